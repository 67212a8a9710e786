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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import annotations as ann
from . import builders, metrics, observation
from .events import MEMORY_OBJECTS, Event, EventLog
from .kube import Kube, NamespaceTerminating
from .logs import about
from .planner import (
    RECONCILE_REASONS,
    AdmissionPlan,
    ReconcilePlan,
    candidate,
    plan_admission,
    plan_reconcile,
    workload_candidate,
)
from .prosody import Evaluator, evaluate
from .selection import PrometheusSelectors
from .settings import OperatorSettings
from .workloads import ObjectRef, label_selector, pod_owner, pod_ref

log = logging.getLogger("prosody_operator")

Obj = dict[str, Any]
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
    configmaps: Index = field(default_factory=dict)  # (namespace, name) -> data
    namespaces: Index = field(default_factory=dict)  # name -> labels
    workloads: Index = field(default_factory=dict)  # (namespace, kind, name) -> WorkloadSummary
    by_configmap: Index = field(default_factory=dict)  # (namespace, configmap) -> (kind, name)
    # (namespace, kind, name) of owners -> the Service and ServiceMonitor of ours they own
    owners: Index = field(default_factory=dict)
    prometheuses: Index = field(default_factory=dict)  # None -> PrometheusSelectors

    @staticmethod
    def first(index: Index, key: Any) -> Any:
        return next(iter(index.get(key) or ()), None)


