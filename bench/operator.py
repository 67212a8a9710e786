"""Benchmark: the prosody-operator's admission webhook and reconciler against a real control plane.

`make bench-operator` runs it (`python -m bench.operator [--workloads N] [--concurrency N] ...`).
Everything is real and on 127.0.0.1: the testinfra control plane (etcd, kube-apiserver v1.34,
kube-controller-manager; started here when it is not up, and then stopped at the end) and the
installed `prosody-operator` as a process with the Helm chart's ServiceAccount, RBAC and
replica settings (the Lease; the webhook certificate shared through a Secret), one replica
(testinfra/operator.py). A Node with spec.podCIDRs exists for the run (the webhook's normal path),
and every pod mounts a ConfigMap holding a prosody.cfg.lua (the webhook reads it to pick the
sidecar's interval, as for a real Deployment). SIGTERM or Ctrl-C stops it and removes all of it.

1. Webhook admission latency on a quiet cluster, from kube-apiserver's own histogram
   `apiserver_admission_webhook_admission_duration_seconds` (GET /metrics with the admin client
   certificate; name="inject.prosody-operator.io", type="admit", operation="CREATE", both
   `rejected` values summed): bucket deltas over --pods pod creations, p50/p99 by linear
   interpolation within a bucket as Prometheus' histogram_quantile does, and the exact mean from
   the _sum/_count deltas. The API server's buckets are coarse (5 ms, 25 ms, 100 ms, ...): a p99
   interpolated inside the 5-25 ms bucket is only as good as that bucket, so the share of calls
   <= 5 ms is reported too. Baseline, same run: client-observed pod CREATE latency with the
   `prosody-operator.io/inject: "true"` label (sent to the webhook) and without it (the
   webhook's objectSelector skips it), interleaved one by one so that load changes hit both.
2. The storm: --workloads annotated workloads, Deployments and StatefulSets alternately,
   created by --concurrency threads. Each becomes a pod (the controller manager creates it, the
   webhook injects it; no kubelet runs it) and a Service + ServiceMonitor (the reconciler). Time
   from each CREATE request to its ServiceMonitor's ADDED event on a watch of the namespace
   (opened before the first create), and from the last CREATE to the last ServiceMonitor; the
   webhook's histogram over the storm's pod creations; the operator's CPU and peak RSS.
3. The operator's requests, counted by the API server itself: for the run, FlowSchemas route
   the operator ServiceAccount's requests to the priority level they would get anyway
   (`workload-low`, as every ServiceAccount's), one FlowSchema per (write verb, resource), one
   for its other writes, one per (get or list, resource in READ) and one for its other reads and
   watches, so that
   `apiserver_flowcontrol_dispatched_requests_total{flow_schema=...}` counts them. Counted over
   --window seconds of steady state after the storm has settled (no request for 5 s, or
   --time-limit), and over a restart of the operator (SIGTERM, then a new process, until it
   settles the same way).

Every phase is bounded by --time-limit seconds (the counts reached are reported). Everything
created is deleted at the end: the bench namespace (pods, workloads, ConfigMap, and with them
the operator's Services and ServiceMonitors), the Node, the FlowSchemas and the operator's
identity (namespace, ClusterRole, ClusterRoleBinding, MutatingWebhookConfiguration).

Results go to stdout as tables and to .cache/results/bench-operator.json, whose keys are:

- machine: cpus (usable cores), cpu_model, python, kubernetes (the API server's /version
  gitVersion), loadavg_start and loadavg_end (1/5/15 min), control_plane_started_here (bool),
  other_webhook_configurations (names of other MutatingWebhookConfigurations holding a webhook
  named inject.prosody-operator.io: another operator, e.g. a concurrent test run, also gets our
  pods and feeds the same histogram), other_namespaces (namespaces other than the system ones
  at start: tests or benchmarks running concurrently on the same control plane).
- settings: pods, warmup_pods, workloads, concurrency, window_s, time_limit_s, webhook_name.
- webhook (part 1) and storm.webhook: calls (histogram count delta), expected_calls (labelled
  pods created), rejected (calls with rejected="true": webhook errors, admitted anyway under
  failurePolicy Ignore), p50_ms, p99_ms (interpolated), mean_ms (sum/count), share_le_5ms,
  buckets (list of {le, count}: per-bucket deltas, not cumulative; le in seconds, "+Inf" last).
- create_latency: labelled and unlabelled, each {n, p50_ms, p99_ms, mean_ms, max_ms, errors}
  (client-observed pod CREATE round trips over one keep-alive HTTPS connection), plus
  p50_ratio, p99_ratio (labelled / unlabelled) and added_p50_ms (labelled p50 - unlabelled p50).
- storm: workloads (created), kinds ({Deployment: n, StatefulSet: n}), found (ServiceMonitors
  seen), concurrency, create_wall_s (first to last CREATE), p50_s, p99_s, max_s (CREATE ->
  ServiceMonitor), after_last_create_s (last CREATE -> last ServiceMonitor), webhook (above),
  settle_s (last ServiceMonitor -> no operator request for 5 s), cpu {wall_s, operator_s,
  apiserver_s} (from the first CREATE until settled).
- requests: steady and restart, each {window_s, writes: {"verb resource": n}, other_writes,
  reads_by_resource: {"get/list resource": n}, other_reads, reads (all reads)}; restart also
  has settle_s (process start until settled) and cpu_s (the new process's CPU until then).
  storm.requests: the same, from the first create until settled; storm.reconciles: the
  operator's own prosody_operator_reconciles_total over the storm, by result.
- operator_memory_kib: first and restarted, each {VmRSS, VmHWM} at the end of its phase; pid.
- operator_log: lines, errors (lines at ERROR level or with a Traceback), of both processes.
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
import sys
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
from testinfra.interrupt import exit_status, unwind_on_signals
from testinfra.kubeapi import create_namespace, namespace_gone, node_with_pod_cidrs, or_none
from testinfra.layout import CACHE_DIR
from testinfra.operator import OperatorProcess
from testinfra.procs import MissingPrerequisite, wait_until
from testinfra.workloads import INJECT, prosody_pod, prosody_workload

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
KINDS = ("Deployment", "StatefulSet")
# The operator's requests, by what the API server counts them under (see OperatorRequests).
WRITE_VERBS = ("create", "update", "patch", "delete")
WRITTEN = ("services", "servicemonitors", "events", "leases", "mutatingwebhookconfigurations")
READ_VERBS = ("get", "list")
READ = (
    "pods", "configmaps", "services", "servicemonitors", "deployments", "statefulsets", "leases",
)  # fmt: skip
FLOWCONTROL = "/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas"
DISPATCHED = "apiserver_flowcontrol_dispatched_requests_total"
# Settled: the operator made no request for this long (leader election's apart: it renews its
# Lease every few seconds for ever).
QUIET_S = 5.0

# Targets the operator is held to (issue 14's, on 2 cores).
MAX_WEBHOOK_P99_MS = 20.0
MAX_AFTER_LAST_CREATE_S = 60.0
MAX_PEAK_RSS_MIB = 150.0


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


# --- part 2: the storm ---------------------------------------------------------------------------


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


def workload_path(namespace: str, kind: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/{kind.lower()}s"


def create_workloads(
    api: Api, namespace: str, names: list[str], concurrency: int, deadline: float
) -> dict[str, tuple[str, float]]:
    """name -> (kind, when its CREATE was sent), for those created. Deployments and StatefulSets
    alternately; a stop (the deadline, or an interrupt) lets the requests in flight finish."""
    created: dict[str, tuple[str, float]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def create(index: int, name: str) -> None:
        if stop.is_set() or time.monotonic() > deadline:
            return
        kind = KINDS[index % len(KINDS)]
        started = time.perf_counter()
        response = api.post(workload_path(namespace, kind), prosody_workload(kind, name, "prosody"))
        if response.status_code == 201:
            with lock:
                created[name] = (kind, started)

    pool = ThreadPoolExecutor(concurrency)
    try:
        list(pool.map(create, range(len(names)), names))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return created


def reconciles(process: OperatorProcess) -> dict[str, float]:
    """The operator's prosody_operator_reconciles_total so far, by result."""
    text = httpx.get(process.metrics_url, timeout=10).text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "prosody_operator_reconciles"
        for sample in family.samples
        if sample.name == "prosody_operator_reconciles_total"
    }


