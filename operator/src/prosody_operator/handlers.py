"""kopf handlers: thin wiring from events to the Controller.

Only event handlers, indexes and a webhook are used, so kopf keeps no state on users' objects.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kopf

from . import annotations as ann
from . import builders
from .controller import Controller
from .kube import Kube, load_config
from .prosody import config_sources, find_prosody_container
from .selection import PrometheusSelectors
from .settings import OperatorSettings
from .tls import ServingCertificate, load_serving_certificate, make_serving_certificate

log = logging.getLogger("prosody_operator")

# Seconds between two reads of the webhook's certificate files (three small files).
CERTIFICATE_CHECK_INTERVAL = 10.0
CONFIGURATION_RETRY = 5.0  # seconds between two attempts to apply the webhook configuration


def _controller(memo: Any) -> Controller:
    controller: Controller = memo.controller
    return controller


def _client_config(settings: OperatorSettings, ca_bundle: str) -> dict[str, Any] | None:
    path = f"/{builders.WEBHOOK_HANDLER_ID}"
    if settings.webhook_url:
        return {"url": settings.webhook_url.rstrip("/") + path, "caBundle": ca_bundle}
    if settings.webhook_service:
        namespace, _, name = settings.webhook_service.partition("/")
        service = {"namespace": namespace, "name": name, "path": path, "port": 443}
        return {"service": service, "caBundle": ca_bundle}
    return None


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
    operator_settings = OperatorSettings()
    load_config()
    kube = Kube()
    memo.controller = Controller(operator_settings, kube)

    def apply_webhook_configuration(ca_bundle: str) -> None:
        client_config = _client_config(operator_settings, ca_bundle)
        if client_config is None:
            log.warning("no webhook URL or Service set: the webhook configuration is not managed")
            return
        kube.apply_webhook_configuration(
            builders.build_webhook_configuration(
                operator_settings.webhook_configuration,
                client_config,
                operator_settings.watch_namespaces,
            )
        )

    certificate = _certificate(operator_settings)
    settings.admission.server = WebhookServer(
        apply_webhook_configuration,
        addr=operator_settings.webhook_host,
        port=operator_settings.webhook_port,
        certfile=str(certificate.certfile),
        pkeyfile=str(certificate.keyfile),
        cafile=str(certificate.cafile),
        file_check_interval=CERTIFICATE_CHECK_INTERVAL,
    )
    # kopf posts its own handler errors as Events too; keep those to real problems.
    settings.posting.level = logging.WARNING


# kopf passes each index to handlers as a keyword named by the index id.
@kopf.index("", "v1", "nodes", id="node_pod_cidrs")
def node_pod_cidrs(spec: kopf.Spec, **_: Any) -> list[str]:
    return list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))


@kopf.index("", "v1", "configmaps", id="prosody_configmaps")
def prosody_configmaps(
    body: kopf.Body, name: str, namespace: str, **_: Any
) -> dict[tuple[str, str], dict[str, str]]:
    """ConfigMaps holding Lua files, so the webhook finds Prosody's config without an API call
    (it was most of the webhook's latency); anything not here is read on demand."""
    data = dict(body.get("data") or {})
    return {(namespace, name): data} if any(key.endswith(".lua") for key in data) else {}


@kopf.index(
    "", "v1", "services", id="metrics_services", labels={builders.DEPLOYMENT_LABEL: kopf.PRESENT}
)
def metrics_services(labels: kopf.Labels, namespace: str, **_: Any) -> dict[tuple[str, str], bool]:
    """Which Deployments have metrics objects of ours (so only those are cleaned up)."""
    return {(namespace, labels[builders.DEPLOYMENT_LABEL]): True}


@kopf.index("apps", "v1", "deployments", id="deployments_by_configmap")
def deployments_by_configmap(
    spec: kopf.Spec, name: str, namespace: str, **_: Any
) -> dict[tuple[str, str], str]:
    """ConfigMaps holding the Prosody config of an annotated Deployment -> the Deployment."""
    template = spec.get("template") or {}
    parsed = ann.parse_annotations((template.get("metadata") or {}).get("annotations"))
    pod_spec = template.get("spec") or {}
    container = find_prosody_container(pod_spec, parsed.overrides.container)
    if not parsed.enabled or container is None:
        return {}
    return {(namespace, source.configmap): name for source in config_sources(pod_spec, container)}


@kopf.index("monitoring.coreos.com", "v1", "prometheuses", id="prometheus_selectors")
def prometheus_selectors(body: kopf.Body, **_: Any) -> PrometheusSelectors:
    return PrometheusSelectors.of(_plain(body))


def _prometheuses(kwargs: dict[str, Any]) -> list[PrometheusSelectors]:
    index = kwargs.get("prometheus_selectors") or {}
    return list(index.get(None, []))


def _reconcile(memo: Any, deployment: dict[str, Any], kwargs: dict[str, Any]) -> None:
    key = (deployment["metadata"]["namespace"], deployment["metadata"]["name"])
    _controller(memo).reconcile(
        deployment,
        has_metrics_objects=key in (kwargs.get("metrics_services") or {}),
        prometheuses=_prometheuses(kwargs),
    )


@kopf.on.event("apps", "v1", "deployments", id="reconcile-deployment")
def deployment_changed(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return  # the garbage collector removes what the Deployment owned
    _reconcile(memo, _plain(body), kwargs)


@kopf.on.event("monitoring.coreos.com", "v1", "prometheuses", id="prometheus-changed")
def prometheus_changed(
    type: str, body: kopf.Body, uid: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A Prometheus' selectors decide which ServiceMonitors it picks up: when they change (not
    on its status updates), re-check every ServiceMonitor."""
    seen: dict[str, PrometheusSelectors | None] = memo.setdefault("prometheus_selectors", {})
    now = None if type == "DELETED" else PrometheusSelectors.of(_plain(body))
    if uid in seen and seen[uid] == now:
        return
    seen[uid] = now
    controller = _controller(memo)
    for namespace, name in list(kwargs.get("metrics_services") or {}):
        deployment = controller.kube.deployment(namespace, name)
        if deployment is not None:
            _reconcile(memo, deployment, kwargs)


@kopf.on.event("", "v1", "configmaps", id="configmap-changed")
def configmap_changed(
    name: str,
    namespace: str,
    memo: kopf.Memo,
    deployments_by_configmap: kopf.Index[Any, Any],
    **kwargs: Any,
) -> None:
    controller = _controller(memo)
    for deployment_name in set(deployments_by_configmap.get((namespace, name), [])):
        deployment = controller.kube.deployment(namespace, deployment_name)
        if deployment is not None:
            _reconcile(memo, deployment, kwargs)


@kopf.on.mutate(
    "",
    "v1",
    "pods",
    id=builders.WEBHOOK_HANDLER_ID,
    operations={"CREATE"},
    ignore_failures=True,
    side_effects=True,
    labels={ann.INJECT: "true"},
)
def inject_exporter(
    body: kopf.Body,
    patch: kopf.Patch,
    dryrun: bool,
    warnings: list[str],
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    # kopf denies the pod if this handler raises, even before its first line runs (a missing
    # keyword, say): so it names no optional keyword and catches everything.
    controller = _controller(memo)
    pod = _plain(body)
    try:
        node_pod_cidrs = kwargs.get("node_pod_cidrs") or {}
        cidrs = [cidr for cidrs in node_pod_cidrs.get(None, []) for cidr in cidrs]
        if not cidrs:  # kopf serves webhooks before its indexes are filled at start-up
            cidrs = controller.kube.node_pod_cidrs()
        index = kwargs.get("prosody_configmaps") or {}

        def cached(namespace: str, name: str) -> dict[str, str] | None:
            return next(iter(index.get((namespace, name)) or []), None)

        injection = controller.plan_injection(pod, cidrs, cached)
    except Exception as error:  # a pod must never be blocked: admit it without the sidecar
        log.exception("injection failed; admitting the pod without the sidecar")
        message = f"prosody-exporter sidecar not injected: {error}"
        warnings.append(message)
        if not dryrun:
            controller.report_injection_problems(pod, [("InjectionFailed", message)])
        return
    warnings.extend(injection.warnings)
    if injection.problems and not dryrun:
        controller.report_injection_problems(pod, injection.problems)
    if injection.patch is not None:
        patch.metadata.annotations.update(injection.patch["metadata"]["annotations"])
        patch.spec["containers"] = injection.patch["spec"]["containers"]
    name = pod["metadata"].get("name") or pod["metadata"].get("generateName", "")
    log.info("pod %s/%s: %s", pod["metadata"].get("namespace"), name, injection.reason)


@kopf.on.probe(id="webhook-configured")
def probe(memo: kopf.Memo, **_: Any) -> bool:
    return hasattr(memo, "controller")


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's bodies are live views; the pure functions take plain dicts."""
    return copy.deepcopy(dict(body))
