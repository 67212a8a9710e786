"""The README's main command: `make demo` (here with --once, as CI runs it): the whole chain on the
test node, helm install -> operator pod -> injected pod -> prometheus-operator -> Prometheus pod ->
sidecar -> Prosody."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testinfra.node import Node
from tools import chart

# The demo reuses the session's control plane and node (it would start them itself).
pytestmark = [pytest.mark.cluster, pytest.mark.node]

REPO = Path(__file__).resolve().parent.parent


def test_demo_shows_live_prosody_metrics_through_the_sidecar(node: Node):
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--once"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # helm installed the chart; its operator pod runs and its webhook has the operator's CA.
    out = result.stdout
    release = r"helm release prosody-operator-\w+ \(prosody-operator-\S+, .*\): deployed"
    assert re.search(release, out), out
    assert re.search(r"operator pod \S+: Running, IP 198\.18\.[\d.]+, ready=True", out), out
    # The pods run on the node, from the images built here, the sidecar under its memory limit.
    assert f"node {node.name}" in out, out
    assert re.search(r"container prosody \(localhost/prosody:0\.12[\d.]*\) ready=True", out), out
    sidecar = r"container prosody-exporter \(\S+prosody-exporter:\S+\) ready=True, restarts 0, "
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    limit = values["sidecar"]["resources"]["limits"]["memory"]  # the chart's default
    assert re.search(sidecar + f"memory limit {limit}", out), out
    assert "caBundle set by the operator" in result.stdout, result.stdout
    assert "health=up" in result.stdout, result.stdout
    assert "sum(prosody_mod_c2s__connections) = 1" in result.stdout, result.stdout
    assert "prosody_exporter_up = 1" in result.stdout, result.stdout
    # The ServiceMonitor's interval is the sidecar's in manual mode, and prometheus-operator's
    # generated job uses it.
    assert "ServiceMonitor xmpp-prosody-metrics: interval 2s" in result.stdout, result.stdout
    assert "PROSODY_EXPORTER_INTERVAL=2s" in result.stdout, result.stdout
    assert "-prosody-metrics/0: scrape_interval 2s" in result.stdout, result.stdout
