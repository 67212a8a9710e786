"""The builders decide what every object looks like; their output is checked against golden YAML.

`UPDATE_GOLDEN=1 pytest tests/operator/test_builders.py` rewrites the golden files after an
intended change (review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from prosody_operator import annotations as ann
from prosody_operator import builders
from prosody_operator.intervals import EffectiveInterval
from prosody_operator.settings import OperatorSettings

GOLDEN = Path(__file__).parent / "golden"
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "xmpp",
        "namespace": "chat",
        "uid": "0b6c0c3e-1111-2222-3333-444455556666",
    },
    "spec": {"selector": {"matchLabels": {"app": "xmpp"}}},
}
SETTINGS = OperatorSettings(
    exporter_image="registry.test/prosody-exporter:0.1.0",
    service_monitor_labels={"release": "kube-prometheus-stack"},
)


def check_golden(name: str, obj: object) -> None:
    path = GOLDEN / f"{name}.yaml"
    rendered = yaml.safe_dump(obj, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), f"{name} differs from {path}"


CASES = {
    "sidecar-defaults": (ann.Overrides(), EffectiveInterval(60.0, 60.0, "Prosody's default")),
    "sidecar-manual": (ann.Overrides(), EffectiveInterval("manual", 30.0, "prosody.cfg.lua:7")),
    "sidecar-overrides": (
        ann.Overrides(
            port=9100,
            allow_cidrs=("198.18.7.0/24",),
            image="registry.test/other:2",
            resources={"requests": {"cpu": "5m"}},
        ),
        EffectiveInterval(15.0, 15.0, "annotation"),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_sidecar(case):
    overrides, interval = CASES[case]
    sidecar = builders.build_sidecar_container(
        SETTINGS, overrides, ["198.18.0.0/16", "2001:db8:1::/64"], interval
    )
    check_golden(case, sidecar)


def test_sidecar_passes_pod_security_restricted():
    sidecar = builders.build_sidecar_container(
        SETTINGS, ann.Overrides(), [], EffectiveInterval(60.0, 60.0, "x")
    )
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_service_and_service_monitor():
    interval = EffectiveInterval(45.0, 45.0, "prosody.cfg.lua:12")
    check_golden("service", builders.build_service(DEPLOYMENT, 9755))
    check_golden(
        "servicemonitor",
        builders.build_service_monitor(
            DEPLOYMENT, interval, SETTINGS.service_monitor_labels, "monitoring/k8s"
        ),
    )


def test_inputs_hash_changes_with_inputs_only():
    interval = EffectiveInterval(45.0, 45.0, "x")
    first = builders.build_service_monitor(DEPLOYMENT, interval, {}, "none")
    again = builders.build_service_monitor(DEPLOYMENT, interval, {}, "none")
    slower = builders.build_service_monitor(
        DEPLOYMENT, EffectiveInterval(60.0, 60.0, "x"), {}, "none"
    )
    key = ann.INPUTS_HASH
    assert first["metadata"]["annotations"][key] == again["metadata"]["annotations"][key]
    assert first["metadata"]["annotations"][key] != slower["metadata"]["annotations"][key]


def test_injection_patch_appends_the_sidecar_and_records_it():
    pod = {"metadata": {}, "spec": {"containers": [{"name": "prosody", "image": "prosody:0.12"}]}}
    sidecar = builders.build_sidecar_container(
        SETTINGS, ann.Overrides(), [], EffectiveInterval(60.0, 60.0, "x")
    )
    patch = builders.build_injection_patch(pod, sidecar)
    assert [c["name"] for c in patch["spec"]["containers"]] == ["prosody", "prosody-exporter"]
    assert builders.has_sidecar(patch["spec"])
    assert '"version": "0.1.0"' in patch["metadata"]["annotations"][ann.STATUS]


@pytest.mark.parametrize(
    ("node_cidrs", "settings", "expected"),
    [
        (
            ["198.18.1.0/24", "198.18.0.0/24", "198.18.1.0/24"],
            {},
            ["198.18.0.0/24", "198.18.1.0/24"],
        ),
        (["198.18.0.0/24"], {"extra_cidrs": "2001:db8::/32"}, ["198.18.0.0/24", "2001:db8::/32"]),
        (["198.18.0.0/24"], {"pod_cidrs": "198.19.0.0/16"}, ["198.19.0.0/16"]),
        ([], {}, []),
    ],
)
def test_allowlist(node_cidrs, settings, expected):
    assert builders.allowlist(node_cidrs, OperatorSettings(**settings)) == expected


def test_webhook_configuration():
    check_golden(
        "webhook-configuration",
        builders.build_webhook_configuration(
            "prosody-operator",
            {"url": "https://127.0.0.1:9443/inject-exporter", "caBundle": "Q0E="},
        ),
    )


def test_webhook_configuration_of_a_namespaced_install_selects_only_its_namespaces():
    client_config = {"url": "https://127.0.0.1:9443/inject-exporter", "caBundle": "Q0E="}
    (webhook,) = builders.build_webhook_configuration(
        "prosody-operator", client_config, ["team-a", "team-b"]
    )["webhooks"]
    assert webhook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]
    }
