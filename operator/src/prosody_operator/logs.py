"""The operator's log: text or JSON lines (PROSODY_OPERATOR_LOG_FORMAT) at a level
(PROSODY_OPERATOR_LOG_LEVEL), the same keys as the exporter's. A line about an object names it:
`extra=about(...)` in the operator's calls, and kopf's object loggers carry the same reference
(`k8s_ref`), so kopf's own lines about objects are named the same way.

    text: 2026-01-01 12:00:00,000 INFO prosody_operator: [chat/xmpp] reconciled: ...
    json: {"time": "...", "level": "info", "logger": "prosody_operator", "message": "...",
           "kind": "Deployment", "namespace": "chat", "name": "xmpp"}
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

REF = "k8s_ref"  # the record attribute kopf's ObjectLogger uses for the object

# Loggers that say, at INFO, what is only worth a look when debugging: kopf logs every handled
# event and aiohttp every webhook call.
CHATTY = ("kopf.objects", "aiohttp.access")


def about(kind: str, namespace: str | None, name: str) -> dict[str, Any]:
    """`extra=` for a log line about an object."""
    return {REF: {"kind": kind, "namespace": namespace or "", "name": name}}


def _ref(record: logging.LogRecord) -> Mapping[str, Any] | None:
    ref = getattr(record, REF, None)
    return ref if isinstance(ref, Mapping) else None


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        ref = _ref(record)
        if ref is not None:
            namespace, name = ref.get("namespace"), ref.get("name")
            record.message = f"[{namespace}/{name}] {record.message}" if namespace else (
                f"[{name}] {record.message}"
            )  # fmt: skip
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = _ref(record)
        if ref is not None:
            entry.update({k: ref.get(k) for k in ("kind", "namespace", "name") if ref.get(k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(log_format: str, level: str) -> None:
    """The one handler on the root logger (kopf's and aiohttp's lines go through it too)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # kopf's configure() would add its own handler; asyncio's debug lines only when debugging.
    logging.getLogger("asyncio").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
