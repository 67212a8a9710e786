"""Does any Prometheus select a ServiceMonitor, or a PodMonitor? (pure)

The classic silent failure: the monitor exists, but no Prometheus picks it up because its
labels (often kube-prometheus-stack's `release`) or its namespace do not match the Prometheus'
selectors. The rules are prometheus-operator's, the same for both kinds with their own fields:
a missing `serviceMonitorSelector` (`podMonitorSelector`) selects nothing, an empty one
everything; a missing `serviceMonitorNamespaceSelector` (`podMonitorNamespaceSelector`) means
the Prometheus' own namespace only, an empty one every namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def describe(selector: Mapping[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for e in selector.get("matchExpressions") or []:
        parts.append(f"{e.get('key')} {e.get('operator')} {e.get('values') or ''}".strip())
    return ",".join(parts) or "everything"


@dataclass(frozen=True)
class PrometheusSelectors:
    namespace: str
    name: str
    monitor_selector: Mapping[str, Any] | None
    namespace_selector: Mapping[str, Any] | None
    pod_monitor_selector: Mapping[str, Any] | None = None
    pod_monitor_namespace_selector: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, prometheus: Mapping[str, Any]) -> PrometheusSelectors:
        spec = prometheus.get("spec") or {}
        return cls(
            prometheus["metadata"]["namespace"],
            prometheus["metadata"]["name"],
            spec.get("serviceMonitorSelector"),
            spec.get("serviceMonitorNamespaceSelector"),
            spec.get("podMonitorSelector"),
            spec.get("podMonitorNamespaceSelector"),
        )

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def why_not(
        self,
        monitor_labels: Mapping[str, str],
        namespace: str,
        namespace_labels: Mapping[str, str],
        kind: str = "ServiceMonitor",
    ) -> str | None:
        """None if this Prometheus selects the monitor of that kind, else the reason it does
        not."""
        if kind == "PodMonitor":
            selector, namespaces = self.pod_monitor_selector, self.pod_monitor_namespace_selector
        else:
            selector, namespaces = self.monitor_selector, self.namespace_selector
        if selector is None:
            field = "podMonitorSelector" if kind == "PodMonitor" else "serviceMonitorSelector"
            return f"{self.ref} has no {field} (selects none)"
        if not matches(selector, monitor_labels):
            return f"{self.ref} selects {kind}s with {describe(selector)}"
        if namespaces is None:
            if namespace != self.namespace:
                return f"{self.ref} only looks in its own namespace {self.namespace}"
        elif not matches(namespaces, namespace_labels):
            return f"{self.ref} looks only in namespaces with {describe(namespaces)}"
        return None


@dataclass(frozen=True)
class Selection:
    selected_by: tuple[str, ...]  # namespace/name of each Prometheus selecting the monitor
    reasons: tuple[str, ...]  # why each other Prometheus does not

    @property
    def summary(self) -> str:
        return ",".join(self.selected_by) or "none"


def select(
    prometheuses: Iterable[PrometheusSelectors],
    monitor_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    kind: str = "ServiceMonitor",
) -> Selection:
    selected, reasons = [], []
    for prometheus in sorted(prometheuses, key=lambda p: p.ref):
        reason = prometheus.why_not(monitor_labels, namespace, namespace_labels, kind)
        if reason is None:
            selected.append(prometheus.ref)
        else:
            reasons.append(reason)
    return Selection(tuple(selected), tuple(reasons))
