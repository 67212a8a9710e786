"""The README documents every setting and every metric the exporter really has."""

from __future__ import annotations

from pathlib import Path

from prosody_exporter.selfmetrics import SelfMetrics
from prosody_exporter.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`{ENV_PREFIX}{name.upper()}`" in README, name
        assert f"`--{name.replace('_', '-')}`" in README, name


def test_every_self_metric_is_documented():
    metrics = SelfMetrics()
    metrics.watch_snapshot(lambda: (0.0, False))
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in README, name
