"""Fixtures for the exporter's tests: real Prosody, the real exporter process, real Prometheus."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testinfra.exporter import ExporterProcess
from testinfra.prosody import VERSIONS, ProsodyServer


@pytest.fixture(params=VERSIONS, ids=[f"prosody-{version}" for version in VERSIONS])
def prosody_version(request: pytest.FixtureRequest) -> str:
    """Each test that runs a real Prosody runs once per supported version."""
    return str(request.param)


@pytest.fixture
def prosody(tmp_path: Path, prosody_version: str) -> Iterator[ProsodyServer]:
    """Prosody in "manual" mode: every request to its /metrics runs a collection."""
    with ProsodyServer(
        tmp_path / "prosody", statistics_interval="manual", version=prosody_version
    ) as server:
        yield server


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def start(upstream_url: str, wait_for_ready: bool = True, **kwargs: object) -> ExporterProcess:
        exporter = ExporterProcess(tmp_path, upstream_url, **kwargs)  # type: ignore[arg-type]
        started.append(exporter)
        return exporter.start(wait_for_ready=wait_for_ready)

    yield start
    for exporter in started:
        exporter.stop()
