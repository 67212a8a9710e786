"""Benchmark: the prosody-operator's admission webhook and reconciler against a real control plane.

`make bench-operator` runs it (`python -m bench.operator [--pods N] [--deployments N] ...`).
Everything is real and on 127.0.0.1: the testinfra control plane (etcd, kube-apiserver v1.34,
kube-controller-manager; started here when it is not up, and then stopped at the end) and the
installed `prosody-operator` as a process with the Helm chart's ServiceAccount and RBAC
(testinfra/operator.py). A Node with spec.podCIDRs exists for the run (the webhook's normal path),
and every pod mounts a ConfigMap holding a prosody.cfg.lua (the webhook reads it to pick the
sidecar's interval, as for a real Deployment).

1. Webhook admission latency, from kube-apiserver's own histogram
   `apiserver_admission_webhook_admission_duration_seconds` (GET /metrics with the admin client
   certificate; name="inject.prosody-operator.io", type="admit", operation="CREATE", both
   `rejected` values summed): bucket deltas over --pods pod creations, p50/p99 by linear
   interpolation within a bucket as Prometheus' histogram_quantile does, and the exact mean from
   the _sum/_count deltas. The API server's buckets are coarse (5 ms, 25 ms, 100 ms, ...): a p99
   interpolated inside the 5-25 ms bucket is only as good as that bucket, so the share of calls
   <= 5 ms is reported too. Baseline, same run: client-observed pod CREATE latency with the
   `prosody-operator.io/inject: "true"` label (sent to the webhook) and without it (the
   webhook's objectSelector skips it), interleaved one by one so that load changes hit both.
2. Time from an annotated Deployment's CREATE request to its ServiceMonitor being present (the
   ADDED event on a watch of the namespace's ServiceMonitors, opened before the first create),
   over --deployments Deployments created by --concurrency threads.
3. The operator's memory (/proc/PID/status VmRSS and VmHWM) after start and after the runs,
   and the CPU time the operator and kube-apiserver used in each phase (/proc/PID/stat).

Every phase is bounded by --time-limit seconds (the counts reached are reported). Everything
created is deleted at the end: the bench namespace (pods, Deployments, ConfigMap, and with them
the operator's Services and ServiceMonitors), the Node and the operator's identity (namespace,
ClusterRole, ClusterRoleBinding, MutatingWebhookConfiguration).

Results go to stdout as tables and to .cache/results/bench-operator.json, whose keys are:

- machine: cpus (usable cores), cpu_model, python, kubernetes (the API server's /version
  gitVersion), loadavg_start and loadavg_end (1/5/15 min), control_plane_started_here (bool),
  other_webhook_configurations (names of other MutatingWebhookConfigurations holding a webhook
  named inject.prosody-operator.io: another operator, e.g. a concurrent test run, also gets our
  pods and feeds the same histogram), other_namespaces (namespaces other than the system ones
  at start: tests or benchmarks running concurrently on the same control plane).
- settings: pods, deployments, concurrency, warmup_pods, time_limit_s, webhook_name.
- webhook: calls (histogram count delta), expected_calls (labelled pods created), rejected
  (calls with rejected="true": webhook errors, admitted anyway under failurePolicy Ignore),
  p50_ms, p99_ms (interpolated), mean_ms (sum/count), share_le_5ms, buckets (list of
  {le, count}: per-bucket deltas, not cumulative; le in seconds, "+Inf" last).
- create_latency: labelled and unlabelled, each {n, p50_ms, p99_ms, mean_ms, max_ms, errors}
  (client-observed pod CREATE round trips over one keep-alive HTTPS connection), plus
  p50_ratio, p99_ratio (labelled / unlabelled) and added_p50_ms (labelled p50 - unlabelled p50).
- service_monitor: n (Deployments created), found (ServiceMonitors seen), concurrency, p50_s,
  p99_s, mean_s, max_s, wall_s (first create to last ServiceMonitor).
- operator_memory_kib: after_start and after_runs, each {VmRSS, VmHWM}; pid.
- cpu: webhook and service_monitor (the two phases, the webhook's warm-up included), each
  {wall_s, operator_s, apiserver_s}: CPU seconds (user + system) the operator and kube-apiserver
  used during the phase.
- operator_log: lines, errors (lines at ERROR level or with a Traceback).
- targets: name, goal, measured (text), passed (bool).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client, config
from prometheus_client.parser import text_string_to_metric_families

from bench.report import (
    format_table,
    memory_kib,
    percentile,
    target,
    targets_table,
    write_results,
)
from bench.report import machine as machine_basics
from testinfra import controlplane
from testinfra.kubeapi import create_namespace, namespace_gone, or_none
from testinfra.layout import CACHE_DIR
from testinfra.operator import OperatorProcess
from testinfra.procs import MissingPrerequisite, wait_until
from testinfra.workloads import INJECT, prosody_deployment, prosody_pod

WORKDIR = CACHE_DIR / "bench-operator"

WEBHOOK_NAME = "inject.prosody-operator.io"
WEBHOOK_METRIC = "apiserver_admission_webhook_admission_duration_seconds"
NODE_CIDRS = ["198.18.64.0/24", "2001:db8:64::/64"]
PROSODY_CONFIG = """\
modules_enabled = { "http_openmetrics", "roster" }
statistics = "internal"
statistics_interval = 45
VirtualHost "example.test"
"""
SM_API = "/apis/monitoring.coreos.com/v1"

# Targets the operator is held to.
MAX_WEBHOOK_P99_MS = 20.0
MAX_SERVICE_MONITOR_P50_S = 1.0


# --- the API, over plain HTTPS with the admin certificate --------------------------------------


class Api:
    """Raw HTTPS to the API server as admin: no client-library overhead in what is timed."""

    def __init__(self) -> None:
        self.base = controlplane.apiserver_url(controlplane.Ports.load())
        self.context: ssl.SSLContext = controlplane.admin_tls_context()
        self._local = threading.local()

    def http(self) -> httpx.Client:
        """One keep-alive connection per thread."""
        found: httpx.Client | None = getattr(self._local, "client", None)
        if found is None:
            found = httpx.Client(base_url=self.base, verify=self.context, timeout=30.0)
            self._local.client = found
        return found

    def get_json(self, path: str) -> dict[str, Any]:
        response = self.http().get(path)
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http().post(path, json=body)

    def metrics_text(self) -> str:
        response = self.http().get("/metrics")
        response.raise_for_status()
        return response.text


# --- objects ------------------------------------------------------------------------------------


def pod(name: str, labelled: bool) -> dict[str, Any]:
    """The same pod either way; only the label decides whether the API server calls the webhook."""
    labels = {"bench": "operator", **({INJECT: "true"} if labelled else {})}
    return prosody_pod(name, "prosody", labels=labels)


# --- statistics ---------------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs, +Inf last."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank:
            if math.isinf(upper_bound):  # the +Inf bucket: the highest finite bound
                return lower_bound
            if count == lower_count:
                return upper_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = upper_bound, count
    return lower_bound


class Histogram:
    """The webhook's admission histogram at one moment: cumulative buckets, sum, count."""

    def __init__(self, text: str) -> None:
        self.buckets: dict[float, float] = {}
        self.sum = self.count = self.rejected = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != WEBHOOK_METRIC:
                continue
            for sample in family.samples:
                labels = sample.labels
                if (labels.get("name"), labels.get("type"), labels.get("operation")) != (
                    WEBHOOK_NAME,
                    "admit",
                    "CREATE",
                ):
                    continue
                if sample.name.endswith("_bucket"):
                    le = float(labels["le"])
                    self.buckets[le] = self.buckets.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    self.sum += sample.value
                elif sample.name.endswith("_count"):
                    self.count += sample.value
                    if labels.get("rejected") == "true":
                        self.rejected += sample.value

    def minus(self, before: Histogram) -> dict[str, Any]:
        bounds = sorted(self.buckets)
        cumulative = [(le, self.buckets[le] - before.buckets.get(le, 0.0)) for le in bounds]
        calls = self.count - before.count
        per_bucket, previous = [], 0.0
        for le, count in cumulative:
            per_bucket.append({"le": "+Inf" if math.isinf(le) else le, "count": count - previous})
            previous = count
        le_5ms = next((count for le, count in cumulative if le == 0.005), math.nan)
        return {
            "calls": calls,
            "rejected": self.rejected - before.rejected,
            "p50_ms": histogram_quantile(0.5, cumulative) * 1000,
            "p99_ms": histogram_quantile(0.99, cumulative) * 1000,
            "mean_ms": (self.sum - before.sum) / calls * 1000 if calls else math.nan,
            "share_le_5ms": le_5ms / calls if calls else math.nan,
            "buckets": per_bucket,
        }


