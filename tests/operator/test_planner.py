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
from prosody_operator.prosody import ConfigInputs, ConfigMount
from prosody_operator.quotas import Requirement
from prosody_operator.selection import PrometheusSelectors
from prosody_operator.settings import RESTRICTED_SIDECAR, OperatorSettings
from prosody_operator.workloads import ObjectRef, label_selector, may_have_pods, pod_owner

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
DEFAULT_URL = "http://127.0.0.1:5280/metrics"
MAIN = "prosody.cfg.lua"
CONFIG = (
    'modules_enabled = { "http_openmetrics" }\nstatistics = "internal"\nstatistics_interval = 45\n'
)
OPTED = {ann.INJECT: "true"}
PROSODY_13 = {"name": "prosody", "image": "prosodyim/prosody:13.0"}
UNKNOWN = {"name": "prosody", "image": "registry.example/team/prosody:2025"}  # no version known
# Read alike by 0.12 and 13.0: /metrics on another port.
PORT_5281 = CONFIG + "http_ports = { 5281 }\n"
# 13.0 reads an option back in its section (0.12 reads nil): 90 s in 13.0, 45 s in 0.12.
READ_BACK = CONFIG + "statistics_interval = statistics_interval and statistics_interval * 2 or 45\n"
# Only 13.0 has the Lua global: 0.12 cannot evaluate it.
LUA_GLOBAL = 'modules_enabled = { "http_openmetrics" }\nstatistics_interval = Lua.tonumber("30")\n'
UNREACHABLE = CONFIG + 'http_interfaces = { "198.18.0.1" }\n'
METRICS_5281 = "http://127.0.0.1:5281/metrics"


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


LOOPBACK = "127.0.0.0/8,::1/128"


def pod(
    name: str,
    *,
    sidecar_interval: str | None = None,
    sidecar_url: str | None = None,
    phase: str = "Running",
    allow: str = "198.18.64.0/24",
) -> dict:
    containers: list[dict[str, Any]] = [PROSODY]
    if sidecar_interval:
        env = [
            {"name": "PROSODY_EXPORTER_INTERVAL", "value": sidecar_interval},
            {"name": "PROSODY_EXPORTER_ALLOW_CIDRS", "value": allow},
        ]
        if sidecar_url:
            env.append({"name": builders.UPSTREAM_ENV, "value": sidecar_url})
        containers.append({"name": builders.SIDECAR_NAME, "env": env})
    return {
        "metadata": {"name": name},
        "spec": {"containers": containers},
        "status": {"phase": phase},
    }


def failed_pod(name: str, error: str) -> dict:
    """A pod the webhook admitted unchanged because injecting failed (handlers.py)."""
    failed = pod(name)
    failed["metadata"]["annotations"] = {ann.STATUS: builders.failed_injection_status(error)}
    return failed


def built(
    body: dict[str, Any],
    interval: str = "60s",
    selected_by: str = "none",
    settings: OperatorSettings = SETTINGS,
    configmaps: dict[str, dict[str, str]] | None = None,
) -> dict:
    """The live objects of an earlier reconcile, as the API server returns them."""
    plan = plan_reconcile(
        settings,
        Workload(body, {}, configmaps=configmaps or {}, owned={}),
    )
    owned = {}
    for obj in plan.apply:
        live = copy.deepcopy(obj)
        live["metadata"]["uid"] = f"uid-{obj['kind']}"
        live["metadata"]["resourceVersion"] = "1"
        owned[obj["kind"]] = live
    monitor = owned.get("ServiceMonitor") or owned["PodMonitor"]
    endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
    assert endpoints[0]["interval"] == interval
    assert monitor["metadata"]["annotations"][ann.SELECTED_BY] == selected_by
    return owned


