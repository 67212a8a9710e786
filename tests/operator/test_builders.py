"""The builders decide what every object looks like; their output is checked against golden YAML.

`UPDATE_GOLDEN=1 pytest tests/operator/test_builders.py` rewrites the golden files after an
intended change (review the diff).
"""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path

import jsonpatch
import pytest
import yaml

from prosody_operator import annotations as ann
from prosody_operator import builders, optin
from prosody_operator.intervals import EffectiveInterval
from prosody_operator.selection import matches
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
STATEFULSET = {
    **DEPLOYMENT,
    "kind": "StatefulSet",
    "metadata": {**DEPLOYMENT["metadata"], "name": "jitsi-prosody"},
    "spec": {"selector": {"matchLabels": {"app.kubernetes.io/component": "prosody"}}},
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


DEFAULT_URL = "http://127.0.0.1:5280/metrics"
CASES = {
    "sidecar-defaults": (
        ann.Overrides(),
        EffectiveInterval(60.0, 60.0, "Prosody's default"),
        DEFAULT_URL,
    ),
    "sidecar-manual": (
        ann.Overrides(),
        EffectiveInterval("manual", 30.0, "prosody.cfg.lua:7"),
        DEFAULT_URL,
    ),
    "sidecar-overrides": (
        ann.Overrides(
            port=9100,
            allow_cidrs=("198.18.7.0/24",),
            image="registry.test/other:2",
            resources={"requests": {"cpu": "5m"}},
        ),
        EffectiveInterval(15.0, 15.0, "annotation"),
        "http://[::1]:5281/prosody/metrics",  # where the config, or the annotation, says
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_sidecar(case):
    overrides, interval, url = CASES[case]
    sidecar = builders.build_sidecar_container(
        SETTINGS, overrides, ["198.18.0.0/16", "2001:db8:1::/64"], interval, upstream_url=url
    )
    check_golden(case, sidecar)


def test_sidecar_passes_pod_security_restricted():
    sidecar = builders.build_sidecar_container(
        SETTINGS, ann.Overrides(), [], EffectiveInterval(60.0, 60.0, "x"), upstream_url=DEFAULT_URL
    )
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize(("name", "workload"), [("", DEPLOYMENT), ("statefulset-", STATEFULSET)])
def test_service_and_service_monitor(name, workload):
    interval = EffectiveInterval(45.0, 45.0, "prosody.cfg.lua:12")
    check_golden(f"{name}service", builders.build_service(workload, 9755))
    check_golden(
        f"{name}servicemonitor",
        builders.build_service_monitor(
            workload, interval, SETTINGS.service_monitor_labels, "monitoring/k8s"
        ),
    )


KNOBS = builders.ScrapeOptions(
    timeout=15.0,
    honor_labels=True,
    relabelings=({"targetLabel": "cluster", "replacement": "eu-1", "action": "replace"},),
    metric_relabelings=(
        {"sourceLabels": ["__name__"], "regex": "prosody_mod_http_.*", "action": "drop"},
    ),
    sample_limit=20000,
)


@pytest.mark.parametrize(("name", "workload"), [("", DEPLOYMENT), ("statefulset-", STATEFULSET)])
def test_pod_monitor(name, workload):
    interval = EffectiveInterval(45.0, 45.0, "prosody.cfg.lua:12")
    check_golden(
        f"{name}podmonitor",
        builders.build_pod_monitor(
            workload, interval, SETTINGS.service_monitor_labels, "monitoring/k8s"
        ),
    )


@pytest.mark.parametrize("build", [builders.build_service_monitor, builders.build_pod_monitor])
def test_monitors_with_every_knob(build):
    interval = EffectiveInterval(45.0, 45.0, "prosody.cfg.lua:12")
    monitor = build(DEPLOYMENT, interval, SETTINGS.service_monitor_labels, "none", KNOBS)
    check_golden(f"{monitor['kind'].lower()}-knobs", monitor)


def test_sidecar_security_context_is_the_setting():
    """The chart's OpenShift mode passes a context without runAsUser and runAsGroup."""
    context = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}
    settings = SETTINGS.model_copy(update={"sidecar_security_context": context})
    sidecar = builders.build_sidecar_container(
        settings, ann.Overrides(), [], EffectiveInterval(60.0, 60.0, "x"), upstream_url=DEFAULT_URL
    )
    assert sidecar["securityContext"] == context
    sidecar["securityContext"]["runAsUser"] = 0  # a copy: the settings stay as they are
    assert settings.sidecar_security_context == context


def test_the_hash_is_of_the_built_object():
    """A new operator version that builds an object differently gives it a new hash, whatever
    the inputs: that is how the change reaches every existing object."""
    monitor = builders.build_service_monitor(
        DEPLOYMENT, EffectiveInterval(45.0, 45.0, "x"), {}, "none"
    )
    again = builders.build_service_monitor(
        DEPLOYMENT, EffectiveInterval(45.0, 45.0, "x"), {}, "none"
    )
    key = ann.OBJECT_HASH
    assert monitor["metadata"]["annotations"][key] == again["metadata"]["annotations"][key]
    changed = copy.deepcopy(monitor)
    changed["spec"]["endpoints"][0]["honorLabels"] = True  # same inputs, a different builder
    builders.with_hash(changed)
    assert changed["metadata"]["annotations"][key] != monitor["metadata"]["annotations"][key]


SERVICE = builders.build_service(DEPLOYMENT, 9755)


def server_fields(service):  # what the API server and other managers add
    service["spec"].update(clusterIPs=["None"], type="ClusterIP", ipFamilies=["IPv4"])
    service["metadata"].update(uid="u1", resourceVersion="7")
    service["metadata"]["labels"]["team"] = "chat"


def extra_port(service):  # added by someone else: theirs
    service["spec"]["ports"].append({"name": "x", "port": 1})


def port_edited(service):
    service["spec"]["ports"][0]["port"] = 9000


def selector_edited(service):
    service["spec"]["selector"]["app"] = "other"


def label_removed(service):
    del service["metadata"]["labels"][ann.WORKLOAD]


def older_build(service):  # written by an operator version that built it differently
    service["metadata"]["annotations"][ann.OBJECT_HASH] = "0"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (None, True),
        (server_fields, True),
        (extra_port, True),
        (port_edited, False),
        (selector_edited, False),
        (label_removed, False),
        (older_build, False),
    ],
)
def test_up_to_date(change, expected):
    live = copy.deepcopy(SERVICE)
    if change is not None:
        change(live)
    assert builders.up_to_date(live, SERVICE) is expected
    assert builders.up_to_date(None, SERVICE) is False


