"""Every decision the operator makes, as pure functions of an observation: what a reconcile
applies, deletes, reports and restarts; what an admission patches and reports. Nothing here
reads or writes anything (tests/operator/test_planner.py drives it from tables)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import annotations as ann
from . import builders, optin, prosody
from .events import Event
from .intervals import EffectiveInterval
from .observation import Admission, Workload
from .prosody import Evaluator
from .selection import Selection, select
from .settings import OperatorSettings
from .workloads import ObjectRef, controller_uid, pod_ref, restart_command

Obj = dict[str, Any]

# The template annotation `kubectl rollout restart` sets, and so does the operator.
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
# One restart per workload per cool-down: during the rollout the old pods still lack the sidecar,
# and restarting again would never let it finish.
RESTART_COOLDOWN_SECONDS = 600.0
# What a reconcile checks every time: its Events of these reasons are the current state (see
# EventLog.report), so a problem that goes away and comes back is reported again.
RECONCILE_REASONS = frozenset(
    {
        "InvalidAnnotation",
        "ProsodyConfig",
        "NameConflict",
        "MetricsConfigured",
        "MetricsRemoved",
        "SelectedByPrometheus",
        "NotSelectedByPrometheus",
        "SidecarMissing",
        "WebhookNotCalled",
    }
)
# The sidecar's allowlist when no pod network is known: loopback only.
LOOPBACK = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class ReconcilePlan:
    workload: ObjectRef
    apply: tuple[Obj, ...] = ()  # built objects, to server-side apply
    delete: tuple[Mapping[str, Any], ...] = ()  # live objects, to delete (by their uid)
    events: tuple[Event, ...] = ()  # on the workload
    restart: bool = False  # restart the workload's rollout
    # (live, built): delete the live object (by its uid), then apply the built one in its place
    # (a field that cannot change in place differs: builders.must_recreate).
    replace: tuple[tuple[Mapping[str, Any], Obj], ...] = ()


@dataclass(frozen=True)
class AdmissionPlan:
    patch: Obj | None  # None: admit the pod as it is
    reason: str  # what was decided, for the log
    target: ObjectRef  # where the Events go: the pod's workload, or the pod
    warnings: tuple[str, ...] = ()  # returned to the client
    events: tuple[Event, ...] = ()


def _invalid(problems: tuple[str, ...] | list[str]) -> list[Event]:
    return [Event.warning("InvalidAnnotation", problem) for problem in problems]


@dataclass(frozen=True)
class Candidate:
    """A pod (template) as a candidate for the sidecar: who opted it in, and its Prosody."""

    opt_in: optin.OptIn
    overrides: ann.Overrides
    container: Obj | None  # Prosody's container; None: no container is recognised as Prosody
    problems: tuple[str, ...]  # invalid annotation values, ignored

    @property
    def wanted(self) -> bool:
        return self.opt_in.inject and self.container is not None

    def configmaps(self, pod_spec: Mapping[str, Any]) -> set[str]:
        """The ConfigMaps its config may come from: what an observation must read."""
        if self.container is None:
            return set()
        return {m.configmap for m in prosody.config_mounts(pod_spec, self.container)}


def candidate(
    pod_metadata: Mapping[str, Any],
    pod_spec: Mapping[str, Any],
    workload_annotations: Mapping[str, str],
    namespace_labels: Mapping[str, str],
) -> Candidate:
    opt_in = optin.decide(pod_metadata, workload_annotations, namespace_labels)
    parsed = ann.parse_annotations(pod_metadata.get("annotations"))
    problems = [*opt_in.problems, *parsed.problems]
    overrides = parsed.overrides
    # Explicitly opted in: Prosody is the first container if none is recognised as Prosody.
    explicit = opt_in.explicit
    container = prosody.find_prosody_container(
        pod_spec, overrides.container, first_otherwise=explicit
    )
    if container is None and overrides.container:
        problems.append(f"{ann.CONTAINER}={overrides.container!r} ignored: no such container")
        overrides = replace(overrides, container=None)
        container = prosody.find_prosody_container(pod_spec, None, first_otherwise=explicit)
    return Candidate(opt_in, overrides, container, tuple(problems))


def workload_candidate(
    workload: Mapping[str, Any], namespace_labels: Mapping[str, str]
) -> Candidate:
    template = workload["spec"].get("template") or {}
    return candidate(
        template.get("metadata") or {},
        template.get("spec") or {},
        workload["metadata"].get("annotations") or {},
        namespace_labels,
    )


# --- Admission -------------------------------------------------------------------------------


def plan_admission(
    settings: OperatorSettings, seen: Admission, evaluate: Evaluator = prosody.evaluate
) -> AdmissionPlan:
    pod = seen.pod
    spec, metadata = pod.get("spec") or {}, pod.get("metadata") or {}
    target = seen.workload or pod_ref(pod)
    if builders.has_sidecar(spec):
        return AdmissionPlan(None, "already injected", target)
    found = candidate(metadata, spec, seen.workload_annotations, seen.namespace_labels)
    opt_in, overrides, container = found.opt_in, found.overrides, found.container

    def plan(patch: Obj | None, reason: str, events: list[Event]) -> AdmissionPlan:
        warnings = tuple(e.message for e in events if e.type == "Warning")
        return AdmissionPlan(patch, reason, target, warnings, () if seen.dry_run else tuple(events))

    if not opt_in.inject:
        why = f'its {opt_in.source} says "false"' if opt_in.source else "not opted in"
        return plan(None, why, _invalid(found.problems))
    if container is None:  # only the namespace opted in, and this pod is not Prosody
        return AdmissionPlan(None, "not recognised as Prosody", target)
    events = _invalid(found.problems)
    decision = prosody.decide_interval(
        settings.manual_interval, spec, container, seen.configmaps, overrides, evaluate
    )
    cidrs = builders.allowlist(seen.node_cidrs, settings)
    if not cidrs and overrides.allow_cidrs is None:
        events.append(
            Event.warning(
                "NoPodNetwork",
                "no pod-network CIDRs known (Nodes have no spec.podCIDRs and "
                "PROSODY_OPERATOR_POD_CIDRS is empty): the sidecar only allows loopback",
            )
        )
        cidrs = list(LOOPBACK)
    sidecar = builders.build_sidecar_container(settings, overrides, cidrs, decision.interval)
    interval = decision.interval
    return plan(
        builders.build_injection_patch(pod, sidecar),
        f"injected ({opt_in.source}), interval {interval.scrape_interval} ({interval.source})",
        events,
    )


# --- Reconcile -------------------------------------------------------------------------------


def plan_reconcile(
    settings: OperatorSettings, seen: Workload, evaluate: Evaluator = prosody.evaluate
) -> ReconcilePlan:
    workload = seen.body
    ref = ObjectRef.of(workload)
    template = workload["spec"].get("template") or {}
    pod_metadata, pod_spec = template.get("metadata") or {}, template.get("spec") or {}
    found = workload_candidate(workload, seen.namespace_labels)
    opt_in, overrides, container = found.opt_in, found.overrides, found.container
    if not found.wanted:
        return _plan_removal(ref, seen, opt_in)

    events = _invalid(found.problems)
    decision = prosody.decide_interval(
        settings.manual_interval, pod_spec, container, seen.configmaps, overrides, evaluate
    )
    events += [Event.warning("ProsodyConfig", str(finding)) for finding in decision.findings]
    port = overrides.port or settings.exporter_port
    monitor_labels = builders.monitor_labels(workload, settings.service_monitor_labels)
    selection = select(seen.prometheuses, monitor_labels, ref.namespace, seen.namespace_labels)
    built = (
        builders.build_service(workload, port),
        builders.build_service_monitor(
            workload, decision.interval, settings.service_monitor_labels, selection.summary
        ),
    )
    apply, replace = [], []
    for obj in built:
        live = seen.owned.get(obj["kind"])
        if live is not None and controller_uid(live) != ref.uid:
            events.append(_name_conflict(obj, ref))
        elif live is not None and builders.must_recreate(live, obj):
            replace.append((live, obj))
        elif not builders.up_to_date(live, obj):
            apply.append(obj)
    pods = _active(seen.pods)
    name = built[1]["metadata"]["name"]
    if apply or replace:
        events.append(_configured(ref, name, decision.interval, port, pods))
    events.append(_selection_event(settings, selection, name))
    drift, restart = _check_sidecars(settings, seen, ref, pod_metadata, opt_in, pods)
    return ReconcilePlan(ref, tuple(apply), (), (*events, *drift), restart, tuple(replace))


def _plan_removal(ref: ObjectRef, seen: Workload, opt_in: optin.OptIn) -> ReconcilePlan:
    """Not (or no longer) a candidate: delete what we made for it."""
    ours = tuple(obj for obj in seen.owned.values() if controller_uid(obj) == ref.uid)
    events = _invalid(opt_in.problems)
    if ours:
        if opt_in.inject:
            why = f"opted in by its {opt_in.source}, but no container is recognised as Prosody"
        elif opt_in.source:
            why = f'its {opt_in.source} says "false"'
        else:
            why = "not opted in any more"
        names = " and ".join(f"{o['kind']} {o['metadata']['name']}" for o in ours)
        events.append(Event.normal("MetricsRemoved", f"{why}: deleted {names}"))
    return ReconcilePlan(ref, (), ours, tuple(events))


def _name_conflict(obj: Mapping[str, Any], ref: ObjectRef) -> Event:
    return Event.warning(
        "NameConflict",
        f"{obj['kind']} {obj['metadata']['name']} exists but is not owned by {ref}: "
        "left as it is (rename or delete it)",
    )


def _sidecar_interval(pod: Mapping[str, Any]) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == builders.SIDECAR_NAME:
            env = {e.get("name"): e.get("value") for e in container.get("env") or []}
            return env.get(builders.INTERVAL_ENV)
    return None


def _configured(
    ref: ObjectRef, name: str, interval: EffectiveInterval, port: int, pods: list[Obj]
) -> Event:
    message = (
        f"ServiceMonitor {name}: interval {interval.scrape_interval} "
        f"(from {interval.source}), Service port {port}"
    )
    behind = [pod for pod in pods if _sidecar_interval(pod) not in (None, interval.scrape_interval)]
    if behind:
        message += (
            f". {len(behind)} pod(s) still collect at another interval: Prosody reads "
            "statistics_interval only when it starts and the sidecar's interval is set when a "
            f"pod is created, so restart the pods to follow ({restart_command(ref)})"
        )
    return Event.normal("MetricsConfigured", message)


def _selection_event(settings: OperatorSettings, selection: Selection, monitor: str) -> Event:
    """Selection diagnostics: the ServiceMonitor is useless unless a Prometheus selects it."""
    if selection.selected_by:
        return Event.normal(
            "SelectedByPrometheus",
            f"ServiceMonitor {monitor} is selected by Prometheus {selection.summary}",
        )
    where = (
        f"namespaces {', '.join(settings.watch_namespaces)}"
        if settings.watch_namespaces
        else "the cluster"
    )
    why = "; ".join(selection.reasons) or f"there is no Prometheus resource in {where}"
    return Event.warning(
        "NotSelectedByPrometheus",
        f"No Prometheus selects ServiceMonitor {monitor}: {why}. Its labels come from "
        "PROSODY_OPERATOR_SERVICE_MONITOR_LABELS (the chart's serviceMonitor.labels).",
    )


def _active(pods: tuple[Mapping[str, Any], ...]) -> list[Obj]:
    """The pods that run or will run (not those finished or being deleted)."""
    return [
        dict(pod)
        for pod in pods
        if (pod.get("status") or {}).get("phase") in ("Pending", "Running")
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
    ]


def _restarted_at(pod_metadata: Mapping[str, Any]) -> float | None:
    value = (pod_metadata.get("annotations") or {}).get(RESTARTED_AT)
    try:
        return datetime.datetime.fromisoformat(value).timestamp() if value else None
    except ValueError:
        return None


def _check_sidecars(
    settings: OperatorSettings,
    seen: Workload,
    ref: ObjectRef,
    pod_metadata: Mapping[str, Any],
    opt_in: optin.OptIn,
    pods: list[Obj],
) -> tuple[list[Event], bool]:
    """Running pods without the sidecar: the webhook was down when they were created, or the
    API server never sends them to it."""
    labels = pod_metadata.get("labels") or {}
    if not optin.reaches_webhook(
        labels, ref.namespace, seen.namespace_labels, settings.watch_namespaces
    ):
        message = (
            f"{ref} is opted in (by its {opt_in.source}), but the API server does not send its "
            "pods to the webhook, so they get no sidecar: "
            + optin.how_to_reach(ref.namespace, settings.watch_namespaces)
        )
        return [Event.warning("WebhookNotCalled", message)], False
    missing = sorted(
        pod["metadata"]["name"] for pod in pods if not builders.has_sidecar(pod.get("spec") or {})
    )
    if not missing:
        return [], False
    restarted = _restarted_at(pod_metadata)
    cooling = restarted is not None and seen.now - restarted < RESTART_COOLDOWN_SECONDS
    restart = settings.restart_on_drift and not cooling
    if restart:
        advice = "Restarting the rollout."
    elif settings.restart_on_drift:
        advice = (
            f"The rollout was restarted at {pod_metadata['annotations'][RESTARTED_AT]}; "
            f"not again within {RESTART_COOLDOWN_SECONDS / 60:g} minutes."
        )
    else:
        advice = f"Fix: {restart_command(ref)}"
    message = (
        f"{len(missing)} pod(s) lack the prosody-exporter sidecar (the webhook was not "
        f"reachable when they were created): {', '.join(missing[:5])}. {advice}"
    )
    return [Event.warning("SidecarMissing", message)], restart
