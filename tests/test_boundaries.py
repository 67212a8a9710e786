"""One module per package talks to the outside world (like kopf's .importlinter contract):
only prosody_operator.kube imports the Kubernetes client, only prosody_exporter.upstream the
HTTP client. Everything else decides, and is testable without a cluster or a Prosody."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "client", "allowed"),
    [
        ("operator/src/prosody_operator", "kubernetes", {"kube.py"}),
        ("exporter/src/prosody_exporter", "httpx", {"upstream.py"}),
        ("exporter/src/prosody_exporter", "kubernetes", set()),
        ("exporter/src/prosody_exporter", "kopf", set()),
    ],
)
def test_only_one_module_imports_the_client(package, client, allowed):
    importers = {
        path.name for path in (REPO / package).glob("*.py") if client in imported_modules(path)
    }
    assert importers == allowed
