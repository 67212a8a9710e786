"""The names of the objects made for a workload: valid whatever the workload is called, and
never shared by two workloads (names.py)."""

from __future__ import annotations

import re

import pytest

from prosody_operator import builders, names
from prosody_operator.intervals import EffectiveInterval
from prosody_operator.selection import matches

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LONG = "a" * 40 + "." + "b" * 212  # 253 characters, the longest workload name
# Workload names as the API server allows them (DNS-1123 subdomains).
HOSTILE = [
    "x",
    "0",
    "7xmpp",
    "chat.example.org",
    "a-" * 30 + "b",
    "prosody-" + "z" * 47,  # 55 + the suffix = 71
    LONG,
    "9" * 253,
    "a." * 126 + "a",
]


@pytest.mark.parametrize("workload", HOSTILE)
def test_every_workload_name_gives_a_valid_service_name(workload: str) -> None:
    name = names.metrics_object_name(workload)
    assert len(name) <= 63 and DNS_1035.fullmatch(name), name
    assert name.endswith("-prosody-metrics")  # what the chart's alerts and dashboard select
    value = names.label_value(workload)
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value


def test_names_that_fit_are_kept() -> None:
    assert names.metrics_object_name("xmpp") == "xmpp-prosody-metrics"
    assert names.metrics_object_name("a" * 47) == "a" * 47 + "-prosody-metrics"
    assert names.label_value("chat.example.org") == "chat.example.org"


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("a" * 47 + "x", "a" * 47 + "y"),  # the same first 63 characters once suffixed
        (LONG, LONG[:-1] + "c"),
        ("chat.example", "chat-example"),  # a dot made a dash
    ],
)
def test_two_workloads_never_share_a_name(one: str, other: str) -> None:
    assert names.metrics_object_name(one) != names.metrics_object_name(other)
    if len(one) > 63 or len(other) > 63:
        assert names.label_value(one) != names.label_value(other)


def test_the_service_monitor_selects_the_service_of_a_long_dotted_name() -> None:
    workload = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": LONG, "namespace": "chat", "uid": "u"},
        "spec": {"selector": {"matchLabels": {"app": "xmpp"}}},
    }
    service = builders.build_service(workload, 9755)
    monitor = builders.build_service_monitor(
        workload, EffectiveInterval(60.0, 60.0, "Prosody's default"), {}, "none"
    )
    assert service["metadata"]["name"] == monitor["metadata"]["name"]
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
