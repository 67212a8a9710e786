"""Pure functions that decide what every object looks like. No API calls here."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__, names
from . import annotations as ann
from .intervals import EffectiveInterval, format_duration
from .optin import SYSTEM_NAMESPACES
from .settings import OperatorSettings

SIDECAR_NAME = "prosody-exporter"
INTERVAL_ENV = "PROSODY_EXPORTER_INTERVAL"
UPSTREAM_ENV = "PROSODY_EXPORTER_UPSTREAM_URL"
ALLOW_CIDRS_ENV = "PROSODY_EXPORTER_ALLOW_CIDRS"
METRICS_PORT_NAME = "metrics"
WEBHOOK_HANDLER_ID = "inject-exporter"
MANAGED_BY = {"app.kubernetes.io/managed-by": "prosody-operator"}
OWNED_KINDS = ("Service", "ServiceMonitor")  # what the operator makes for a workload
# The webhook for labelled pods keeps the name it always had (bench/ reads the API server's
# metrics by it); the other serves opted-in namespaces.
POD_WEBHOOK = "inject.prosody-operator.io"
NAMESPACE_WEBHOOK = "namespace.inject.prosody-operator.io"
PROMETHEUS_IO = "prometheus.io/"
MONITORING = "monitoring.coreos.com/v1"

Obj = dict[str, Any]


def hash_of(obj: Any) -> str:
    """A stable hash of a built object (kept on it to skip no-op writes and to notice that a new
    operator version builds it differently, as prometheus-operator does)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """`obj` with the hash of everything else in it as the annotation OBJECT_HASH."""
    obj["metadata"].setdefault("annotations", {}).pop(ann.OBJECT_HASH, None)
    obj["metadata"]["annotations"][ann.OBJECT_HASH] = hash_of(obj)
    return obj


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
    *,
    upstream_url: str,
) -> Obj:
    """`upstream_url`: Prosody's /metrics, where its config serves it (or the annotation says).
    No Host header is needed: mod_http_openmetrics is a global module, whose route answers on
    any Host."""
    port = overrides.port or settings.exporter_port
    cidrs = overrides.allow_cidrs if overrides.allow_cidrs is not None else tuple(allow_cidrs)
    env = {
        UPSTREAM_ENV: upstream_url,
        INTERVAL_ENV: format_duration(interval.scrape_seconds),
        "PROSODY_EXPORTER_LISTEN_PORT": str(port),
        ALLOW_CIDRS_ENV: ",".join(cidrs),
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
        # The default passes Pod Security "restricted"; the chart's OpenShift mode leaves
        # runAsUser and runAsGroup out of it.
        "securityContext": copy.deepcopy(dict(settings.sidecar_security_context)),
    }


def injection_status(sidecar: Mapping[str, Any]) -> str:
    return json.dumps({"version": __version__, "hash": hash_of(sidecar)}, sort_keys=True)


def failed_injection_status(error: str) -> str:
    """The status annotation of a pod admitted without the sidecar, and why: the reconciler
    reports it on the workload (the webhook posts nothing)."""
    return json.dumps({"version": __version__, "error": error[:400]}, sort_keys=True)


def build_failure_patch(error: str) -> Obj:
    """The merge patch for a pod admitted without the sidecar: only why."""
    return {"metadata": {"annotations": {ann.STATUS: failed_injection_status(error)}}}


def injection_error(pod: Mapping[str, Any]) -> str | None:
    """Why this pod was admitted without the sidecar, if it was."""
    status = ((pod.get("metadata") or {}).get("annotations") or {}).get(ann.STATUS)
    try:
        error = json.loads(status).get("error") if status else None
    except (ValueError, AttributeError):
        return None
    return str(error) if error else None