class Controller:
    def __init__(
        self, settings: OperatorSettings, kube: Kube, evaluator: Evaluator = evaluate
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.evaluate = metrics.counted(evaluator)
        self.events = EventLog(self._post_event)
        # The resourceVersion of each object this operator last wrote, until its watch event
        # arrives: that event is no news, and until then the index holds an older version.
        self._written: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._written_lock = threading.Lock()

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

    def _configmaps(
        self, namespace: str, names: set[str], indexes: Indexes
    ) -> dict[str, dict[str, str]]:
        """The data of the named ConfigMaps: from the index of those holding Lua files, the
        others (or all, while it fills at start-up) from the API."""
        found = {}
        for name in names:
            data = Indexes.first(indexes.configmaps, (namespace, name))
            if data is not None:
                found[name] = data
        found.update(self.kube.configmap_data(namespace, names - found.keys()))
        return found

    # --- our own writes ----------------------------------------------------------------

    def _wrote(self, obj: Mapping[str, Any], resource_version: str) -> None:
        meta = obj["metadata"]
        with self._written_lock:
            self._written[(meta["namespace"], obj["kind"], meta["name"])] = resource_version
            while len(self._written) > MEMORY_OBJECTS:
                self._written.popitem(last=False)

    def observed(self, obj: Mapping[str, Any]) -> bool:
        """Whether a watch event about one of our objects shows our own last write (no news);
        from then on the index holds that version."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", obj.get("kind") or "", meta.get("name") or "")
        with self._written_lock:
            if key in self._written and self._written[key] == meta.get("resourceVersion"):
                del self._written[key]
                return True
        return False

    def _indexed_current(self, obj: Mapping[str, Any]) -> bool:
        """Whether the index's copy can be trusted: no write of ours is on its way to it."""
        meta = obj["metadata"]
        with self._written_lock:
            written = self._written.get((meta["namespace"], obj["kind"], meta["name"]))
        return written is None or written == meta.get("resourceVersion")

    def _owned(self, ref: ObjectRef, indexes: Indexes) -> dict[str, Obj]:
        """The live Service and ServiceMonitor named as ours for the workload: the index's
        copies when current, else read (missing from the index: not ours, or not seen yet)."""
        name = builders.metrics_object_name(ref.name)
        indexed = {
            obj["kind"]: dict(obj)
            for obj in indexes.owners.get(ref.key) or ()
            if obj["metadata"]["name"] == name
        }
        owned = {kind: obj for kind, obj in indexed.items() if self._indexed_current(obj)}
        if len(owned) < len(builders.OWNED_KINDS):
            read = self.kube.metrics_objects(ref.namespace, name)
            owned.update({kind: obj for kind, obj in read.items() if kind not in owned})
        return owned

    # --- admission -----------------------------------------------------------------------

    def admit(self, pod: Obj, dry_run: bool, indexes: Indexes) -> AdmissionPlan:
        """Observe, plan, report; the caller (kopf's webhook) returns the patch."""
        plan = plan_admission(self.settings, self.observe_pod(pod, dry_run, indexes), self.evaluate)
        self.events.report(plan.target, plan.events)
        return plan

    def observe_pod(self, pod: Obj, dry_run: bool, indexes: Indexes) -> observation.Admission:
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
        configmaps = {}
        prosody = candidate(metadata, spec, workload_annotations, namespace_labels)
        if prosody.wanted:
            configmaps = self._configmaps(namespace, prosody.configmaps(spec), indexes)
        cidrs = [cidr for cidrs in indexes.node_pod_cidrs.get(None, ()) for cidr in cidrs]
        if prosody.wanted and not cidrs:
            cidrs = self.kube.node_pod_cidrs()
        return observation.Admission(
            pod,
            namespace_labels,
            owner,
            workload_annotations,
            configmaps,
            tuple(cidrs),
            dry_run,
        )

    def report_admission_failure(self, pod: Obj, message: str) -> None:
        self.events.report(
            pod_owner(pod) or pod_ref(pod), [Event.warning("InjectionFailed", message)]
        )

    # --- reconcile -----------------------------------------------------------------------

    def reconcile(self, workload: Obj, indexes: Indexes) -> ReconcilePlan:
        ref = ObjectRef.of(workload)
        started = time.perf_counter()
        try:
            plan = plan_reconcile(
                self.settings, self.observe_workload(workload, indexes), self.evaluate
            )
            self.execute(plan)
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
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
        return plan

    def reconcile_named(self, kind: str, namespace: str, name: str, indexes: Indexes) -> None:
        """Reconcile a workload known by name (its ConfigMap, namespace or objects changed)."""
        workload = self.kube.workload(kind, namespace, name)
        if workload is not None and not workload["metadata"].get("deletionTimestamp"):
            self.reconcile(workload, indexes)

    def observe_workload(self, workload: Obj, indexes: Indexes) -> observation.Workload:
        """Reads only what the plan can need: nothing more for a workload that is not a
        candidate and owns nothing."""
        ref = ObjectRef.of(workload)
        namespace_labels = self._namespace_labels(ref.namespace, indexes)
        prosody = workload_candidate(workload, namespace_labels)
        owned: dict[str, Obj] = {}
        if prosody.wanted or Indexes.first(indexes.owners, ref.key):
            owned = self._owned(ref, indexes)
        if not prosody.wanted:
            return observation.Workload(workload, namespace_labels, owned=owned)
        template = workload["spec"].get("template") or {}
        configmaps = self._configmaps(
            ref.namespace, prosody.configmaps(template.get("spec") or {}), indexes
        )
        selector = label_selector(workload["spec"].get("selector") or {})
        pods = self.kube.pods(ref.namespace, selector) if selector else []
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

    def execute(self, plan: ReconcilePlan) -> None:
        try:
            for live, obj in plan.replace:
                if self.kube.delete(live):  # else replaced meanwhile: the next reconcile sees it
                    self._wrote(obj, self.kube.apply(obj))
            for obj in plan.apply:
                self._wrote(obj, self.kube.apply(obj))
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


def summarize(workload: Mapping[str, Any]) -> WorkloadSummary:
    """What the workload index keeps: its reference, and its annotations of ours."""
    annotations = workload["metadata"].get("annotations") or {}
    ours = {k: v for k, v in annotations.items() if k.startswith(ann.PREFIX)}
    return WorkloadSummary(ObjectRef.of(workload), ours)
