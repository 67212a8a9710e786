"""Observe -> plan -> apply, for an admission request and for a workload.

Observing reads what a decision needs (from kopf's indexes, else through Kube) into one
immutable value; the planner decides; executing carries the plan out. Only this module and
kube.py have side effects, and kube.py alone talks to the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as NotYet
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from . import annotations as ann
from . import builders, metrics, names, observation, optin
from .configmaps import ConfigMapCache
from .evaluation import Busy, Evaluations, Limits
from .events import MEMORY_OBJECTS, Event, EventLog
from .kube import Kube, NamespaceTerminating, NameTaken, retryable
from .logs import about
from .planner import (
    RECONCILE_REASONS,
    AdmissionPlan,
    ReconcilePlan,
    candidate,
    monitor_kinds,
    plan_admission,
    plan_reconcile,
    workload_candidate,
)
from .prosody import ConfigInputs, Evaluator, evaluate
from .prosody_config import DIALECTS, StatisticsConfig
from .retries import Retries
from .selection import PrometheusSelectors
from .settings import OperatorSettings
from .workloads import ObjectRef, label_selector, may_have_pods, pod_owner

log = logging.getLogger("prosody_operator")

Obj = dict[str, Any]
T = TypeVar("T")
# A kopf index: key -> the values every indexed object returned for that key.
Index = Mapping[Any, Iterable[Any]]


@dataclass(frozen=True)
class WorkloadSummary:
    """What the workload index keeps of a workload."""

    ref: ObjectRef
    annotations: Mapping[str, str]  # its own annotations of ours


@dataclass(frozen=True)
class Indexes:
    """kopf's in-memory indexes (handlers.py fills them). kopf serves the webhook before it has
    filled them at start-up: whatever is missing there is read from the API."""

    node_pod_cidrs: Index = field(default_factory=dict)  # None -> [cidr, ...] per Node
    namespaces: Index = field(default_factory=dict)  # name -> labels
    workloads: Index = field(default_factory=dict)  # (namespace, kind, name) -> WorkloadSummary
    by_configmap: Index = field(default_factory=dict)  # (namespace, configmap) -> (kind, name)
    # (namespace, kind, name) of owners -> copies of the objects of ours they own (what a
    # reconcile compares with what it builds)
    owners: Index = field(default_factory=dict)
    prometheuses: Index = field(default_factory=dict)  # None -> PrometheusSelectors
    quotas: Index = field(default_factory=dict)  # namespace -> quotas.Requirement

    @staticmethod
    def first(index: Index, key: Any) -> Any:
        return next(iter(index.get(key) or ()), None)


# Seconds a reconcile waits beyond the evaluation budget (the result of a killed evaluation
# comes right after it).
RECONCILE_SLACK = 2.0
# Seconds before a workload whose rollout restart waits for the webhook is looked at again.
DEFERRED_RESTART_RECHECK = 5.0


class Controller:
    """`evaluations`: the out-of-process evaluator (evaluation.py); None evaluates in this
    process, without a time bound (for tests that need no worker processes)."""

    def __init__(
        self, settings: OperatorSettings, kube: Kube, evaluations: Evaluations | None = None
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.evaluations = evaluations
        self.events = EventLog(self._post_event)
        self.configmaps = ConfigMapCache()
        self.node_cidrs_at_start: tuple[str, ...] = ()
        self.retries = Retries()
        # Workloads whose rollout restart waits for the webhook: looked at again, at a fixed
        # pace; the keys of those waiting, said once in the log.
        self.deferrals = Retries((DEFERRED_RESTART_RECHECK,))
        self._deferred: set[tuple[str, str, str]] = set()
        # Reconciles of workloads whose config was still being evaluated when they were last
        # reconciled: one thread, run when the evaluation is done.
        self._followups = ThreadPoolExecutor(1, thread_name_prefix="reconcile-evaluated")
        # Where a reconcile asked for later goes (handlers.py: the leader's work queue); None:
        # it runs in the thread that asks.
        self.requeue: Callable[[ObjectRef], None] | None = None
        # What the API server answered to this operator's last write of each object, until
        # its watch event arrives: that event is no news, and until then the index holds an
        # older version (or none) and this copy is the live object.
        self._written: OrderedDict[tuple[str, str, str], Obj] = OrderedDict()
        self._written_lock = threading.Lock()

    def evaluator(self, wait: float, waiting: list[Future[StatisticsConfig]]) -> Evaluator:
        """Evaluates through the workers, waiting at most `wait` seconds in all (a config read
        in both dialects is two evaluations) for results not cached yet: None then, and the
        Future goes to `waiting`."""
        evaluations = self.evaluations
        if evaluations is None:
            return metrics.counted(evaluate)
        deadline = time.monotonic() + wait

        def bounded(inputs: ConfigInputs) -> StatisticsConfig | None:
            try:
                if not inputs.version_known:  # to be read in every dialect: start them together
                    for dialect in DIALECTS:
                        evaluations.submit(replace(inputs, dialect=dialect))
                future = evaluations.submit(inputs)
            except Busy as error:
                log.warning("config not evaluated: %s", error)
                return None
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()))
            except NotYet:
                waiting.append(future)
                return None

        return bounded

    def _post_event(self, involved: ObjectRef, event: Event) -> None:
        metrics.event_posted(event, self.kube.post_event(involved, event))

    def remember_posted_events(self) -> int:
        """Seed the Event log with the Events an earlier process posted, so a restart posts
        none again; returns how many."""
        posted = self.kube.posted_events(self.settings.watch_namespaces)
        for uid, reason, message in posted:
            self.events.remember(uid, reason, message)
        return len(posted)

    def _namespace_labels(self, namespace: str, indexes: Indexes) -> Mapping[str, str]:
        labels = Indexes.first(indexes.namespaces, namespace)
        return labels if labels is not None else self.kube.namespace_labels(namespace)

    # --- our own writes ----------------------------------------------------------------

    def _wrote(self, written: Obj) -> None:
        meta = written["metadata"]
        with self._written_lock:
            key = (meta["namespace"], written["kind"], meta["name"])
            self._written[key] = builders.comparable(written)
            while len(self._written) > MEMORY_OBJECTS:
                self._written.popitem(last=False)

    def observed(self, type: str, obj: Mapping[str, Any]) -> bool:
        """Whether a watch event about one of our objects shows our own last write (no news);
        from then on the index holds that version. A deletion is news, and ends what is
        remembered of the object."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", obj.get("kind") or "", meta.get("name") or "")
        with self._written_lock:
            written = self._written.get(key)
            if written is None:
                return False
            if type == "DELETED" or _version(written) == meta.get("resourceVersion"):
                del self._written[key]
                return type != "DELETED"
        return False

    def _owned(
        self, ref: ObjectRef, kinds: set[str], indexes: Indexes, look: bool
    ) -> dict[str, Obj]:
        """The live objects of these kinds named as ours for the workload: the index's copy, or
        our last write while the index has not seen it; read when the index's copy is older
        than our write (changed since). One neither has is taken as absent (the index has
        every object of ours), and read only if `look`: someone else's of that name is found
        when creating it (`execute`) fails."""
        name = names.metrics_object_name(ref.name)
        indexed = {
            obj["kind"]: obj
            for obj in indexes.owners.get(ref.key) or ()
            if obj["metadata"]["name"] == name
        }
        owned, read = {}, set()
        with self._written_lock:
            for kind in kinds | indexed.keys():
                written, live = self._written.get((ref.namespace, kind, name)), indexed.get(kind)
                if live is not None and (written is None or _version(written) == _version(live)):
                    owned[kind] = dict(live)
                elif written is not None and live is None:
                    owned[kind] = dict(written)
                elif live is not None or look:
                    read.add(kind)
        if read:
            owned.update(self.kube.metrics_objects(ref.namespace, name, read))
        return owned

    # --- admission -----------------------------------------------------------------------

    def admit(self, pod: Obj, indexes: Indexes) -> AdmissionPlan:
        """Observe and plan; the caller (kopf's webhook) returns the patch. Nothing is written,
        and nothing read outside the pod's namespace, which must be one the API server sends
        here: anyone who reaches the webhook's port can send a review (kopf checks no caller).
        A config not evaluated within the admission's wait is left to the workload's reconcile."""
        namespace = (pod.get("metadata") or {}).get("namespace") or ""
        if not optin.served(namespace, self.settings.watch_namespaces):
            return AdmissionPlan(None, f"namespace {namespace!r} is not served")
        evaluate = self.evaluator(self.settings.evaluation_admission_wait, [])
        return plan_admission(self.settings, self.observe_pod(pod, indexes), evaluate)

    def observe_pod(self, pod: Obj, indexes: Indexes) -> observation.Admission:
        metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        namespace = metadata.get("namespace") or ""
        namespace_labels = self._namespace_labels(namespace, indexes)
        owner = pod_owner(pod)
        workload_annotations: Mapping[str, str] = {}
        if owner is not None:
            summary = Indexes.first(indexes.workloads, owner.key)
            if summary is None:  # not indexed yet: read it
                body = self.kube.workload(owner.kind, owner.namespace, owner.name) or {}
                summary = summarize(body) if body else None
            if summary is not None:
                owner, workload_annotations = summary.ref, summary.annotations
        configmaps: Mapping[str, Mapping[str, str]] = {}
        prosody = candidate(metadata, spec, workload_annotations, namespace_labels)
        if prosody.wanted:
            configmaps = self.configmaps.read_through(
                namespace, prosody.configmaps(spec), partial(self.kube.configmap_data, namespace)
            )
        return observation.Admission(
            pod,
            namespace_labels,
            owner,
            workload_annotations,
            configmaps,
            self._node_cidrs(indexes),
            tuple(indexes.quotas.get(namespace, ())),
        )

    def _node_cidrs(self, indexes: Indexes) -> tuple[str, ...]:
        """The Nodes' podCIDRs from the index; until kopf has filled it (it serves the webhook
        meanwhile), as read once at start-up. Never a list of all Nodes per admission."""
        nodes = indexes.node_pod_cidrs.get(None)
        if nodes is None:
            return self.node_cidrs_at_start
        return tuple(cidr for cidrs in nodes for cidr in cidrs)

    def read_node_cidrs(self) -> None:
        """At start-up, before the webhook serves."""
        self.node_cidrs_at_start = tuple(self.kube.node_pod_cidrs())

    # --- reconcile -----------------------------------------------------------------------

    def reconcile(self, workload: Obj, indexes: Indexes) -> ReconcilePlan | None:
        """The plan carried out; None when it failed for a reason that passes, and will be
        tried again (retries.py)."""
        ref = ObjectRef.of(workload)
        return self._retrying(ref, indexes, lambda: self._reconcile(workload, indexes))

    def reconcile_named(self, kind: str, namespace: str, name: str, indexes: Indexes) -> None:
        """Reconcile a workload known by name (its ConfigMap, namespace or objects changed)."""
        ref = ObjectRef("", kind, namespace, name)
        self._retrying(ref, indexes, lambda: self._reconcile_named(ref, indexes))

    def _reconcile(self, workload: Obj, indexes: Indexes) -> ReconcilePlan:
        waiting: list[Future[StatisticsConfig]] = []
        wait = self.settings.evaluation_timeout + RECONCILE_SLACK
        started = time.perf_counter()
        try:
            evaluate = self.evaluator(wait, waiting)
            try:
                plan = self._plan_and_execute(workload, indexes, evaluate, look=False)
            except NameTaken:  # an object taken for absent exists: look at it, plan again
                plan = self._plan_and_execute(workload, indexes, evaluate, look=True)
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        self._record(plan)
        self._defer(plan, indexes)
        if waiting:  # queued behind other evaluations: reconcile again once they are done
            ref = plan.workload

            def follow_up(_: Future[StatisticsConfig]) -> None:
                if all(future.done() for future in waiting):
                    self._followups.submit(self._later, ref, indexes)

            for future in waiting:
                future.add_done_callback(follow_up)
        return plan

    def _plan_and_execute(
        self, workload: Obj, indexes: Indexes, evaluate: Evaluator, look: bool
    ) -> ReconcilePlan:
        seen = self.observe_workload(workload, indexes, look)
        plan = plan_reconcile(self.settings, seen, evaluate)
        if plan.restart and self.settings.webhook_service:
            # New pods get the sidecar only if the webhook can be called: look (the config's
            # evaluation is cached by now).
            namespace, _, name = self.settings.webhook_service.partition("/")
            ready = self.kube.has_ready_endpoint(namespace, name)
            seen = replace(seen, webhook_ready=ready)
            plan = plan_reconcile(self.settings, seen, evaluate)
        # Kinds taken for absent without a look are made by applies that take nothing over.
        self.execute(
            plan, careful=() if look else {o["kind"] for o in plan.apply} - seen.owned.keys()
        )
        return plan

    def _defer(self, plan: ReconcilePlan, indexes: Indexes) -> None:
        """A restart that waits: reconcile again shortly (said once in the log)."""
        ref = plan.workload
        key = (ref.namespace, ref.kind, ref.name)
        if not plan.deferred:
            self._forget_deferral(key)
            return
        if key not in self._deferred:
            self._deferred.add(key)
            log.info(
                "rollout restart deferred: %s; looking again every %g s",
                plan.deferred,
                DEFERRED_RESTART_RECHECK,
                extra=about(ref.kind, ref.namespace, ref.name),
            )
        self.deferrals.failed(key, lambda: self._later(ref, indexes))

    def _forget_deferral(self, key: tuple[str, str, str]) -> None:
        self._deferred.discard(key)
        self.deferrals.succeeded(key)

    @staticmethod
    def _record(plan: ReconcilePlan) -> None:
        ref = plan.workload
        changed = bool(plan.apply or plan.delete or plan.replace or plan.restart)
        metrics.RECONCILES.labels("changed" if changed else "unchanged").inc()
        metrics.WORKLOADS.set(ref.key, metrics.workload_states(plan.events))
        if changed:
            what = [f"{o['kind']} applied" for o in plan.apply]
            what += [f"{live['kind']} made again" for live, _ in plan.replace]
            what += [f"{o['kind']} deleted" for o in plan.delete]
            what += ["rollout restarted"] * plan.restart
            where = about(ref.kind, ref.namespace, ref.name)
            log.info("reconciled: %s", ", ".join(what), extra=where)

    def _reconcile_named(self, ref: ObjectRef, indexes: Indexes) -> None:
        workload = self.kube.workload(ref.kind, ref.namespace, ref.name)
        if workload is not None and not workload["metadata"].get("deletionTimestamp"):
            self._reconcile(workload, indexes)
        else:  # gone: nothing waits for it any more
            self._forget_deferral((ref.namespace, ref.kind, ref.name))

    def _later(self, ref: ObjectRef, indexes: Indexes) -> None:
        if self.requeue is not None:
            self.requeue(ref)
        else:
            self.reconcile_named(ref.kind, ref.namespace, ref.name, indexes)

    def _retrying(self, ref: ObjectRef, indexes: Indexes, work: Callable[[], T]) -> T | None:
        try:
            done = work()
        except Exception as error:
            if not retryable(error):
                raise
            key = (ref.namespace, ref.kind, ref.name)
            delay = self.retries.failed(key, lambda: self._later(ref, indexes))
            log.warning("reconciling %s failed (%s); again in %g s", ref, error, delay)
            return None
        self.retries.succeeded((ref.namespace, ref.kind, ref.name))
        return done

    def observe_workload(
        self, workload: Obj, indexes: Indexes, look: bool = False
    ) -> observation.Workload:
        """Reads only what the plan can need: nothing more for a workload that is not a
        candidate and owns nothing (`look`: see `_owned`)."""
        ref = ObjectRef.of(workload)
        namespace_labels = self._namespace_labels(ref.namespace, indexes)
        prosody = workload_candidate(workload, namespace_labels)
        # What it owns (to delete what the plan no longer builds), and what the plan builds.
        kinds = {obj["kind"] for obj in indexes.owners.get(ref.key) or ()}
        if prosody.wanted:
            kinds.update(monitor_kinds(self.settings))
        owned: dict[str, Obj] = {}
        if kinds:
            owned = self._owned(ref, kinds, indexes, look)
        if not prosody.wanted:
            return observation.Workload(workload, namespace_labels, owned=owned)
        template = workload["spec"].get("template") or {}
        # Kept as the webhook keeps them (its pods will need them), current through events.
        configmaps = self.configmaps.read_through(
            ref.namespace,
            prosody.configmaps(template.get("spec") or {}),
            partial(self.kube.configmap_data, ref.namespace),
        )
        selector = label_selector(workload["spec"].get("selector") or {})
        pods = []
        if selector and may_have_pods(workload):
            pods = self.kube.pods(ref.namespace, selector)
        prometheuses: list[PrometheusSelectors] = list(indexes.prometheuses.get(None, ()))
        return observation.Workload(
            workload,
            namespace_labels,
            configmaps,
            owned,
            tuple(prometheuses),
            tuple(pods),
            time.time(),
        )

    def execute(self, plan: ReconcilePlan, careful: Collection[str] = ()) -> None:
        """Carry the plan out. The applies of `careful` kinds fail (NameTaken) rather than take
        over someone else's object of the same name."""
        try:
            for live, obj in plan.replace:
                if self.kube.delete(live):  # else replaced meanwhile: the next reconcile sees it
                    self._wrote(self.kube.apply(obj))
            for obj in plan.apply:
                self._wrote(self.kube.apply(obj, force=obj["kind"] not in careful))
        except NamespaceTerminating:
            return  # the namespace goes, and everything in it
        for live in plan.delete:
            self.kube.delete(live)
        if plan.restart:
            self.kube.restart_rollout(plan.workload)
        # Last: the Events say what was done.
        self.events.report(plan.workload, plan.events, settles=RECONCILE_REASONS)

    # --- the webhook configuration -------------------------------------------------------

    def apply_webhook_configuration(self, ca_bundle: str) -> None:
        client_config = builders.build_webhook_client_config(
            ca_bundle, url=self.settings.webhook_url, service=self.settings.webhook_service
        )
        if client_config is None:
            log.warning("no webhook URL or Service set: the webhook configuration is not managed")
            return
        configuration = builders.build_webhook_configuration(
            self.settings.webhook_configuration, client_config, self.settings.watch_namespaces
        )
        # Another replica, or this one before a restart, may have applied the same already.
        live = self.kube.webhook_configuration(self.settings.webhook_configuration)
        if live is None or not builders.is_subset(configuration, live):
            self.kube.apply_webhook_configuration(configuration)


def start_evaluations(settings: OperatorSettings) -> Evaluations:
    """The config evaluation workers, bounded as the settings say, started."""
    return Evaluations(
        Limits(
            timeout=settings.evaluation_timeout,
            memory_bytes=settings.evaluation_memory_mib * 1024 * 1024,
            workers=settings.evaluation_workers,
            cache_size=settings.evaluation_cache_size,
        )
    )


def _version(obj: Mapping[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def summarize(workload: Mapping[str, Any]) -> WorkloadSummary:
    """What the workload index keeps: its reference, and its annotations of ours."""
    annotations = workload["metadata"].get("annotations") or {}
    ours = {k: v for k, v in annotations.items() if k.startswith(ann.PREFIX)}
    return WorkloadSummary(ObjectRef.of(workload), ours)
