"""The exporter's own metrics, all prefixed `prosody_exporter_`, in a registry of their own."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .access import DenyReason
from .exposition import Format
from .upstream import ErrorReason

PREFIX = "prosody_exporter_"


class SnapshotState(Collector):
    """Values read from the keeper at scrape time, so they are never out of date."""

    def __init__(self, read: Callable[[], tuple[float, bool]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        age, stale = self._read()
        yield GaugeMetricFamily(
            PREFIX + "snapshot_age_seconds",
            "Seconds since the snapshot being served was collected (NaN before the first).",
            value=age,
        )
        yield GaugeMetricFamily(
            PREFIX + "snapshot_stale",
            "1 when the last good snapshot is older than the staleness limit and is not served.",
            value=float(stale),
        )


class SelfMetrics:
    def __init__(self) -> None:
        # `_created` samples of our own counters double their size and say only when the
        # process started, which process_start_time-style metrics tell better.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.up = Gauge(
            PREFIX + "up", "1 if the last collection from Prosody succeeded.", registry=r
        )
        self.last_success = Gauge(
            PREFIX + "last_success_timestamp_seconds",
            "Unix time of the last successful collection.",
            registry=r,
        )
        self.collect_duration = Histogram(
            PREFIX + "collect_duration_seconds",
            "Time taken by one collection from Prosody, including parsing.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.upstream_errors = Counter(
            PREFIX + "upstream_errors",
            "Failed collections from Prosody, by reason.",
            ["reason"],
            registry=r,
        )
        self.denied = Counter(
            PREFIX + "denied_requests",
            "Requests refused by the CIDR allowlist, by reason.",
            ["reason"],
            registry=r,
        )
        self.scrapes = Counter(
            PREFIX + "scrapes",
            "Metrics responses served, by format.",
            ["format"],
            registry=r,
        )
        build = Gauge(
            PREFIX + "build_info",
            "Always 1; labels say what is running.",
            ["version", "python_version"],
            registry=r,
        )
        build.labels(__version__, platform.python_version()).set(1)
        # Every reason shows up as 0 from the start, so rate() and alerts work before a failure.
        for reason in ErrorReason:
            self.upstream_errors.labels(reason.value)
        for fmt in Format:
            self.scrapes.labels(fmt.name.lower())
        for deny in DenyReason:
            self.denied.labels(deny.value)

    def watch_snapshot(self, read: Callable[[], tuple[float, bool]]) -> None:
        self.registry.register(SnapshotState(read))
