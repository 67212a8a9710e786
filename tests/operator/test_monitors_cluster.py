"""What the chart's monitor and sidecar values make the operator build, on the real API server:
the ServiceMonitors and PodMonitors against prometheus-operator v0.85's own CRDs, the switch
between the kinds and to inject only, the prometheus.io annotations, and the sidecar's
securityContext under Pod Security "restricted".

Each test runs the real operator (with the chart's ServiceAccount and RBAC) configured as the
chart's Deployment would configure it for a `ci/` scenario: the settings are the env that
`helm template` renders for it. No kubelet runs here, so pods stay Pending; what is checked is
what the API server admitted and stored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, utils

from prosody_operator import annotations as ann
from prosody_operator import builders, names, planner
from prosody_operator.observation import Workload
from prosody_operator.settings import ENV_PREFIX, OperatorSettings
from testinfra.kubeapi import or_none
from testinfra.operator import OperatorProcess
from testinfra.procs import wait_until
from testinfra.workloads import prosody_pod, prosody_workload
from tools import chart

pytestmark = pytest.mark.cluster

CI = chart.CHART / "ci"
MONITORING = ("monitoring.coreos.com", "v1")
PLURALS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors"}
# Where the webhook listens and what it serves, its ports, and the release namespace's Lease:
# OperatorProcess sets these for a local run (one replica, which reconciles).
LOCAL_SETTINGS = ("WEBHOOK_", "HEALTH_PORT", "METRICS_PORT", "WATCH_NAMESPACES", "LEADER_")


def chart_settings(*values_files: Path, **set_values: Any) -> dict[str, str]:
    """The operator's settings for a scenario: the env of the chart's Deployment, as rendered
    by `helm template` (lower-case names without the prefix, as OperatorProcess takes them)."""
    objects = chart.render_objects("release", "namespace", values_files, set_values)
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = {}
    for item in container["env"]:
        name = item["name"].removeprefix(ENV_PREFIX)
        if not name.startswith(LOCAL_SETTINGS):
            settings[name.lower()] = item["value"]
    return settings


@pytest.fixture(scope="module")
def operator(
    k8s_client: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, not started: each test starts it with its scenario's settings."""
    process = OperatorProcess(k8s_client, tmp_path_factory.mktemp("operator"))
    process.install_identity()
    try:
        yield process
    finally:
        process.uninstall()


class Objects:
    """Readers and writers over the test's namespace, for assertions."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def create(self, body: dict[str, Any]) -> None:
        utils.create_from_dict(self.api, body, namespace=self.namespace)

    def monitor(self, kind: str, workload: str) -> dict[str, Any] | None:
        name = names.metrics_object_name(workload)
        found: dict[str, Any] | None = or_none(
            lambda: self.custom.get_namespaced_custom_object(  # type: ignore[arg-type,return-value]
                *MONITORING, self.namespace, PLURALS[kind], name
            )
        )
        return found

    def service(self, workload: str) -> client.V1Service | None:
        name = names.metrics_object_name(workload)
        return or_none(lambda: self.core.read_namespaced_service(name, self.namespace))

    def kinds(self, workload: str) -> set[str]:
        """Which of the operator's objects exist for the workload."""
        found = {kind for kind in PLURALS if self.monitor(kind, workload) is not None}
        return found | ({"Service"} if self.service(workload) is not None else set())

    def wait_for_kinds(self, workload: str, kinds: set[str], timeout: float = 90) -> None:
        wait_until(lambda: self.kinds(workload) == kinds, timeout, f"{workload}: just {kinds}")

    def wait_for_monitor(self, kind: str, workload: str, timeout: float = 90) -> dict[str, Any]:
        wait_until(lambda: bool(self.monitor(kind, workload)), timeout, f"{kind} of {workload}")
        found = self.monitor(kind, workload)
        assert found is not None
        return found

    def wait_for_event(self, name: str, reason: str, contains: str = "") -> str:
        found: list[str] = []

        def has_event() -> bool:
            events = self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={name}"
            ).items
            found[:] = [
                e.message or ""
                for e in events
                if e.reason == reason and contains in (e.message or "")
            ]
            return bool(found)

        wait_until(has_event, 90, f"a {reason} event on {name} containing {contains!r}")
        return found[0]

    def pod(self, name: str) -> client.V1Pod:
        return self.core.read_namespaced_pod(name, self.namespace)