def sidecar_env(pod: Mapping[str, Any]) -> dict[str, str] | None:
    """The injected sidecar's env, if the pod has the sidecar."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == SIDECAR_NAME:
            return {e.get("name"): e.get("value") for e in container.get("env") or []}
    return None


def build_injection_patch(
    pod: Mapping[str, Any], sidecar: Obj, annotations: Mapping[str, str] | None = None
) -> Obj:
    """The merge patch that adds the sidecar and records what was injected (and sets
    `annotations` on the pod)."""
    containers = [*pod.get("spec", {}).get("containers", []), sidecar]
    return {
        "metadata": {"annotations": {**(annotations or {}), ann.STATUS: injection_status(sidecar)}},
        "spec": {"containers": containers},
    }


def build_json_patch(pod: Mapping[str, Any], patch: Obj) -> list[Obj]:
    """One of our merge patches (annotations set, the containers replaced) as the JSONPatch an
    admission response carries. An "add" of a member that exists replaces it (RFC 6902)."""
    annotations = patch["metadata"]["annotations"]
    if (pod.get("metadata") or {}).get("annotations") is None:
        ops = [{"op": "add", "path": "/metadata/annotations", "value": dict(annotations)}]
    else:
        ops = [
            {"op": "add", "path": f"/metadata/annotations/{_pointer(key)}", "value": value}
            for key, value in annotations.items()
        ]
    if "spec" in patch:
        ops.append({"op": "add", "path": "/spec/containers", "value": patch["spec"]["containers"]})
    return ops


def _pointer(key: str) -> str:
    """A key as a JSON Pointer reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def build_admission_response(
    review: Mapping[str, Any], patch: list[Obj], warnings: Iterable[str] = ()
) -> Obj:
    """The AdmissionReview that admits the pod of `review`, with `patch` (JSONPatch ops) and
    `warnings` for the client."""
    request = review.get("request") or {}
    response: Obj = {"uid": request.get("uid", ""), "allowed": True}
    if warnings:
        response["warnings"] = list(warnings)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
    return {
        "apiVersion": review.get("apiVersion") or "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }


def prometheus_scrape_annotations(port: int) -> dict[str, str]:
    """What a Prometheus without the Operator reads (the `kubernetes-pods` job of the
    prometheus-community chart and of Prometheus' own example configuration)."""
    return {
        PROMETHEUS_IO + "scrape": "true",
        PROMETHEUS_IO + "port": str(port),
        PROMETHEUS_IO + "path": "/metrics",
        PROMETHEUS_IO + "scheme": "http",
    }


def has_sidecar(pod_spec: Mapping[str, Any]) -> bool:
    return any(c.get("name") == SIDECAR_NAME for c in pod_spec.get("containers") or [])


def allowlist(node_cidrs: Iterable[str], settings: OperatorSettings) -> list[str]:
    """The sidecar's default allowlist: the pod network (from the Nodes, or the setting that
    replaces it), plus the extra CIDRs."""
    base = [str(n) for n in settings.pod_cidrs] or sorted(set(node_cidrs))
    extra = [str(n) for n in settings.extra_cidrs]
    return list(dict.fromkeys([*base, *extra]))


# --- Objects owned by a workload -------------------------------------------------------------


def owner_reference(workload: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": workload["apiVersion"],
        "kind": workload["kind"],
        "name": workload["metadata"]["name"],
        "uid": workload["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def workload_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    """Our labels on the objects made for a workload; the ServiceMonitor selects its Service by
    them."""
    return {
        **MANAGED_BY,
        ann.WORKLOAD: names.label_value(workload["metadata"]["name"]),
        ann.WORKLOAD_KIND: workload["kind"],
    }


def _metadata(workload: Mapping[str, Any]) -> Obj:
    return {
        "name": names.metrics_object_name(workload["metadata"]["name"]),
        "namespace": workload["metadata"]["namespace"],
        "labels": workload_labels(workload),
        "annotations": {},
        "ownerReferences": [owner_reference(workload)],
    }


def build_service(workload: Mapping[str, Any], port: int) -> Obj:
    """Headless: Prometheus scrapes the endpoints, so a ClusterIP would only use up the
    cluster's finite service range and a kube-proxy rule on every node."""
    selector = workload["spec"]["selector"].get("matchLabels") or {}
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(workload),
            "spec": {
                "clusterIP": "None",
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
    )


def must_recreate(live: Mapping[str, Any] | None, built: Mapping[str, Any]) -> bool:
    """Whether the live object differs from the built one in a field the API server does not
    change in place: a Service's clusterIP (one made with a ClusterIP, as operator versions
    before headless Services made them, cannot become headless). It is deleted and made again."""
    if live is None or built["kind"] != "Service":
        return False
    return bool((live.get("spec") or {}).get("clusterIP") != built["spec"]["clusterIP"])


def monitor_labels(workload: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, str]:
    """The ServiceMonitor's labels: the configured ones (so a Prometheus selects it), ours last."""
    return {**labels, **workload_labels(workload)}


@dataclass(frozen=True)
class ScrapeOptions:
    """How Prometheus scrapes a workload beyond its interval: the same in a ServiceMonitor and
    a PodMonitor. Empty values leave the field out (prometheus-operator's defaults)."""

    timeout: float | None = None  # seconds, at most the interval; None: the interval's default
    honor_labels: bool = False
    relabelings: tuple[Mapping[str, Any], ...] = ()
    metric_relabelings: tuple[Mapping[str, Any], ...] = ()
    sample_limit: int = 0  # 0: none


def _monitor(
    kind: str,
    workload: Mapping[str, Any],
    interval: EffectiveInterval,
    labels: Mapping[str, str],
    selected_by: str,
    scrape: ScrapeOptions,
    relabelings: Sequence[Mapping[str, Any]] = (),
) -> Obj:
    """A ServiceMonitor or PodMonitor without its selector; `relabelings` come before the
    configured ones."""
    metadata = _metadata(workload)
    metadata["labels"] = monitor_labels(workload, labels)
    metadata["annotations"] = {ann.INTERVAL_SOURCE: interval.source, ann.SELECTED_BY: selected_by}
    timeout = interval.scrape_timeout if scrape.timeout is None else format_duration(scrape.timeout)
    endpoint: Obj = {
        "port": METRICS_PORT_NAME,
        "path": "/metrics",
        "interval": interval.scrape_interval,
        "scrapeTimeout": timeout,
    }
    if scrape.honor_labels:
        endpoint["honorLabels"] = True
    if relabelings or scrape.relabelings:
        endpoint["relabelings"] = [dict(r) for r in (*relabelings, *scrape.relabelings)]
    if scrape.metric_relabelings:
        endpoint["metricRelabelings"] = [dict(r) for r in scrape.metric_relabelings]
    endpoints = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    spec: Obj = {
        "namespaceSelector": {"matchNames": [workload["metadata"]["namespace"]]},
        endpoints: [endpoint],
    }
    if scrape.sample_limit:
        spec["sampleLimit"] = scrape.sample_limit
    return {"apiVersion": MONITORING, "kind": kind, "metadata": metadata, "spec": spec}


def build_service_monitor(
    workload: Mapping[str, Any],
    interval: EffectiveInterval,
    labels: Mapping[str, str],
    selected_by: str,
    scrape: ScrapeOptions = ScrapeOptions(),
) -> Obj:
    """`selected_by`: which Prometheus resources select it ("none" is worth a look)."""
    monitor = _monitor("ServiceMonitor", workload, interval, labels, selected_by, scrape)
    monitor["spec"]["selector"] = {"matchLabels": workload_labels(workload)}
    return with_hash(monitor)


def build_pod_monitor(
    workload: Mapping[str, Any],
    interval: EffectiveInterval,
    labels: Mapping[str, str],
    selected_by: str,
    scrape: ScrapeOptions = ScrapeOptions(),
) -> Obj:
    """The PodMonitor mode: no Service; the workload's own pod selector, the sidecar's named
    port (pods not injected yet have none, so they are no targets). Its targets get the
    `service` label a ServiceMonitor's would have, so the chart's alerts and dashboard work in
    both modes."""
    name = names.metrics_object_name(workload["metadata"]["name"])
    service = {"action": "replace", "targetLabel": "service", "replacement": name}
    monitor = _monitor("PodMonitor", workload, interval, labels, selected_by, scrape, [service])
    selector = workload["spec"]["selector"]
    monitor["spec"]["selector"] = {
        key: copy.deepcopy(selector[key])
        for key in ("matchLabels", "matchExpressions")
        if selector.get(key)
    }
    return with_hash(monitor)


def is_subset(wanted: Any, actual: Any) -> bool:
    """Whether `actual` has everything `wanted` has (what else the API server or others added is
    not ours to judge): mappings key by key, lists element by element in any order."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and is_subset(value, actual[key]) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(actual, list) and all(
            any(is_subset(item, candidate) for candidate in actual) for item in wanted
        )
    return bool(wanted == actual)


# What up_to_date and must_recreate compare, and a delete names (uid); the rest is left out.
_COMPARED_METADATA = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations")


def comparable(obj: Mapping[str, Any]) -> Obj:
    """A copy of a live object of ours with only what a reconcile compares with what it builds:
    what the operator keeps of each (its index, its last writes)."""
    metadata = obj.get("metadata") or {}
    kept = {k: copy.deepcopy(metadata[k]) for k in _COMPARED_METADATA if k in metadata}
    kept["ownerReferences"] = copy.deepcopy(metadata.get("ownerReferences") or [])
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": kept,
        "spec": copy.deepcopy(dict(obj.get("spec") or {})),
    }


def up_to_date(live: Mapping[str, Any] | None, built: Mapping[str, Any]) -> bool:
    """Whether the live object is what we built: same hash (nothing changed in what we build)
    and still all we set (nobody edited it by hand)."""
    if live is None:
        return False
    live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(ann.OBJECT_HASH)
    return live_hash == built["metadata"]["annotations"][ann.OBJECT_HASH] and is_subset(built, live)


# --- The webhook configuration ----------------------------------------------------------------


def build_webhook_client_config(ca_bundle: str, *, url: str = "", service: str = "") -> Obj | None:
    """Where the API server calls the webhook: a URL (local runs), or the webhook Service
    (`namespace/name`, in-cluster); None when neither is set."""
    path = f"/{WEBHOOK_HANDLER_ID}"
    if url:
        return {"url": url.rstrip("/") + path, "caBundle": ca_bundle}
    if service:
        namespace, _, name = service.partition("/")
        reference = {"namespace": namespace, "name": name, "path": path, "port": 443}
        return {"service": reference, "caBundle": ca_bundle}
    return None


def build_webhook_configuration(
    name: str, client_config: Obj, namespaces: Sequence[str] = (), timeout_seconds: int = 5
) -> Obj:
    """Two webhooks, both filtered by the API server (optin.reaches_webhook says the same in
    Python): pods labelled inject=true; and, in namespaces labelled inject=true, pods with no
    such label ("false" opts a pod out). Only in `namespaces` when given, else never in system
    namespaces: filtering here, not in the handler, keeps a second, differently scoped install's
    webhook from even being called. Failures ignored, short timeout: a broken webhook must never
    block a pod."""
    if namespaces:
        namespace_match = {"operator": "In", "values": list(namespaces)}
    else:
        namespace_match = {"operator": "NotIn", "values": list(SYSTEM_NAMESPACES)}
    in_scope = {"key": "kubernetes.io/metadata.name", **namespace_match}

    def webhook(webhook_name: str, objects: Obj, namespace_selector: Obj) -> Obj:
        return {
            "name": webhook_name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",  # it reads, and writes nothing
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
            "objectSelector": objects,
            "namespaceSelector": namespace_selector,
            "clientConfig": client_config,
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": dict(MANAGED_BY)},
        "webhooks": [
            webhook(
                POD_WEBHOOK,
                {"matchLabels": {ann.INJECT: "true"}},
                {"matchExpressions": [in_scope]},
            ),
            webhook(
                NAMESPACE_WEBHOOK,
                {
                    "matchExpressions": [
                        {"key": ann.INJECT, "operator": "NotIn", "values": ["true", "false"]}
                    ]
                },
                {
                    "matchExpressions": [
                        in_scope,
                        {"key": ann.INJECT, "operator": "In", "values": ["true"]},
                    ]
                },
            ),
        ],
    }
