"""The exporter against a real Prosody (0.12 and 13) and a real Prometheus, all started here on
loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from testinfra.procs import wait_until
from testinfra.prometheus import PrometheusServer, build_prometheus_config
from testinfra.prosody import ProsodyServer
from testinfra.xmpp import XmppSession, register_account


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


def collections_seen(exporter) -> float:
    """Prosody's own count of statistics collections, as of the exporter's last snapshot."""
    body = httpx.get(exporter.base_url + "/metrics", headers=OM, timeout=5).text
    return sample_value(body, "prosody_stats_collection_seconds_count")


def scrape_repeatedly(url: str, headers: dict[str, str], seconds: float, pause: float) -> int:
    """One scraper: bounded in time and in count (at most seconds/pause requests)."""
    done, deadline = 0, time.monotonic() + seconds
    with httpx.Client(headers=headers, timeout=5) as client:
        while time.monotonic() < deadline and done < int(seconds / pause) + 1:
            assert client.get(url).status_code == 200
            done += 1
            time.sleep(pause)
    return done


def run_scrapers(url: str, count: int, seconds: float) -> int:
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(scrape_repeatedly(url, OM, seconds, 0.05)))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return sum(results)


def test_five_scrapers_cost_prosody_one_collection_per_interval(prosody, start_exporter):
    interval = 1.0
    exporter = start_exporter(prosody.metrics_url, interval=interval)
    before, started = collections_seen(exporter), time.monotonic()
    requests = run_scrapers(exporter.base_url + "/metrics", count=5, seconds=5)
    after, elapsed = collections_seen(exporter), time.monotonic() - started
    intervals = elapsed / interval
    assert requests > 5 * intervals  # far more scrapes than intervals ...
    assert abs((after - before) - intervals) <= 1.5, (before, after, intervals)  # ... one each


def test_scraping_prosody_directly_collects_once_per_request(prosody):
    """The contrast: in manual mode every direct request is a full collection."""
    before = sample_value(
        httpx.get(prosody.metrics_url).text, "prosody_stats_collection_seconds_count"
    )
    requests = run_scrapers(prosody.metrics_url, count=5, seconds=2)
    after = sample_value(
        httpx.get(prosody.metrics_url).text, "prosody_stats_collection_seconds_count"
    )
    assert after - before == requests + 1


def test_numeric_statistics_interval(tmp_path, start_exporter, prosody_version):
    """With Prosody collecting on its own timer, the exporter serves Prosody's values unchanged."""
    with ProsodyServer(
        tmp_path / "prosody", statistics_interval=2, version=prosody_version
    ) as prosody:
        exporter = start_exporter(prosody.metrics_url, interval=0.5)
        direct = httpx.get(prosody.metrics_url).text
        served = httpx.get(exporter.base_url + "/metrics", headers=OM).text
        name = "prosody_stats_collection_seconds_count"
        assert abs(sample_value(direct, name) - sample_value(served, name)) <= 1
        assert "# EOF" in served and served.endswith("# EOF\n")


def c2s_connections(exporter) -> float:
    body = httpx.get(exporter.base_url + "/metrics", headers=OM, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "prosody_mod_c2s__connections"
        for sample in family.samples
    )


def test_xmpp_client_session_shows_in_c2s_connections(prosody, start_exporter):
    register_account(prosody, "alice", "correct horse")
    exporter = start_exporter(prosody.metrics_url, interval=0.5)
    assert c2s_connections(exporter) == 0
    session = XmppSession(prosody, "alice", "correct horse").open()
    try:
        wait_until(lambda: c2s_connections(exporter) >= 1, 10, "the session in c2s connections")
    finally:
        session.close()
    wait_until(lambda: c2s_connections(exporter) == 0, 10, "the session to be gone")