def bench_storm(
    api: Api,
    namespace: str,
    args: argparse.Namespace,
    cpu: CpuMeter,
    requests: OperatorRequests,
    process: OperatorProcess,
) -> dict[str, Any]:
    names = [f"xmpp-{i:04d}" for i in range(args.workloads)]
    deadline = time.monotonic() + args.time_limit
    monitor_names = {f"{name}-prosody-metrics" for name in names}
    watch = ServiceMonitorWatch(api, namespace, monitor_names, deadline)
    watch.start()
    watch.ready.wait(30)
    before = Histogram(api.metrics_text())
    requests_before, reconciles_before = requests.counts(), reconciles(process)
    with cpu.phase("storm"):
        created = create_workloads(api, namespace, names, args.concurrency, deadline)
        watch.join(max(0.0, deadline - time.monotonic()) + 15)
        if watch.error is not None:
            raise RuntimeError(f"ServiceMonitor watch failed: {watch.error!r}")
        # Every workload's pod went through the webhook (the controllers create them at once).
        calls = wait_for_webhook_calls(api, before, len(created), deadline)
        settled_at = requests.wait_until_quiet(deadline)
    found_requests = requests.during(
        requests_before, requests.counts(), cpu.phases["storm"]["wall_s"]
    )
    reconciled = reconciles(process)
    webhook = calls.minus(before)
    webhook["expected_calls"] = len(created)
    starts = [started for _, started in created.values()]
    delays = [
        watch.seen[f"{name}-prosody-metrics"] - started
        for name, (_, started) in created.items()
        if f"{name}-prosody-metrics" in watch.seen
    ]
    last_monitor = max(watch.seen.values(), default=math.nan)
    kinds = {kind: sum(1 for k, _ in created.values() if k == kind) for kind in KINDS}
    return {
        "workloads": len(created),
        "kinds": kinds,
        "found": len(delays),
        "concurrency": args.concurrency,
        "create_wall_s": max(starts) - min(starts) if starts else math.nan,
        "p50_s": percentile(delays, 0.5),
        "p99_s": percentile(delays, 0.99),
        "max_s": max(delays, default=math.nan),
        "after_last_create_s": last_monitor - max(starts) if starts else math.nan,
        "webhook": webhook,
        "settle_s": settled_at - last_monitor,
        "cpu": cpu.phases["storm"],
        "requests": found_requests,
        "reconciles": {
            result: n - reconciles_before.get(result, 0.0) for result, n in reconciled.items()
        },
    }