def summary_ms(seconds: Sequence[float], errors: int) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p99_ms": percentile(ms, 0.99),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "max_ms": max(ms, default=math.nan),
        "errors": errors,
    }


# --- part 1: the webhook ------------------------------------------------------------------------


def create_pods(
    api: Api, namespace: str, prefix: str, count: int, deadline: float
) -> dict[str, Any]:
    """Labelled and unlabelled pods alternately, one at a time; client round trips timed."""
    timings: dict[bool, list[float]] = {True: [], False: []}
    errors = {True: 0, False: 0}
    path = f"/api/v1/namespaces/{namespace}/pods"
    for i in range(count):
        if time.monotonic() > deadline:
            break
        for labelled in (True, False) if i % 2 == 0 else (False, True):
            body = pod(f"{prefix}-{'w' if labelled else 'b'}-{i:04d}", labelled)
            started = time.perf_counter()
            response = api.post(path, body)
            elapsed = time.perf_counter() - started
            if response.status_code == 201:
                timings[labelled].append(elapsed)
            else:
                errors[labelled] += 1
    return {"timings": timings, "errors": errors}


def bench_webhook(api: Api, namespace: str, args: argparse.Namespace) -> dict[str, Any]:
    # Warm-up (connections, the operator's indexes, its thread pool), outside the deltas.
    create_pods(api, namespace, "warm", args.warmup_pods, time.monotonic() + args.time_limit)
    before = Histogram(api.metrics_text())
    run = create_pods(api, namespace, "pod", args.pods, time.monotonic() + args.time_limit)
    after = Histogram(api.metrics_text())
    webhook = after.minus(before)
    webhook["expected_calls"] = len(run["timings"][True]) + run["errors"][True]
    labelled = summary_ms(run["timings"][True], run["errors"][True])
    unlabelled = summary_ms(run["timings"][False], run["errors"][False])
    latency = {
        "labelled": labelled,
        "unlabelled": unlabelled,
        "p50_ratio": labelled["p50_ms"] / unlabelled["p50_ms"],
        "p99_ratio": labelled["p99_ms"] / unlabelled["p99_ms"],
        "added_p50_ms": labelled["p50_ms"] - unlabelled["p50_ms"],
    }
    return {"webhook": webhook, "create_latency": latency}


