"""The real helm (built by testinfra.controlplane) over charts/prosody-operator: `helm template`
for the tests and tools/chart.py, and the arguments `install`/`upgrade` share with it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from . import controlplane
from .layout import REPO_ROOT
from .procs import MissingPrerequisite

CHART = REPO_ROOT / "charts" / "prosody-operator"


def helm_binary() -> str:
    try:
        return str(controlplane.built_binary("helm"))
    except controlplane.MissingBinary as error:
        raise MissingPrerequisite(str(error)) from None


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), *args], check=check, capture_output=True, text=True, timeout=120
    )


def template_args(
    release: str,
    namespace: str,
    values_files: Iterable[Path] = (),
    set_values: Mapping[str, Any] | None = None,
    chart_dir: Path | None = None,
) -> list[str]:
    """Arguments of `helm template`/`install`/`upgrade` after the verb: release, chart, values
    (`set_values` as JSON, so types survive: `--set-json key=value`)."""
    argv = [release, str(chart_dir or CHART), "--namespace", namespace]
    for path in values_files:
        argv += ["--values", str(path)]
    for key, value in (set_values or {}).items():
        argv += ["--set-json", f"{key}={json.dumps(value)}"]
    return argv


def render(
    release: str,
    namespace: str,
    values_files: Iterable[Path] = (),
    set_values: Mapping[str, Any] | None = None,
    chart_dir: Path | None = None,
    api_versions: Iterable[str] = (),
) -> str:
    """`helm template`: the manifests the chart would install (on a cluster that serves
    `api_versions` too, as `.Capabilities` tells the templates)."""
    argv = template_args(release, namespace, values_files, set_values, chart_dir)
    argv += [f"--api-versions={version}" for version in api_versions]
    return helm("template", *argv).stdout


def render_objects(
    release: str,
    namespace: str,
    values_files: Iterable[Path] = (),
    set_values: Mapping[str, Any] | None = None,
    chart_dir: Path | None = None,
    api_versions: Iterable[str] = (),
) -> list[dict[str, Any]]:
    text = render(release, namespace, values_files, set_values, chart_dir, api_versions)
    return [doc for doc in yaml.safe_load_all(text) if doc]
