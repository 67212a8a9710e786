"""Which Prometheus selects a ServiceMonitor: prometheus-operator's rules, table-driven."""

from __future__ import annotations

import pytest

from prosody_operator.selection import PrometheusSelectors, matches, select

LABELS = {"release": "kube-prometheus-stack", "app.kubernetes.io/managed-by": "prosody-operator"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, True),
        ({"matchLabels": {"release": "kube-prometheus-stack"}}, True),
        ({"matchLabels": {"release": "other"}}, False),
        (
            {
                "matchExpressions": [
                    {"key": "release", "operator": "In", "values": ["a", "kube-prometheus-stack"]}
                ]
            },
            True,
        ),
        (
            {
                "matchExpressions": [
                    {"key": "release", "operator": "NotIn", "values": ["kube-prometheus-stack"]}
                ]
            },
            False,
        ),
        ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]}, True),
        ({"matchExpressions": [{"key": "release", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}, True),
    ],
)
def test_matches(selector, expected):
    assert matches(selector, LABELS) is expected


def prometheus(name="k8s", namespace="monitoring", monitors=None, namespaces=None):
    return PrometheusSelectors(namespace, name, monitors, namespaces)


@pytest.mark.parametrize(
    ("prometheuses", "selected", "reason"),
    [
        ([], (), None),
        ([prometheus(monitors={}, namespaces={})], ("monitoring/k8s",), None),
        ([prometheus(monitors=None, namespaces={})], (), "has no serviceMonitorSelector"),
        (
            [prometheus(monitors={"matchLabels": {"release": "prom"}}, namespaces={})],
            (),
            "selects ServiceMonitors with release=prom",
        ),
        ([prometheus(monitors={}, namespaces=None)], (), "only looks in its own namespace"),
        ([prometheus(namespace="chat", monitors={}, namespaces=None)], ("chat/k8s",), None),
        (
            [prometheus(monitors={}, namespaces={"matchLabels": {"monitoring": "on"}})],
            (),
            "looks only in namespaces with monitoring=on",
        ),
        (
            [
                prometheus("a", monitors={"matchLabels": {"release": "x"}}, namespaces={}),
                prometheus("b", monitors={"matchLabels": dict(LABELS)}, namespaces={}),
            ],
            ("monitoring/b",),
            "monitoring/a selects",
        ),
    ],
)
def test_select(prometheuses, selected, reason):
    selection = select(prometheuses, LABELS, "chat", {"kubernetes.io/metadata.name": "chat"})
    assert selection.selected_by == selected
    assert selection.summary == (",".join(selected) or "none")
    if reason:
        assert any(reason in r for r in selection.reasons), selection.reasons


def pod_prometheus(monitors=None, namespaces=None, service_monitors=None):
    return PrometheusSelectors("monitoring", "k8s", service_monitors, {}, monitors, namespaces)


@pytest.mark.parametrize(
    ("prometheus", "selected", "reason"),
    [
        (pod_prometheus(monitors={}, namespaces={}), True, None),
        (pod_prometheus(service_monitors={}), False, "has no podMonitorSelector (selects none)"),
        (
            pod_prometheus(monitors={"matchLabels": {"release": "prom"}}, namespaces={}),
            False,
            "selects PodMonitors with release=prom",
        ),
        (pod_prometheus(monitors={}), False, "only looks in its own namespace monitoring"),
        (
            pod_prometheus(monitors={}, namespaces={"matchLabels": {"monitoring": "on"}}),
            False,
            "looks only in namespaces with monitoring=on",
        ),
    ],
)
def test_select_pod_monitors(prometheus, selected, reason):
    """The same rules with the Prometheus' podMonitorSelector and podMonitorNamespaceSelector."""
    selection = select([prometheus], LABELS, "chat", {}, kind="PodMonitor")
    assert bool(selection.selected_by) is selected
    if reason:
        assert any(reason in r for r in selection.reasons), selection.reasons


def test_selectors_of_a_prometheus_resource():
    spec = {
        "serviceMonitorSelector": {"matchLabels": {"a": "1"}},
        "podMonitorSelector": {"matchLabels": {"b": "2"}},
        "podMonitorNamespaceSelector": {},
    }
    found = PrometheusSelectors.of({"metadata": {"namespace": "m", "name": "p"}, "spec": spec})
    assert found == PrometheusSelectors(
        "m", "p", {"matchLabels": {"a": "1"}}, None, {"matchLabels": {"b": "2"}}, {}
    )