def wait_for_webhook_calls(api: Api, before: Histogram, count: int, deadline: float) -> Histogram:
    while True:
        now = Histogram(api.metrics_text())
        if now.count - before.count >= count or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


# --- part 3: the operator's requests, counted by the API server ----------------------------------


class OperatorRequests:
    """FlowSchemas that sort the operator ServiceAccount's requests, for the API server to count
    in apiserver_flowcontrol_dispatched_requests_total{flow_schema}: one per (write verb,
    resource in WRITTEN), then its other writes, then its reads (get, list) per resource in READ,
    then the rest (other reads and watches). They route
    to `workload-low`, the priority level every ServiceAccount's requests get anyway
    (FlowSchema service-accounts), so nothing is treated differently for being counted.
    apiserver_request_total, split by verb and resource, has no label for who made a request."""

    def __init__(self, api: Api, service_account: str, namespace: str) -> None:
        self.api = api
        self.prefix = f"bench-{uuid.uuid4().hex[:6]}-"
        subject = {
            "kind": "ServiceAccount",
            "serviceAccount": {"name": service_account, "namespace": namespace},
        }

        def schema(name: str, precedence: int, verbs: list[str], resources: list[str]) -> Any:
            rules: dict[str, Any] = {
                "subjects": [subject],
                "resourceRules": [
                    {
                        "verbs": verbs,
                        "apiGroups": ["*"],
                        "resources": resources,
                        "namespaces": ["*"],
                        "clusterScope": True,
                    }
                ],
            }
            if verbs == ["*"]:
                rules["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
            return {
                "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
                "kind": "FlowSchema",
                "metadata": {"name": self.prefix + name},
                "spec": {
                    "matchingPrecedence": precedence,
                    "priorityLevelConfiguration": {"name": "workload-low"},
                    "distinguisherMethod": {"type": "ByUser"},
                    "rules": [rules],
                },
            }

        self.schemas = [
            schema(f"{verb}-{resource}", 50, [verb], [resource])
            for verb in WRITE_VERBS
            for resource in WRITTEN
        ]
        self.schemas.append(schema("other-writes", 51, [*WRITE_VERBS, "deletecollection"], ["*"]))
        self.schemas += [
            schema(f"read-{resource}", 52, [*READ_VERBS], [resource]) for resource in READ
        ]
        self.schemas.append(schema("other-reads", 53, ["*"], ["*"]))

    def install(self) -> None:
        for body in self.schemas:
            self.api.post(FLOWCONTROL, body).raise_for_status()

    def uninstall(self) -> None:
        for body in self.schemas:
            self.api.http().delete(f"{FLOWCONTROL}/{body['metadata']['name']}")

    def counts(self) -> dict[str, float]:
        """Requests so far by FlowSchema, without the prefix ("patch-services", "reads"...)."""
        found = dict.fromkeys(
            (b["metadata"]["name"][len(self.prefix) :] for b in self.schemas), 0.0
        )
        for family in text_string_to_metric_families(self.api.metrics_text()):
            if family.name != DISPATCHED.removesuffix("_total"):
                continue
            for sample in family.samples:
                schema = sample.labels.get("flow_schema", "")
                if sample.name == DISPATCHED and schema.startswith(self.prefix):
                    found[schema[len(self.prefix) :]] += sample.value
        return found

    def wait_until_quiet(self, deadline: float) -> float:
        """When the operator last made a request (but to its Lease), once it made none for
        QUIET_S seconds."""

        def counts() -> dict[str, float]:
            return {name: n for name, n in self.counts().items() if not name.endswith("leases")}

        last, last_change = counts(), time.perf_counter()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = counts()
            if now != last:
                last, last_change = now, time.perf_counter()
            elif time.perf_counter() - last_change >= QUIET_S:
                break
        return last_change

    def during(self, before: dict[str, float], after: dict[str, float], window: float) -> Any:
        delta = {name: after[name] - before[name] for name in after}
        writes = {
            f"{verb} {resource}": delta[f"{verb}-{resource}"]
            for verb in WRITE_VERBS
            for resource in WRITTEN
        }
        reads = {f"get/list {resource}": delta[f"read-{resource}"] for resource in READ}
        return {
            "window_s": window,
            "writes": writes,
            "other_writes": delta["other-writes"],
            "reads_by_resource": reads,
            "other_reads": delta["other-reads"],
            "reads": sum(reads.values()) + delta["other-reads"],
        }


def bench_steady(requests: OperatorRequests, window: float) -> dict[str, Any]:
    before = requests.counts()
    time.sleep(window)
    return requests.during(before, requests.counts(), window)


def bench_restart(
    process: OperatorProcess, requests: OperatorRequests, args: argparse.Namespace
) -> dict[str, Any]:
    """SIGTERM, then a new process with the same identity; counted until it settles."""
    process.stop()
    before = requests.counts()
    started = time.perf_counter()
    process.start()
    pid = running_pid(process)
    settled_at = requests.wait_until_quiet(time.monotonic() + args.time_limit)
    cpu = cpu_seconds(pid)
    found = requests.during(before, requests.counts(), time.perf_counter() - started)
    found.update(settle_s=settled_at - started, cpu_s=cpu)
    return found


def running_pid(process: OperatorProcess) -> int:
    assert process.process is not None
    return process.process.popen.pid


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
def operator(
    api: Api, api_client: client.ApiClient
) -> Iterator[tuple[OperatorProcess, OperatorRequests]]:
    """The operator, running, with its requests counted from its start."""
    process = OperatorProcess(
        api_client,
        WORKDIR / "operator",
        settings={
            "exporter_image": "registry.test/prosody-exporter:bench",
            "service_monitor_labels": "release=kube-prometheus-stack",
        },
    )
    # As the chart runs every replica: the Lease, and the webhook certificate in a Secret.
    process.settings.update(process.replica_settings())
    requests = OperatorRequests(api, process.fullname, process.namespace)
    try:
        process.install_identity()
        requests.install()
        process.start()
        yield process, requests
    finally:
        process.uninstall()
        requests.uninstall()
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


def targets(
    webhook: dict[str, Any],
    storm: dict[str, Any],
    requests: dict[str, Any],
    memory: dict[str, Any],
    wanted: int,
) -> list[dict[str, Any]]:
    def writes(found: dict[str, Any]) -> tuple[float, float]:
        """Writes, and the Lease renewals among them (leader election's, shown apart)."""
        lease = sum(n for name, n in found["writes"].items() if name.endswith(" leases"))
        return sum(found["writes"].values()) + found["other_writes"] - lease, lease

    def webhook_target(name: str, found: dict[str, Any]) -> dict[str, Any]:
        return target(
            name,
            f"p99 <= {MAX_WEBHOOK_P99_MS:g} ms (API server's histogram)",
            f"p99 {found['p99_ms']:.1f} ms, p50 {found['p50_ms']:.1f} ms over"
            f" {found['calls']:.0f} calls ({found['share_le_5ms']:.0%} <= 5 ms)",
            found["p99_ms"] <= MAX_WEBHOOK_P99_MS,
        )

    rows = [
        webhook_target("webhook, quiet", webhook),
        webhook_target("webhook, storm", storm["webhook"]),
        target(
            "ServiceMonitors",
            f"all, <= {MAX_AFTER_LAST_CREATE_S:g} s after the last create",
            f"{storm['found']}/{storm['workloads']} found,"
            f" the last {storm['after_last_create_s']:.1f} s after the last create",
            storm["found"] == storm["workloads"] == wanted
            and storm["after_last_create_s"] <= MAX_AFTER_LAST_CREATE_S,
        ),
    ]
    for phase in ("steady", "restart"):
        count, lease = writes(requests[phase])
        window = requests[phase]["window_s"]
        rows.append(
            target(
                f"writes, {phase}",
                "0 (Lease renewals apart)",
                f"{count:.0f} in {window:.0f} s (+ {lease:.0f} to the Lease)",
                count == 0,
            )
        )
    peak = max(m["VmHWM"] for m in (memory["first"], memory["restarted"])) / 1024
    rows.append(
        target(
            "peak RSS", f"<= {MAX_PEAK_RSS_MIB:g} MiB", f"{peak:.1f} MiB", peak <= MAX_PEAK_RSS_MIB
        )
    )
    return rows


def header(info: dict[str, Any], args: argparse.Namespace) -> str:
    load = " ".join(f"{x:.2f}" for x in info["loadavg_start"])
    lines = [
        f"prosody-operator benchmark: {info['cpus']} cores, {info['cpu_model']},"
        f" Python {info['python']}, Kubernetes {info['kubernetes']}",
        f"load average at start {load}; control plane"
        f" {'started here' if info['control_plane_started_here'] else 'already up (reused)'}",
        f"{args.pods} labelled + {args.pods} unlabelled pods (one at a time, interleaved, after"
        f" {args.warmup_pods} + {args.warmup_pods} warm-up); {args.workloads} workloads"
        f" ({' and '.join(KINDS)} alternately), {args.concurrency} creators; steady window"
        f" {args.window:g} s; each phase bounded by {args.time_limit:g} s",
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


def webhook_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    def row(name: str, webhook: dict[str, Any]) -> list[str]:
        buckets = ", ".join(
            f"<={b['le'] * 1000:g}ms:{b['count']:.0f}"
            for b in webhook["buckets"]
            if b["le"] != "+Inf" and b["count"]
        )
        inf = next((b["count"] for b in webhook["buckets"] if b["le"] == "+Inf"), 0)
        if inf:
            buckets += f", >25s:{inf:.0f}"
        return [
            name,
            f"{webhook['calls']:.0f}",
            f"{webhook['expected_calls']}",
            f"{webhook['rejected']:.0f}",
            f"{webhook['p50_ms']:.1f} ms",
            f"{webhook['p99_ms']:.1f} ms",
            f"{webhook['mean_ms']:.2f} ms",
            f"{webhook['share_le_5ms']:.0%}",
            buckets,
        ]

    headers = ["when", "calls", "expected", "rejected", "p50", "p99", "mean", "<=5ms", "per bucket"]
    return format_table(headers, [row(name, webhook) for name, webhook in rows])


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


def storm_table(storm: dict[str, Any]) -> str:
    kinds = ", ".join(f"{n} {kind}s" for kind, n in storm["kinds"].items())
    row = [
        f"{storm['workloads']} ({kinds})",
        storm["found"],
        storm["concurrency"],
        f"{storm['create_wall_s']:.1f} s",
        f"{storm['p50_s']:.2f} s",
        f"{storm['p99_s']:.2f} s",
        f"{storm['max_s']:.2f} s",
        f"{storm['after_last_create_s']:.1f} s",
        f"{storm['settle_s']:.1f} s",
    ]
    headers = [
        "workloads", "found", "creators", "creates took", "p50", "p99", "max",
        "last create -> last ServiceMonitor", "then settled",
    ]  # fmt: skip
    return format_table(headers, [row])


def requests_table(storm: dict[str, Any], requests: dict[str, Any]) -> str:
    """Per (verb, resource) written or read in any phase, then other writes and reads; the
    storm's also per workload."""
    phases = {"storm": storm["requests"], **requests}
    workloads = max(storm["workloads"], 1)

    def row(name: str, counts: dict[str, float]) -> list[str]:
        return [
            name,
            *(f"{counts[p]:.0f}" for p in phases),
            f"{counts['storm'] / workloads:.2f}",
        ]

    rows = []
    for group in ("writes", "reads_by_resource"):
        for name in phases["storm"][group]:
            counts = {p: found[group][name] for p, found in phases.items()}
            if any(counts.values()):
                rows.append(row(name, counts))
    for key, name in (("other_writes", "other writes"), ("other_reads", "other reads, watches")):
        rows.append(row(name, {p: found[key] for p, found in phases.items()}))
    headers = [
        "operator's requests",
        *(f"{p} ({found['window_s']:.0f} s)" for p, found in phases.items()),
        "storm, per workload",
    ]
    return format_table(headers, rows)


def resources_table(document: dict[str, Any]) -> str:
    storm, restart = document["storm"], document["requests"]["restart"]
    memory = document["operator_memory_kib"]
    cpu = storm["cpu"]
    rows = [
        [
            "storm (first create until settled)",
            f"{cpu['wall_s']:.1f} s",
            f"{cpu['operator_s']:.1f} s",
            f"{cpu['operator_s'] / cpu['wall_s']:.0%}",
            f"{cpu['apiserver_s']:.1f} s",
            f"{memory['first']['VmRSS'] / 1024:.1f} MiB",
            f"{memory['first']['VmHWM'] / 1024:.1f} MiB",
        ],
        [
            "restart (start until settled)",
            f"{restart['settle_s']:.1f} s",
            f"{restart['cpu_s']:.1f} s",
            f"{restart['cpu_s'] / restart['settle_s']:.0%}",
            "-",
            f"{memory['restarted']['VmRSS'] / 1024:.1f} MiB",
            f"{memory['restarted']['VmHWM'] / 1024:.1f} MiB",
        ],
    ]
    headers = [
        "operator", "wall", "CPU", "of 1 core", "apiserver CPU", "VmRSS at end", "peak (VmHWM)",
    ]  # fmt: skip
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
    parser.add_argument("--workloads", type=int, default=1000, help="annotated workloads")
    parser.add_argument("--concurrency", type=int, default=20, help="workload creators")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state seconds")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, started_here: bool) -> dict[str, Any]:
    api = Api()
    info = machine(api)
    info["control_plane_started_here"] = started_here
    api_client = config.new_client_from_config(config_file=str(controlplane.ADMIN_KUBECONFIG))
    with api_client:
        core = client.CoreV1Api(api_client)
        with (
            node_with_pod_cidrs(api_client, NODE_CIDRS),
            operator(api, api_client) as (process, requests),
        ):
            info["other_namespaces"] = other_namespaces(core, process.namespace)
            pid = running_pid(process)
            others = other_webhook_configurations(api_client, process.webhook_configuration)
            info["other_webhook_configurations"] = others
            print(header(info, args), flush=True)
            with bench_namespace(api_client) as namespace:
                cpu = CpuMeter(pid)
                print("part 1: pod creations through the webhook, one at a time ...", flush=True)
                part1 = bench_webhook(api, namespace, args)
                print(f"part 2: {args.workloads} workloads at once ...", flush=True)
                storm = bench_storm(api, namespace, args, cpu, requests, process)
                print(f"part 3: the operator's requests over {args.window:g} s ...", flush=True)
                steady = bench_steady(requests, args.window)
                memory: dict[str, Any] = {"pid": pid, "first": memory_kib(pid)}
                print("        ... and over a restart", flush=True)
                restart = bench_restart(process, requests, args)
                memory["restarted"] = memory_kib(running_pid(process))
                others += other_webhook_configurations(api_client, process.webhook_configuration)
                info["other_webhook_configurations"] = sorted(set(others))
                operator_log = log_summary(process.log_text())
    info["loadavg_end"] = list(os.getloadavg())
    found = {"steady": steady, "restart": restart}
    return {
        "machine": info,
        "settings": {
            "pods": args.pods,
            "warmup_pods": args.warmup_pods,
            "workloads": args.workloads,
            "concurrency": args.concurrency,
            "window_s": args.window,
            "time_limit_s": args.time_limit,
            "webhook_name": WEBHOOK_NAME,
        },
        **part1,
        "storm": storm,
        "requests": found,
        "operator_memory_kib": memory,
        "operator_log": operator_log,
        "targets": targets(part1["webhook"], storm, found, memory, args.workloads),
    }


def report(document: dict[str, Any], args: argparse.Namespace) -> None:
    info, webhook, storm = document["machine"], document["webhook"], document["storm"]
    print()
    print(header(info, args))
    load = " ".join(f"{x:.2f}" for x in info["loadavg_end"])
    print(f"load average at end {load}")
    print(
        f"\nWebhook admission latency (kube-apiserver's {WEBHOOK_METRIC},"
        f' name="{WEBHOOK_NAME}", admit, CREATE; bucket deltas, interpolated):'
    )
    print(webhook_table([("quiet, one pod at a time", webhook), ("storm", storm["webhook"])]))
    for found in (webhook, storm["webhook"]):
        if found["calls"] != found["expected_calls"]:
            print(
                f"NOTE: {found['calls']:.0f} webhook calls for {found['expected_calls']} pods:"
                " something else (a concurrent test run?) also called the webhook, or the"
                " controllers had not created every pod by the time limit"
            )
    print("\nClient-observed pod CREATE round trip (baseline: the webhook skips unlabelled pods):")
    print(create_table(document["create_latency"]))
    latency = document["create_latency"]
    print(
        f"labelled/unlabelled: p50 {latency['p50_ratio']:.2f}x, p99 {latency['p99_ratio']:.2f}x;"
        f" added by the webhook at p50: {latency['added_p50_ms']:.2f} ms"
    )
    print("\nThe storm: workload CREATE -> its ServiceMonitor ADDED (watch):")
    print(storm_table(storm))
    print(
        "\nThe operator's requests, counted by the API server"
        f" ({DISPATCHED} of FlowSchemas matching its ServiceAccount):"
    )
    print(requests_table(storm, document["requests"]))
    reconciled = storm["reconciles"]
    print(
        f"reconciles in the storm (the operator's prosody_operator_reconciles_total):"
        f" {sum(reconciled.values()):.0f} for {storm['workloads']} workloads"
        f" ({', '.join(f'{result} {n:.0f}' for result, n in sorted(reconciled.items()))})"
    )
    print("\nThe operator's CPU (/proc/PID/stat utime + stime) and memory (/proc/PID/status):")
    print(resources_table(document))
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
    unwind_on_signals()
    args = parse_args(argv)
    shutil.rmtree(WORKDIR, ignore_errors=True)  # the operator's log of an earlier run
    WORKDIR.mkdir(parents=True)
    try:
        with control_plane() as started_here:
            document = run(args, started_here)
    except MissingPrerequisite as error:
        raise SystemExit(f"bench.operator: {error}") from None
    except KeyboardInterrupt as error:
        print("bench.operator: stopped; what it started is stopped and deleted", file=sys.stderr)
        raise SystemExit(exit_status(error)) from None
    report(document, args)
    write_results("bench-operator", without_nan(document))


if __name__ == "__main__":
    main()
