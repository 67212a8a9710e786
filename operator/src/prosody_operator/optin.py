"""Who asked for the sidecar, and whether the API server sends their pods to the webhook (pure).

The opt-in `prosody-operator.io/inject: "true"|"false"` can be set in four places; the first that
is set decides (annotations before labels, the pod before its workload before its namespace):

1. the pod template's annotation;
2. the workload's own annotation (Deployment, StatefulSet, DaemonSet metadata);
3. the pod template's label;
4. the namespace's label, which opts in only the pods recognised as Prosody (prosody.is_prosody).

The first three are explicit: the pod's Prosody container is then the one the `container`
annotation names, else the one recognised as Prosody, else the first.

The API server calls the webhook only for pods labelled "true", and, in namespaces labelled
"true", for pods not labelled at all (builders.build_webhook_configuration): a label "false"
keeps a pod away from the webhook altogether.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import annotations as ann

# The webhook is never called in these (a broken webhook there could stop the cluster).
SYSTEM_NAMESPACES = ("kube-system", "kube-node-lease", "kube-public")


@dataclass(frozen=True)
class OptIn:
    inject: bool
    explicit: bool  # False: only the namespace asked, so only pods recognised as Prosody
    source: str  # which of the four places decided, for messages
    problems: tuple[str, ...] = ()  # invalid values, ignored


def decide(
    pod_metadata: Mapping[str, Any],
    workload_annotations: Mapping[str, str],
    namespace_labels: Mapping[str, str],
) -> OptIn:
    places = (
        ("pod annotation", "on the pod template", (pod_metadata.get("annotations") or {})),
        ("workload annotation", "on the workload", workload_annotations),
        ("pod label", "on the pod template's labels", (pod_metadata.get("labels") or {})),
    )
    problems = []
    for source, where, values in places:
        value = values.get(ann.INJECT)
        if (problem := ann.invalid_switch(where, value)) is not None:
            problems.append(problem)
        if (decided := ann.switch(value)) is not None:
            return OptIn(decided, True, source, tuple(problems))
    if ann.switch(namespace_labels.get(ann.INJECT)):
        return OptIn(True, False, "namespace label", tuple(problems))
    return OptIn(False, False, "", tuple(problems))


def served(namespace: str, watch_namespaces: Sequence[str]) -> bool:
    """Whether the webhook is called at all in this namespace."""
    if watch_namespaces:
        return namespace in watch_namespaces
    return namespace not in SYSTEM_NAMESPACES


def reaches_webhook(
    pod_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    watch_namespaces: Sequence[str],
) -> bool:
    """Whether the API server sends a pod with these labels to the webhook: what the selectors
    of builders.build_webhook_configuration say (a test checks the two agree)."""
    if not served(namespace, watch_namespaces):
        return False
    label = pod_labels.get(ann.INJECT)
    if label == "true":
        return True
    return label != "false" and namespace_labels.get(ann.INJECT) == "true"


def how_to_reach(namespace: str, watch_namespaces: Sequence[str]) -> str:
    """What to add so that a workload's pods reach the webhook."""
    if not served(namespace, watch_namespaces):
        why = "not in watchNamespaces" if watch_namespaces else "a system namespace"
        return f"the webhook is never called in namespace {namespace} ({why})"
    return (
        f'add the label {ann.INJECT}: "true" to the pod template (spec.template.metadata.labels), '
        f"or label the namespace: kubectl label namespace {namespace} {ann.INJECT}=true"
    )
