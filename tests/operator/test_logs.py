"""The operator's log lines (logs.py), text and JSON, through the real logging module; the real
operator's JSON log is read in test_high_availability.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from prosody_operator import logs


@pytest.fixture
def root_logger() -> Iterator[None]:
    """configure() replaces the root logger's handlers and level: put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def log_lines(log_format: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    logs.configure(log_format, "info")
    log = logging.getLogger("prosody_operator")
    log.info("reconciled: Service applied", extra=logs.about("Deployment", "chat", "xmpp"))
    log.info("Node CIDRs changed", extra=logs.about("Node", None, "node-1"))
    try:
        raise ValueError("the API server said no")
    except ValueError:
        log.exception("injection failed", extra=logs.about("Pod", "chat", "xmpp-7d9f"))
    log.info("leading")
    logging.getLogger("kopf.objects").info("handled an event")  # chatty: left out at info
    return capsys.readouterr().err.splitlines()


def test_json_lines_name_the_object_they_are_about(root_logger, capsys):
    lines = [json.loads(line) for line in log_lines("json", capsys)]
    assert [line["message"] for line in lines] == [
        "reconciled: Service applied",
        "Node CIDRs changed",
        "injection failed",
        "leading",
    ]
    about = [{k: line.get(k) for k in ("kind", "namespace", "name")} for line in lines]
    assert about == [
        {"kind": "Deployment", "namespace": "chat", "name": "xmpp"},
        {"kind": "Node", "namespace": None, "name": "node-1"},  # cluster-scoped: no namespace
        {"kind": "Pod", "namespace": "chat", "name": "xmpp-7d9f"},
        {"kind": None, "namespace": None, "name": None},
    ]
    assert "ValueError: the API server said no" in lines[2]["exception"]
    assert {line["level"] for line in lines} == {"info", "error"}
    assert {line["logger"] for line in lines} == {"prosody_operator"}


def test_text_lines_start_with_the_object_they_are_about(root_logger, capsys):
    lines = [line for line in log_lines("text", capsys) if " prosody_operator: " in line]
    messages = [line.split(" prosody_operator: ", 1)[1] for line in lines]
    assert messages == [
        "[chat/xmpp] reconciled: Service applied",
        "[node-1] Node CIDRs changed",
        "[chat/xmpp-7d9f] injection failed",
        "leading",
    ]
