"""The workloads whose pods can run Prosody, and references between objects (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    group: str = "apps"
    version: str = "v1"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


# Every kind that has a pod template and that `kubectl rollout restart` restarts.
KINDS = {
    kind.kind: kind
    for kind in (
        Kind("Deployment", "deployments"),
        Kind("StatefulSet", "statefulsets"),
        Kind("DaemonSet", "daemonsets"),
    )
}


@dataclass(frozen=True)
class ObjectRef:
    """What an Event names as its object."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str | None = None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjectRef:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"], meta.get("uid"))

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.kind, self.name)

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def restart_command(workload: ObjectRef) -> str:
    return (
        f"kubectl -n {workload.namespace} rollout restart {workload.kind.lower()}/{workload.name}"
    )


def pod_owner(pod: Mapping[str, Any]) -> ObjectRef | None:
    """The workload a new pod belongs to, from its controller reference alone: a Deployment's
    ReplicaSets are named <deployment>-<pod-template-hash>, and the pod carries that hash."""
    metadata = pod.get("metadata") or {}
    namespace = metadata.get("namespace") or ""
    for owner in metadata.get("ownerReferences") or []:
        if not owner.get("controller"):
            continue
        kind, name = owner.get("kind"), owner.get("name") or ""
        if kind == "ReplicaSet":
            suffix = "-" + ((metadata.get("labels") or {}).get("pod-template-hash") or "")
            if suffix != "-" and name.endswith(suffix):
                return ObjectRef("apps/v1", "Deployment", namespace, name.removesuffix(suffix))
        elif kind in KINDS:
            return ObjectRef(KINDS[kind].api_version, kind, namespace, name)
    return None


def may_have_pods(workload: Mapping[str, Any]) -> bool:
    """Whether the workload's controller reports pods of it in its status. One that does not
    (just created) has none to look at, and its first ones come with a status update: an event
    that reconciles it again."""
    status = workload.get("status") or {}
    if workload.get("kind") == "DaemonSet":
        return bool(status.get("currentNumberScheduled") or status.get("numberMisscheduled"))
    return bool(status.get("replicas"))


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its owner that garbage-collects it), if any."""
    for owner in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("controller"):
            return str(owner.get("uid"))
    return None


def label_selector(selector: Mapping[str, Any]) -> str:
    """A LabelSelector as the `labelSelector` query parameter."""
    terms = [f"{key}={value}" for key, value in (selector.get("matchLabels") or {}).items()]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = ",".join(expression.get("values") or [])
        terms.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": f"{key}",
                "DoesNotExist": f"!{key}",
            }[operator]
        )
    return ",".join(terms)
