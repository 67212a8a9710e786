"""Pure functions that decide what every object looks like. No API calls here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import __version__
from . import annotations as ann
from .intervals import EffectiveInterval, format_duration
from .settings import OperatorSettings

SIDECAR_NAME = "prosody-exporter"
METRICS_PORT_NAME = "metrics"
DEPLOYMENT_LABEL = ann.PREFIX + "deployment"
WEBHOOK_HANDLER_ID = "inject-exporter"
MANAGED_BY = {"app.kubernetes.io/managed-by": "prosody-operator"}

Obj = dict[str, Any]


def inputs_hash(*inputs: Any) -> str:
    """A stable hash of what an object was built from (kept in an annotation to skip no-op
    writes, as prometheus-operator does)."""
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- The sidecar ------------------------------------------------------------------------------


def sidecar_resources(settings: OperatorSettings, override: Mapping[str, Any] | None) -> Obj:
    if override is not None:
        return {kind: dict(values) for kind, values in override.items()}
    requests = {"cpu": settings.sidecar_cpu_request, "memory": settings.sidecar_memory_request}
    limits = {"cpu": settings.sidecar_cpu_limit, "memory": settings.sidecar_memory_limit}
    return {
        "requests": {k: v for k, v in requests.items() if v},
        "limits": {k: v for k, v in limits.items() if v},
    }


def build_sidecar_container(
    settings: OperatorSettings,
    overrides: ann.Overrides,
    allow_cidrs: Sequence[str],
    interval: EffectiveInterval,
) -> Obj:
    port = overrides.port or settings.exporter_port
    cidrs = overrides.allow_cidrs if overrides.allow_cidrs is not None else tuple(allow_cidrs)
    env = {
        "PROSODY_EXPORTER_INTERVAL": format_duration(interval.scrape_seconds),
        "PROSODY_EXPORTER_LISTEN_PORT": str(port),
        "PROSODY_EXPORTER_ALLOW_CIDRS": ",".join(cidrs),
    }

    def probe(path: str) -> Obj:
        return {
            "httpGet": {"path": path, "port": METRICS_PORT_NAME},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
        }

    return {
        "name": SIDECAR_NAME,
        "image": overrides.image or settings.exporter_image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": name, "value": value} for name, value in env.items()],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "livenessProbe": probe("/healthz"),
        # Not /readyz: a pod is Ready only when all its containers are, and Prosody must keep
        # serving XMPP while its metrics are broken. Metric health shows in the exporter's own
        # metrics (prosody_exporter_up, prosody_exporter_snapshot_stale) instead.
        "readinessProbe": probe("/healthz"),
        "resources": sidecar_resources(settings, overrides.resources),
        # Passes Pod Security "restricted".
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def injection_status(sidecar: Mapping[str, Any]) -> str:
    return json.dumps({"version": __version__, "hash": inputs_hash(sidecar)}, sort_keys=True)


def build_injection_patch(pod: Mapping[str, Any], sidecar: Obj) -> Obj:
    """The merge patch that adds the sidecar and records what was injected."""
    containers = [*pod.get("spec", {}).get("containers", []), sidecar]
    return {
        "metadata": {"annotations": {ann.STATUS: injection_status(sidecar)}},
        "spec": {"containers": containers},
    }


def has_sidecar(pod_spec: Mapping[str, Any]) -> bool:
    return any(c.get("name") == SIDECAR_NAME for c in pod_spec.get("containers") or [])


def allowlist(node_cidrs: Iterable[str], settings: OperatorSettings) -> list[str]:
    """The sidecar's default allowlist: the pod network (from the Nodes, or the setting that
    replaces it), plus the extra CIDRs."""
    base = [str(n) for n in settings.pod_cidrs] or sorted(set(node_cidrs))
    extra = [str(n) for n in settings.extra_cidrs]
    return list(dict.fromkeys([*base, *extra]))


# --- Objects owned by a Deployment ------------------------------------------------------------


def owner_reference(deployment: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
        "uid": deployment["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metrics_object_name(deployment_name: str) -> str:
    return f"{deployment_name}-prosody-metrics"[:63].rstrip("-")


def _metadata(deployment: Mapping[str, Any], inputs: str) -> Obj:
    name = deployment["metadata"]["name"]
    return {
        "name": metrics_object_name(name),
        "namespace": deployment["metadata"]["namespace"],
        "labels": {**MANAGED_BY, DEPLOYMENT_LABEL: name},
        "annotations": {ann.INPUTS_HASH: inputs},
        "ownerReferences": [owner_reference(deployment)],
    }


def build_service(deployment: Mapping[str, Any], port: int) -> Obj:
    selector = deployment["spec"]["selector"].get("matchLabels") or {}
    inputs = inputs_hash("service", selector, port)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(deployment, inputs),
        "spec": {
            "selector": dict(selector),
            "ports": [
                {
                    "name": METRICS_PORT_NAME,
                    "port": port,
                    "targetPort": METRICS_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def monitor_labels(deployment: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, str]:
    """The ServiceMonitor's labels: the configured ones (so a Prometheus selects it), ours last."""
    return {**labels, **MANAGED_BY, DEPLOYMENT_LABEL: deployment["metadata"]["name"]}


