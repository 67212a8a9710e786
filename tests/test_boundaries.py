"""One module per package talks to the outside world (like kopf's .importlinter contract):
only prosody_operator.kube imports the Kubernetes client, only prosody_exporter.upstream the
HTTP client. Everything else decides, and is testable without a cluster or a Prosody. And the
top-level folders depend on each other one way only."""

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


# Top-level folders, by the names they are imported under.
FOLDERS = {
    "prosody_operator": "operator/src/prosody_operator",
    "prosody_exporter": "exporter/src/prosody_exporter",
    "testinfra": "testinfra",
    "tools": "tools",
    "bench": "bench",
    "demo": "demo",
    "tests": "tests",
}


def folder_imports() -> dict[str, set[str]]:
    """Which other top-level folders each one imports."""
    return {
        name: {
            imported
            for path in (REPO / folder).rglob("*.py")
            for imported in imported_modules(path) & FOLDERS.keys()
            if imported != name
        }
        for name, folder in FOLDERS.items()
    }


def test_no_import_cycle_between_top_level_folders():
    graph = folder_imports()

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            node == goal or (node not in seen and reaches(node, goal, seen | {node}))
            for node in graph[start]
        )

    cycles = sorted(name for name in graph if reaches(name, name))
    assert cycles == [], {name: sorted(graph[name]) for name in cycles}
    assert not graph["prosody_operator"] and not graph["prosody_exporter"]
