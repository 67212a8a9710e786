"""The README's main command: `make demo` (here with --once, as CI runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_shows_live_prosody_metrics_through_the_sidecar():
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--once"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "health=up" in result.stdout, result.stdout
    assert "sum(prosody_mod_c2s__connections) = 1" in result.stdout, result.stdout
    assert "prosody_exporter_up = 1" in result.stdout, result.stdout
