"""Every decision of the operator, table-driven from observations, with no cluster: a row per
decision the README documents. The configs are evaluated for real (the embedded Lua); the cluster
tests (test_operator_cluster.py) prove the wiring around the planner."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from prosody_operator import annotations as ann
from prosody_operator import builders, optin, planner
from prosody_operator.events import Event, EventLog
from prosody_operator.observation import Admission, Workload
from prosody_operator.planner import plan_admission, plan_reconcile
from prosody_operator.prosody import ConfigMount
from prosody_operator.selection import PrometheusSelectors
from prosody_operator.settings import OperatorSettings
from prosody_operator.workloads import ObjectRef, label_selector, pod_owner

NAMESPACE = "chat"
UID = "uid-xmpp"
NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC).timestamp()
SETTINGS = OperatorSettings(
    exporter_image="registry.test/prosody-exporter:1",
    service_monitor_labels={"release": "kps"},
    manual_interval=20.0,
)
PROSODY = {"name": "prosody", "image": "prosody/prosody:0.12"}
JITSI = {"name": "jitsi-meet", "image": "ghcr.io/jitsi/prosody:stable-10008"}
NGINX = {"name": "web", "image": "nginx:1.27"}
MAIN = "prosody.cfg.lua"
CONFIG = (
    'modules_enabled = { "http_openmetrics" }\nstatistics = "internal"\nstatistics_interval = 45\n'
)
OPTED = {ann.INJECT: "true"}


def mounted(container: dict[str, Any], configmap: str = "prosody") -> dict[str, Any]:
    return {**container, "volumeMounts": [{"name": "config", "mountPath": "/etc/prosody"}]}


def workload(
    kind: str = "Deployment",
    *,
    annotations: dict[str, str] | None = None,
    pod_annotations: dict[str, str] | None = None,
    pod_labels: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    configmap: str | None = None,
) -> dict[str, Any]:
    containers = containers or [PROSODY]
    spec: dict[str, Any] = {"containers": containers}
    if configmap:
        spec["containers"] = [mounted(containers[0]), *containers[1:]]
        spec["volumes"] = [{"name": "config", "configMap": {"name": configmap}}]
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": "xmpp",
            "namespace": NAMESPACE,
            "uid": UID,
            "annotations": annotations or {},
        },
        "spec": {
            "selector": {"matchLabels": {"app": "xmpp"}},
            "template": {
                "metadata": {
                    "labels": {"app": "xmpp", **(pod_labels or {})},
                    "annotations": pod_annotations or {},
                },
                "spec": spec,
            },
        },
    }


def opted_in(**kwargs: Any) -> dict[str, Any]:
    """What the README tells users to write: the pod template labelled and annotated."""
    return workload(pod_labels=OPTED, pod_annotations={**OPTED, **kwargs.pop("pod", {})}, **kwargs)


def pod(name: str, *, sidecar_interval: str | None = None, phase: str = "Running") -> dict:
    containers: list[dict[str, Any]] = [PROSODY]
    if sidecar_interval:
        env = [{"name": "PROSODY_EXPORTER_INTERVAL", "value": sidecar_interval}]
        containers.append({"name": builders.SIDECAR_NAME, "env": env})
    return {
        "metadata": {"name": name},
        "spec": {"containers": containers},
        "status": {"phase": phase},
    }


def built(body: dict[str, Any], interval: str = "60s", selected_by: str = "none") -> dict:
    """The live objects of an earlier reconcile, as the API server returns them."""
    plan = plan_reconcile(
        SETTINGS,
        Workload(body, {}, owned={}),
    )
    owned = {}
    for obj in plan.apply:
        live = copy.deepcopy(obj)
        live["metadata"]["uid"] = f"uid-{obj['kind']}"
        live["metadata"]["resourceVersion"] = "1"
        owned[obj["kind"]] = live
    assert owned["ServiceMonitor"]["spec"]["endpoints"][0]["interval"] == interval
    assert owned["ServiceMonitor"]["metadata"]["annotations"][ann.SELECTED_BY] == selected_by
    return owned


def hand_edited(owned: dict[str, dict], interval: str) -> dict[str, dict]:
    edited = copy.deepcopy(owned)
    edited["ServiceMonitor"]["spec"]["endpoints"][0]["interval"] = interval
    return edited


def foreign(owned: dict[str, dict], kind: str) -> dict[str, dict]:
    """The object of that name belongs to someone else (another owner, or none)."""
    changed = copy.deepcopy(owned)
    del changed[kind]["metadata"]["ownerReferences"]
    return changed


def restarted(body: dict[str, Any], minutes_ago: float) -> dict[str, Any]:
    body = copy.deepcopy(body)
    at = datetime.datetime.fromtimestamp(NOW - minutes_ago * 60, datetime.UTC)
    body["spec"]["template"]["metadata"]["annotations"][planner.RESTARTED_AT] = at.isoformat()
    return body


KPS = PrometheusSelectors("monitoring", "kps", {"matchLabels": {"release": "kps"}}, {})
OTHER = PrometheusSelectors("monitoring", "other", {"matchLabels": {"release": "x"}}, {})
DRIFT = SETTINGS.model_copy(update={"restart_on_drift": True})


# Each row: the observation (and settings), then what the plan must hold — the kinds it applies
# and deletes, its Events by reason (each with a text its message contains), and the restart.
RECONCILE = {
    # -- who is opted in (optin.py's precedence) --
    "not opted in: nothing": (
        Workload(workload(), {}),
        [], [], {}, False,
    ),
    "pod template label and annotation: Service and ServiceMonitor": (
        Workload(opted_in(), {}),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "interval 60s (from Prosody's default), Service port 9755",
         "NotSelectedByPrometheus": "no Prometheus resource in the cluster"},
        False,
    ),
    "pod template label alone": (
        Workload(workload(pod_labels=OPTED), {}),
        ["Service", "ServiceMonitor"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""},
        False,
    ),
    "namespace label, container named prosody": (
        Workload(workload(), OPTED),
        ["Service", "ServiceMonitor"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""},
        False,
    ),
    "namespace label, a Prosody image (jitsi's) in a container of another name": (
        Workload(workload(containers=[JITSI]), OPTED),
        ["Service", "ServiceMonitor"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""},
        False,
    ),
    "namespace label, not Prosody: left alone": (
        Workload(workload(containers=[NGINX]), OPTED),
        [], [], {}, False,
    ),
    "namespace label, pod template label false: opted out": (
        Workload(workload(pod_labels={ann.INJECT: "false"}), OPTED),
        [], [], {}, False,
    ),
    "namespace label, workload annotation false: opted out": (
        Workload(workload(annotations={ann.INJECT: "false"}), OPTED),
        [], [], {}, False,
    ),
    "workload annotation false beats the pod template's label": (
        Workload(workload(annotations={ann.INJECT: "false"}, pod_labels=OPTED), {}),
        [], [], {}, False,
    ),
    "pod template annotation true beats workload annotation false": (
        Workload(
            workload(annotations={ann.INJECT: "false"}, pod_labels=OPTED, pod_annotations=OPTED),
            {},
        ),
        ["Service", "ServiceMonitor"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""},
        False,
    ),
    "explicit opt-in, no container recognised: the first container is Prosody": (
        Workload(opted_in(containers=[NGINX]), {}),
        ["Service", "ServiceMonitor"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""},
        False,
    ),
    # -- a workload annotation whose pods cannot reach the webhook --
    "workload annotation, pods never reach the webhook: say what to add": (
        Workload(workload(annotations=OPTED), {}, pods=(pod("xmpp-1"),)),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "", "NotSelectedByPrometheus": "",
         "WebhookNotCalled": f'add the label {ann.INJECT}: "true" to the pod template'},
        False,
    ),
    "workload annotation in an opted-in namespace: reached, nothing to add": (
        Workload(workload(annotations=OPTED, containers=[NGINX]), OPTED),
        ["Service", "ServiceMonitor"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""},
        False,
    ),
    "opted in in a system namespace: the webhook is never called there": (
        Workload(
            {**opted_in(), "metadata": {**opted_in()["metadata"], "namespace": "kube-system"}}, {}
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "", "NotSelectedByPrometheus": "",
         "WebhookNotCalled": "never called in namespace kube-system"},
        False,
    ),
    # -- opting out removes what was made, and only that --
    "opted out: delete our Service and ServiceMonitor": (
        Workload(
            workload(pod_labels=OPTED, pod_annotations={ann.INJECT: "false"}),
            {},
            owned=built(opted_in()),
        ),
        [], ["Service", "ServiceMonitor"],
        {"MetricsRemoved": 'its pod annotation says "false": deleted Service xmpp-prosody-metrics'},
        False,
    ),
    "no container recognised any more: delete them": (
        Workload(workload(containers=[NGINX]), OPTED, owned=built(opted_in())),
        [], ["Service", "ServiceMonitor"],
        {"MetricsRemoved": "no container is recognised as Prosody"},
        False,
    ),
    "opted out, objects of that name not ours: left alone": (
        Workload(
            workload(), {}, owned=foreign(foreign(built(opted_in()), "Service"), "ServiceMonitor")
        ),
        [], [], {}, False,
    ),
    # -- invalid values never stop anything --
    "invalid annotation values: reported, defaults used": (
        Workload(opted_in(pod={ann.PORT: "99999", ann.INTERVAL: "often"}), {}),
        ["Service", "ServiceMonitor"], [],
        {"InvalidAnnotation": f"{ann.PORT}='99999' ignored", "MetricsConfigured": "port 9755",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "inject annotation neither true nor false: reported, the next place decides": (
        Workload(workload(annotations={ann.INJECT: "yes"}, pod_labels=OPTED), {}),
        ["Service", "ServiceMonitor"], [],
        {"InvalidAnnotation": "on the workload ignored", "MetricsConfigured": "",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "container annotation naming no container: reported, Prosody found as usual": (
        Workload(opted_in(pod={ann.CONTAINER: "xmpp"}), {}),
        ["Service", "ServiceMonitor"], [],
        {"InvalidAnnotation": "'xmpp' ignored: no such container", "MetricsConfigured": "",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    # -- where the interval comes from --
    "interval from Prosody's config in the mounted ConfigMap": (
        Workload(opted_in(configmap="prosody"), {}, configmaps={"prosody": {MAIN: CONFIG}}),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "interval 45s (from prosody.cfg.lua:3)",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "interval annotation beats the config": (
        Workload(
            opted_in(configmap="prosody", pod={ann.INTERVAL: "15s"}),
            {},
            configmaps={"prosody": {MAIN: CONFIG}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "interval 15s (from annotation)", "NotSelectedByPrometheus": ""},
        False,
    ),
    '"manual": the operator\'s manual interval': (
        Workload(
            opted_in(configmap="prosody"),
            {},
            configmaps={"prosody": {MAIN: CONFIG.replace("45", '"manual"')}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "interval 20s", "NotSelectedByPrometheus": ""},
        False,
    ),
    "config problems: ProsodyConfig warnings naming file and line": (
        Workload(
            opted_in(configmap="prosody"),
            {},
            configmaps={"prosody": {MAIN: 'VirtualHost "x"\nstatistics_interval = 5\n'}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyConfig": "prosody.cfg.lua:2", "MetricsConfigured": "(from Prosody's default)",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "missing ConfigMap: a ProsodyConfig warning, Prosody's default": (
        Workload(opted_in(configmap="prosody"), {}),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyConfig": "ConfigMap prosody not found", "MetricsConfigured": "",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    # -- writing only what changed (the hash is of the built object) --
    "as built before: no write": (
        Workload(opted_in(), {}, owned=built(opted_in())),
        [], [], {"NotSelectedByPrometheus": ""}, False,
    ),
    "ServiceMonitor edited by hand: put back": (
        Workload(opted_in(), {}, owned=hand_edited(built(opted_in()), "5s")),
        ["ServiceMonitor"], [],
        {"MetricsConfigured": "interval 60s", "NotSelectedByPrometheus": ""},
        False,
    ),
    "Service deleted by hand: made again": (
        Workload(opted_in(), {}, owned={"ServiceMonitor": built(opted_in())["ServiceMonitor"]}),
        ["Service"], [], {"MetricsConfigured": "", "NotSelectedByPrometheus": ""}, False,
    ),
    "the config's interval changed, pods still at the old one: restart advice": (
        Workload(
            opted_in(configmap="prosody"),
            {},
            configmaps={"prosody": {MAIN: CONFIG}},
            owned=built(opted_in(configmap="prosody")),
            pods=(pod("xmpp-1", sidecar_interval="60s"),),
        ),
        ["ServiceMonitor"], [],
        {"MetricsConfigured": "1 pod(s) still collect at another interval: Prosody reads "
         "statistics_interval only when it starts",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "an object of our name that is not ours: NameConflict, left as it is": (
        Workload(opted_in(), {}, owned=foreign(built(opted_in()), "Service")),
        [], [],
        {"NameConflict": "Service xmpp-prosody-metrics exists but is not owned by Deployment "
         "chat/xmpp", "NotSelectedByPrometheus": ""},
        False,
    ),
    # -- is the ServiceMonitor picked up? --
    "selected by a Prometheus": (
        Workload(opted_in(), {}, prometheuses=(KPS,)),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "", "SelectedByPrometheus": "selected by Prometheus monitoring/kps"},
        False,
    ),
    "selected by none: why each misses it": (
        Workload(opted_in(), {}, prometheuses=(OTHER,)),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "",
         "NotSelectedByPrometheus": "monitoring/other selects ServiceMonitors with release=x"},
        False,
    ),
    "selection changed: the ServiceMonitor's selected-by annotation follows": (
        Workload(opted_in(), {}, owned=built(opted_in()), prometheuses=(KPS,)),
        ["ServiceMonitor"], [], {"MetricsConfigured": "", "SelectedByPrometheus": ""}, False,
    ),
    # -- pods without the sidecar --
    "running pods without the sidecar: SidecarMissing with the command": (
        Workload(
            opted_in(), {}, owned=built(opted_in()),
            pods=(pod("xmpp-1"), pod("xmpp-2", sidecar_interval="60s")),
        ),
        [], [],
        {"NotSelectedByPrometheus": "",
         "SidecarMissing": "1 pod(s) lack the prosody-exporter sidecar (the webhook was not "
         "reachable when they were created): xmpp-1. Fix: kubectl -n chat rollout restart "
         "deployment/xmpp"},
        False,
    ),
    "finished or deleted pods do not count": (
        Workload(
            opted_in(), {}, owned=built(opted_in()),
            pods=(pod("xmpp-1", phase="Succeeded"),
                  {**pod("xmpp-2"), "metadata": {"name": "xmpp-2", "deletionTimestamp": "x"}}),
        ),
        [], [], {"NotSelectedByPrometheus": ""}, False,
    ),
    "restartOnDrift: restart the rollout": (
        (Workload(opted_in(), {}, owned=built(opted_in()), pods=(pod("xmpp-1"),), now=NOW), DRIFT),
        [], [], {"NotSelectedByPrometheus": "", "SidecarMissing": "Restarting the rollout."}, True,
    ),
    "restartOnDrift: not again within 10 minutes of a restart": (
        (
            Workload(restarted(opted_in(), 5), {}, owned=built(restarted(opted_in(), 5)),
                     pods=(pod("xmpp-1"),), now=NOW),
            DRIFT,
        ),
        [], [],
        {"NotSelectedByPrometheus": "", "SidecarMissing": "not again within 10 minutes"}, False,
    ),
    "restartOnDrift: again after 10 minutes": (
        (
            Workload(restarted(opted_in(), 11), {}, owned=built(restarted(opted_in(), 11)),
                     pods=(pod("xmpp-1"),), now=NOW),
            DRIFT,
        ),
        [], [], {"NotSelectedByPrometheus": "", "SidecarMissing": "Restarting"}, True,
    ),
    # -- every workload kind --
    "StatefulSet": (
        Workload(opted_in(kind="StatefulSet"), {}, pods=(pod("xmpp-0"),)),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "", "NotSelectedByPrometheus": "",
         "SidecarMissing": "rollout restart statefulset/xmpp"},
        False,
    ),
    "DaemonSet": (
        Workload(opted_in(kind="DaemonSet"), {}, pods=(pod("xmpp-abcde"),)),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "", "NotSelectedByPrometheus": "",
         "SidecarMissing": "rollout restart daemonset/xmpp"},
        False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", RECONCILE)
def test_plan_reconcile(row):
    seen, applied, deleted, events, restart = RECONCILE[row]
    seen, settings = seen if isinstance(seen, tuple) else (seen, SETTINGS)
    plan = plan_reconcile(settings, seen)
    assert plan.workload == ObjectRef.of(seen.body)
    assert [obj["kind"] for obj in plan.apply] == applied
    assert sorted(obj["kind"] for obj in plan.delete) == deleted
    assert {e.reason for e in plan.events} == events.keys(), plan.events
    for reason, text in events.items():
        assert any(e.reason == reason and text in e.message for e in plan.events), (reason, text)
    assert {e.reason for e in plan.events} <= planner.RECONCILE_REASONS
    assert plan.restart is restart
    for obj in plan.apply:  # what is applied is owned by the workload, and carries its hash
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
        assert obj["metadata"]["ownerReferences"][0]["kind"] == seen.body["kind"]
        assert obj["metadata"]["annotations"][ann.OBJECT_HASH] == builders.hash_of(
            {**obj, "metadata": {**obj["metadata"], "annotations": {
                k: v for k, v in obj["metadata"]["annotations"].items() if k != ann.OBJECT_HASH
            }}}
        )  # fmt: skip


def test_deletes_name_the_observed_objects():
    """The executor deletes by the observed uid: an object replaced since is not deleted."""
    owned = built(opted_in())
    plan = plan_reconcile(SETTINGS, Workload(workload(), {}, owned=owned))
    assert {obj["metadata"]["uid"] for obj in plan.delete} == {"uid-Service", "uid-ServiceMonitor"}


def with_cluster_ip(owned: dict[str, dict]) -> dict[str, dict]:
    """The Service as operator versions before headless Services made it: a ClusterIP."""
    changed = copy.deepcopy(owned)
    changed["Service"]["spec"].update(clusterIP="198.19.7.9", clusterIPs=["198.19.7.9"])
    return changed


def test_a_service_with_a_cluster_ip_is_made_again_headless():
    """spec.clusterIP cannot change in place: the Service is deleted (by the uid observed)
    and applied anew; the ServiceMonitor, up to date, is left alone."""
    owned = with_cluster_ip(built(opted_in()))
    plan = plan_reconcile(SETTINGS, Workload(opted_in(), {}, owned=owned))
    assert plan.apply == () and plan.delete == ()
    ((live, new),) = plan.replace
    assert live["metadata"]["uid"] == "uid-Service"
    assert new["kind"] == "Service" and new["spec"]["clusterIP"] == "None"
    assert {e.reason for e in plan.events} == {"MetricsConfigured", "NotSelectedByPrometheus"}
    # Headless already: nothing to do.
    assert plan_reconcile(SETTINGS, Workload(opted_in(), {}, owned=built(opted_in()))).replace == ()
    # Not ours: never deleted.
    foreign_plan = plan_reconcile(
        SETTINGS, Workload(opted_in(), {}, owned=foreign(owned, "Service"))
    )
    assert foreign_plan.replace == () and foreign_plan.delete == ()


def test_an_upgrade_whose_builder_changed_rewrites_every_object(monkeypatch):
    """Objects written by an operator version that built them differently carry another hash:
    the new version rewrites them, even though none of their inputs changed."""
    owned = built(opted_in())
    assert plan_reconcile(SETTINGS, Workload(opted_in(), {}, owned=owned)).apply == ()
    original = builders.build_service

    def newer_build_service(workload, port):  # e.g. a new version adds a label
        service = original(workload, port)
        service["metadata"]["labels"]["app.kubernetes.io/part-of"] = "prosody"
        return builders.with_hash(service)

    monkeypatch.setattr(builders, "build_service", newer_build_service)
    plan = plan_reconcile(SETTINGS, Workload(opted_in(), {}, owned=owned))
    assert [obj["kind"] for obj in plan.apply] == ["Service"]


# --- admission -----------------------------------------------------------------------------------

DEPLOYMENT = ObjectRef("apps/v1", "Deployment", NAMESPACE, "xmpp", UID)
NODE_CIDRS = ("198.18.64.0/24",)


def new_pod(
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    configmap: str | None = None,
) -> dict[str, Any]:
    template = workload(
        pod_labels=labels, pod_annotations=annotations, containers=containers, configmap=configmap
    )["spec"]["template"]
    return {
        "metadata": {**template["metadata"], "namespace": NAMESPACE, "generateName": "xmpp-"},
        "spec": template["spec"],
    }


def admission(pod_body: dict[str, Any], **kwargs: Any) -> Admission:
    values: dict[str, Any] = {
        "namespace_labels": {},
        "workload": DEPLOYMENT,
        "workload_annotations": {},
        "configmaps": {},
        "node_cidrs": NODE_CIDRS,
        **kwargs,
    }
    return Admission(pod_body, **values)


INJECTED = new_pod(labels=OPTED)
INJECTED["spec"]["containers"].append({"name": builders.SIDECAR_NAME})

# Each row: the observation, then the sidecar's env (None: no patch), and the Events by reason.
ADMISSION = {
    "labelled pod: injected": (
        admission(new_pod(labels=OPTED)),
        {"PROSODY_EXPORTER_INTERVAL": "60s", "PROSODY_EXPORTER_ALLOW_CIDRS": "198.18.64.0/24"},
        {},
    ),
    "already has the sidecar: left alone": (admission(INJECTED), None, {}),
    "pod annotation false: left alone": (
        admission(new_pod(labels=OPTED, annotations={ann.INJECT: "false"})), None, {},
    ),
    "opted-in namespace, Prosody pod: injected": (
        admission(new_pod(), namespace_labels=OPTED), {"PROSODY_EXPORTER_INTERVAL": "60s"}, {},
    ),
    "opted-in namespace, the maintained Prosody image in a container of another name": (
        admission(
            new_pod(containers=[{"name": "xmpp", "image": "docker.io/prosodyim/prosody:13.0"}]),
            namespace_labels=OPTED,
        ),
        {"PROSODY_EXPORTER_INTERVAL": "60s"},
        {},
    ),
    "opted-in namespace, jitsi's Prosody image: injected": (
        admission(new_pod(containers=[JITSI]), namespace_labels=OPTED),
        {"PROSODY_EXPORTER_INTERVAL": "60s"},
        {},
    ),
    "opted-in namespace, not Prosody: untouched, not even an Event": (
        admission(new_pod(containers=[NGINX], annotations={ann.PORT: "x"}), namespace_labels=OPTED),
        None,
        {},
    ),
    "opted-in namespace, workload annotation false: left alone": (
        admission(
            new_pod(), namespace_labels=OPTED, workload_annotations={ann.INJECT: "false"}
        ),
        None,
        {},
    ),
    "workload annotation true: injected even if not recognised": (
        admission(
            new_pod(containers=[NGINX]), namespace_labels=OPTED, workload_annotations=OPTED
        ),
        {"PROSODY_EXPORTER_INTERVAL": "60s"},
        {},
    ),
    "interval from the mounted config": (
        admission(
            new_pod(labels=OPTED, configmap="prosody"),
            configmaps={"prosody": {MAIN: CONFIG}},
        ),
        {"PROSODY_EXPORTER_INTERVAL": "45s"},
        {},
    ),
    "invalid annotations: injected with the defaults, warned": (
        admission(new_pod(labels=OPTED, annotations={ann.PORT: "99999", ann.ALLOW_CIDRS: "x"})),
        {"PROSODY_EXPORTER_LISTEN_PORT": "9755", "PROSODY_EXPORTER_ALLOW_CIDRS": "198.18.64.0/24"},
        {"InvalidAnnotation": f"{ann.ALLOW_CIDRS}='x' ignored"},
    ),
    "no pod network known: loopback only, warned": (
        admission(new_pod(labels=OPTED), node_cidrs=()),
        {"PROSODY_EXPORTER_ALLOW_CIDRS": "127.0.0.0/8,::1/128"},
        {"NoPodNetwork": "the sidecar only allows loopback"},
    ),
    "no pod network, but an allowlist annotation: no warning": (
        admission(
            new_pod(labels=OPTED, annotations={ann.ALLOW_CIDRS: "198.18.0.0/15"}), node_cidrs=()
        ),
        {"PROSODY_EXPORTER_ALLOW_CIDRS": "198.18.0.0/15"},
        {},
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", ADMISSION)
def test_plan_admission(row):
    seen, env, events = ADMISSION[row]
    plan = plan_admission(SETTINGS, seen)
    if env is None:
        assert plan.patch is None
    else:
        assert plan.patch is not None
        sidecar = plan.patch["spec"]["containers"][-1]
        assert sidecar["name"] == builders.SIDECAR_NAME
        assert env.items() <= {e["name"]: e["value"] for e in sidecar["env"]}.items()
        assert ann.STATUS in plan.patch["metadata"]["annotations"]
    assert {e.reason for e in plan.events} == events.keys()
    for reason, text in events.items():
        assert any(e.reason == reason and text in e.message for e in plan.events), (reason, text)
    assert list(plan.warnings) == [e.message for e in plan.events if e.type == "Warning"]
    assert plan.target == DEPLOYMENT


def test_dry_run_warns_but_posts_no_event():
    pod_body = new_pod(labels=OPTED, annotations={ann.PORT: "bogus"})
    wet = plan_admission(SETTINGS, admission(pod_body))
    dry = plan_admission(SETTINGS, admission(pod_body, dry_run=True))
    assert dry.patch == wet.patch and dry.warnings == wet.warnings != ()
    assert wet.events and dry.events == ()


def test_a_bare_pod_reports_on_itself():
    bare = {**new_pod(labels=OPTED, annotations={ann.PORT: "bogus"})}
    bare["metadata"] = {**bare["metadata"], "name": "solo"}
    plan = plan_admission(SETTINGS, admission(bare, workload=None))
    assert plan.target == ObjectRef("v1", "Pod", NAMESPACE, "solo")
    assert [e.reason for e in plan.events] == ["InvalidAnnotation"]


# --- the parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod_annotation", "workload_annotation", "pod_label", "namespace_label", "expected"),
    [
        (None, None, None, None, (False, False, "")),
        (None, None, None, "true", (True, False, "namespace label")),
        (None, None, "true", None, (True, True, "pod label")),
        (None, None, "false", "true", (False, True, "pod label")),
        (None, "true", None, None, (True, True, "workload annotation")),
        (None, "false", "true", "true", (False, True, "workload annotation")),
        ("true", "false", "false", None, (True, True, "pod annotation")),
        ("false", "true", "true", "true", (False, True, "pod annotation")),
        ("yes", None, "true", None, (True, True, "pod label")),  # invalid: the next place decides
        (None, None, None, "false", (False, False, "")),
    ],
)
def test_opt_in_precedence(
    pod_annotation, workload_annotation, pod_label, namespace_label, expected
):
    def only(value: str | None) -> dict[str, str]:
        return {} if value is None else {ann.INJECT: value}

    decided = optin.decide(
        {"annotations": only(pod_annotation), "labels": only(pod_label)},
        only(workload_annotation),
        only(namespace_label),
    )
    assert (decided.inject, decided.explicit, decided.source) == expected
    assert bool(decided.problems) is (pod_annotation == "yes")


@pytest.mark.parametrize(
    ("mount", "expected"),
    [
        (ConfigMount("c", "/etc/prosody"), {"a.cfg.lua": "a", "b.cfg.lua": "b"}),
        (ConfigMount("c", "/etc/prosody/d"), {"d/a.cfg.lua": "a", "d/b.cfg.lua": "b"}),
        (ConfigMount("c", "/srv/x"), {"/srv/x/a.cfg.lua": "a", "/srv/x/b.cfg.lua": "b"}),
        (ConfigMount("c", "/etc/prosody/prosody.cfg.lua", "a.cfg.lua"), {"prosody.cfg.lua": "a"}),
        (ConfigMount("c", "/etc/prosody/x.lua", "missing"), {}),
        (ConfigMount("c", "/etc/prosody", None, (("a.cfg.lua", "d/m.lua"),)), {"d/m.lua": "a"}),
        (ConfigMount("c", "/etc/prosody/x", "d", (("b.cfg.lua", "d/b.lua"),)), {"x/b.lua": "b"}),
    ],
    ids=["directory", "subdirectory", "outside", "subPath", "subPath missing", "items", "both"],
)  # fmt: skip
def test_config_mount_files(mount, expected):
    assert mount.files({"a.cfg.lua": "a", "b.cfg.lua": "b"}) == expected


def owned_pod(kind: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    owner = {"kind": kind, "name": name, "controller": True, "uid": "u"}
    return {
        "metadata": {"namespace": NAMESPACE, "labels": labels or {}, "ownerReferences": [owner]}
    }


@pytest.mark.parametrize(
    ("pod_body", "expected"),
    [
        (
            owned_pod("ReplicaSet", "xmpp-7d4b9c8f5", {"pod-template-hash": "7d4b9c8f5"}),
            ("Deployment", "xmpp"),
        ),
        (
            owned_pod("ReplicaSet", "my-x-app-5f9", {"pod-template-hash": "5f9"}),
            ("Deployment", "my-x-app"),
        ),
        (owned_pod("ReplicaSet", "bare-rs"), None),  # a ReplicaSet of no Deployment
        (owned_pod("StatefulSet", "jitsi-prosody"), ("StatefulSet", "jitsi-prosody")),
        (owned_pod("DaemonSet", "xmpp"), ("DaemonSet", "xmpp")),
        (owned_pod("Job", "backup"), None),
        ({"metadata": {"namespace": NAMESPACE}}, None),
    ],
)
def test_pod_owner(pod_body, expected):
    owner = pod_owner(pod_body)
    assert (owner and (owner.kind, owner.name)) == expected


def test_label_selector():
    selector = {
        "matchLabels": {"app": "xmpp"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
        ],
    }
    assert label_selector(selector) == "app=xmpp,tier in (a,b),!canary"


def test_event_log_posts_what_is_new_and_forgets_what_a_reconcile_settles():
    posted: list[tuple[str, str]] = []
    log = EventLog(lambda target, event: posted.append((target.name, event.reason)))
    target = DEPLOYMENT
    missing = Event.warning("SidecarMissing", "1 pod")
    selected = Event.normal("SelectedByPrometheus", "kps")
    settles = planner.RECONCILE_REASONS
    log.report(target, [missing, selected], settles)
    log.report(target, [missing, selected], settles)  # the next reconcile: nothing new
    log.report(target, [Event.warning("NoPodNetwork", "x")])  # an admission
    log.report(target, [Event.warning("NoPodNetwork", "x")])  # the next pod
    log.report(target, [selected], settles)  # fixed: forgotten ...
    log.report(target, [missing, selected], settles)  # ... so reported when it comes back
    assert posted == [
        ("xmpp", "SidecarMissing"),
        ("xmpp", "SelectedByPrometheus"),
        ("xmpp", "NoPodNetwork"),
        ("xmpp", "SidecarMissing"),
    ]


def test_event_log_memory_is_bounded():
    posted = []
    log = EventLog(lambda target, event: posted.append(target.name), capacity=2)
    event = Event.normal("MetricsConfigured", "x")
    for name in ("a", "b", "c", "a"):
        log.report(ObjectRef("apps/v1", "Deployment", NAMESPACE, name, f"uid-{name}"), [event])
    assert posted == ["a", "b", "c", "a"]  # "a" was forgotten to make room for "c"
