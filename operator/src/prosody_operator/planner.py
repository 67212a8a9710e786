"""Every decision the operator makes, as pure functions of an observation: what a reconcile
applies, deletes, reports and restarts; what an admission patches and reports. Nothing here
reads or writes anything (tests/operator/test_planner.py drives it from tables)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import annotations as ann
from . import builders, optin, prosody, quotas
from .events import Event
from .intervals import EffectiveInterval, format_duration
from .observation import Admission, Workload
from .prosody import Evaluator
from .prosody_versions import DEFAULT_UPSTREAM_URL
from .selection import Selection, select
from .settings import OperatorSettings
from .workloads import ObjectRef, controller_uid, restart_command

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
        "ProsodyVersionUnknown",
        "NameConflict",
        "MetricsConfigured",
        "MetricsRemoved",
        "SelectedByPrometheus",
        "NotSelectedByPrometheus",
        "SidecarMissing",
        "WebhookNotCalled",
        "InjectionFailed",
        "NoPodNetwork",
    }
)
# The sidecar's allowlist when no pod network is known: loopback only.
LOOPBACK = ("127.0.0.0/8", "::1/128")
MONITOR_BUILDERS = {
    "ServiceMonitor": builders.build_service_monitor,
    "PodMonitor": builders.build_pod_monitor,
}
NO_POD_NETWORK = (
    "no pod-network CIDRs known (Nodes have no spec.podCIDRs and PROSODY_OPERATOR_POD_CIDRS is "
    "empty): the sidecar only allows loopback"
)


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
    # Why a restart waits (reconcile again shortly to look again); empty: none waits.
    deferred: str = ""


@dataclass(frozen=True)
class AdmissionPlan:
    """What the webhook answers. It posts no Event: the reconciler reports on the workload what
    its pods were admitted with (a forged admission review can then make the operator write
    nothing)."""

    patch: Obj | None  # None: admit the pod as it is
    reason: str  # what was decided, for the log
    warnings: tuple[str, ...] = ()  # returned to the client


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
    if builders.has_sidecar(spec):
        return AdmissionPlan(None, "already injected")
    found = candidate(metadata, spec, seen.workload_annotations, seen.namespace_labels)
    opt_in, overrides, container = found.opt_in, found.overrides, found.container
    warnings = list(found.problems)
    if not opt_in.inject:
        why = f'its {opt_in.source} says "false"' if opt_in.source else "not opted in"
        return AdmissionPlan(None, why, tuple(warnings))
    if container is None:  # only the namespace opted in, and this pod is not Prosody
        return AdmissionPlan(None, "not recognised as Prosody")
    decision = prosody.decide_config(
        settings.manual_interval, spec, container, seen.configmaps, overrides, evaluate
    )
    cidrs = builders.allowlist(seen.node_cidrs, settings)
    if not cidrs and overrides.allow_cidrs is None:
        warnings.append(NO_POD_NETWORK)
        cidrs = list(LOOPBACK)
    sidecar = builders.build_sidecar_container(
        settings, overrides, cidrs, decision.interval, upstream_url=decision.upstream.url
    )
    rejected = quotas.unmet(seen.quotas, sidecar["resources"])
    if rejected is not None:  # the API server would reject the pod: admit it as it is
        patch = builders.build_failure_patch(rejected)
        return AdmissionPlan(patch, "not injected: " + rejected, (*warnings, rejected))
    interval, upstream = decision.interval, decision.upstream
    annotations = {}
    if settings.prometheus_scrape_annotations:
        # Those the pod already has are the user's: kept (prometheus.io/scrape: "false" too).
        port = overrides.port or settings.exporter_port
        present = metadata.get("annotations") or {}
        wanted = builders.prometheus_scrape_annotations(port)
        annotations = {k: v for k, v in wanted.items() if k not in present}
    return AdmissionPlan(
        builders.build_injection_patch(pod, sidecar, annotations),
        f"injected ({opt_in.source}), interval {interval.scrape_interval} ({interval.source}), "
        f"/metrics at {upstream.url} ({upstream.source})",
        tuple(warnings),
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
    decision = prosody.decide_config(
        settings.manual_interval, pod_spec, container, seen.configmaps, overrides, evaluate
    )
    events += [Event.warning("ProsodyConfig", str(finding)) for finding in decision.findings]
    if decision.dialects_disagree:
        events.append(Event.warning("ProsodyVersionUnknown", decision.dialects_disagree))
    port = overrides.port or settings.exporter_port
    kinds = monitor_kinds(settings)
    built: list[Obj] = []
    if "Service" in kinds:
        built.append(builders.build_service(workload, port))
    monitor, selection, note = None, None, ""
    if kinds:
        kind = kinds[-1]
        monitor_labels = builders.monitor_labels(workload, settings.service_monitor_labels)
        selection = select(
            seen.prometheuses, monitor_labels, ref.namespace, seen.namespace_labels, kind
        )
        scrape, note = scrape_options(settings, overrides, decision.interval)
        monitor = MONITOR_BUILDERS[kind](
            workload,
            decision.interval,
            settings.service_monitor_labels,
            selection.summary,
            scrape,
        )
        built.append(monitor)
    apply, recreate = [], []
    for obj in built:
        live = seen.owned.get(obj["kind"])
        if live is not None and controller_uid(live) != ref.uid:
            events.append(_name_conflict(obj, ref))
        elif live is not None and builders.must_recreate(live, obj):
            recreate.append((live, obj))
        elif not builders.up_to_date(live, obj):
            apply.append(obj)
    # The kinds another mode made (monitor kind switched, or inject only): ours go.
    stale = tuple(
        live
        for kind, live in sorted(seen.owned.items())
        if kind not in kinds and controller_uid(live) == ref.uid
    )
    if stale:
        why = (
            f"the monitor kind is {settings.monitor_kind}"
            if kinds
            else "inject only (PROSODY_OPERATOR_SERVICE_MONITOR_ENABLED is false)"
        )
        events.append(Event.normal("MetricsRemoved", f"{why}: deleted {_names(stale)}"))
    pods = _active(seen.pods)
    if monitor is not None and selection is not None:
        # Sidecars set otherwise when their pods were created (before a change, or from the
        # fallbacks while the config was still being evaluated). Not known while it still is.
        behind = not decision.pending and any(_behind(pod, decision) for pod in pods)
        if apply or recreate or behind:
            events.append(_configured(ref, monitor, decision, port, behind, note))
        events.append(_selection_event(settings, selection, monitor))
    drift, restart, deferred = _check_sidecars(settings, seen, ref, pod_metadata, opt_in, pods)
    admitted = _admission_results(ref, overrides, pods)
    return ReconcilePlan(
        ref, tuple(apply), stale, (*events, *drift, *admitted), restart, tuple(recreate), deferred
    )


def monitor_kinds(settings: OperatorSettings) -> tuple[str, ...]:
    """What each opted-in workload gets, the monitor last: a Service and a ServiceMonitor, a
    PodMonitor alone, or (inject only) nothing."""
    if not settings.service_monitor_enabled:
        return ()
    if settings.monitor_kind == "PodMonitor":
        return ("PodMonitor",)
    return ("Service", "ServiceMonitor")


def scrape_options(
    settings: OperatorSettings, overrides: ann.Overrides, interval: EffectiveInterval
) -> tuple[builders.ScrapeOptions, str]:
    """The monitor's scrape options, from the settings and the workload's annotations; and a
    note when the scrape timeout asked for exceeds the interval (prometheus-operator refuses
    such a monitor): it is the interval then."""
    timeout, note = overrides.scrape_timeout, ""
    source = f"annotation {ann.SCRAPE_TIMEOUT}"
    if timeout is None:
        timeout = settings.service_monitor_scrape_timeout
        source = "PROSODY_OPERATOR_SERVICE_MONITOR_SCRAPE_TIMEOUT"
    if timeout is not None and timeout > interval.scrape_seconds:
        note = (
            f"scrapeTimeout {interval.scrape_interval}, not the {format_duration(timeout)} of "
            f"{source}: a timeout cannot exceed the interval"
        )
        timeout = interval.scrape_seconds
    limit = overrides.sample_limit
    return (
        builders.ScrapeOptions(
            timeout=timeout,
            honor_labels=settings.service_monitor_honor_labels,
            relabelings=tuple(settings.service_monitor_relabelings),
            metric_relabelings=tuple(settings.service_monitor_metric_relabelings),
            sample_limit=settings.service_monitor_sample_limit if limit is None else limit,
        ),
        note,
    )


def _names(objects: tuple[Mapping[str, Any], ...]) -> str:
    return " and ".join(f"{o['kind']} {o['metadata']['name']}" for o in objects)


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
        events.append(Event.normal("MetricsRemoved", f"{why}: deleted {_names(ours)}"))
    return ReconcilePlan(ref, (), ours, tuple(events))


def _name_conflict(obj: Mapping[str, Any], ref: ObjectRef) -> Event:
    return Event.warning(
        "NameConflict",
        f"{obj['kind']} {obj['metadata']['name']} exists but is not owned by {ref}: "
        "left as it is (rename or delete it)",
    )


def _behind(pod: Mapping[str, Any], decision: prosody.ConfigDecision) -> bool:
    """Whether the pod's sidecar collects at another interval or from another URL."""
    env = builders.sidecar_env(pod)
    if env is None:
        return False
    # Sidecars injected before the URL was set collect from the exporter's default.
    url = env.get(builders.UPSTREAM_ENV, DEFAULT_UPSTREAM_URL)
    interval = env.get(builders.INTERVAL_ENV)
    return interval not in (None, decision.interval.scrape_interval) or url != decision.upstream.url


