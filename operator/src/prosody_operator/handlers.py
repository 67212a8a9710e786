"""kopf handlers: thin wiring from events to the Controller, which they alone call.

Only event handlers, indexes and a webhook are used, so kopf keeps no state on users' objects.
Every replica runs all of it: the indexes and the webhook serve on each. Event handlers only
queue the workloads to reconcile (workqueue.py); the queue's workers run while this replica
leads (leadership.py), so exactly one replica writes. Admissions run in a thread pool of their
own: a reconcile waiting on the API never delays a pod's admission.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kopf

from . import annotations as ann
from . import builders, metrics
from .builders import Obj
from .controller import Controller, Indexes, start_evaluations, summarize
from .kube import MONITOR_PLURALS, MONITORING_GROUP, MONITORING_VERSION, Kube, load_config
from .leadership import LeaderElector, default_identity
from .logs import about
from .planner import AdmissionPlan
from .prosody import prosody_configmaps
from .quotas import Requirement, requirement
from .selection import PrometheusSelectors
from .settings import OperatorSettings
from .tls import (
    ServingCertificate,
    load_serving_certificate,
    make_serving_certificate,
    shared_serving_certificate,
)
from .workloads import KINDS
from .workqueue import WorkQueue

log = logging.getLogger("prosody_operator")

# Seconds between two reads of the webhook's certificate files (three small files).
CERTIFICATE_CHECK_INTERVAL = 10.0
CONFIGURATION_RETRY = 5.0  # seconds between two attempts to apply the webhook configuration
OWNED = builders.MANAGED_BY  # the label on every object the operator makes
# Threads that reconcile, each one workload at a time; most of a reconcile is waiting on the API.
RECONCILE_WORKERS = 4
# Threads that decide admissions (the API server waits for each; no API call when indexed).
ADMISSION_WORKERS = 4
# Seconds a per-object worker of kopf waits for that object's next event before it exits
# (kopf's default: 5): in a storm of creations, fewer of them alive at once (bench-operator's
# 500 workloads: 105 MiB after the storm instead of 121-125).
WORKER_IDLE = 0.5

Key = tuple[str, str, str]  # (namespace, kind, name) of a workload


def _controller(memo: Any) -> Controller:
    controller: Controller = memo.controller
    return controller


def _queue(memo: Any) -> WorkQueue:
    queue: WorkQueue = memo.queue
    return queue


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's bodies are live views; the controller takes plain dicts. Without managedFields:
    nothing reads them, and they are half of a workload body (kept while it is queued)."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return copy.deepcopy({**dict(body), "metadata": metadata})


class _Merged(Mapping[Any, list[Any]]):
    """Several kopf indexes read as one (the same key's values from all of them)."""

    def __init__(self, *indexes: Mapping[Any, Any]) -> None:
        self._indexes = indexes

    def __getitem__(self, key: Any) -> list[Any]:
        found = [value for index in self._indexes for value in (index.get(key) or ())]
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[Any]:
        return iter(dict.fromkeys(key for index in self._indexes for key in index))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _indexes(kwargs: Mapping[str, Any]) -> Indexes:
    """kopf passes each index as a keyword named by its id: live views, kept up to date, so
    the ones a startup handler gets serve the queue's workers for good (an empty one is still
    the index, not to be replaced)."""

    def index(name: str) -> Mapping[Any, Any]:
        found = kwargs.get(name)
        return found if found is not None else {}

    def merged(prefix: str) -> _Merged:
        return _Merged(*(index(f"{prefix}_{k.plural}") for k in KINDS.values()))

    return Indexes(
        node_pod_cidrs=index("node_pod_cidrs"),
        namespaces=index("namespace_labels"),
        workloads=merged("workloads"),
        by_configmap=merged("configmaps_of"),
        owners=_Merged(
            *(index(f"owned_{plural}") for plural in ("services", *MONITOR_PLURALS.values()))
        ),
        prometheuses=index("prometheus_selectors"),
        quotas=index("quota_requirements"),
    )


def _certificate(settings: OperatorSettings, kube: Kube) -> ServingCertificate:
    if settings.webhook_cert_dir:
        return load_serving_certificate(Path(settings.webhook_cert_dir))
    hosts = []
    if settings.webhook_url:
        hosts.append(urlparse(settings.webhook_url).hostname or "localhost")
    if settings.webhook_service:
        namespace, _, name = settings.webhook_service.partition("/")
        hosts += [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    directory = Path(tempfile.mkdtemp(prefix="webhook-"))
    if settings.webhook_cert_secret:
        namespace, _, name = settings.webhook_cert_secret.partition("/")
        try:
            return shared_serving_certificate(
                functools.partial(kube.read_secret, namespace, name),
                functools.partial(kube.replace_secret, namespace),
                directory,
                hosts or ["localhost"],
            )
        except LookupError:
            log.error(
                "the Secret %s holding the replicas' webhook certificate does not exist: this "
                "replica makes its own, and other replicas' calls will fail TLS",
                settings.webhook_cert_secret,
            )
    return make_serving_certificate(directory, hosts or ["localhost"])


class WebhookServer(kopf.WebhookServer):
    """kopf's webhook server, which rereads its certificate files every `file_check_interval`
    and restarts with them when they change (a Secret renewed by cert-manager). Each time it
    (re)starts serving, `on_serving` gets the caBundle of the current ca.crt: a renewed CA
    reaches the webhook configuration without restarting the operator."""

    def __init__(
        self,
        on_serving: Callable[[str], None],
        review: Callable[..., Awaitable[Obj]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.on_serving = on_serving
        self.review = review

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        # Reviews go to `review`, not to kopf's `fn`: kopf would run its handler machinery and
        # compute the JSONPatch by diffing the whole pod before and after (most of an admission's
        # time, profiled), where the operator knows the few operations it makes.
        async for client_config in super().__call__(self.review):
            while True:  # the server is already listening; only the caBundle waits
                try:
                    await asyncio.to_thread(self.on_serving, client_config["caBundle"])
                    break
                except Exception:
                    log.exception("could not apply the webhook configuration; retrying")
                    await asyncio.sleep(CONFIGURATION_RETRY)
            yield client_config


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    operator_settings: OperatorSettings = memo.settings  # checked and built once, by main()
    load_config()
    kube = Kube()
    controller = memo.controller = Controller(
        operator_settings, kube, start_evaluations(operator_settings)
    )
    controller.read_node_cidrs()
    # kopf hands startup handlers the same live indexes as every handler.
    indexes = memo.indexes = _indexes(kwargs)
    certificate = _certificate(operator_settings, kube)

    def serving(ca_bundle: str) -> None:
        controller.apply_webhook_configuration(ca_bundle)
        memo.webhook_serving = True

    settings.admission.server = WebhookServer(
        serving,
        functools.partial(review, memo),
        addr=operator_settings.webhook_host,
        port=operator_settings.webhook_port,
        certfile=str(certificate.certfile),
        pkeyfile=str(certificate.keyfile),
        cafile=str(certificate.cafile),
        file_check_interval=CERTIFICATE_CHECK_INTERVAL,
    )
    # kopf posts its own handler errors as Events too; keep those to real problems.
    settings.posting.level = logging.WARNING
    settings.queueing.idle_timeout = WORKER_IDLE
    memo.admissions = ThreadPoolExecutor(ADMISSION_WORKERS, thread_name_prefix="admission")

    # Another replica, or this process before a restart, may have posted Events this one would
    # otherwise post again: read them each time this replica starts leading, before its first
    # reconcile, in a worker (a long list in the elector's thread would delay its renewals).
    events_read = threading.Lock()
    events_stale = threading.Event()

    def remember_posted_events() -> None:
        with events_read:
            if not events_stale.is_set():
                return
            events_stale.clear()
            try:
                remembered = controller.remember_posted_events()
                log.info("%d Events posted before remembered", remembered)
            except Exception:
                log.exception("could not read the Events posted before: some may be posted again")

    def process(key: Key, body: dict[str, Any] | None) -> None:
        remember_posted_events()
        if body is None:
            controller.reconcile_named(key[1], key[0], key[2], indexes)
        else:
            controller.reconcile(body, indexes)

    queue = memo.queue = WorkQueue(
        process, RECONCILE_WORKERS, log_extra=lambda key: about(key[1], key[0], key[2])
    )
    queue.start()
    # Reconciles asked for later (a retry, a config evaluated meanwhile) go through the queue.
    controller.requeue = lambda ref: queue.add((ref.namespace, ref.kind, ref.name))
    for cache, index in (
        ("workloads", indexes.workloads),
        ("namespaces", indexes.namespaces),
        ("owned_objects", indexes.owners),
        ("prometheuses", indexes.prometheuses),
    ):
        metrics.SIZES.register(cache, functools.partial(_entries, index))
    metrics.SIZES.register("configmaps", functools.partial(len, controller.configmaps))
    metrics.SIZES.register("event_log_objects", functools.partial(len, controller.events))
    metrics.SIZES.register("reconcile_queue", functools.partial(len, queue))

    def start_leading() -> None:
        events_stale.set()
        metrics.set_leader(True)
        for key in list(indexes.workloads):  # what was queued as a standby is queued already
            queue.add(key)
        queue.resume()

    def stop_leading() -> None:
        queue.pause()
        metrics.set_leader(False)
        metrics.WORKLOADS.clear()

    if operator_settings.leader_election_lease:
        memo.elector = LeaderElector(
            kube,
            operator_settings.leader_election_lease,
            default_identity(),
            start_leading,
            stop_leading,
        )
        memo.elector.start()
    else:
        start_leading()


def _entries(index: Mapping[Any, Any]) -> int:
    return sum(len(list(values)) for values in index.values())


def stop_reconciling(memo: kopf.Memo) -> None:
    """Let the workers finish the reconciles under way, then release the Lease (another
    replica takes over at once, and never reconciles a workload while this one still does);
    the webhook serves on. Safe to call twice."""
    queue: WorkQueue | None = getattr(memo, "queue", None)
    if queue is not None:
        queue.pause()
        queue.stop()
    elector: LeaderElector | None = getattr(memo, "elector", None)
    if elector is not None:
        elector.stop()


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    stop_reconciling(memo)
    admissions: ThreadPoolExecutor | None = getattr(memo, "admissions", None)
    if admissions is not None:
        admissions.shutdown(wait=False, cancel_futures=True)


# --- indexes: what the webhook and the reconciler look up without an API call ------------------

# Index functions are `async` though they await nothing: kopf runs a plain function in its
# thread pool, a hop per event that, in a storm, competed with the admission threads for the GIL
# (bench-operator, 500 workloads: the webhook's p50 in the storm 13 ms, now 4; the operator's
# CPU 12.5 s, now 9.3).


@kopf.index("", "v1", "nodes", id="node_pod_cidrs")
async def node_pod_cidrs(spec: kopf.Spec, **_: Any) -> list[str]:
    return list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))


@kopf.index("", "v1", "resourcequotas", id="quota_requirements")
async def quota_requirements(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Requirement]:
    found = requirement(body)
    return {namespace: found} if found else {}


@kopf.index("", "v1", "namespaces", id="namespace_labels")
async def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


async def _workload_summary(body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], Any]:
    summary = summarize(body)
    return {summary.ref.key: summary}


async def _configmaps_of(
    body: kopf.Body, name: str, namespace: str, **_: Any
) -> dict[tuple[str, str], tuple[str, str]]:
    """The ConfigMaps a workload's Prosody may read its config from -> the workload."""
    template = body.get("spec", {}).get("template") or {}
    container = ((template.get("metadata") or {}).get("annotations") or {}).get(ann.CONTAINER)
    names = prosody_configmaps(template.get("spec") or {}, container)
    return {(namespace, configmap): (body["kind"], name) for configmap in names}


def _owner_key(body: Mapping[str, Any], namespace: str) -> Key | None:
    """The workload an object of ours is for."""
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("controller") and owner.get("kind") in KINDS:
            return (namespace, owner["kind"], owner["name"])
    return None


async def _owned(body: kopf.Body, namespace: str, **_: Any) -> dict[Key, dict[str, Any]]:
    """Objects of ours -> the workload they are for: so that it is cleaned up and re-checked,
    and its reconciles read them without an API call."""
    key = _owner_key(body, namespace)
    return {} if key is None else {key: builders.comparable(body)}


kopf.index("", "v1", "services", id="owned_services", labels=OWNED)(_owned)
for _plural in MONITOR_PLURALS.values():
    kopf.index(MONITORING_GROUP, MONITORING_VERSION, _plural, id=f"owned_{_plural}", labels=OWNED)(
        _owned
    )


@kopf.index("monitoring.coreos.com", "v1", "prometheuses", id="prometheus_selectors")
async def prometheus_selectors(body: kopf.Body, **_: Any) -> PrometheusSelectors:
    return PrometheusSelectors.of(_plain(body))


# --- reconciling workloads: queued, for the workers of the leading replica ------------------


async def workload_changed(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    key: Key = (body.metadata.namespace or "", body["kind"], body.metadata.name or "")
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        # The garbage collector removes what the workload owned.
        _queue(memo).discard(key)
        metrics.WORKLOADS.forget(key)
        return
    _queue(memo).add(key, _plain(body))


for _kind in KINDS.values():
    kopf.index(_kind.group, _kind.version, _kind.plural, id=f"workloads_{_kind.plural}")(
        _workload_summary
    )
    kopf.index(_kind.group, _kind.version, _kind.plural, id=f"configmaps_of_{_kind.plural}")(
        _configmaps_of
    )
    kopf.on.event(_kind.group, _kind.version, _kind.plural, id=f"reconcile-{_kind.plural}")(
        workload_changed
    )


async def owned_changed(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Service, ServiceMonitor or PodMonitor of ours changed or went: its workload puts it
    right (a hand edit is reverted, a deleted one made again). Our own writes are no news."""
    key = _owner_key(body, body.metadata.namespace or "")
    if key is not None and not _controller(memo).observed(type, body):
        _queue(memo).add(key)


kopf.on.event("", "v1", "services", id="owned-service-changed", labels=OWNED)(owned_changed)
for _plural in MONITOR_PLURALS.values():
    kopf.on.event(
        MONITORING_GROUP, MONITORING_VERSION, _plural, id=f"owned-{_plural}-changed", labels=OWNED
    )(owned_changed)


@kopf.on.event("", "v1", "configmaps", id="configmap-changed")
async def configmap_changed(
    type: str, body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    data = None if type == "DELETED" else dict(body.get("data") or {})
    _controller(memo).configmaps.update(namespace, name, data)
    indexes = _indexes(kwargs)
    for kind, workload in set(indexes.by_configmap.get((namespace, name)) or ()):
        _queue(memo).add((namespace, kind, workload))


@kopf.on.event("", "v1", "namespaces", id="namespace-changed")
async def namespace_changed(
    type: str, name: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A namespace opted in or out: its workloads' pods are candidates now, or no longer."""
    seen: dict[str, str | None] = memo.setdefault("namespace_opt_in", {})
    now = None if type == "DELETED" else labels.get(ann.INJECT)
    first, before = name not in seen, seen.get(name)
    seen[name] = now
    if first or before == now or type == "DELETED":
        return  # at start-up every workload is reconciled anyway
    for namespace, kind, workload in list(_indexes(kwargs).workloads):
        if namespace == name:
            _queue(memo).add((namespace, kind, workload))


@kopf.on.event("monitoring.coreos.com", "v1", "prometheuses", id="prometheus-changed")
async def prometheus_changed(
    type: str, body: kopf.Body, uid: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A Prometheus' selectors decide which ServiceMonitors it picks up: when they change (not
    on its status updates), re-check every workload with a ServiceMonitor."""
    seen: dict[str, PrometheusSelectors | None] = memo.setdefault("prometheus_selectors", {})
    now = None if type == "DELETED" else PrometheusSelectors.of(_plain(body))
    if uid in seen and seen[uid] == now:
        return
    seen[uid] = now
    for key in list(_indexes(kwargs).owners):
        _queue(memo).add(key)


# --- admission ---------------------------------------------------------------------------------


async def review(memo: kopf.Memo, request: Any, webhook: str | None = None, **_: Any) -> Obj:
    """An AdmissionReview answered (kopf's webhook server calls this, see WebhookServer): the
    pod it is about admitted, with the sidecar when the plan says so. Never an error, so a pod
    is never blocked: on a failure it is admitted without the sidecar, and why is on it."""
    pod = ((request.get("request") or {}).get("object") or {}) if isinstance(request, dict) else {}
    if webhook != builders.WEBHOOK_HANDLER_ID or not isinstance(pod, dict):
        return builders.build_admission_response({}, [])
    admit = functools.partial(_admit, _controller(memo), pod, memo.indexes)
    try:
        plan = await asyncio.get_running_loop().run_in_executor(memo.admissions, admit)
        patch = [] if plan.patch is None else builders.build_json_patch(pod, plan.patch)
    except Exception as error:  # e.g. the pool is shut down: the operator is stopping
        plan = _failed(error)
        patch = builders.build_json_patch(pod, plan.patch or {})
    return builders.build_admission_response(request, patch, plan.warnings)


def _failed(error: Exception) -> AdmissionPlan:
    """Admitted without the sidecar, with a warning for the client, and why on the pod for the
    reconciler, which reports it on the workload (the webhook posts nothing)."""
    failure = f"injecting it failed: {error}"
    return AdmissionPlan(
        builders.build_failure_patch(failure),
        failure,
        (f"prosody-exporter sidecar not injected: {error}",),
    )


def _admit(controller: Controller, pod: dict[str, Any], indexes: Indexes) -> AdmissionPlan:
    """Observe and plan one admission, counted. A pod is never blocked: on a failure it is
    admitted without the sidecar."""
    metadata = pod["metadata"]
    # A pod of a ReplicaSet has only its name's prefix yet.
    name = metadata.get("name") or metadata.get("generateName") or ""
    where = about("Pod", metadata.get("namespace"), name)
    started = time.perf_counter()
    try:
        plan = controller.admit(pod, indexes)
    except Exception as error:
        metrics.ADMISSIONS.labels("failed").inc()
        log.exception("injection failed; admitting the pod without the sidecar", extra=where)
        return _failed(error)
    finally:
        metrics.ADMISSION_SECONDS.observe(time.perf_counter() - started)
    metrics.ADMISSIONS.labels("injected" if plan.patch is not None else "skipped").inc()
    # Every pod of an opted-in namespace comes here: the ones left alone are not news.
    level = logging.INFO if plan.patch or plan.warnings else logging.DEBUG
    log.log(level, "pod admitted: %s", plan.reason, extra=where)
    return plan


@kopf.on.probe(id="webhook-configured")
def probe(memo: kopf.Memo, **_: Any) -> bool:
    return hasattr(memo, "controller")
