"""The Prosody workload the tests, the demo and the benchmarks deploy: what a user writes."""

from __future__ import annotations

from typing import Any

INJECT = "prosody-operator.io/inject"
# The official image, for tests whose pods never run; on the test node, pods run the Prosody
# image built here (testinfra.e2e.prosody_image).
PROSODY_IMAGE = "prosody/prosody:0.12"


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


def prosody_deployment(
    name: str,
    configmap: str | None,
    *,
    annotations: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    image: str = PROSODY_IMAGE,
) -> dict[str, Any]:
    """An annotated Prosody Deployment (see prosody_pod_spec)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name, INJECT: "true"},
                    "annotations": {INJECT: "true", **(annotations or {})},
                },
                "spec": prosody_pod_spec(configmap, env, image),
            },
        },
    }