# --- part 2: Deployment -> ServiceMonitor -------------------------------------------------------


class ServiceMonitorWatch(threading.Thread):
    """Records when each ServiceMonitor of the namespace is first seen (ADDED on a watch)."""

    def __init__(self, api: Api, namespace: str, expected: set[str], deadline: float) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace, self.expected = api, namespace, expected
        self.deadline = deadline
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        path = f"{SM_API}/namespaces/{self.namespace}/servicemonitors"
        try:
            with httpx.Client(base_url=self.api.base, verify=self.api.context) as http:
                version = http.get(path).json()["metadata"]["resourceVersion"]
                while not self.expected <= set(self.seen) and time.monotonic() < self.deadline:
                    version = self._watch(http, path, version)
        except BaseException as error:  # reported by the main thread
            self.error = error
        finally:
            self.ready.set()

    def _watch(self, http: httpx.Client, path: str, version: str) -> str:
        remaining = max(1, math.ceil(self.deadline - time.monotonic()))
        params = {"watch": "true", "resourceVersion": version, "timeoutSeconds": str(remaining)}
        timeout = httpx.Timeout(10.0, read=remaining + 10.0)
        with http.stream("GET", path, params=params, timeout=timeout) as response:
            response.raise_for_status()
            self.ready.set()
            for line in response.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":  # e.g. 410 Gone: start again from a fresh list
                    return str(http.get(path).json()["metadata"]["resourceVersion"])
                version = obj["metadata"]["resourceVersion"]
                name = obj["metadata"]["name"]
                if event["type"] in ("ADDED", "MODIFIED") and name not in self.seen:
                    self.seen[name] = time.perf_counter()
                if self.expected <= set(self.seen):
                    break
        return version