def _configured(
    ref: ObjectRef,
    monitor: Mapping[str, Any],
    decision: prosody.ConfigDecision,
    port: int,
    behind: bool,
    note: str,
) -> Event:
    interval, upstream = decision.interval, decision.upstream
    where = "Service port" if monitor["kind"] == "ServiceMonitor" else "pod port"
    message = (
        f"{monitor['kind']} {monitor['metadata']['name']}: interval {interval.scrape_interval} "
        f"(from {interval.source}), {where} {port}; the sidecar collects "
        f"{upstream.url} (from {upstream.source})"
    )
    if note:
        message += f"; {note}"
    if behind:
        message += (
            ". Pods still collect at another interval or from another URL: Prosody reads "
            "statistics_interval and its HTTP settings only when it starts and the sidecar's "
            f"are set when a pod is created, so restart the pods to follow ({restart_command(ref)})"
        )
    return Event.normal("MetricsConfigured", message)


def _selection_event(
    settings: OperatorSettings, selection: Selection, monitor: Mapping[str, Any]
) -> Event:
    """Selection diagnostics: the monitor is useless unless a Prometheus selects it."""
    named = f"{monitor['kind']} {monitor['metadata']['name']}"
    if selection.selected_by:
        return Event.normal(
            "SelectedByPrometheus", f"{named} is selected by Prometheus {selection.summary}"
        )
    where = (
        f"namespaces {', '.join(settings.watch_namespaces)}"
        if settings.watch_namespaces
        else "the cluster"
    )
    why = "; ".join(selection.reasons) or f"there is no Prometheus resource in {where}"
    return Event.warning(
        "NotSelectedByPrometheus",
        f"No Prometheus selects {named}: {why}. Its labels come from "
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
) -> tuple[list[Event], bool, str]:
    """Running pods without the sidecar: the webhook was down when they were created, or the
    API server never sends them to it. The Events, whether to restart the rollout, and why a
    restart waits: until the webhook Service has a ready endpoint, as the new pods would lack
    the sidecar too, and the cool-down would then keep them so."""
    labels = pod_metadata.get("labels") or {}
    if not optin.reaches_webhook(
        labels, ref.namespace, seen.namespace_labels, settings.watch_namespaces
    ):
        message = (
            f"{ref} is opted in (by its {opt_in.source}), but the API server does not send its "
            "pods to the webhook, so they get no sidecar: "
            + optin.how_to_reach(ref.namespace, settings.watch_namespaces)
        )
        return [Event.warning("WebhookNotCalled", message)], False, ""
    missing = sorted(
        pod["metadata"]["name"]
        for pod in pods
        if not builders.has_sidecar(pod.get("spec") or {}) and builders.injection_error(pod) is None
    )
    if not missing:
        return [], False, ""
    restarted = _restarted_at(pod_metadata)
    cooling = restarted is not None and seen.now - restarted < RESTART_COOLDOWN_SECONDS
    restart = settings.restart_on_drift and not cooling
    deferred = ""
    if restart and seen.webhook_ready is False:
        restart = False
        service = settings.webhook_service
        deferred = f"no ready endpoint of the webhook Service {service}"
        advice = (
            f"Restarting the rollout once the webhook Service {service} has a ready endpoint "
            "(none now: new pods would lack the sidecar too)."
        )
    elif restart:
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
    return [Event.warning("SidecarMissing", message)], restart, deferred


