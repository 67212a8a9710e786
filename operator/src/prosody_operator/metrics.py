"""The operator's own metrics, served on PROSODY_OPERATOR_METRICS_PORT at /metrics (with /readyz
beside it) from a registry of their own.

Other modules count through the functions here (`admission`, `reconcile`, `evaluation`,
`event_posted`, ...), so the names, labels and buckets live in one place; an evaluator run
elsewhere (out of process, say) reports through `record_evaluation`. Label values are from
fixed sets: nothing a user writes becomes a label.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from . import __version__
from .events import Event

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # CPU, memory, open files of the operator's process
PlatformCollector(registry=REGISTRY)

# Admission is milliseconds (the API server waits); a reconcile or an evaluation can take longer.
FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ADMISSIONS = Counter(
    "prosody_operator_admissions",
    "Pods the webhook admitted, by result: injected, skipped (not opted in, not Prosody, "
    "already injected), failed (admitted without the sidecar after an error).",
    ["result"],
    registry=REGISTRY,
)
ADMISSION_SECONDS = Histogram(
    "prosody_operator_admission_duration_seconds",
    "Time the operator took to decide an admission (the API server's call adds its own).",
    buckets=FAST,
    registry=REGISTRY,
)
RECONCILES = Counter(
    "prosody_operator_reconciles",
    "Workload reconciles, by result: changed (wrote, deleted or restarted something), "
    "unchanged, error (retried later).",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "prosody_operator_reconcile_duration_seconds",
    "Time of one workload reconcile: observing, planning and applying.",
    buckets=SLOW,
    registry=REGISTRY,
)
EVALUATIONS = Counter(
    "prosody_operator_config_evaluations",
    "Evaluations of a Prosody config, by result: ok, problems (findings reported as "
    "ProsodyConfig Events), error (the evaluation itself failed).",
    ["result"],
    registry=REGISTRY,
)
EVALUATION_SECONDS = Histogram(
    "prosody_operator_config_evaluation_duration_seconds",
    "Time of one evaluation of a Prosody config.",
    buckets=SLOW,
    registry=REGISTRY,
)
EVENTS = Counter(
    "prosody_operator_events_posted",
    "Kubernetes Events the operator posted, by type and reason.",
    ["type", "reason"],
    registry=REGISTRY,
)
EVENT_FAILURES = Counter(
    "prosody_operator_event_post_failures",
    "Kubernetes Events the API server refused (the work they report on went on).",
    registry=REGISTRY,
)
LEADER = Gauge(
    "prosody_operator_leader",
    "1 while this replica reconciles (holds the Lease, or runs without leader election).",
    registry=REGISTRY,
)
LEADER_TRANSITIONS = Counter(
    "prosody_operator_leader_transitions",
    "Times this replica started or stopped reconciling.",
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "prosody_operator_build_info",
    "Always 1; the operator's version as a label.",
    ["version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__).set(1)

# Workload states (a workload can be in several): what the leader's last reconcile found.
INJECTED = "injected"  # its running pods have the sidecar (or it has none yet)
SIDECAR_MISSING = "sidecar_missing"  # SidecarMissing or WebhookNotCalled
NOT_SELECTED = "not_selected"  # no Prometheus selects its ServiceMonitor
CONFIG_PROBLEM = "config_problem"  # ProsodyConfig or InvalidAnnotation
STATES = (INJECTED, SIDECAR_MISSING, NOT_SELECTED, CONFIG_PROBLEM)
_STATE_OF_REASON = {
    "SidecarMissing": SIDECAR_MISSING,
    "WebhookNotCalled": SIDECAR_MISSING,
    "NotSelectedByPrometheus": NOT_SELECTED,
    "ProsodyConfig": CONFIG_PROBLEM,
    "InvalidAnnotation": CONFIG_PROBLEM,
}
# Every reconcile of a workload the operator monitors ends with exactly one of these.
_MONITORED = frozenset({"SelectedByPrometheus", "NotSelectedByPrometheus"})


def workload_states(events: Iterable[Event]) -> frozenset[str]:
    """The states a reconcile's Events put a workload in; none for one not monitored."""
    reasons = {event.reason for event in events}
    if not reasons & _MONITORED:
        return frozenset()
    states = {_STATE_OF_REASON[reason] for reason in reasons if reason in _STATE_OF_REASON}
    if SIDECAR_MISSING not in states:
        states.add(INJECTED)
    return frozenset(states)


class WorkloadStates(Collector):
    """prosody_operator_workloads{state}: how many workloads are in each state."""

    def __init__(self) -> None:
        self._states: dict[Any, frozenset[str]] = {}
        self._lock = threading.Lock()

    def set(self, key: Any, states: frozenset[str]) -> None:
        with self._lock:
            if states:
                self._states[key] = states
            else:
                self._states.pop(key, None)

    def forget(self, key: Any) -> None:
        self.set(key, frozenset())

    def clear(self) -> None:
        """Another replica reconciles now: its figures are the ones to read."""
        with self._lock:
            self._states.clear()

    def counts(self) -> dict[str, int]:
        with self._lock:
            found = list(self._states.values())
        return {state: sum(1 for states in found if state in states) for state in STATES}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "prosody_operator_workloads",
            "Monitored workloads by state, as the reconciling replica last saw them: injected, "
            "sidecar_missing, not_selected (by any Prometheus), config_problem.",
            labels=["state"],
        )
        for state, count in self.counts().items():
            family.add_metric([state], count)
        yield family


class Sizes(Collector):
    """prosody_operator_cache_entries{cache}: the operator's in-memory indexes and caches, from
    functions registered by the modules that own them."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], int]] = {}

    def register(self, cache: str, size: Callable[[], int]) -> None:
        self._sources[cache] = size

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "prosody_operator_cache_entries",
            "Entries in the operator's indexes and caches (kopf's indexes, the Event log's "
            "memory, the reconcile queue).",
            labels=["cache"],
        )
        for cache, size in sorted(self._sources.items()):
            family.add_metric([cache], size())
        yield family


WORKLOADS = WorkloadStates()
REGISTRY.register(WORKLOADS)
SIZES = Sizes()
REGISTRY.register(SIZES)


# --- counting -------------------------------------------------------------------------------


def record_evaluation(result: str, seconds: float) -> None:
    """One config evaluation: result `ok`, `problems` or `error`."""
    EVALUATIONS.labels(result).inc()
    EVALUATION_SECONDS.observe(seconds)


def counted(evaluate: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An evaluator that records each evaluation: its result (findings make it `problems`) and
    its duration."""

    def evaluate_counted(inputs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = evaluate(inputs)
        except Exception:
            record_evaluation("error", time.perf_counter() - started)
            raise
        outcome = "problems" if getattr(result, "findings", ()) else "ok"
        record_evaluation(outcome, time.perf_counter() - started)
        return result

    return evaluate_counted


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


def event_posted(event: Event, posted: bool) -> None:
    if posted:
        EVENTS.labels(event.type, event.reason).inc()
    else:
        EVENT_FAILURES.inc()


_leading = [False]


def set_leader(leading: bool) -> None:
    if _leading[0] != leading:
        LEADER_TRANSITIONS.inc()
        _leading[0] = leading
    LEADER.set(1 if leading else 0)


# --- serving --------------------------------------------------------------------------------


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape and probe would drown the operator's log


def serve(
    port: int, ready: Callable[[], bool], host: str = "0.0.0.0"
) -> tuple[WSGIServer, threading.Thread]:
    """/metrics, and /readyz (200 while `ready()`, else 503), in a thread of their own."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: Mapping[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/readyz":
            ok = ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ok\n" if ok else b"not ready\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
