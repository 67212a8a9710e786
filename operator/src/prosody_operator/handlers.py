"""kopf handlers: thin wiring from events to the Controller, which they alone call.

Only event handlers, indexes and a webhook are used, so kopf keeps no state on users' objects.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kopf

from . import annotations as ann
from . import builders
from .controller import Controller, Indexes, start_evaluations, summarize
from .kube import MONITOR_PLURALS, MONITORING_GROUP, MONITORING_VERSION, Kube, load_config
from .planner import AdmissionPlan
from .prosody import prosody_configmaps
from .quotas import Requirement, requirement
from .selection import PrometheusSelectors
from .settings import OperatorSettings
from .tls import ServingCertificate, load_serving_certificate, make_serving_certificate
from .workloads import KINDS

log = logging.getLogger("prosody_operator")

# Seconds between two reads of the webhook's certificate files (three small files).
CERTIFICATE_CHECK_INTERVAL = 10.0
CONFIGURATION_RETRY = 5.0  # seconds between two attempts to apply the webhook configuration
OWNED = builders.MANAGED_BY  # the label on every object the operator makes


def _controller(memo: Any) -> Controller:
    controller: Controller = memo.controller
    return controller


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's bodies are live views; the controller takes plain dicts."""
    return copy.deepcopy(dict(body))


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
    """kopf passes each index as a keyword named by its id."""

    def merged(prefix: str) -> _Merged:
        return _Merged(*(kwargs.get(f"{prefix}_{k.plural}") or {} for k in KINDS.values()))

    return Indexes(
        node_pod_cidrs=kwargs.get("node_pod_cidrs") or {},
        namespaces=kwargs.get("namespace_labels") or {},
        workloads=merged("workloads"),
        by_configmap=merged("configmaps_of"),
        owners=_Merged(
            *(
                kwargs.get(f"owned_{plural}") or {}
                for plural in ("services", *MONITOR_PLURALS.values())
            )
        ),
        prometheuses=kwargs.get("prometheus_selectors") or {},
        quotas=kwargs.get("quota_requirements") or {},
    )


def _certificate(settings: OperatorSettings) -> ServingCertificate:
    if settings.webhook_cert_dir:
        return load_serving_certificate(Path(settings.webhook_cert_dir))
    hosts = []
    if settings.webhook_url:
        hosts.append(urlparse(settings.webhook_url).hostname or "localhost")
    if settings.webhook_service:
        namespace, _, name = settings.webhook_service.partition("/")
        hosts += [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    return make_serving_certificate(
        Path(tempfile.mkdtemp(prefix="webhook-")), hosts or ["localhost"]
    )


class WebhookServer(kopf.WebhookServer):
    """kopf's webhook server, which rereads its certificate files every `file_check_interval`
    and restarts with them when they change (a Secret renewed by cert-manager). Each time it
    (re)starts serving, `on_serving` gets the caBundle of the current ca.crt: a renewed CA
    reaches the webhook configuration without restarting the operator."""

    def __init__(self, on_serving: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_serving = on_serving

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for client_config in super().__call__(fn):
            while True:  # the server is already listening; only the caBundle waits
                try:
                    await asyncio.to_thread(self.on_serving, client_config["caBundle"])
                    break
                except Exception:
                    log.exception("could not apply the webhook configuration; retrying")
                    await asyncio.sleep(CONFIGURATION_RETRY)
            yield client_config


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator_settings: OperatorSettings = memo.settings  # checked and built once, by main()
    load_config()
    controller = memo.controller = Controller(
        operator_settings, Kube(), start_evaluations(operator_settings)
    )
    controller.read_node_cidrs()
    certificate = _certificate(operator_settings)
    settings.admission.server = WebhookServer(
        controller.apply_webhook_configuration,
        addr=operator_settings.webhook_host,
        port=operator_settings.webhook_port,
        certfile=str(certificate.certfile),
        pkeyfile=str(certificate.keyfile),
        cafile=str(certificate.cafile),
        file_check_interval=CERTIFICATE_CHECK_INTERVAL,
    )
    # kopf posts its own handler errors as Events too; keep those to real problems.
    settings.posting.level = logging.WARNING


# --- indexes: what the webhook and the reconciler look up without an API call ------------------


@kopf.index("", "v1", "nodes", id="node_pod_cidrs")
def node_pod_cidrs(spec: kopf.Spec, **_: Any) -> list[str]:
    return list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))


@kopf.index("", "v1", "resourcequotas", id="quota_requirements")
def quota_requirements(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Requirement]:
    found = requirement(body)
    return {namespace: found} if found else {}


@kopf.index("", "v1", "namespaces", id="namespace_labels")
def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


def _workload_summary(body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], Any]:
    summary = summarize(body)
    return {summary.ref.key: summary}


def _configmaps_of(
    body: kopf.Body, name: str, namespace: str, **_: Any
) -> dict[tuple[str, str], tuple[str, str]]:
    """The ConfigMaps a workload's Prosody may read its config from -> the workload."""
    template = body.get("spec", {}).get("template") or {}
    container = ((template.get("metadata") or {}).get("annotations") or {}).get(ann.CONTAINER)
    names = prosody_configmaps(template.get("spec") or {}, container)
    return {(namespace, configmap): (body["kind"], name) for configmap in names}


