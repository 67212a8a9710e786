"""The operator's distribution ships the config evaluation's Lua files (package data): the wheel
that the operator image installs (its Dockerfile runs `pip install /src/operator`, which builds
one) and the sdist both contain them, and the installed wheel evaluates configs in both
dialects. Built with the venv's setuptools, through the same PEP 517 hooks pip calls."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LUA_FILES = {"driver.lua", "configmanager-0.12.lua", "configmanager-13.lua"}

# One process per build: setuptools keeps state between them.
BUILD = """
import sys
from setuptools import build_meta
print("BUILT", getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""

EVALUATE = """
import prosody_operator
from prosody_operator.prosody_config import evaluate_prosody_config
assert prosody_operator.__file__.startswith(__import__("sys").argv[1]), prosody_operator.__file__
config = 'modules_enabled = { "http_openmetrics" }\\nstatistics_interval = Lua.tonumber("30")\\n'
for dialect in ("0.12", "13"):
    print(dialect, evaluate_prosody_config({"prosody.cfg.lua": config}, dialect=dialect).interval)
"""


def build(source: Path, hook: str, dist: Path) -> str:
    built = subprocess.run(
        [sys.executable, "-c", BUILD, hook, str(dist)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    [line] = [line for line in built.stdout.splitlines() if line.startswith("BUILT ")]
    return line.split()[1]


def test_wheel_and_sdist_ship_the_lua_files(tmp_path: Path) -> None:
    source = tmp_path / "operator"
    shutil.copytree(REPO / "operator", source, ignore=shutil.ignore_patterns("*.egg-info"))
    dist = tmp_path / "dist"
    dist.mkdir()
    wheel_name, sdist_name = (build(source, hook, dist) for hook in ("build_wheel", "build_sdist"))

    with zipfile.ZipFile(dist / wheel_name) as wheel:
        in_wheel = {Path(name).name for name in wheel.namelist() if "/lua/" in name}
        wheel.extractall(tmp_path / "installed")
    with tarfile.open(dist / sdist_name) as sdist:
        in_sdist = {Path(name).name for name in sdist.getnames() if "/lua/" in name}
    assert in_wheel == LUA_FILES
    assert in_sdist == LUA_FILES

    installed = tmp_path / "installed"
    evaluated = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(installed)!r})\n"
         + EVALUATE, str(installed)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    assert evaluated.stdout.split("\n")[:2] == ["0.12 None", "13 30.0"]
