"""Does any Prometheus select a ServiceMonitor? (pure)

The classic silent failure: the ServiceMonitor exists, but no Prometheus picks it up because its
labels (often kube-prometheus-stack's `release`) or its namespace do not match the Prometheus'
selectors. The rules are prometheus-operator's: a missing `serviceMonitorSelector` selects
nothing, an empty one everything; a missing `serviceMonitorNamespaceSelector` means the
Prometheus' own namespace only, an empty one every namespace.
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

    @classmethod
    def of(cls, prometheus: Mapping[str, Any]) -> PrometheusSelectors:
        spec = prometheus.get("spec") or {}
        return cls(
            prometheus["metadata"]["namespace"],
            prometheus["metadata"]["name"],
            spec.get("serviceMonitorSelector"),
            spec.get("serviceMonitorNamespaceSelector"),
        )

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def why_not(
        self, monitor_labels: Mapping[str, str], namespace: str, namespace_labels: Mapping[str, str]
    ) -> str | None:
        """None if this Prometheus selects the ServiceMonitor, else the reason it does not."""
        if self.monitor_selector is None:
            return f"{self.ref} has no serviceMonitorSelector (selects none)"
        if not matches(self.monitor_selector, monitor_labels):
            return f"{self.ref} selects ServiceMonitors with {describe(self.monitor_selector)}"
        if self.namespace_selector is None:
            if namespace != self.namespace:
                return f"{self.ref} only looks in its own namespace {self.namespace}"
        elif not matches(self.namespace_selector, namespace_labels):
            return f"{self.ref} looks only in namespaces with {describe(self.namespace_selector)}"
        return None


@dataclass(frozen=True)
class Selection:
    selected_by: tuple[str, ...]  # namespace/name of each Prometheus selecting the ServiceMonitor
    reasons: tuple[str, ...]  # why each other Prometheus does not

    @property
    def summary(self) -> str:
        return ",".join(self.selected_by) or "none"


def select(
    prometheuses: Iterable[PrometheusSelectors],
    monitor_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
) -> Selection:
    selected, reasons = [], []
    for prometheus in sorted(prometheuses, key=lambda p: p.ref):
        reason = prometheus.why_not(monitor_labels, namespace, namespace_labels)
        if reason is None:
            selected.append(prometheus.ref)
        else:
            reasons.append(reason)
    return Selection(tuple(selected), tuple(reasons))