@pytest.fixture
def objects(k8s_client: client.ApiClient, namespace: str) -> Objects:
    return Objects(k8s_client, namespace)


def run(operator: OperatorProcess, settings: dict[str, str], objects: Objects) -> None:
    """(Re)start the operator with these settings, and wait until its webhook injects: each
    start makes a new CA, and until the webhook configuration has it the API server's calls
    fail (and are ignored). A dry-run pod shows it."""
    operator.stop()
    operator.settings = settings
    operator.start()

    def injects() -> bool:
        try:
            pod = objects.core.create_namespaced_pod(
                objects.namespace, prosody_pod("probe", None), dry_run="All"
            )
        except client.ApiException as error:  # refused by Pod Security: injected, but not valid
            return error.status == 403 and builders.SIDECAR_NAME in str(error.body)
        return any(c.name == builders.SIDECAR_NAME for c in pod.spec.containers)

    wait_until(injects, 30, "the operator's webhook to inject")


def sidecar_of(pod: client.V1Pod) -> client.V1Container:
    return next(c for c in pod.spec.containers if c.name == builders.SIDECAR_NAME)


# --- what the builders make is valid against prometheus-operator's CRDs -------------------------


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_every_knob_passes_the_crds_strict_validation(
    k8s_client: client.ApiClient, namespace: str, kind: str
) -> None:
    """The monitor the operator builds with every knob of ci/monitor-knobs-values.yaml set
    (and per-workload annotations), server-side applied as a dry run with strict field
    validation: a field the CRD does not know, or of the wrong type, fails here instead of
    being dropped silently."""
    settings = OperatorSettings(
        **chart_settings(CI / "monitor-knobs-values.yaml", **{"serviceMonitor.kind": kind})
    )
    body = prosody_workload("Deployment", "xmpp", None, annotations={ann.SAMPLE_LIMIT: "500"})
    body["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
    plan = planner.plan_reconcile(settings, Workload(body, {}))
    monitors = [obj for obj in plan.apply if obj["kind"] == kind]
    assert len(monitors) == 1
    for obj in plan.apply:
        if obj["kind"] == "Service":
            continue
        response = client.CustomObjectsApi(k8s_client).patch_namespaced_custom_object(
            *MONITORING, namespace, PLURALS[kind], obj["metadata"]["name"], obj,
            dry_run="All", field_validation="Strict", field_manager="test", force=True,
            _content_type="application/apply-patch+yaml", _preload_content=False,
        )  # fmt: skip
        stored = json.loads(response.data)
        assert builders.is_subset(obj["spec"], stored["spec"])  # nothing pruned
        assert stored["spec"]["sampleLimit"] == 500


# --- the operator, configured by the chart's values ------------------------------------------


def test_pod_monitor_mode_then_service_monitor_then_inject_only(
    operator: OperatorProcess, objects: Objects
) -> None:
    """ci/podmonitor-values.yaml: a PodMonitor and no Service. Switching the chart back to the
    default deletes the PodMonitor for a Service and a ServiceMonitor; ci/inject-only
    deletes those, and new pods still get the sidecar, annotated for Prometheus."""
    run(operator, chart_settings(CI / "podmonitor-values.yaml"), objects)
    objects.create(prosody_workload("Deployment", "xmpp", None))
    monitor = objects.wait_for_monitor("PodMonitor", "xmpp")
    objects.wait_for_kinds("xmpp", {"PodMonitor"})
    workload = client.AppsV1Api(objects.api).read_namespaced_deployment("xmpp", objects.namespace)
    assert monitor["spec"]["selector"] == {"matchLabels": workload.spec.selector.match_labels}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == builders.METRICS_PORT_NAME  # the sidecar's named port
    assert {
        "action": "replace",
        "targetLabel": "service",
        "replacement": "xmpp-prosody-metrics",
    } in (endpoint["relabelings"])
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    objects.wait_for_event("xmpp", "MetricsConfigured", "PodMonitor xmpp-prosody-metrics")

    run(operator, chart_settings(), objects)
    objects.wait_for_kinds("xmpp", {"Service", "ServiceMonitor"})
    objects.wait_for_event("xmpp", "MetricsRemoved", "deleted PodMonitor xmpp-prosody-metrics")

    run(operator, chart_settings(CI / "inject-only-values.yaml"), objects)
    objects.wait_for_kinds("xmpp", set())
    objects.wait_for_event("xmpp", "MetricsRemoved", "inject only")
    pod = prosody_pod("solo", None)
    pod["metadata"]["annotations"]["prometheus.io/path"] = "/own"  # the pod's own: kept
    objects.create(pod)
    stored = objects.pod("solo")
    assert sidecar_of(stored).ports[0].container_port == 9755
    notes = stored.metadata.annotations
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"]) == ("true", "9755")
    assert (notes["prometheus.io/path"], notes["prometheus.io/scheme"]) == ("/own", "http")


def test_a_monitor_of_our_name_that_is_not_ours_is_left_alone(
    operator: OperatorProcess, objects: Objects
) -> None:
    """Switching kinds deletes only what the workload owns."""
    foreign = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "xmpp-prosody-metrics"},
        "spec": {"selector": {"matchLabels": {"app": "xmpp"}}, "endpoints": [{"port": "web"}]},
    }
    objects.custom.create_namespaced_custom_object(
        *MONITORING, objects.namespace, "servicemonitors", foreign
    )
    run(operator, chart_settings(CI / "podmonitor-values.yaml"), objects)
    objects.create(prosody_workload("Deployment", "xmpp", None))
    objects.wait_for_kinds("xmpp", {"PodMonitor", "ServiceMonitor"})
    objects.wait_for_event("xmpp", "MetricsConfigured", "PodMonitor")
    stored = objects.monitor("ServiceMonitor", "xmpp")
    assert stored is not None and stored["spec"]["endpoints"] == [{"port": "web"}]