BUILT_5281 = built(opted_in(configmap="prosody"), "45s", configmaps={"prosody": {MAIN: PORT_5281}})


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
KPS_PODS = PrometheusSelectors(
    "monitoring", "kps", None, None, {"matchLabels": {"release": "kps"}}, {}
)
DRIFT = SETTINGS.model_copy(update={"restart_on_drift": True})
WEBHOOK = "prosody-operator/prosody-operator-webhook"
DRIFT_SERVICE = DRIFT.model_copy(update={"webhook_service": WEBHOOK})
PODS = SETTINGS.model_copy(update={"monitor_kind": "PodMonitor"})
INJECT_ONLY = SETTINGS.model_copy(update={"service_monitor_enabled": False})


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
        {"MetricsConfigured": "Pods still collect at another interval or from another URL: "
         "Prosody reads statistics_interval and its HTTP settings only when it starts",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    # -- which Prosody reads the config: its dialect (prosody_versions.py) --
    "the image's tag: a 13.0 config read as 13.0 reads it": (
        Workload(
            opted_in(configmap="prosody", containers=[PROSODY_13]),
            {},
            configmaps={"prosody": {MAIN: READ_BACK}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "interval 90s (from prosody.cfg.lua:4)",
         "ProsodyConfig": "Duplicate option", "NotSelectedByPrometheus": ""},
        False,
    ),
    "the version annotation beats the image": (
        Workload(
            opted_in(configmap="prosody", pod={ann.PROSODY_VERSION: "13.0.1"}),
            {},
            configmaps={"prosody": {MAIN: LUA_GLOBAL}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "interval 30s (from prosody.cfg.lua:2)",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "version known: a config error is Prosody refusing to start": (
        Workload(opted_in(configmap="prosody"), {}, configmaps={"prosody": {MAIN: LUA_GLOBAL}}),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyConfig": "prosody.cfg.lua:2: config error, Prosody refuses to start: attempt "
         "to index a nil value (global 'Lua')",
         "MetricsConfigured": "(from Prosody's default)", "NotSelectedByPrometheus": ""},
        False,
    ),
    "an invalid version annotation: reported, the image decides": (
        Workload(
            opted_in(configmap="prosody", containers=[PROSODY_13], pod={ann.PROSODY_VERSION: "x"}),
            {},
            configmaps={"prosody": {MAIN: LUA_GLOBAL}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"InvalidAnnotation": f"{ann.PROSODY_VERSION}='x' ignored: not a Prosody version",
         "MetricsConfigured": "interval 30s", "NotSelectedByPrometheus": ""},
        False,
    ),
    "version unknown, both read it alike: nothing to say": (
        Workload(
            opted_in(configmap="prosody", containers=[UNKNOWN]),
            {},
            configmaps={"prosody": {MAIN: PORT_5281}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": f"interval 45s (from prosody.cfg.lua:3), Service port 9755; the "
         f"sidecar collects {METRICS_5281} (from prosody.cfg.lua:4 (http_ports))",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "version unknown, they read it differently: 13.0's reading, and a Warning": (
        Workload(
            opted_in(configmap="prosody", containers=[UNKNOWN]),
            {},
            configmaps={"prosody": {MAIN: READ_BACK}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyVersionUnknown": "The Prosody version of container prosody is not known (image "
         "registry.example/team/prosody:2025 is not an official Prosody image), and its config "
         "reads differently in each (0.12: interval 45s from prosody.cfg.lua:4, /metrics at "
         f"{DEFAULT_URL}; 13.0: interval 90s from prosody.cfg.lua:4, /metrics at "
         f"{DEFAULT_URL}). Used 13.0's reading: the current release",
         "MetricsConfigured": "interval 90s", "ProsodyConfig": "Duplicate option",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "version unknown, only 13.0 reads it: 13.0's reading, no claim that Prosody fails": (
        Workload(
            opted_in(configmap="prosody", containers=[UNKNOWN]),
            {},
            configmaps={"prosody": {MAIN: LUA_GLOBAL}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyVersionUnknown": "(0.12: a config error; 13.0: interval 30s from "
         "prosody.cfg.lua:2, /metrics at http://127.0.0.1:5280/metrics). Used 13.0's reading: "
         "the only one that reads it without an error",
         "MetricsConfigured": "interval 30s", "NotSelectedByPrometheus": ""},
        False,
    ),
    "version unknown, neither reads it: an error as 13.0 reads it, not a sure failure": (
        Workload(
            opted_in(configmap="prosody", containers=[UNKNOWN]),
            {},
            configmaps={"prosody": {MAIN: "statistics_interval = = 5\n"}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyConfig": "config error as Prosody 13.0 reads it (which Prosody runs here is not "
         "known)",
         "MetricsConfigured": "(from Prosody's default)", "NotSelectedByPrometheus": ""},
        False,
    ),
    # -- where the sidecar collects /metrics --
    "/metrics where the config serves it": (
        Workload(opted_in(configmap="prosody"), {}, configmaps={"prosody": {MAIN: PORT_5281}}),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": f"the sidecar collects {METRICS_5281} (from prosody.cfg.lua:4 "
         "(http_ports))", "NotSelectedByPrometheus": ""},
        False,
    ),
    "the metrics-url annotation beats the config": (
        Workload(
            opted_in(configmap="prosody", pod={ann.METRICS_URL: "http://[::1]:5290/m"}),
            {},
            configmaps={"prosody": {MAIN: PORT_5281}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "the sidecar collects http://[::1]:5290/m (from annotation)",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "an invalid metrics-url annotation: reported, the config decides": (
        Workload(
            opted_in(configmap="prosody", pod={ann.METRICS_URL: "https://127.0.0.1/metrics"}),
            {},
            configmaps={"prosody": {MAIN: PORT_5281}},
        ),
        ["Service", "ServiceMonitor"], [],
        {"InvalidAnnotation": f"{ann.METRICS_URL}='https://127.0.0.1/metrics' ignored",
         "MetricsConfigured": f"the sidecar collects {METRICS_5281}",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "a config that leaves /metrics out of reach: a ProsodyConfig warning, the default URL": (
        Workload(opted_in(configmap="prosody"), {}, configmaps={"prosody": {MAIN: UNREACHABLE}}),
        ["Service", "ServiceMonitor"], [],
        {"ProsodyConfig": "prosody.cfg.lua:4: Prosody's HTTP server listens on 198.18.0.1 "
         "(http_interfaces), not on loopback",
         "MetricsConfigured": f"the sidecar collects {DEFAULT_URL} (from Prosody's defaults "
         "(see the config's findings))", "NotSelectedByPrometheus": ""},
        False,
    ),
    "pods collect from another URL than the config says: restart advice": (
        Workload(
            opted_in(configmap="prosody"),
            {},
            configmaps={"prosody": {MAIN: PORT_5281}},
            owned=BUILT_5281,
            pods=(pod("xmpp-1", sidecar_interval="45s", sidecar_url=DEFAULT_URL),),
        ),
        [], [],
        {"MetricsConfigured": "Pods still collect at another interval or from another URL",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "pods collect where the config says: nothing to say": (
        Workload(
            opted_in(configmap="prosody"),
            {},
            configmaps={"prosody": {MAIN: PORT_5281}},
            owned=BUILT_5281,
            pods=(pod("xmpp-1", sidecar_interval="45s", sidecar_url=METRICS_5281),),
        ),
        [], [], {"NotSelectedByPrometheus": ""}, False,
    ),
    "an object of our name that is not ours: NameConflict, left as it is": (
        Workload(opted_in(), {}, owned=foreign(built(opted_in()), "Service")),
        [], [],
        {"NameConflict": "Service xmpp-prosody-metrics exists but is not owned by Deployment "
         "chat/xmpp", "NotSelectedByPrometheus": ""},
        False,
    ),
    "a ServiceMonitor of our name that is not ours: NameConflict, our Service kept": (
        Workload(opted_in(), {}, owned=foreign(built(opted_in()), "ServiceMonitor")),
        [], [],
        {"NameConflict": "ServiceMonitor xmpp-prosody-metrics exists but is not owned by "
         "Deployment chat/xmpp", "NotSelectedByPrometheus": ""},
        False,
    ),
    "both not ours, and ours missing: only what is free is made": (
        Workload(
            opted_in(), {}, owned={"Service": foreign(built(opted_in()), "Service")["Service"]}
        ),
        ["ServiceMonitor"], [],
        {"NameConflict": "Service xmpp-prosody-metrics", "MetricsConfigured": "",
         "NotSelectedByPrometheus": ""},
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
    "pods admitted without the sidecar because injecting failed: InjectionFailed, not drift": (
        Workload(
            opted_in(), {}, owned=built(opted_in()),
            pods=(failed_pod("xmpp-1", "injecting it failed: boom"),
                  pod("xmpp-2", sidecar_interval="60s")),
        ),
        [], [],
        {"NotSelectedByPrometheus": "",
         "InjectionFailed": "1 pod(s) were admitted without the prosody-exporter sidecar "
         "(injecting it failed: boom): xmpp-1. Once fixed: kubectl -n chat rollout restart "
         "deployment/xmpp"},
        False,
    ),
    "pods injected when no pod network was known: NoPodNetwork": (
        Workload(
            opted_in(), {}, owned=built(opted_in()),
            pods=(pod("xmpp-1", sidecar_interval="60s", allow=LOOPBACK),
                  pod("xmpp-2", sidecar_interval="60s")),
        ),
        [], [],
        {"NotSelectedByPrometheus": "",
         "NoPodNetwork": "1 pod(s) have a sidecar that allows only loopback, as no pod-network "
         "CIDRs were known when they were created"},
        False,
    ),
    "loopback only, as the pod's annotation asked: no NoPodNetwork": (
        Workload(
            opted_in(pod={ann.ALLOW_CIDRS: "127.0.0.0/8,::1/128"}), {},
            owned=built(opted_in(pod={ann.ALLOW_CIDRS: "127.0.0.0/8,::1/128"})),
            pods=(pod("xmpp-1", sidecar_interval="60s", allow=LOOPBACK),),
        ),
        [], [], {"NotSelectedByPrometheus": ""}, False,
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
    # -- restartOnDrift and the webhook: a restart only when its new pods can get the sidecar --
    "restartOnDrift, the webhook Service has a ready endpoint: restart the rollout": (
        (
            Workload(opted_in(), {}, owned=built(opted_in()), pods=(pod("xmpp-1"),), now=NOW,
                     webhook_ready=True),
            DRIFT_SERVICE,
        ),
        [], [], {"NotSelectedByPrometheus": "", "SidecarMissing": "Restarting the rollout."}, True,
    ),
    "restartOnDrift, no ready endpoint of the webhook Service: the restart waits": (
        (
            Workload(opted_in(), {}, owned=built(opted_in()), pods=(pod("xmpp-1"),), now=NOW,
                     webhook_ready=False),
            DRIFT_SERVICE,
        ),
        [], [],
        {"NotSelectedByPrometheus": "",
         "SidecarMissing": "xmpp-1. Restarting the rollout once the webhook Service "
         f"{WEBHOOK} has a ready endpoint (none now: new pods would lack the sidecar too)."},
        False,
    ),
    "restartOnDrift, webhook not known (no Service, or not read): restart the rollout": (
        (
            Workload(opted_in(), {}, owned=built(opted_in()), pods=(pod("xmpp-1"),), now=NOW,
                     webhook_ready=None),
            DRIFT_SERVICE,
        ),
        [], [], {"NotSelectedByPrometheus": "", "SidecarMissing": "Restarting the rollout."}, True,
    ),
    "restartOnDrift, no ready endpoint, within the cool-down: not again (nothing waits)": (
        (
            Workload(restarted(opted_in(), 5), {}, owned=built(restarted(opted_in(), 5)),
                     pods=(pod("xmpp-1"),), now=NOW, webhook_ready=False),
            DRIFT_SERVICE,
        ),
        [], [],
        {"NotSelectedByPrometheus": "", "SidecarMissing": "not again within 10 minutes"}, False,
    ),
    "no restartOnDrift, no ready endpoint: the command, nothing waits": (
        Workload(opted_in(), {}, owned=built(opted_in()), pods=(pod("xmpp-1"),), now=NOW,
                 webhook_ready=False),
        [], [], {"NotSelectedByPrometheus": "", "SidecarMissing": "Fix: kubectl"}, False,
    ),
    "no ready endpoint, every pod injected: nothing to restart, nothing waits": (
        (
            Workload(opted_in(), {}, owned=built(opted_in()),
                     pods=(pod("xmpp-1", sidecar_interval="60s"),), now=NOW, webhook_ready=False),
            DRIFT_SERVICE,
        ),
        [], [], {"NotSelectedByPrometheus": ""}, False,
    ),
    # -- the monitor's kind: ServiceMonitor (above), PodMonitor, or none (inject only) --
    "PodMonitor mode: a PodMonitor and no Service": (
        (Workload(opted_in(), {}), PODS),
        ["PodMonitor"], [],
        {"MetricsConfigured": "PodMonitor xmpp-prosody-metrics: interval 60s (from Prosody's "
         "default), pod port 9755",
         "NotSelectedByPrometheus": "No Prometheus selects PodMonitor xmpp-prosody-metrics"},
        False,
    ),
    "PodMonitor mode, as built before: no write": (
        (Workload(opted_in(), {}, owned=built(opted_in(), settings=PODS)), PODS),
        [], [], {"NotSelectedByPrometheus": ""}, False,
    ),
    "switched to PodMonitor: the Service and the ServiceMonitor go": (
        (Workload(opted_in(), {}, owned=built(opted_in())), PODS),
        ["PodMonitor"], ["Service", "ServiceMonitor"],
        {"MetricsConfigured": "PodMonitor", "NotSelectedByPrometheus": "",
         "MetricsRemoved": "the monitor kind is PodMonitor: deleted Service xmpp-prosody-metrics "
         "and ServiceMonitor xmpp-prosody-metrics"},
        False,
    ),
    "switched back to ServiceMonitor: the PodMonitor goes": (
        Workload(opted_in(), {}, owned=built(opted_in(), settings=PODS)),
        ["Service", "ServiceMonitor"], ["PodMonitor"],
        {"MetricsConfigured": "Service port 9755", "NotSelectedByPrometheus": "",
         "MetricsRemoved": "the monitor kind is ServiceMonitor: deleted PodMonitor "
         "xmpp-prosody-metrics"},
        False,
    ),
    "PodMonitor mode, a Service of our name not ours: left alone, no conflict": (
        (Workload(opted_in(), {}, owned=foreign(built(opted_in()), "Service")), PODS),
        ["PodMonitor"], ["ServiceMonitor"],
        {"MetricsConfigured": "", "NotSelectedByPrometheus": "", "MetricsRemoved": ""},
        False,
    ),
    "PodMonitor mode, a PodMonitor of our name not ours: NameConflict": (
        (Workload(opted_in(), {}, owned=foreign(built(opted_in(), settings=PODS), "PodMonitor")),
         PODS),
        [], [],
        {"NameConflict": "PodMonitor xmpp-prosody-metrics exists but is not owned",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "PodMonitor mode: selected by a Prometheus' podMonitorSelector": (
        (Workload(opted_in(), {}, prometheuses=(KPS_PODS,)), PODS),
        ["PodMonitor"], [],
        {"MetricsConfigured": "",
         "SelectedByPrometheus": "PodMonitor xmpp-prosody-metrics is selected by Prometheus "
         "monitoring/kps"},
        False,
    ),
    "PodMonitor mode: a Prometheus selecting ServiceMonitors only": (
        (Workload(opted_in(), {}, prometheuses=(KPS,)), PODS),
        ["PodMonitor"], [],
        {"MetricsConfigured": "",
         "NotSelectedByPrometheus": "monitoring/kps has no podMonitorSelector (selects none)"},
        False,
    ),
    "ServiceMonitor mode: a Prometheus selecting PodMonitors only": (
        Workload(opted_in(), {}, prometheuses=(KPS_PODS,)),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "",
         "NotSelectedByPrometheus": "monitoring/kps has no serviceMonitorSelector"},
        False,
    ),
    "inject only: no Service, no monitor, nothing to select": (
        (Workload(opted_in(), {}, prometheuses=(KPS,)), INJECT_ONLY),
        [], [], {}, False,
    ),
    "inject only: what was made before goes": (
        (Workload(opted_in(), {}, owned=built(opted_in())), INJECT_ONLY),
        [], ["Service", "ServiceMonitor"],
        {"MetricsRemoved": "inject only (PROSODY_OPERATOR_SERVICE_MONITOR_ENABLED is false): "
         "deleted Service xmpp-prosody-metrics and ServiceMonitor xmpp-prosody-metrics"},
        False,
    ),
    "inject only: pods without the sidecar are still reported": (
        (Workload(opted_in(), {}, pods=(pod("xmpp-1"),)), INJECT_ONLY),
        [], [], {"SidecarMissing": "xmpp-1"}, False,
    ),
    "a scrape timeout above the interval: the interval, and said so": (
        (Workload(opted_in(pod={ann.INTERVAL: "30s", ann.SCRAPE_TIMEOUT: "45s"}), {}), SETTINGS),
        ["Service", "ServiceMonitor"], [],
        {"MetricsConfigured": "scrapeTimeout 30s, not the 45s of annotation "
         f"{ann.SCRAPE_TIMEOUT}: a timeout cannot exceed the interval",
         "NotSelectedByPrometheus": ""},
        False,
    ),
    "invalid monitor annotations: reported, the settings used": (
        Workload(opted_in(pod={ann.SCRAPE_TIMEOUT: "soon", ann.SAMPLE_LIMIT: "-5"}), {}),
        ["Service", "ServiceMonitor"], [],
        {"InvalidAnnotation": f"{ann.SAMPLE_LIMIT}='-5' ignored", "MetricsConfigured": "",
         "NotSelectedByPrometheus": ""},
        False,
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
    # A restart waits, to be looked at again, only when the webhook has no ready endpoint.
    waits = "once the webhook Service" in str(events.get("SidecarMissing"))
    assert plan.deferred == (f"no ready endpoint of the webhook Service {WEBHOOK}" if waits else "")
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

# Each row: the observation, then the sidecar's env (None: no patch), and the warnings (what
# each is about: a text it holds). The webhook posts no Event: the reconciler does.
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
    "opted-in namespace, not Prosody: untouched, not even a warning": (
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
        {"allowlist": f"{ann.ALLOW_CIDRS}='x' ignored", "port": f"{ann.PORT}='99999' ignored"},
    ),
    "no pod network known: loopback only, warned": (
        admission(new_pod(labels=OPTED), node_cidrs=()),
        {"PROSODY_EXPORTER_ALLOW_CIDRS": "127.0.0.0/8,::1/128"},
        {"NoPodNetwork": "the sidecar only allows loopback"},
    ),
    "the sidecar collects /metrics where the config serves it": (
        admission(
            new_pod(labels=OPTED, configmap="prosody"),
            configmaps={"prosody": {MAIN: PORT_5281}},
        ),
        {"PROSODY_EXPORTER_INTERVAL": "45s", builders.UPSTREAM_ENV: METRICS_5281},
        {},
    ),
    "no config: Prosody's default /metrics": (
        admission(new_pod(labels=OPTED)), {builders.UPSTREAM_ENV: DEFAULT_URL}, {},
    ),
    "the metrics-url annotation beats the config": (
        admission(
            new_pod(labels=OPTED, configmap="prosody",
                    annotations={ann.METRICS_URL: "http://localhost:5290/m"}),
            configmaps={"prosody": {MAIN: PORT_5281}},
        ),
        {builders.UPSTREAM_ENV: "http://localhost:5290/m"},
        {},
    ),
    "an invalid metrics-url annotation: warned, the config's URL": (
        admission(
            new_pod(labels=OPTED, configmap="prosody", annotations={ann.METRICS_URL: "5281"}),
            configmaps={"prosody": {MAIN: PORT_5281}},
        ),
        {builders.UPSTREAM_ENV: METRICS_5281},
        {"InvalidAnnotation": f"{ann.METRICS_URL}='5281' ignored"},
    ),
    "a 13.0 image: its config read as 13.0 reads it": (
        admission(
            new_pod(labels=OPTED, configmap="prosody", containers=[PROSODY_13]),
            configmaps={"prosody": {MAIN: LUA_GLOBAL}},
        ),
        {"PROSODY_EXPORTER_INTERVAL": "30s"},
        {},
    ),
    "the version unknown: the reading that works": (
        admission(
            new_pod(labels=OPTED, configmap="prosody", containers=[UNKNOWN]),
            configmaps={"prosody": {MAIN: LUA_GLOBAL}},
        ),
        {"PROSODY_EXPORTER_INTERVAL": "30s"},
        {},
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
    seen, env, warned = ADMISSION[row]
    plan = plan_admission(SETTINGS, seen)
    if env is None:
        assert plan.patch is None
    else:
        assert plan.patch is not None
        sidecar = plan.patch["spec"]["containers"][-1]
        assert sidecar["name"] == builders.SIDECAR_NAME
        assert env.items() <= {e["name"]: e["value"] for e in sidecar["env"]}.items()
        assert ann.STATUS in plan.patch["metadata"]["annotations"]
    assert len(plan.warnings) == len(warned), plan.warnings
    for text in warned.values():
        assert any(text in warning for warning in plan.warnings), (text, plan.warnings)


def not_evaluated_yet(inputs: ConfigInputs) -> None:
    """An evaluator whose result is not there in time (evaluation.py's workers are busy)."""
    return None


def test_admission_does_not_wait_for_an_evaluation_it_has_not_got():
    """Injected all the same, with the fallbacks: the env's interval, Prosody's default URL."""
    container = {**PROSODY, "env": [{"name": "PROSODY_STATISTICS_INTERVAL", "value": "25"}]}
    seen = admission(
        new_pod(labels=OPTED, configmap="prosody", containers=[container]),
        configmaps={"prosody": {MAIN: PORT_5281}},
    )
    plan = plan_admission(SETTINGS, seen, not_evaluated_yet)
    assert plan.patch is not None
    env = {e["name"]: e["value"] for e in plan.patch["spec"]["containers"][-1]["env"]}
    assert env["PROSODY_EXPORTER_INTERVAL"] == "25s"
    assert env[builders.UPSTREAM_ENV] == DEFAULT_URL
    assert "config not evaluated yet" in plan.reason
    # The reconciler, with the result, finds the pod behind and says so.
    injected = {**pod("xmpp-1"), "spec": {"containers": plan.patch["spec"]["containers"]}}
    configured = plan_reconcile(
        SETTINGS,
        Workload(
            opted_in(configmap="prosody", containers=[container]),
            {},
            configmaps={"prosody": {MAIN: PORT_5281}},
            pods=(injected,),
        ),
    )
    [message] = [e.message for e in configured.events if e.reason == "MetricsConfigured"]
    assert "interval 45s" in message and METRICS_5281 in message
    assert "Pods still collect at another interval or from another URL" in message


def test_a_reconcile_without_the_result_uses_the_fallbacks_and_gives_no_advice():
    """The result comes later (the controller reconciles again then): meanwhile the fallbacks,
    said to be so, and no advice to restart pods that may well be right."""
    seen = Workload(
        opted_in(configmap="prosody"),
        {},
        configmaps={"prosody": {MAIN: PORT_5281}},
        owned=built(
            opted_in(configmap="prosody"), "45s", configmaps={"prosody": {MAIN: PORT_5281}}
        ),
        pods=(pod("xmpp-1", sidecar_interval="45s", sidecar_url=METRICS_5281),),
    )
    plan = plan_reconcile(SETTINGS, seen, not_evaluated_yet)
    [message] = [e.message for e in plan.events if e.reason == "MetricsConfigured"]
    assert "interval 60s (from Prosody's default; config not evaluated yet)" in message
    assert "restart" not in message
    assert not [e for e in plan.events if e.reason == "ProsodyConfig"]


def many_findings(count: int) -> str:
    """A config with `count` distinct findings: a misplaced option under each of its hosts."""
    return CONFIG + f'for i = 1, {count} do VirtualHost("host" .. i) statistics_interval = 5 end\n'


def test_a_config_with_60000_findings_posts_21_events_once():
    """At most 20 findings per evaluation and one line saying how many more; the next reconcile
    posts none of them again (the Event log keeps what it posted)."""
    posted: list[Event] = []
    log = EventLog(lambda target, event: posted.append(event))
    seen = Workload(
        opted_in(configmap="prosody"), {}, configmaps={"prosody": {MAIN: many_findings(60_000)}}
    )
    for _ in range(2):
        plan = plan_reconcile(SETTINGS, seen)
        log.report(plan.workload, plan.events, settles=planner.RECONCILE_REASONS)
    config = [e.message for e in posted if e.reason == "ProsodyConfig"]
    assert len(config) == 21, config[-3:]
    assert len(set(config)) == 21
    assert "statistics_interval is set under VirtualHost 'host1'" in config[0]
    assert config[-1] == (
        "prosody.cfg.lua: and 59980 more finding(s) like these: the operator reports the first 20"
    )
    # Deciding findings are kept whatever the count: here, none (45 s from line 3).
    assert any(e.reason == "MetricsConfigured" and "interval 45s" in e.message for e in posted)


def test_findings_that_decide_are_kept_past_the_cap():
    """Statistics off: the finding that says why comes after 60 000 others, and is kept."""
    config = many_findings(60_000).replace(
        'statistics = "internal"\nstatistics_interval = 45\n', ""
    )
    plan = plan_reconcile(
        SETTINGS,
        Workload(opted_in(configmap="prosody"), {}, configmaps={"prosody": {MAIN: config}}),
    )
    messages = [e.message for e in plan.events if e.reason == "ProsodyConfig"]
    assert len(messages) == 21
    assert any("statistics are off" in m for m in messages)
    assert "and 59981 more finding(s)" in messages[-1]  # 60 000 + statistics off


LIMITS_CPU = Requirement("compute", frozenset({"limits.cpu", "requests.memory"}))


@pytest.mark.parametrize(
    ("settings", "requirement", "injected"),
    [
        (SETTINGS, LIMITS_CPU, False),  # the default sidecar sets no CPU limit
        (
            SETTINGS.model_copy(update={"sidecar_cpu_limit": "100m"}),
            LIMITS_CPU,
            True,
        ),  # the chart's value
        (SETTINGS, Requirement("requests", frozenset({"cpu", "requests.memory"})), True),
        (
            SETTINGS.model_copy(
                update={"sidecar_memory_request": "", "sidecar_memory_limit": "64Mi"}
            ),
            Requirement("memory", frozenset({"requests.memory"})),
            True,  # a limit alone: the API server sets the request to it
        ),
    ],
)
def test_a_resource_quota_the_sidecar_would_fail_leaves_the_pod_as_it_is(
    settings, requirement, injected
):
    """The API server would reject the whole pod ("must specify limits.cpu"): it is admitted
    without the sidecar instead, warned, and marked for the reconciler's InjectionFailed."""
    plan = plan_admission(settings, admission(new_pod(labels=OPTED), quotas=(requirement,)))
    assert plan.patch is not None
    if injected:
        assert plan.patch["spec"]["containers"][-1]["name"] == builders.SIDECAR_NAME
        return
    assert "spec" not in plan.patch
    (warning,) = plan.warnings
    assert "ResourceQuota compute requires limits.cpu of every container" in warning
    assert builders.injection_error({"metadata": plan.patch["metadata"]}) == warning


def test_a_bare_pod_is_warned_too():
    """No workload to report on: the client (kubectl) gets the warnings."""
    bare = {**new_pod(labels=OPTED, annotations={ann.PORT: "bogus"})}
    bare["metadata"] = {**bare["metadata"], "name": "solo"}
    plan = plan_admission(SETTINGS, admission(bare, workload=None))
    assert plan.patch is not None and len(plan.warnings) == 1 and ann.PORT in plan.warnings[0]


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


@pytest.mark.parametrize(
    "kind, status, expected",
    [
        ("Deployment", None, False),  # just created: its controller has not seen it yet
        ("Deployment", {"observedGeneration": 1}, False),
        ("Deployment", {"replicas": 2, "readyReplicas": 0}, True),
        ("StatefulSet", {"replicas": 0}, False),  # scaled to zero
        ("StatefulSet", {"replicas": 1}, True),
        ("DaemonSet", {"currentNumberScheduled": 0, "numberMisscheduled": 0}, False),
        ("DaemonSet", {"currentNumberScheduled": 3}, True),
        ("DaemonSet", {"numberMisscheduled": 1}, True),
    ],
)
def test_pods_are_listed_only_for_workloads_whose_status_reports_some(kind, status, expected):
    workload = {"kind": kind, **({"status": status} if status is not None else {})}
    assert may_have_pods(workload) is expected


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


# --- what the monitor says ------------------------------------------------------------------------

RELABEL = {"targetLabel": "cluster", "replacement": "eu-1", "action": "replace"}
DROP_HTTP = {"sourceLabels": ["__name__"], "regex": "prosody_mod_http_.*", "action": "drop"}
KNOBS = SETTINGS.model_copy(
    update={
        "service_monitor_relabelings": [RELABEL],
        "service_monitor_metric_relabelings": [DROP_HTTP],
        "service_monitor_sample_limit": 5000,
        "service_monitor_honor_labels": True,
        "service_monitor_scrape_timeout": 15.0,
    }
)
SERVICE_LABEL = {
    "action": "replace",
    "targetLabel": "service",
    "replacement": "xmpp-prosody-metrics",
}
DEFAULT_ENDPOINT = {
    "port": "metrics",
    "path": "/metrics",
    "interval": "60s",
    "scrapeTimeout": "10s",
}
KNOB_ENDPOINT = {
    **DEFAULT_ENDPOINT,
    "scrapeTimeout": "15s",
    "honorLabels": True,
    "relabelings": [RELABEL],
    "metricRelabelings": [DROP_HTTP],
}

# Each row: the settings and the pod template's annotations, then the monitor's endpoint and its
# sampleLimit (None: not set).
MONITOR = {
    "defaults: prometheus-operator's own for everything but interval and timeout": (
        SETTINGS, {}, DEFAULT_ENDPOINT, None,
    ),
    "every knob from the settings": (KNOBS, {}, KNOB_ENDPOINT, 5000),
    "the workload's annotations beat the settings": (
        KNOBS, {ann.SCRAPE_TIMEOUT: "20s", ann.SAMPLE_LIMIT: "20000"},
        {**KNOB_ENDPOINT, "scrapeTimeout": "20s"}, 20000,
    ),
    "sample-limit 0: no limit, whatever the setting": (
        KNOBS, {ann.SAMPLE_LIMIT: "0"}, KNOB_ENDPOINT, None,
    ),
    "a timeout above the interval is the interval": (
        KNOBS.model_copy(update={"service_monitor_scrape_timeout": 90.0}), {},
        {**KNOB_ENDPOINT, "scrapeTimeout": "60s"}, 5000,
    ),
    "the interval annotation bounds the timeout too": (
        SETTINGS, {ann.INTERVAL: "5s", ann.SCRAPE_TIMEOUT: "8s"},
        {**DEFAULT_ENDPOINT, "interval": "5s", "scrapeTimeout": "5s"}, None,
    ),
    "PodMonitor: the same knobs, the service label first": (
        KNOBS.model_copy(update={"monitor_kind": "PodMonitor"}), {},
        {**KNOB_ENDPOINT, "relabelings": [SERVICE_LABEL, RELABEL]}, 5000,
    ),
    "PodMonitor, defaults: only the service label": (
        PODS, {}, {**DEFAULT_ENDPOINT, "relabelings": [SERVICE_LABEL]}, None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", MONITOR)
def test_monitor_fields(row):
    settings, annotations, endpoint, sample_limit = MONITOR[row]
    body = opted_in(pod=annotations)
    plan = plan_reconcile(settings, Workload(body, {}))
    (monitor,) = [obj for obj in plan.apply if obj["kind"] == settings.monitor_kind]
    spec = monitor["spec"]
    endpoints = spec[
        "endpoints" if settings.monitor_kind == "ServiceMonitor" else "podMetricsEndpoints"
    ]
    assert endpoints == [endpoint]
    assert spec.get("sampleLimit") == sample_limit
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    if settings.monitor_kind == "PodMonitor":  # the workload's own pods
        assert spec["selector"] == body["spec"]["selector"]
        assert [obj["kind"] for obj in plan.apply] == ["PodMonitor"]


def test_pod_monitor_selects_with_the_workloads_whole_selector():
    """A Service can select by labels only; a PodMonitor takes matchExpressions too."""
    body = opted_in()
    body["spec"]["selector"]["matchExpressions"] = [
        {"key": "tier", "operator": "In", "values": ["xmpp"]}
    ]
    (monitor,) = plan_reconcile(PODS, Workload(body, {})).apply
    assert monitor["spec"]["selector"] == body["spec"]["selector"]


# --- what the webhook adds besides the sidecar ---------------------------------------------------

SCRAPE_ANNOTATIONS = SETTINGS.model_copy(update={"prometheus_scrape_annotations": True})
OPENSHIFT = SETTINGS.model_copy(
    update={
        "sidecar_security_context": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    }
)
PROMETHEUS_IO = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": "9755",
    "prometheus.io/path": "/metrics",
    "prometheus.io/scheme": "http",
}

# Each row: the settings and the pod's annotations, then the annotations the patch sets besides
# the status, and the sidecar's securityContext.
INJECTED_EXTRAS = {
    "defaults: no prometheus.io annotations, the restricted context": (
        SETTINGS, {}, {}, dict(RESTRICTED_SIDECAR),
    ),
    "prometheus.io annotations on": (
        SCRAPE_ANNOTATIONS, {}, PROMETHEUS_IO, dict(RESTRICTED_SIDECAR),
    ),
    "prometheus.io annotations follow the port annotation": (
        SCRAPE_ANNOTATIONS, {ann.PORT: "9100"}, {**PROMETHEUS_IO, "prometheus.io/port": "9100"},
        dict(RESTRICTED_SIDECAR),
    ),
    "the pod's own prometheus.io annotations are kept": (
        SCRAPE_ANNOTATIONS, {"prometheus.io/scrape": "false", "prometheus.io/path": "/x"},
        {"prometheus.io/port": "9755", "prometheus.io/scheme": "http"}, dict(RESTRICTED_SIDECAR),
    ),
    "the OpenShift mode's context: no runAsUser or runAsGroup": (
        OPENSHIFT, {}, {}, OPENSHIFT.sidecar_security_context,
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", INJECTED_EXTRAS)
def test_injected_annotations_and_security_context(row):
    settings, annotations, added, context = INJECTED_EXTRAS[row]
    plan = plan_admission(settings, admission(new_pod(labels=OPTED, annotations=annotations)))
    assert plan.patch is not None
    patched = dict(plan.patch["metadata"]["annotations"])
    assert patched.pop(ann.STATUS)
    assert patched == added
    assert plan.patch["spec"]["containers"][-1]["securityContext"] == context


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_event_log_posts_a_persisting_event_again_after_a_while():
    """Like client-go's event series: a finding that persists is not posted on every reconcile,
    but again once the one posted is old (the API server drops Events after an hour)."""
    posted: list[str] = []
    clock = Clock()
    log = EventLog(lambda target, event: posted.append(event.reason), repost_after=100, clock=clock)
    finding = Event.warning("ProsodyConfig", "prosody.cfg.lua:3: statistics_interval ignored")
    selected = Event.normal("SelectedByPrometheus", "kps")
    for clock.now in (0, 10, 60, 99):  # reconciles on status updates
        log.report(DEPLOYMENT, [finding], planner.RECONCILE_REASONS)
    assert posted == ["ProsodyConfig"]
    clock.now = 101
    log.report(DEPLOYMENT, [finding, selected], planner.RECONCILE_REASONS)
    assert posted == ["ProsodyConfig", "ProsodyConfig", "SelectedByPrometheus"]
    clock.now = 150  # the selection's Event is fresh, the finding's too
    log.report(DEPLOYMENT, [finding, selected], planner.RECONCILE_REASONS)
    assert len(posted) == 3


def test_event_log_forgets_objects_that_stopped_reporting():
    """A deleted workload never reports again: its memory goes after `repost_after`, not only
    when 10,000 others push it out."""
    clock = Clock()
    log = EventLog(lambda target, event: None, repost_after=100, clock=clock)
    event = Event.warning("SidecarMissing", "1 pod")
    for n in range(50):
        log.report(ObjectRef("apps/v1", "Deployment", NAMESPACE, f"w{n}", f"uid-{n}"), [event])
    assert len(log) == 50
    clock.now = 101
    log.report(DEPLOYMENT, [event])
    assert len(log) == 1