def test_the_service_is_headless_and_a_cluster_ip_means_making_it_again():
    assert SERVICE["spec"]["clusterIP"] == "None"
    live = copy.deepcopy(SERVICE)
    server_fields(live)
    assert not builders.must_recreate(live, SERVICE)
    live["spec"].update(clusterIP="198.19.7.9", clusterIPs=["198.19.7.9"])
    assert builders.must_recreate(live, SERVICE)
    assert not builders.must_recreate(None, SERVICE)
    monitor = builders.build_service_monitor(
        DEPLOYMENT, EffectiveInterval(45.0, 45.0, "x"), {}, "none"
    )
    assert not builders.must_recreate(copy.deepcopy(monitor), monitor)


def test_injection_patch_appends_the_sidecar_and_records_it():
    pod = {"metadata": {}, "spec": {"containers": [{"name": "prosody", "image": "prosody:0.12"}]}}
    sidecar = builders.build_sidecar_container(
        SETTINGS, ann.Overrides(), [], EffectiveInterval(60.0, 60.0, "x"), upstream_url=DEFAULT_URL
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
    webhooks = builders.build_webhook_configuration(
        "prosody-operator", client_config, ["team-a", "team-b"]
    )["webhooks"]
    assert [w["name"] for w in webhooks] == [builders.POD_WEBHOOK, builders.NAMESPACE_WEBHOOK]
    for webhook in webhooks:
        assert webhook["namespaceSelector"]["matchExpressions"][0] == {
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": ["team-a", "team-b"],
        }


@pytest.mark.parametrize("namespaces", [[], ["team-a"]])
@pytest.mark.parametrize(
    ("pod_labels", "namespace", "namespace_labels"),
    [
        ({ann.INJECT: "true"}, "team-a", {}),
        ({}, "team-a", {}),
        ({}, "team-a", {ann.INJECT: "true"}),
        ({"app": "x"}, "team-a", {ann.INJECT: "true"}),
        ({ann.INJECT: "false"}, "team-a", {ann.INJECT: "true"}),
        ({ann.INJECT: "yes"}, "team-a", {ann.INJECT: "true"}),
        ({ann.INJECT: "true"}, "team-a", {ann.INJECT: "false"}),
        ({}, "team-a", {ann.INJECT: "false"}),
        ({ann.INJECT: "true"}, "kube-system", {}),
        ({}, "kube-system", {ann.INJECT: "true"}),
        ({ann.INJECT: "true"}, "team-b", {ann.INJECT: "true"}),
    ],
)
def test_webhook_selectors_agree_with_reaches_webhook(
    pod_labels, namespace, namespace_labels, namespaces
):
    """What the API server does with the configuration's selectors is what the reconciler
    assumes when it says a workload's pods never reach the webhook."""
    configuration = builders.build_webhook_configuration("x", {"url": "https://x"}, namespaces)
    labels = {**namespace_labels, "kubernetes.io/metadata.name": namespace}
    called = [
        webhook["name"]
        for webhook in configuration["webhooks"]
        if matches(webhook["objectSelector"], pod_labels)
        and matches(webhook["namespaceSelector"], labels)
    ]
    assert len(called) <= 1  # never twice for one pod
    assert bool(called) is optin.reaches_webhook(pod_labels, namespace, labels, namespaces)


@pytest.mark.parametrize(
    "annotations",
    [None, {}, {"team": "chat", "a/b~c": "kept"}],
    ids=["no annotations", "empty annotations", "annotations with / and ~ in keys"],
)
def test_the_admission_json_patch_does_what_the_merge_patch_says(annotations):
    """Applied by a JSONPatch implementation (jsonpatch, kopf's), the ops the webhook answers
    give the pod the merge patch's annotations and containers, and keep everything else."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "xmpp", "namespace": "chat"},
        "spec": {"containers": [{"name": "prosody", "image": "prosody:13"}], "volumes": []},
    }
    if annotations is not None:
        pod["metadata"]["annotations"] = dict(annotations)
    sidecar = {"name": builders.SIDECAR_NAME, "image": "exporter"}
    merge = builders.build_injection_patch(pod, sidecar, {"prometheus.io/scrape": "true"})
    patched = jsonpatch.apply_patch(pod, builders.build_json_patch(pod, merge))
    assert patched["metadata"]["annotations"] == {
        **(annotations or {}),
        **merge["metadata"]["annotations"],
    }
    assert patched["spec"] == {"containers": [*pod["spec"]["containers"], sidecar], "volumes": []}
    assert {k: v for k, v in patched["metadata"].items() if k != "annotations"} == {
        "name": "xmpp",
        "namespace": "chat",
    }
    failure = builders.build_failure_patch("no sidecar")
    failed = jsonpatch.apply_patch(pod, builders.build_json_patch(pod, failure))
    assert failed["spec"] == pod["spec"]
    assert (
        failed["metadata"]["annotations"][ann.STATUS]
        == failure["metadata"]["annotations"][ann.STATUS]
    )


def test_the_admission_response_admits_with_the_patch_and_warnings():
    review = {"apiVersion": "admission.k8s.io/v1", "request": {"uid": "u-1", "object": {}}}
    ops = [{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}]
    answer = builders.build_admission_response(review, ops, ("careful",))
    response = answer["response"]
    assert answer["kind"] == "AdmissionReview" and answer["apiVersion"] == "admission.k8s.io/v1"
    assert response["uid"] == "u-1" and response["allowed"] is True
    assert response["warnings"] == ["careful"] and response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == ops
    bare = builders.build_admission_response(review, [])["response"]
    assert bare == {"uid": "u-1", "allowed": True}