def build_service_monitor(
    deployment: Mapping[str, Any],
    interval: EffectiveInterval,
    labels: Mapping[str, str],
    selected_by: str,
) -> Obj:
    """`selected_by`: which Prometheus resources select it ("none" is worth a look)."""
    name = deployment["metadata"]["name"]
    inputs = inputs_hash(
        "servicemonitor", interval.scrape_interval, interval.source, dict(labels), selected_by
    )
    metadata = _metadata(deployment, inputs)
    metadata["labels"] = monitor_labels(deployment, labels)
    metadata["annotations"][ann.INTERVAL_SOURCE] = interval.source
    metadata["annotations"][ann.SELECTED_BY] = selected_by
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {DEPLOYMENT_LABEL: name, **MANAGED_BY}},
            "namespaceSelector": {"matchNames": [deployment["metadata"]["namespace"]]},
            "endpoints": [
                {
                    "port": METRICS_PORT_NAME,
                    "path": "/metrics",
                    "interval": interval.scrape_interval,
                    "scrapeTimeout": interval.scrape_timeout,
                }
            ],
        },
    }


# --- The webhook configuration ----------------------------------------------------------------


SYSTEM_NAMESPACES = ["kube-system", "kube-node-lease", "kube-public"]


def build_webhook_configuration(
    name: str, client_config: Obj, namespaces: Sequence[str] = (), timeout_seconds: int = 5
) -> Obj:
    """Server-side filtered (only labelled pods; only in `namespaces` when given, else never in
    system namespaces), failures ignored, short timeout: a broken webhook must never block a
    pod. Filtering by namespace here, not in the handler, keeps a second, differently scoped
    install's webhook from even being called."""
    if namespaces:
        namespace_match = {"operator": "In", "values": list(namespaces)}
    else:
        namespace_match = {"operator": "NotIn", "values": SYSTEM_NAMESPACES}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": dict(MANAGED_BY)},
        "webhooks": [
            {
                "name": "inject.prosody-operator.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "NoneOnDryRun",
                "failurePolicy": "Ignore",
                "timeoutSeconds": timeout_seconds,
                "reinvocationPolicy": "Never",
                "matchPolicy": "Equivalent",
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                        "scope": "Namespaced",
                    }
                ],
                "objectSelector": {"matchLabels": {ann.INJECT: "true"}},
                "namespaceSelector": {
                    "matchExpressions": [{"key": "kubernetes.io/metadata.name", **namespace_match}]
                },
                "clientConfig": client_config,
            }
        ],
    }
