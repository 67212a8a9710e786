"""What the operator does on an admission request and on a Deployment change.

Decisions come from the pure modules (annotations, prosody, builders); this module fetches their
inputs through `Kube`, applies the results, and reports each decision and problem as an Event on
the Deployment.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import annotations as ann
from . import builders
from .kube import Kube
from .prosody import (
    ConfigSource,
    IntervalDecision,
    config_sources,
    decide_interval,
    find_prosody_container,
)
from .selection import PrometheusSelectors, Selection, select
from .settings import OperatorSettings

log = logging.getLogger("prosody_operator")

# A ReplicaSet's pods are named <replicaset>-<random>, and a Deployment's ReplicaSets
# <deployment>-<pod-template-hash>.
_RS_SUFFIX = re.compile(r"-[a-z0-9]{1,10}$")
RESTART_COOLDOWN_SECONDS = 600.0

# (namespace, name) -> the ConfigMap's data, or None when not known without asking the API.
CachedConfigMaps = Callable[[str, str], Mapping[str, str] | None]

Obj = dict[str, Any]


@dataclass(frozen=True)
class Injection:
    patch: Obj | None  # None: leave the pod as it is
    reason: str
    problems: tuple[tuple[str, str], ...] = ()  # (Event reason, message)

    @property
    def warnings(self) -> list[str]:
        return [message for _, message in self.problems]


@dataclass
class EventLog:
    """Posts each distinct (object, reason, message) once, so level-triggered reconciles do not
    flood the object with the same Event."""

    kube: Kube
    _seen: dict[tuple[str, str], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        key = (obj["metadata"].get("uid", obj["metadata"]["name"]), reason)
        with self._lock:
            if self._seen.get(key) == message:
                return
            self._seen[key] = message
        self.kube.post_event(obj, event_type, reason, message)

    def forget(self, obj: Mapping[str, Any], reason: str) -> None:
        with self._lock:
            self._seen.pop((obj["metadata"].get("uid", obj["metadata"]["name"]), reason), None)


def _interval_of(monitor: Mapping[str, Any] | None) -> str | None:
    endpoints = ((monitor or {}).get("spec") or {}).get("endpoints") or [{}]
    interval: str | None = endpoints[0].get("interval")
    return interval


class Controller:
    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.events = EventLog(kube)
        self._restarted: dict[str, float] = {}

    # --- shared --------------------------------------------------------------------------

    def _interval(
        self,
        namespace: str,
        pod_spec: Mapping[str, Any],
        overrides: ann.Overrides,
        cached: CachedConfigMaps | None = None,
    ) -> IntervalDecision:
        """`cached`: ConfigMap data already known (kopf's index); the rest is read."""
        container = find_prosody_container(pod_spec, overrides.container)
        sources: list[ConfigSource] = config_sources(pod_spec, container) if container else []
        names = {source.configmap for source in sources}
        configmaps: dict[str, Mapping[str, str]] = {}
        for name in names:
            data = cached(namespace, name) if cached else None
            if data is not None:
                configmaps[name] = data
        configmaps.update(self.kube.configmap_data(namespace, names - configmaps.keys()))
        return decide_interval(self.settings, container, sources, configmaps, overrides)

    # --- admission -----------------------------------------------------------------------

    def plan_injection(
        self,
        pod: Mapping[str, Any],
        node_cidrs: Iterable[str],
        cached_configmaps: CachedConfigMaps | None = None,
    ) -> Injection:
        spec = pod.get("spec") or {}
        metadata = pod.get("metadata") or {}
        if builders.has_sidecar(spec):
            return Injection(None, "already injected")
        parsed = ann.parse_annotations(metadata.get("annotations"))
        problems = [("InvalidAnnotation", problem) for problem in parsed.problems]
        if not parsed.enabled:
            return Injection(None, f'{ann.INJECT} is not "true"', tuple(problems))
        overrides = parsed.overrides
        if overrides.container and find_prosody_container(spec, overrides.container) is None:
            problem = f"{ann.CONTAINER}={overrides.container!r} ignored: no such container"
            problems.append(("InvalidAnnotation", problem))
            overrides = dataclasses.replace(overrides, container=None)
        namespace = metadata.get("namespace") or ""
        decision = self._interval(namespace, spec, overrides, cached_configmaps)
        cidrs = builders.allowlist(node_cidrs, self.settings)
        if not cidrs and overrides.allow_cidrs is None:
            problems.append(
                (
                    "NoPodNetwork",
                    "no pod-network CIDRs known (Nodes have no spec.podCIDRs and "
                    "PROSODY_OPERATOR_POD_CIDRS is empty): the sidecar only allows loopback",
                )
            )
            cidrs = ["127.0.0.0/8", "::1/128"]
        sidecar = builders.build_sidecar_container(
            self.settings, overrides, cidrs, decision.interval
        )
        return Injection(
            builders.build_injection_patch(pod, sidecar),
            f"injected, interval {decision.interval.scrape_interval} ({decision.interval.source})",
            tuple(problems),
        )

    def event_target(self, pod: Mapping[str, Any]) -> Obj:
        """Where to report on a new pod: its Deployment (from its ReplicaSet owner), or else the
        pod itself."""
        metadata = pod.get("metadata") or {}
        namespace = metadata.get("namespace") or ""
        for owner in metadata.get("ownerReferences") or []:
            if owner.get("kind") == "ReplicaSet":
                name = self.kube.replicaset_owner(namespace, owner["name"])
                if name is None:
                    name = _RS_SUFFIX.sub("", owner["name"])
                return {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": name, "namespace": namespace},
                }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": metadata.get("name") or metadata.get("generateName", "pod"),
                "namespace": namespace,
            },
        }

    def report_injection_problems(
        self, pod: Mapping[str, Any], problems: Iterable[tuple[str, str]]
    ) -> None:
        target = self.event_target(pod)
        for reason, message in problems:
            self.kube.post_event(target, "Warning", reason, message)

    # --- reconciling Deployments ---------------------------------------------------------

    def reconcile(
        self,
        deployment: Obj,
        *,
        has_metrics_objects: bool,
        prometheuses: Iterable[PrometheusSelectors] = (),
    ) -> None:
        meta = deployment["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        template = deployment["spec"]["template"]
        parsed = ann.parse_annotations(template.get("metadata", {}).get("annotations"))
        object_name = builders.metrics_object_name(name)
        if not parsed.enabled:
            if has_metrics_objects and self.kube.delete_metrics_objects(namespace, object_name):
                self.events.post(
                    deployment,
                    "Normal",
                    "MetricsRemoved",
                    f'{ann.INJECT} is no longer "true": deleted Service and ServiceMonitor '
                    f"{object_name}",
                )
            return
        for problem in parsed.problems:
            self.events.post(deployment, "Warning", "InvalidAnnotation", problem)
        decision = self._interval(namespace, template.get("spec") or {}, parsed.overrides)
        for finding in decision.findings:
            where = finding.file + (f":{finding.line}" if finding.line else "")
            self.events.post(deployment, "Warning", "ProsodyConfig", f"{where}: {finding.message}")
        interval = decision.interval
        port = parsed.overrides.port or self.settings.exporter_port
        service = builders.build_service(deployment, port)
        selection = self._selection(deployment, prometheuses)
        monitor = builders.build_service_monitor(
            deployment, interval, self.settings.service_monitor_labels, selection.summary
        )
        changed_service = self.kube.ensure(service)
        changed_monitor = self.kube.ensure(monitor)
        if changed_service or changed_monitor:
            message = (
                f"ServiceMonitor {object_name}: interval {interval.scrape_interval} "
                f"(from {interval.source}), Service port {port}"
            )
            if changed_monitor and _interval_of(changed_monitor.previous) not in (
                None,
                interval.scrape_interval,
            ):
                message += (
                    ". Prosody reads statistics_interval only when it starts and the sidecar's "
                    "interval is set when a pod is created: restart the pods to follow "
                    f"(kubectl -n {namespace} rollout restart deployment/{name})"
                )
            self.events.post(deployment, "Normal", "MetricsConfigured", message)
        self._report_selection(deployment, object_name, selection)
        self._check_drift(deployment, interval.scrape_interval)

    def _selection(self, deployment: Obj, prometheuses: Iterable[PrometheusSelectors]) -> Selection:
        prometheuses = list(prometheuses)
        namespace = deployment["metadata"]["namespace"]
        labels = builders.monitor_labels(deployment, self.settings.service_monitor_labels)
        namespace_labels = self.kube.namespace_labels(namespace) if prometheuses else {}
        return select(prometheuses, labels, namespace, namespace_labels)

    def _report_selection(self, deployment: Obj, object_name: str, selection: Selection) -> None:
        """Selection diagnostics: the ServiceMonitor is useless unless a Prometheus selects it."""
        if selection.selected_by:
            self.events.forget(deployment, "NotSelectedByPrometheus")
            self.events.post(
                deployment,
                "Normal",
                "SelectedByPrometheus",
                f"ServiceMonitor {object_name} is selected by Prometheus {selection.summary}",
            )
            return
        self.events.forget(deployment, "SelectedByPrometheus")
        where = (
            f"namespaces {', '.join(self.settings.watch_namespaces)}"
            if self.settings.watch_namespaces
            else "the cluster"
        )
        why = "; ".join(selection.reasons) or f"there is no Prometheus resource in {where}"
        self.events.post(
            deployment,
            "Warning",
            "NotSelectedByPrometheus",
            f"No Prometheus selects ServiceMonitor {object_name}: {why}. Its labels come from "
            "PROSODY_OPERATOR_SERVICE_MONITOR_LABELS (the chart's serviceMonitor.labels).",
        )

    def _check_drift(self, deployment: Obj, interval: str) -> None:
        """Running pods without the sidecar (the webhook was down when they were created)."""
        selector = deployment["spec"]["selector"].get("matchLabels") or {}
        if not selector:
            return
        pods = self.kube.pods(deployment["metadata"]["namespace"], selector)
        active = [p for p in pods if p.get("status", {}).get("phase") in ("Pending", "Running")]
        missing = sorted(
            p["metadata"]["name"] for p in active if not builders.has_sidecar(p.get("spec", {}))
        )
        if not missing:
            self.events.forget(deployment, "SidecarMissing")
            return
        name = deployment["metadata"]["name"]
        restart = self.settings.restart_on_drift
        self.events.post(
            deployment,
            "Warning",
            "SidecarMissing",
            f"{len(missing)} pod(s) lack the prosody-exporter sidecar (the webhook was not "
            f"reachable when they were created): {', '.join(missing[:5])}. "
            + (
                "Restarting the rollout."
                if restart
                else f"Fix: kubectl -n {deployment['metadata']['namespace']} rollout restart "
                f"deployment/{name}"
            ),
        )
        if restart and self._may_restart(deployment["metadata"]["uid"]):
            self.kube.restart_rollout(deployment["metadata"]["namespace"], name)

    def _may_restart(self, uid: str) -> bool:
        """One restart per Deployment per cool-down: during the rollout the old pods still lack
        the sidecar, and restarting again would never let it finish."""
        now = time.monotonic()
        if now - self._restarted.get(uid, -RESTART_COOLDOWN_SECONDS) < RESTART_COOLDOWN_SECONDS:
            return False
        self._restarted[uid] = now
        return True