def _owner(body: kopf.Body, namespace: str, **_: Any) -> dict[tuple[str, str, str], str]:
    """Objects of ours -> the workload they are for (the object's kind), so that it is cleaned
    up and re-checked."""
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("controller") and owner.get("kind") in KINDS:
            return {(namespace, owner["kind"], owner["name"]): str(body.get("kind"))}
    return {}


kopf.index("", "v1", "services", id="owned_services", labels=OWNED)(_owner)
for _plural in MONITOR_PLURALS.values():
    kopf.index(MONITORING_GROUP, MONITORING_VERSION, _plural, id=f"owned_{_plural}", labels=OWNED)(
        _owner
    )


@kopf.index("monitoring.coreos.com", "v1", "prometheuses", id="prometheus_selectors")
def prometheus_selectors(body: kopf.Body, **_: Any) -> PrometheusSelectors:
    return PrometheusSelectors.of(_plain(body))


# --- reconciling workloads -------------------------------------------------------------------


def workload_changed(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return  # the garbage collector removes what the workload owned
    _controller(memo).reconcile(_plain(body), _indexes(kwargs))


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


def owned_changed(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """A Service or ServiceMonitor of ours changed or went: its workload puts it right (a hand
    edit is reverted, a deleted one made again; our own writes change nothing more)."""
    for namespace, kind, name in _owner(body, body.metadata.namespace or ""):
        _controller(memo).reconcile_named(kind, namespace, name, _indexes(kwargs))


kopf.on.event("", "v1", "services", id="owned-service-changed", labels=OWNED)(owned_changed)
for _plural in MONITOR_PLURALS.values():
    kopf.on.event(
        MONITORING_GROUP, MONITORING_VERSION, _plural, id=f"owned-{_plural}-changed", labels=OWNED
    )(owned_changed)


@kopf.on.event("", "v1", "configmaps", id="configmap-changed")
def configmap_changed(
    type: str, body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    controller = _controller(memo)
    data = None if type == "DELETED" else dict(body.get("data") or {})
    controller.configmaps.update(namespace, name, data)
    indexes = _indexes(kwargs)
    for kind, workload in set(indexes.by_configmap.get((namespace, name)) or ()):
        controller.reconcile_named(kind, namespace, workload, indexes)


@kopf.on.event("", "v1", "namespaces", id="namespace-changed")
def namespace_changed(
    type: str, name: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A namespace opted in or out: its workloads' pods are candidates now, or no longer."""
    seen: dict[str, str | None] = memo.setdefault("namespace_opt_in", {})
    now = None if type == "DELETED" else labels.get(ann.INJECT)
    first, before = name not in seen, seen.get(name)
    seen[name] = now
    if first or before == now or type == "DELETED":
        return  # at start-up every workload is reconciled anyway
    indexes = _indexes(kwargs)
    for namespace, kind, workload in list(indexes.workloads):
        if namespace == name:
            _controller(memo).reconcile_named(kind, namespace, workload, indexes)


@kopf.on.event("monitoring.coreos.com", "v1", "prometheuses", id="prometheus-changed")
def prometheus_changed(
    type: str, body: kopf.Body, uid: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A Prometheus' selectors decide which ServiceMonitors it picks up: when they change (not
    on its status updates), re-check every workload with a ServiceMonitor."""
    seen: dict[str, PrometheusSelectors | None] = memo.setdefault("prometheus_selectors", {})
    now = None if type == "DELETED" else PrometheusSelectors.of(_plain(body))
    if uid in seen and seen[uid] == now:
        return
    seen[uid] = now
    indexes = _indexes(kwargs)
    for namespace, kind, workload in list(indexes.owners):
        _controller(memo).reconcile_named(kind, namespace, workload, indexes)


# --- admission ---------------------------------------------------------------------------------


@kopf.on.mutate(
    "",
    "v1",
    "pods",
    id=builders.WEBHOOK_HANDLER_ID,
    operations={"CREATE"},
    ignore_failures=True,
    side_effects=False,
)
def inject_exporter(
    body: kopf.Body, patch: kopf.Patch, warnings: list[str], memo: kopf.Memo, **kwargs: Any
) -> None:
    # kopf denies the pod if this handler raises, even before its first line runs (a missing
    # keyword, say): so it names no optional keyword and catches everything.
    controller = _controller(memo)
    pod = _plain(body)
    try:
        plan = controller.admit(pod, _indexes(kwargs))
    except Exception as error:  # a pod must never be blocked: admit it without the sidecar
        log.exception("injection failed; admitting the pod without the sidecar")
        warnings.append(f"prosody-exporter sidecar not injected: {error}")
        # For the reconciler, which reports it on the workload (the webhook posts nothing).
        failure = f"injecting it failed: {error}"
        plan = AdmissionPlan(builders.build_failure_patch(failure), failure)
    warnings.extend(plan.warnings)
    if plan.patch is not None:
        patch.metadata.annotations.update(plan.patch["metadata"]["annotations"])
        if "spec" in plan.patch:
            patch.spec["containers"] = plan.patch["spec"]["containers"]
    name = pod["metadata"].get("name") or pod["metadata"].get("generateName", "")
    # Every pod of an opted-in namespace comes here: the ones left alone are not news.
    level = logging.INFO if plan.patch or plan.warnings else logging.DEBUG
    log.log(level, "pod %s/%s: %s", pod["metadata"].get("namespace"), name, plan.reason)


@kopf.on.probe(id="webhook-configured")
def probe(memo: kopf.Memo, **_: Any) -> bool:
    return hasattr(memo, "controller")