def bench_service_monitors(api: Api, namespace: str, args: argparse.Namespace) -> dict[str, Any]:
    names = [f"xmpp-{i:03d}" for i in range(args.deployments)]
    deadline = time.monotonic() + args.time_limit
    watch = ServiceMonitorWatch(
        api, namespace, {f"{name}-prosody-metrics" for name in names}, deadline
    )
    watch.start()
    watch.ready.wait(30)
    created: dict[str, float] = {}
    lock = threading.Lock()
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments"

    def create(name: str) -> None:
        if time.monotonic() > deadline:
            return
        started = time.perf_counter()
        response = api.post(path, prosody_deployment(name, "prosody"))
        if response.status_code == 201:
            with lock:
                created[name] = started

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(create, names))
    watch.join(max(0.0, deadline - time.monotonic()) + 15)
    if watch.error is not None:
        raise RuntimeError(f"ServiceMonitor watch failed: {watch.error!r}")
    delays = [
        watch.seen[f"{name}-prosody-metrics"] - started
        for name, started in created.items()
        if f"{name}-prosody-metrics" in watch.seen
    ]
    wall = (max(watch.seen.values()) - min(created.values())) if delays else math.nan
    return {
        "n": len(created),
        "found": len(delays),
        "concurrency": args.concurrency,
        "p50_s": percentile(delays, 0.5),
        "p99_s": percentile(delays, 0.99),
        "mean_s": sum(delays) / len(delays) if delays else math.nan,
        "max_s": max(delays, default=math.nan),
        "wall_s": wall,
    }


# --- setup and cleanup --------------------------------------------------------------------------


@contextlib.contextmanager
def control_plane() -> Iterator[bool]:
    """The control plane up; stopped at the end only if started here."""
    try:
        started_here = controlplane.up()
    except controlplane.ControlPlaneError as error:
        raise SystemExit(f"bench.operator: the control plane did not start: {error}") from None
    try:
        yield started_here
    finally:
        if started_here:
            controlplane.stop()


@contextlib.contextmanager
def node(core: client.CoreV1Api) -> Iterator[str]:
    """A Node whose spec.podCIDRs the sidecar's allowlist is built from."""
    name = f"bench-node-{uuid.uuid4().hex[:6]}"
    core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1NodeSpec(pod_cidr=NODE_CIDRS[0], pod_cidrs=NODE_CIDRS),
        )
    )
    try:
        yield name
    finally:
        or_none(lambda: core.delete_node(name))


@contextlib.contextmanager
def operator(api_client: client.ApiClient) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        api_client,
        WORKDIR / "operator",
        settings={
            "exporter_image": "registry.test/prosody-exporter:bench",
            "service_monitor_labels": "release=kube-prometheus-stack",
        },
    )
    try:
        process.install_identity()
        process.start()
        yield process
    finally:
        process.uninstall()
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: namespace_gone(api_client, process.namespace), 60, "the operator namespace"
            )


@contextlib.contextmanager
def bench_namespace(api_client: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    name = f"bench-operator-{uuid.uuid4().hex[:6]}"
    try:
        create_namespace(api_client, name)
        core.create_namespaced_config_map(
            name,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="prosody"),
                data={"prosody.cfg.lua": PROSODY_CONFIG},
            ),
        )
        yield name
    finally:
        or_none(lambda: core.delete_namespace(name))
        try:
            wait_until(
                lambda: namespace_gone(api_client, name), 120, f"namespace {name} to be deleted"
            )
        except TimeoutError as error:
            print(f"bench.operator: warning: {error}; it is still being deleted")