def _admission_results(ref: ObjectRef, overrides: ann.Overrides, pods: list[Obj]) -> list[Event]:
    """What the webhook did to the workload's pods that the workload's owner should hear of (the
    webhook itself posts nothing): injection failed, or no pod network was known."""
    events = []
    failed = [(p["metadata"]["name"], builders.injection_error(p)) for p in pods]
    failed = [(name, error) for name, error in failed if error is not None]
    if failed:
        names = ", ".join(sorted(name for name, _ in failed)[:5])
        events.append(
            Event.warning(
                "InjectionFailed",
                f"{len(failed)} pod(s) were admitted without the prosody-exporter sidecar "
                f"({failed[0][1]}): {names}. Once fixed: {restart_command(ref)}",
            )
        )
    loopback = ",".join(LOOPBACK)
    confined = sorted(
        p["metadata"]["name"]
        for p in pods
        if (builders.sidecar_env(p) or {}).get(builders.ALLOW_CIDRS_ENV) == loopback
    )
    if confined and overrides.allow_cidrs is None:
        events.append(
            Event.warning(
                "NoPodNetwork",
                f"{len(confined)} pod(s) have a sidecar that allows only loopback, as no "
                "pod-network CIDRs were known when they were created (Nodes have no "
                "spec.podCIDRs and PROSODY_OPERATOR_POD_CIDRS is empty): "
                f"{', '.join(confined[:5])}. Set the chart's sidecar.podCIDRs, then: "
                f"{restart_command(ref)}",
            )
        )
    return events
