"""The Prosody workloads the tests, the demo and the benchmarks deploy: what a user writes."""

from __future__ import annotations

from typing import Any

INJECT = "prosody-operator.io/inject"
# The official image, for tests whose pods never run; on the test node, pods run the Prosody
# image built here (testinfra.e2e.prosody_image).
PROSODY_IMAGE = "prosody/prosody:0.12"


def prosody_config(interval: str, *, modules: tuple[str, ...] = (), extra: str = "") -> str:
    """A user's prosody.cfg.lua, as a ConfigMap holds it: metrics on, statistics_interval
    `interval` (a Lua value: `30`, `"manual"`), more `modules` and `extra` global settings, and
    one VirtualHost a test client can log in to."""
    enabled = ", ".join(
        f'"{m}"' for m in ("http_openmetrics", "roster", "saslauth", "ping", *modules)
    )
    return f"""
modules_enabled = {{ {enabled} }}
authentication = "internal_hashed"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
statistics = "internal"
statistics_interval = {interval}
{extra}
VirtualHost "localhost"
"""


def prosody_pod_spec(
    configmap: str | None, env: dict[str, str] | None = None, image: str = PROSODY_IMAGE
) -> dict[str, Any]:
    """A Prosody pod spec, its config from a ConfigMap mounted at /etc/prosody, compliant with
    Pod Security "restricted"."""
    container: dict[str, Any] = {
        "name": "prosody",
        "image": image,
        "ports": [{"name": "c2s", "containerPort": 5222}],
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 101,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    volumes = []
    if configmap:
        container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/prosody"}]
        volumes = [{"name": "config", "configMap": {"name": configmap}}]
    return {"containers": [container], "volumes": volumes}


def prosody_pod(
    name: str, configmap: str | None, *, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A bare Prosody pod annotated for injection; `labels` replace the default
    {app: name, prosody-operator.io/inject: "true"} (without that label, the webhook's
    objectSelector skips the pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": name, INJECT: "true"} if labels is None else labels,
            "annotations": {INJECT: "true"},
        },
        "spec": prosody_pod_spec(configmap),
    }


def prosody_workload(
    kind: str,
    name: str,
    configmap: str | None,
    *,
    annotations: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    opted_in: bool = True,
    containers: list[dict[str, Any]] | None = None,
    image: str = PROSODY_IMAGE,
) -> dict[str, Any]:
    """A Prosody Deployment, StatefulSet or DaemonSet (see prosody_pod_spec); `opted_in`: its pod
    template has the inject label and annotation, as the README says; `annotations` are more
    on the pod template; `containers` replace the pod's containers."""
    inject = {INJECT: "true"} if opted_in else {}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {
                "labels": {"app": name, **inject},
                "annotations": {**inject, **(annotations or {})},
            },
            "spec": prosody_pod_spec(configmap, env, image),
        },
    }
    if containers is not None:
        spec["template"]["spec"]["containers"] = containers
    if kind != "DaemonSet":
        spec["replicas"] = 1
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def prosody_deployment(
    name: str,
    configmap: str | None,
    *,
    annotations: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    image: str = PROSODY_IMAGE,
) -> dict[str, Any]:
    """An annotated Prosody Deployment (see prosody_workload)."""
    return prosody_workload(
        "Deployment", name, configmap, annotations=annotations, env=env, image=image
    )


def jitsi_prosody_statefulset(
    release: str,
    configmap: str,
    *,
    pod_labels: dict[str, str] | None = None,
    pod_annotations: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Prosody as jitsi-helm (jitsi-contrib/jitsi-helm, its charts/prosody) lays it out: a
    StatefulSet `<release>-prosody` with one replica and a governing Service of the same name,
    the chart's selector labels, container `prosody` with jitsi's five named ports and the
    /http-bind probes on bosh-insecure, and an emptyDir for Prosody's data. The chart's values
    `podLabels`, `podAnnotations` and `annotations` (on the StatefulSet) are the arguments.

    One difference: jitsi's image renders /config/prosody.cfg.lua from templates at start-up,
    while the Prosody tests run (Debian's) reads /etc/prosody, so the config ConfigMap is mounted
    there, as the chart's `extraVolumes`/`extraVolumeMounts` would."""
    name = f"{release}-prosody"
    selector = {"app.kubernetes.io/name": "prosody", "app.kubernetes.io/instance": release}
    ports = {
        "xmpp-c2s": 5222,
        "xmpp-s2s": 5269,
        "xmpp-component": 5347,
        "bosh-insecure": 5280,
        "bosh-secure": 5281,
    }
    probe = {"httpGet": {"path": "/http-bind", "port": "bosh-insecure"}}
    container = {
        "name": "prosody",
        "image": "jitsi/prosody:stable",
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports.items()],
        "livenessProbe": probe,
        "readinessProbe": probe,
        "volumeMounts": [
            {"name": "prosody-data", "mountPath": "/config/data"},
            {"name": "prosody-config", "mountPath": "/etc/prosody"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": selector, "annotations": annotations or {}},
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": {**selector, **(pod_labels or {})},
                    "annotations": pod_annotations or {},
                },
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "prosody-data", "emptyDir": {}},
                        {"name": "prosody-config", "configMap": {"name": configmap}},
                    ],
                },
            },
        },
    }
