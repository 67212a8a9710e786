"""Fixtures for the control-plane tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testinfra.webhook import LabellingWebhook


@pytest.fixture
def labelling_webhook(control_plane: None) -> Iterator[LabellingWebhook]:
    """An HTTPS mutating webhook on 127.0.0.1 with a certificate the API server trusts."""
    with LabellingWebhook() as webhook:
        yield webhook
