"""Observe -> plan -> apply, for an admission request and for a workload.

Observing reads what a decision needs (from kopf's indexes, else through Kube) into one
immutable value; the planner decides; executing carries the plan out. Only this module and
kube.py have side effects, and kube.py alone talks to the API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import annotations as ann
from . import builders, names, observation, optin
from .configmaps import ConfigMapCache
from .events import EventLog
from .kube import Kube, NamespaceTerminating, retryable
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
from .retries import Retries
from .selection import PrometheusSelectors
from .settings import OperatorSettings
from .workloads import ObjectRef, label_selector, pod_owner

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
    owners: Index = field(default_factory=dict)  # (namespace, kind, name) of owners -> True
    prometheuses: Index = field(default_factory=dict)  # None -> PrometheusSelectors
    quotas: Index = field(default_factory=dict)  # namespace -> quotas.Requirement

    @staticmethod
    def first(index: Index, key: Any) -> Any:
        return next(iter(index.get(key) or ()), None)


class Controller:
    def __init__(
        self, settings: OperatorSettings, kube: Kube, evaluator: Evaluator = evaluate
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.evaluate = evaluator
        self.events = EventLog(kube.post_event)
        self.configmaps = ConfigMapCache()
        self.node_cidrs_at_start: tuple[str, ...] = ()
        self.retries = Retries()

    def _namespace_labels(self, namespace: str, indexes: Indexes) -> Mapping[str, str]:
        labels = Indexes.first(indexes.namespaces, namespace)
        return labels if labels is not None else self.kube.namespace_labels(namespace)

    # --- admission -----------------------------------------------------------------------

    def admit(self, pod: Obj, indexes: Indexes) -> AdmissionPlan:
        """Observe and plan; the caller (kopf's webhook) returns the patch. Nothing is written,
        and nothing read outside the pod's namespace, which must be one the API server sends
        here: anyone who reaches the webhook's port can send a review (kopf checks no caller)."""
        namespace = (pod.get("metadata") or {}).get("namespace") or ""
        if not optin.served(namespace, self.settings.watch_namespaces):
            return AdmissionPlan(None, f"namespace {namespace!r} is not served")
        return plan_admission(self.settings, self.observe_pod(pod, indexes), self.evaluate)

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
        configmaps = {}
        prosody = candidate(metadata, spec, workload_annotations, namespace_labels)
        if prosody.wanted:
            mounted = prosody.configmaps(spec)
            for name in mounted:
                data = self.configmaps.get(namespace, name)
                if data is not None:
                    configmaps[name] = data
            configmaps.update(self.kube.configmap_data(namespace, mounted - configmaps.keys()))
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
        plan = plan_reconcile(
            self.settings, self.observe_workload(workload, indexes), self.evaluate
        )
        self.execute(plan)
        return plan

    def _reconcile_named(self, ref: ObjectRef, indexes: Indexes) -> None:
        workload = self.kube.workload(ref.kind, ref.namespace, ref.name)
        if workload is not None and not workload["metadata"].get("deletionTimestamp"):
            self._reconcile(workload, indexes)

    def _retrying(self, ref: ObjectRef, indexes: Indexes, work: Callable[[], T]) -> T | None:
        try:
            done = work()
        except Exception as error:
            if not retryable(error):
                raise
            key = (ref.namespace, ref.kind, ref.name)
            delay = self.retries.failed(
                key, lambda: self.reconcile_named(ref.kind, ref.namespace, ref.name, indexes)
            )
            log.warning("reconciling %s failed (%s); again in %g s", ref, error, delay)
            return None
        self.retries.succeeded((ref.namespace, ref.kind, ref.name))
        return done

    def observe_workload(self, workload: Obj, indexes: Indexes) -> observation.Workload:
        """Reads only what the plan can need: nothing more for a workload that is not a
        candidate and owns nothing."""
        ref = ObjectRef.of(workload)
        namespace_labels = self._namespace_labels(ref.namespace, indexes)
        prosody = workload_candidate(workload, namespace_labels)
        owned: dict[str, Obj] = {}
        if prosody.wanted or Indexes.first(indexes.owners, ref.key):
            name = names.metrics_object_name(ref.name)
            owned = self.kube.metrics_objects(ref.namespace, name)
        if not prosody.wanted:
            return observation.Workload(workload, namespace_labels, owned=owned)
        template = workload["spec"].get("template") or {}
        configmaps = self.kube.configmap_data(
            ref.namespace, prosody.configmaps(template.get("spec") or {})
        )
        for name, data in configmaps.items():  # for the webhook: its pods will need them
            self.configmaps.put(ref.namespace, name, data)
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
            for obj in plan.apply:
                self.kube.apply(obj)
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
        self.kube.apply_webhook_configuration(
            builders.build_webhook_configuration(
                self.settings.webhook_configuration, client_config, self.settings.watch_namespaces
            )
        )


def summarize(workload: Mapping[str, Any]) -> WorkloadSummary:
    """What the workload index keeps: its reference, and its annotations of ours."""
    annotations = workload["metadata"].get("annotations") or {}
    ours = {k: v for k, v in annotations.items() if k.startswith(ann.PREFIX)}
    return WorkloadSummary(ObjectRef.of(workload), ours)
