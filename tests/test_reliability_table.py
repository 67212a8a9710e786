"""The README's Reliability table names tests that exist (a renamed test would leave it lying)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def table_cells() -> list[str]:
    """The last cell (the tests) of each row of the table."""
    section = (REPO / "README.md").read_text().split("### Reliability", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    return [row.rstrip(" |").rsplit(" | ", 1)[-1] for row in rows]


def test_every_test_the_table_names_exists() -> None:
    files = {path.relative_to(REPO).as_posix(): path for path in (REPO / "tests").rglob("*.py")}
    functions = {
        node.name
        for path in files.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    named = []
    for cell in table_cells():
        for path in re.findall(r"`([\w/]+\.py)", cell):
            # Bare file names are in tests/operator, as the table says.
            assert path in files or f"tests/operator/{path}" in files, path
            named.append(path)
        for name in re.findall(r"::(\w+)(\*?)`", cell):
            function, wildcard = name
            assert any(f == function or (wildcard and f.startswith(function)) for f in functions)
            named.append(function)
    assert len(named) >= 20, named
