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
