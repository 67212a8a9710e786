"""No Docker engine runs here, so the images are checked by what they install: the same pins the
tests ran with."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)")


def pins(requirements: Path) -> dict[str, str]:
    found = {}
    for line in requirements.read_text().splitlines():
        if match := PIN.match(line.strip()):
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]  # PEP 503 names
    return found


@pytest.mark.parametrize(
    ("dockerfile", "requirements"),
    [
        ("exporter/Dockerfile", "requirements/exporter.txt"),
        ("operator/Dockerfile", "requirements/operator.txt"),
    ],
)
def test_image_installs_the_pins_the_tests_ran_with(dockerfile, requirements):
    text = (REPO / dockerfile).read_text()
    assert f"-r /src/{requirements}" in text and "-c /src/requirements/constraints.txt" in text
    assert re.search(r"^USER \d+:\d+$", text, re.MULTILINE), "non-root numeric user"
    pinned = pins(REPO / requirements)
    assert pinned, requirements
    for name, pinned_version in pinned.items():
        assert version(name) == pinned_version, f"{name}: tests ran {version(name)}"
    constraints = pins(REPO / "requirements/constraints.txt")
    for name, pinned_version in pinned.items():
        assert constraints[name] == pinned_version, name