def other_webhook_configurations(api_client: client.ApiClient, ours: str) -> list[str]:
    admission = client.AdmissionregistrationV1Api(api_client)
    return sorted(
        c.metadata.name
        for c in admission.list_mutating_webhook_configuration().items
        if c.metadata.name != ours and any(w.name == WEBHOOK_NAME for w in c.webhooks or [])
    )


def other_namespaces(core: client.CoreV1Api, ours: str) -> list[str]:
    """Someone else's namespaces: a sign that other work shares the control plane."""
    system = {"default", "kube-node-lease", "kube-public", "kube-system", ours}
    return sorted(
        n.metadata.name for n in core.list_namespace().items if n.metadata.name not in system
    )


def log_summary(text: str) -> dict[str, int]:
    """Plain (`[ERROR   ]`) or JSON (`"ERROR"`) log lines at ERROR level, and tracebacks."""
    lines = text.splitlines()
    errors = [line for line in lines if re.search(r'\[ERROR\b|"ERROR"|^Traceback', line)]
    return {"lines": len(lines), "errors": len(errors)}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far."""
    if pid is None:
        return math.nan
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the operator and kube-apiserver during each phase."""

    def __init__(self, operator_pid: int) -> None:
        self.pids = {
            "operator": operator_pid,
            "apiserver": controlplane.running_pid("kube-apiserver"),
        }
        self.phases: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before = {who: cpu_seconds(pid) for who, pid in self.pids.items()}
        started = time.monotonic()
        yield
        used = {f"{who}_s": cpu_seconds(pid) - before[who] for who, pid in self.pids.items()}
        self.phases[name] = {"wall_s": time.monotonic() - started, **used}


# --- machine, targets and printing --------------------------------------------------------------


def machine(api: Api) -> dict[str, Any]:
    return {**machine_basics(), "kubernetes": api.get_json("/version").get("gitVersion", "?")}


def targets(webhook: dict[str, Any], monitors: dict[str, Any]) -> list[dict[str, Any]]:
    p99, p50 = webhook["p99_ms"], monitors["p50_s"]
    return [
        target(
            "webhook latency",
            f"p99 <= {MAX_WEBHOOK_P99_MS:g} ms (API server's histogram)",
            f"p99 {p99:.1f} ms, p50 {webhook['p50_ms']:.1f} ms over {webhook['calls']:.0f} calls"
            f" ({webhook['share_le_5ms']:.0%} <= 5 ms)",
            p99 <= MAX_WEBHOOK_P99_MS,
        ),
        target(
            "ServiceMonitor",
            f"p50 <= {MAX_SERVICE_MONITOR_P50_S:g} s from Deployment create",
            f"p50 {p50:.2f} s, p99 {monitors['p99_s']:.2f} s"
            f" ({monitors['found']}/{monitors['n']} found)",
            p50 <= MAX_SERVICE_MONITOR_P50_S and monitors["found"] == monitors["n"],
        ),
    ]


def header(info: dict[str, Any], args: argparse.Namespace) -> str:
    load = " ".join(f"{x:.2f}" for x in info["loadavg_start"])
    lines = [
        f"prosody-operator benchmark: {info['cpus']} cores, {info['cpu_model']},"
        f" Python {info['python']}, Kubernetes {info['kubernetes']}",
        f"load average at start {load}; control plane"
        f" {'started here' if info['control_plane_started_here'] else 'already up (reused)'}",
        f"{args.pods} labelled + {args.pods} unlabelled pods (one at a time, interleaved, after"
        f" {args.warmup_pods} + {args.warmup_pods} warm-up); {args.deployments} Deployments,"
        f" {args.concurrency} at a time; each phase bounded by {args.time_limit:g} s",
    ]
    if info.get("other_namespaces"):
        lines.append(
            f"NOTE: other namespaces exist ({', '.join(info['other_namespaces'])}): tests or"
            " benchmarks are probably sharing the control plane, figures are noisy"
        )
    if info.get("other_webhook_configurations"):
        lines.append(
            "NOTE: other webhook configurations also register "
            f"{WEBHOOK_NAME}: {', '.join(info['other_webhook_configurations'])} (their calls"
            " land in the same histogram)"
        )
    return "\n".join(lines)


