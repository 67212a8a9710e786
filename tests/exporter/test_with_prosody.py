"""The exporter against a real Prosody 0.12 and a real Prometheus, all started here on loopback."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from testinfra.prometheus import PrometheusServer, build_prometheus_config


def sample_value(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in exposition")


OM = {"Accept": "application/openmetrics-text; version=1.0.0"}


def test_prometheus_scrapes_prosody_through_the_exporter(prosody, start_exporter, tmp_path: Path):
    exporter = start_exporter(prosody.metrics_url)
    target = exporter.base_url.removeprefix("http://")
    with PrometheusServer(tmp_path / "prometheus", build_prometheus_config([target])) as prom:
        series = prom.wait_for_series('prosody_stats_collection_seconds_count{job="prosody"}')
        up = prom.wait_for_series('up{job="prosody"} == 1')
        exporter_up = prom.wait_for_series("prosody_exporter_up == 1")
        [target_info] = prom.active_targets()
    assert series and up and exporter_up
    assert target_info["health"] == "up", target_info