def test_monitor_knobs_and_per_workload_annotations_reach_the_stored_monitor(
    operator: OperatorProcess, objects: Objects
) -> None:
    """ci/monitor-knobs-values.yaml as stored by the API server (the CRD keeps every field);
    a workload's annotations override the scrape timeout and the sample limit; a timeout
    longer than the interval becomes the interval, and the Event says so."""
    values = chart_settings(CI / "monitor-knobs-values.yaml")
    run(operator, values, objects)
    settings = OperatorSettings(**values)
    objects.create(prosody_workload("Deployment", "xmpp", None))
    overridden = {ann.SCRAPE_TIMEOUT: "20s", ann.SAMPLE_LIMIT: "0"}
    objects.create(prosody_workload("Deployment", "chat", None, annotations=overridden))
    short = {ann.INTERVAL: "10s"}  # and the setting's timeout, 15s
    objects.create(prosody_workload("Deployment", "fast", None, annotations=short))

    spec = objects.wait_for_monitor("ServiceMonitor", "xmpp")["spec"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["relabelings"] == settings.service_monitor_relabelings
    assert endpoint["metricRelabelings"] == settings.service_monitor_metric_relabelings
    assert endpoint["honorLabels"] is True
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("60s", "15s")
    assert spec["sampleLimit"] == 20000

    spec = objects.wait_for_monitor("ServiceMonitor", "chat")["spec"]
    assert spec["endpoints"][0]["scrapeTimeout"] == "20s"
    assert "sampleLimit" not in spec  # 0: no limit

    spec = objects.wait_for_monitor("ServiceMonitor", "fast")["spec"]
    assert (spec["endpoints"][0]["interval"], spec["endpoints"][0]["scrapeTimeout"]) == (
        "10s",
        "10s",
    )
    objects.wait_for_event("fast", "MetricsConfigured", "scrapeTimeout 10s, not the 15s")


def test_pod_monitor_selection_diagnostics(operator: OperatorProcess, objects: Objects) -> None:
    """A Prometheus that selects ServiceMonitors only misses the PodMonitor, and says why; one
    whose podMonitorSelector matches selects it."""
    run(operator, chart_settings(CI / "podmonitor-values.yaml"), objects)
    objects.create(prosody_workload("Deployment", "xmpp", None))
    objects.wait_for_monitor("PodMonitor", "xmpp")

    def prometheus(name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus"}
        body.update(metadata={"name": name}, spec=spec)
        objects.custom.create_namespaced_custom_object(
            *MONITORING, objects.namespace, "prometheuses", body
        )

    release = {"matchLabels": {"release": "kube-prometheus-stack"}}
    prometheus("services", {"serviceMonitorSelector": release})
    message = objects.wait_for_event("xmpp", "NotSelectedByPrometheus", "podMonitorSelector")
    assert f"{objects.namespace}/services has no podMonitorSelector (selects none)" in message
    prometheus("pods", {"podMonitorSelector": release})
    objects.wait_for_event(
        "xmpp", "SelectedByPrometheus", f"PodMonitor xmpp-prosody-metrics is selected by "
        f"Prometheus {objects.namespace}/pods",
    )  # fmt: skip


# --- the sidecar's securityContext under Pod Security "restricted" -----------------------------


@pytest.fixture
def restricted(objects: Objects) -> Objects:
    objects.core.patch_namespace(
        objects.namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    return objects


@pytest.mark.parametrize(
    ("scenario", "ids"),
    [
        ((), {"runAsUser": 65532, "runAsGroup": 65532}),
        ((CI / "openshift-values.yaml",), {"runAsUser": None, "runAsGroup": None}),
        ((CI / "security-context-values.yaml",), {"runAsUser": 10001, "runAsGroup": 10001}),
    ],
    ids=["default", "openshift", "site-policy"],
)
def test_injected_pod_is_admitted_under_pod_security_restricted(
    operator: OperatorProcess, restricted: Objects, scenario: tuple[Path, ...], ids: dict
) -> None:
    """The API server admits the injected pod (the webhook runs before Pod Security's check);
    the OpenShift mode leaves the UID and GID to the SCC and keeps runAsNonRoot."""
    run(operator, chart_settings(*scenario), restricted)
    restricted.create(prosody_pod("xmpp", None))
    context = sidecar_of(restricted.pod("xmpp")).security_context
    assert context.run_as_non_root is True
    assert {"runAsUser": context.run_as_user, "runAsGroup": context.run_as_group} == ids
    assert context.allow_privilege_escalation is False
    assert context.capabilities.drop == ["ALL"]


def test_a_sidecar_context_restricted_forbids_is_refused(
    operator: OperatorProcess, restricted: Objects
) -> None:
    """The check above can fail: a sidecar that may escalate privileges makes the API server
    refuse the whole pod in a namespace enforcing "restricted"."""
    escalating = {"sidecar.securityContext.allowPrivilegeEscalation": True}
    run(operator, chart_settings(**escalating), restricted)
    with pytest.raises(client.ApiException) as refused:
        restricted.core.create_namespaced_pod(restricted.namespace, prosody_pod("xmpp", None))
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in message
    assert f'(container "{builders.SIDECAR_NAME}" must set' in message