def webhook_table(webhook: dict[str, Any]) -> str:
    buckets = ", ".join(
        f"<={b['le'] * 1000:g}ms:{b['count']:.0f}"
        for b in webhook["buckets"]
        if b["le"] != "+Inf" and b["count"]
    )
    inf = next((b["count"] for b in webhook["buckets"] if b["le"] == "+Inf"), 0)
    if inf:
        buckets += f", >25s:{inf:.0f}"
    row = [
        f"{webhook['calls']:.0f}",
        f"{webhook['expected_calls']}",
        f"{webhook['rejected']:.0f}",
        f"{webhook['p50_ms']:.1f} ms",
        f"{webhook['p99_ms']:.1f} ms",
        f"{webhook['mean_ms']:.2f} ms",
        f"{webhook['share_le_5ms']:.0%}",
        buckets,
    ]
    headers = ["calls", "expected", "rejected", "p50", "p99", "mean", "<=5ms", "per bucket"]
    return format_table(headers, [row])


def create_table(latency: dict[str, Any]) -> str:
    rows = []
    for kind, label in (("labelled", "labelled (webhook)"), ("unlabelled", "unlabelled")):
        s = latency[kind]
        rows.append(
            [
                label,
                s["n"],
                s["errors"],
                f"{s['p50_ms']:.2f} ms",
                f"{s['p99_ms']:.2f} ms",
                f"{s['mean_ms']:.2f} ms",
                f"{s['max_ms']:.2f} ms",
            ]
        )
    return format_table(["pods", "n", "errors", "p50", "p99", "mean", "max"], rows)


def monitor_table(monitors: dict[str, Any]) -> str:
    row = [
        monitors["n"],
        monitors["found"],
        monitors["concurrency"],
        f"{monitors['p50_s']:.3f} s",
        f"{monitors['p99_s']:.3f} s",
        f"{monitors['mean_s']:.3f} s",
        f"{monitors['max_s']:.3f} s",
        f"{monitors['wall_s']:.2f} s",
    ]
    headers = ["Deployments", "found", "concurrency", "p50", "p99", "mean", "max", "wall"]
    return format_table(headers, [row])


def memory_table(memory: dict[str, Any]) -> str:
    rows = [
        [when, f"{m['VmRSS'] / 1024:.1f} MiB", f"{m['VmHWM'] / 1024:.1f} MiB"]
        for when, m in (
            ("after start", memory["after_start"]),
            ("after runs", memory["after_runs"]),
        )
    ]
    return format_table(["operator", "VmRSS", "VmHWM"], rows)


def cpu_table(phases: dict[str, dict[str, float]]) -> str:
    rows = [
        [
            name,
            f"{phase['wall_s']:.2f} s",
            f"{phase['operator_s']:.2f} s",
            f"{phase['operator_s'] / phase['wall_s']:.0%}",
            f"{phase['apiserver_s']:.2f} s",
            f"{phase['apiserver_s'] / phase['wall_s']:.0%}",
        ]
        for name, phase in phases.items()
    ]
    headers = ["phase", "wall", "operator CPU", "of 1 core", "apiserver CPU", "of 1 core"]
    return format_table(headers, rows)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pods", type=int, default=200, help="labelled (and unlabelled) pods")
    parser.add_argument("--warmup-pods", type=int, default=10, help="of each kind, not counted")
    parser.add_argument("--deployments", type=int, default=50, help="annotated Deployments")
    parser.add_argument("--concurrency", type=int, default=5, help="Deployment creators")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, started_here: bool) -> dict[str, Any]:
    api = Api()
    info = machine(api)
    info["control_plane_started_here"] = started_here
    api_client = config.new_client_from_config(config_file=str(controlplane.ADMIN_KUBECONFIG))
    with api_client:
        core = client.CoreV1Api(api_client)
        with node(core), operator(api_client) as process:
            info["other_namespaces"] = other_namespaces(core, process.namespace)
            assert process.process is not None
            pid = process.process.popen.pid
            memory = {"pid": pid, "after_start": memory_kib(pid)}
            others = other_webhook_configurations(api_client, process.webhook_configuration)
            info["other_webhook_configurations"] = others
            print(header(info, args), flush=True)
            with bench_namespace(api_client) as namespace:
                cpu = CpuMeter(pid)
                print("part 1: pod creations through the webhook ...", flush=True)
                with cpu.phase("webhook"):
                    part1 = bench_webhook(api, namespace, args)
                print("part 2: Deployments -> ServiceMonitors ...", flush=True)
                with cpu.phase("service_monitor"):
                    monitors = bench_service_monitors(api, namespace, args)
                memory["after_runs"] = memory_kib(pid)
                others += other_webhook_configurations(api_client, process.webhook_configuration)
                info["other_webhook_configurations"] = sorted(set(others))
                operator_log = log_summary(process.log_text())
    info["loadavg_end"] = list(os.getloadavg())
    return {
        "machine": info,
        "settings": {
            "pods": args.pods,
            "deployments": args.deployments,
            "concurrency": args.concurrency,
            "warmup_pods": args.warmup_pods,
            "time_limit_s": args.time_limit,
            "webhook_name": WEBHOOK_NAME,
        },
        **part1,
        "service_monitor": monitors,
        "operator_memory_kib": memory,
        "cpu": cpu.phases,
        "operator_log": operator_log,
        "targets": targets(part1["webhook"], monitors),
    }


def report(document: dict[str, Any], args: argparse.Namespace) -> None:
    info, webhook = document["machine"], document["webhook"]
    print()
    print(header(info, args))
    load = " ".join(f"{x:.2f}" for x in info["loadavg_end"])
    print(f"load average at end {load}")
    print(
        f"\nWebhook admission latency (kube-apiserver's {WEBHOOK_METRIC},"
        f' name="{WEBHOOK_NAME}", admit, CREATE; bucket deltas, interpolated):'
    )
    print(webhook_table(webhook))
    if webhook["calls"] != webhook["expected_calls"]:
        print(
            f"NOTE: {webhook['calls']:.0f} webhook calls for {webhook['expected_calls']} labelled"
            " pods: something else (a concurrent test run?) also called the webhook"
        )
    print("\nClient-observed pod CREATE round trip (baseline: the webhook skips unlabelled pods):")
    print(create_table(document["create_latency"]))
    latency = document["create_latency"]
    print(
        f"labelled/unlabelled: p50 {latency['p50_ratio']:.2f}x, p99 {latency['p99_ratio']:.2f}x;"
        f" added by the webhook at p50: {latency['added_p50_ms']:.2f} ms"
    )
    print("\nAnnotated Deployment CREATE -> ServiceMonitor ADDED (watch):")
    print(monitor_table(document["service_monitor"]))
    print(f"\nOperator memory (/proc/{document['operator_memory_kib']['pid']}/status):")
    print(memory_table(document["operator_memory_kib"]))
    print("\nCPU used per phase (/proc/PID/stat utime + stime; warm-up included in part 1):")
    print(cpu_table(document["cpu"]))
    log = document["operator_log"]
    print(f"operator log: {log['lines']} lines, {log['errors']} at ERROR level")
    print("\nTargets:")
    print(targets_table(document["targets"]))


def without_nan(value: Any) -> Any:
    """NaN (nothing measured) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    shutil.rmtree(WORKDIR, ignore_errors=True)  # the operator's log of an earlier run
    WORKDIR.mkdir(parents=True)
    try:
        with control_plane() as started_here:
            document = run(args, started_here)
    except MissingPrerequisite as error:
        raise SystemExit(f"bench.operator: {error}") from None
    report(document, args)
    write_results("bench-operator", without_nan(document))


if __name__ == "__main__":
    main()
