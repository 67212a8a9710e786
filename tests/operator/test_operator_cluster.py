"""The operator against the real control plane: the real kube-apiserver calls its webhook over
HTTPS (filtered by the real objectSelector and namespaceSelector), the real controller-manager
turns Deployments and StatefulSets into Pods, and the operator runs with the chart's
ServiceAccount and RBAC, not as admin.

No kubelet runs here, so pods stay Pending: what is checked is what the API server stored. (A
StatefulSet therefore never gets past its first pod, and its rolling update never starts: the
end-to-end test of tests/e2e/test_statefulset.py runs its pods.)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, utils
from prometheus_client.parser import text_string_to_metric_families

from prosody_operator import annotations as ann
from testinfra.kubeapi import or_none
from testinfra.operator import OperatorProcess
from testinfra.procs import wait_until
from testinfra.workloads import prosody_pod_spec, prosody_workload

pytestmark = pytest.mark.cluster

NODE_CIDRS = ["198.18.64.0/24", "2001:db8:64::/64"]
MANUAL_INTERVAL = "20"


@pytest.fixture(scope="module")
def node(k8s_client: client.ApiClient) -> Iterator[str]:
    """A Node whose spec.podCIDRs is the pod network the sidecar allows by default."""
    core = client.CoreV1Api(k8s_client)
    name = f"node-{uuid.uuid4().hex[:6]}"
    core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1NodeSpec(pod_cidr=NODE_CIDRS[0], pod_cidrs=NODE_CIDRS),
        )
    )
    yield name
    core.delete_node(name)


@pytest.fixture(scope="module")
def operator(
    k8s_client: client.ApiClient, node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        k8s_client,
        tmp_path_factory.mktemp("operator"),
        settings={
            "exporter_image": "registry.test/prosody-exporter:test",
            "manual_interval": MANUAL_INTERVAL,
            "service_monitor_labels": "release=kube-prometheus-stack",
        },
    )
    process.install_identity()
    try:
        process.start()
        yield process
    finally:
        process.uninstall()


# --- helpers ------------------------------------------------------------------------------


def prosody_config(interval: str, extra: str = "") -> str:
    return f"""
modules_enabled = {{ "http_openmetrics", "roster" }}
statistics = "internal"
statistics_interval = {interval}
{extra}
VirtualHost "example.test"
"""


def deployment(
    name: str,
    configmap: str | None,
    annotations: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    kind: str = "Deployment",
) -> dict[str, Any]:
    return prosody_workload(kind, name, configmap, annotations=annotations, env=env)


KINDS = ["Deployment", "StatefulSet"]
PATCH = {
    "Deployment": "patch_namespaced_deployment",
    "StatefulSet": "patch_namespaced_stateful_set",
}
DELETE = {
    "Deployment": "delete_namespaced_deployment",
    "StatefulSet": "delete_namespaced_stateful_set",
}


class Cluster:
    """Small readers over the API, for assertions."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def create_configmap(self, name: str, files: dict[str, str]) -> None:
        self.core.create_namespaced_config_map(
            self.namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=files)
        )

    def replace_configmap(self, name: str, files: dict[str, str]) -> None:
        self.core.patch_namespaced_config_map(name, self.namespace, {"data": files})

    def create_deployment(self, body: dict[str, Any]) -> None:
        """A Deployment, StatefulSet or DaemonSet."""
        utils.create_from_dict(self.api, body, namespace=self.namespace)

    def patch_workload(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        getattr(self.apps, PATCH[kind])(name, self.namespace, patch)

    def pods(self, app: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"app={app}")
        return [self.api.sanitize_for_serialization(p) for p in pods.items]

    def service_monitor(self, deployment_name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = or_none(
            lambda: self.custom.get_namespaced_custom_object(  # type: ignore[arg-type,return-value]
                "monitoring.coreos.com",
                "v1",
                self.namespace,
                "servicemonitors",
                f"{deployment_name}-prosody-metrics",
            )
        )
        return found

    def service(self, deployment_name: str) -> client.V1Service | None:
        name = f"{deployment_name}-prosody-metrics"
        return or_none(lambda: self.core.read_namespaced_service(name, self.namespace))

    def events(self, name: str) -> list[client.CoreV1Event]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return list(events.items)

    def wait_for_event(
        self, name: str, reason: str, contains: str = "", timeout: float = 30
    ) -> str:
        found: list[str] = []

        def has_event() -> bool:
            found[:] = [
                e.message or ""
                for e in self.events(name)
                if e.reason == reason and contains in (e.message or "")
            ]
            return bool(found)

        wait_until(has_event, timeout, f"a {reason} event on {name} containing {contains!r}")
        return found[0]

    def wait_for_interval(self, name: str, interval: str, timeout: float = 30) -> dict[str, Any]:
        def has_interval() -> bool:
            monitor = self.service_monitor(name)
            return bool(monitor) and monitor["spec"]["endpoints"][0]["interval"] == interval  # type: ignore[index]

        wait_until(has_interval, timeout, f"ServiceMonitor {name} with interval {interval}")
        monitor = self.service_monitor(name)
        assert monitor is not None
        return monitor

    def wait_for_pod(self, app: str, timeout: float = 30) -> dict[str, Any]:
        wait_until(lambda: bool(self.pods(app)), timeout, f"a pod of {app}")
        return self.pods(app)[0]


def sidecar(pod: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in pod["spec"]["containers"] if c["name"] == "prosody-exporter"), None)


def sidecar_env(pod: dict[str, Any]) -> dict[str, str]:
    found = sidecar(pod)
    assert found is not None, f"no sidecar in {[c['name'] for c in pod['spec']['containers']]}"
    return {e["name"]: e["value"] for e in found["env"]}


@pytest.fixture
def cluster(k8s_client: client.ApiClient, namespace: str, operator: OperatorProcess) -> Cluster:
    # Pods here must pass Pod Security "restricted", sidecar included.
    client.CoreV1Api(k8s_client).patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    return Cluster(k8s_client, namespace)


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_annotated_workload_gets_sidecar_service_and_service_monitor(cluster: Cluster, kind):
    cluster.create_configmap("prosody", {"prosody.cfg.lua": prosody_config("45")})
    cluster.create_deployment(deployment("xmpp", "prosody", kind=kind))

    pod = cluster.wait_for_pod("xmpp")
    env = sidecar_env(pod)
    assert env["PROSODY_EXPORTER_INTERVAL"] == "45s"
    assert env["PROSODY_EXPORTER_ALLOW_CIDRS"] == ",".join(NODE_CIDRS)
    assert sidecar(pod)["image"] == "registry.test/prosody-exporter:test"  # type: ignore[index]
    status = json.loads(pod["metadata"]["annotations"][ann.STATUS])
    assert status["version"] == "0.1.0" and status["hash"]

    monitor = cluster.wait_for_interval("xmpp", "45s")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["ownerReferences"][0]["kind"] == kind
    service = cluster.service("xmpp")
    assert service is not None and service.spec.selector == {"app": "xmpp"}
    assert service.spec.ports[0].target_port == "metrics"
    message = cluster.wait_for_event("xmpp", "MetricsConfigured", "interval 45s")
    assert "prosody.cfg.lua" in message


@pytest.mark.parametrize(
    ("files", "env", "expected"),
    [
        ({"prosody.cfg.lua": prosody_config('"manual"')}, {}, MANUAL_INTERVAL + "s"),
        (
            {
                "prosody.cfg.lua": prosody_config("60", 'Include "stats.cfg.lua"'),
                "stats.cfg.lua": "statistics_interval = 15\n",
            },
            {},
            "15s",
        ),
        (
            {"prosody.cfg.lua": prosody_config("ENV_PROSODY_STATISTICS_INTERVAL")},
            {"PROSODY_STATISTICS_INTERVAL": "25"},
            "25s",
        ),
    ],
    ids=["manual", "include", "env"],
)
def test_interval_from_prosody_config(cluster: Cluster, files, env, expected):
    cluster.create_configmap("prosody", files)
    cluster.create_deployment(deployment("xmpp", "prosody", env=env))
    cluster.wait_for_interval("xmpp", expected)
    assert sidecar_env(cluster.wait_for_pod("xmpp"))["PROSODY_EXPORTER_INTERVAL"] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_editing_the_configmap_updates_the_interval(cluster: Cluster, kind):
    cluster.create_configmap("prosody", {"prosody.cfg.lua": prosody_config("45")})
    cluster.create_deployment(deployment("xmpp", "prosody", kind=kind))
    cluster.wait_for_interval("xmpp", "45s")
    cluster.wait_for_pod("xmpp")
    cluster.replace_configmap("prosody", {"prosody.cfg.lua": prosody_config("90")})
    cluster.wait_for_interval("xmpp", "90s")
    message = cluster.wait_for_event("xmpp", "MetricsConfigured", "90s")
    assert f"rollout restart {kind.lower()}/xmpp" in message


def test_config_problems_become_warning_events(cluster: Cluster):
    broken = 'statistics = "internal"\nVirtualHost "example.test"\nstatistics_interval = 10\n'
    cluster.create_configmap("prosody", {"prosody.cfg.lua": broken})
    cluster.create_deployment(deployment("xmpp", "prosody"))
    cluster.wait_for_interval("xmpp", "60s")  # the misplaced setting has no effect
    message = cluster.wait_for_event("xmpp", "ProsodyConfig", "prosody.cfg.lua:3")
    assert "statistics_interval" in message


@pytest.mark.parametrize("kind", KINDS)
def test_removing_the_annotation_deletes_service_and_monitor(cluster: Cluster, kind):
    cluster.create_configmap("prosody", {"prosody.cfg.lua": prosody_config("45")})
    cluster.create_deployment(deployment("xmpp", "prosody", kind=kind))
    cluster.wait_for_interval("xmpp", "45s")
    patch = {"spec": {"template": {"metadata": {"annotations": {ann.INJECT: "false"}}}}}
    cluster.patch_workload(kind, "xmpp", patch)
    wait_until(
        lambda: cluster.service_monitor("xmpp") is None and cluster.service("xmpp") is None,
        30,
        "Service and ServiceMonitor to be deleted",
    )
    cluster.wait_for_event("xmpp", "MetricsRemoved")


@pytest.mark.parametrize("kind", KINDS)
def test_deleting_the_workload_garbage_collects_them(cluster: Cluster, kind):
    cluster.create_deployment(deployment("xmpp", None, kind=kind))
    cluster.wait_for_interval("xmpp", "60s")
    getattr(cluster.apps, DELETE[kind])("xmpp", cluster.namespace, propagation_policy="Foreground")
    wait_until(
        lambda: cluster.service_monitor("xmpp") is None and cluster.service("xmpp") is None,
        60,
        "garbage collection of Service and ServiceMonitor",
    )


def test_invalid_annotations_admit_the_pod_and_explain(cluster: Cluster):
    bad = {ann.PORT: "99999", ann.ALLOW_CIDRS: "not-a-cidr", ann.INTERVAL: "often"}
    cluster.create_deployment(deployment("xmpp", None, annotations=bad))
    pod = cluster.wait_for_pod("xmpp")
    env = sidecar_env(pod)  # injected, with the defaults in place of the invalid values
    assert env["PROSODY_EXPORTER_LISTEN_PORT"] == "9755"
    assert env["PROSODY_EXPORTER_ALLOW_CIDRS"] == ",".join(NODE_CIDRS)
    for key in (ann.PORT, ann.ALLOW_CIDRS, ann.INTERVAL):
        cluster.wait_for_event("xmpp", "InvalidAnnotation", key)


def test_opt_out_annotation_skips_injection(cluster: Cluster):
    body = deployment("xmpp", None)
    body["spec"]["template"]["metadata"]["annotations"][ann.INJECT] = "false"
    cluster.create_deployment(body)
    assert sidecar(cluster.wait_for_pod("xmpp")) is None
    time.sleep(2)  # give the reconciler a chance to (wrongly) act
    assert cluster.service_monitor("xmpp") is None


@pytest.mark.parametrize("kind", KINDS)
def test_webhook_down_admits_pods_and_restart_reports_drift(
    cluster: Cluster, operator: OperatorProcess, kind
):
    operator.stop()
    try:
        started = time.monotonic()
        cluster.create_deployment(deployment("xmpp", None, kind=kind))
        pod = cluster.wait_for_pod("xmpp")
        assert sidecar(pod) is None  # failurePolicy Ignore: admitted without the sidecar
        assert time.monotonic() - started < 20
    finally:
        operator.start()
    message = cluster.wait_for_event("xmpp", "SidecarMissing")
    assert f"rollout restart {kind.lower()}/xmpp" in message
    # Converged with no duplicates after the restart.
    cluster.wait_for_interval("xmpp", "60s")
    monitors = cluster.custom.list_namespaced_custom_object(
        "monitoring.coreos.com", "v1", cluster.namespace, "servicemonitors"
    )
    assert len(monitors["items"]) == 1  # type: ignore[index]


def test_dry_run_has_no_side_effects(cluster: Cluster):
    def pod(name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {ann.INJECT: "true"},
                "annotations": {ann.INJECT: "true", ann.PORT: "bogus"},
            },
            "spec": deployment("x", None)["spec"]["template"]["spec"],
        }

    dry = cluster.core.create_namespaced_pod(cluster.namespace, pod("dry"), dry_run="All")
    assert any(c.name == "prosody-exporter" for c in dry.spec.containers)  # mutated all the same
    cluster.core.create_namespaced_pod(cluster.namespace, pod("wet"))
    cluster.wait_for_event("wet", "InvalidAnnotation", ann.PORT)  # a real request reports
    assert cluster.events("dry") == []  # the dry run did not


def writes_to_metrics_objects(api: client.ApiClient) -> float:
    """Writes the API server has served for Services and ServiceMonitors, from its own metrics."""
    method, url, headers, body, _ = api.param_serialize("GET", "/metrics")
    response = api.call_api(method, url, headers, body)
    response.read()
    text = response.data.decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "apiserver_request"
        for sample in family.samples
        if sample.name == "apiserver_request_total"
        and sample.labels.get("resource") in ("services", "servicemonitors")
        and sample.labels.get("verb") in ("APPLY", "PATCH", "UPDATE", "CREATE")
    )


def test_no_write_when_nothing_changed(cluster: Cluster):
    cluster.create_configmap("prosody", {"prosody.cfg.lua": prosody_config("45")})
    cluster.create_deployment(deployment("xmpp", "prosody"))
    cluster.wait_for_interval("xmpp", "45s")
    cluster.wait_for_event("xmpp", "ScalingReplicaSet")
    # The count is cluster-wide: let earlier tests' namespaces finish going away first (their
    # teardown writes to their own Services), and the Deployment's status updates settle.
    wait_until(
        lambda: all(ns.status.phase != "Terminating" for ns in cluster.core.list_namespace().items),
        90,
        "earlier tests' namespaces to be deleted",
    )
    time.sleep(3)
    before = writes_to_metrics_objects(cluster.api)
    # Deployment and ConfigMap events that change none of the inputs: a label, a comment.
    cluster.apps.patch_namespaced_deployment(
        "xmpp", cluster.namespace, {"metadata": {"labels": {"touched": "yes"}}}
    )
    cluster.replace_configmap("prosody", {"prosody.cfg.lua": prosody_config("45", "-- hi")})
    time.sleep(3)  # let the reconciler see both events
    assert writes_to_metrics_objects(cluster.api) == before
    # ... while a real change is one write.
    cluster.replace_configmap("prosody", {"prosody.cfg.lua": prosody_config("50")})
    cluster.wait_for_interval("xmpp", "50s")
    assert writes_to_metrics_objects(cluster.api) == before + 1


def create_prometheus(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Prometheus",
        "metadata": {"name": name},
        "spec": spec,
    }
    cluster.custom.create_namespaced_custom_object(
        "monitoring.coreos.com", "v1", cluster.namespace, "prometheuses", body
    )


def test_selection_diagnostics(cluster: Cluster):
    """The classic silent failure: a Prometheus whose selector misses the ServiceMonitor."""
    cluster.create_deployment(deployment("xmpp", None))
    cluster.wait_for_interval("xmpp", "60s")
    create_prometheus(
        cluster,
        "missing",
        {
            "serviceMonitorSelector": {"matchLabels": {"release": "prom"}},
            "serviceMonitorNamespaceSelector": {},
        },
    )
    message = cluster.wait_for_event("xmpp", "NotSelectedByPrometheus", "release=prom")
    assert f"{cluster.namespace}/missing selects ServiceMonitors with release=prom" in message
    create_prometheus(
        cluster,
        "matching",
        {"serviceMonitorSelector": {"matchLabels": {"release": "kube-prometheus-stack"}}},
    )
    cluster.wait_for_event("xmpp", "SelectedByPrometheus", f"{cluster.namespace}/matching")
    wait_until(
        lambda: (
            cluster.service_monitor("xmpp")["metadata"]["annotations"][ann.SELECTED_BY]  # type: ignore[index]
            == f"{cluster.namespace}/matching"
        ),
        30,
        "the selected-by annotation",
    )
    # The ServiceMonitor changed, its interval did not: no advice to restart the pods.
    configured = [e.message for e in cluster.events("xmpp") if e.reason == "MetricsConfigured"]
    assert configured and not any("rollout restart" in m for m in configured), configured


@pytest.mark.parametrize("kind", KINDS)
def test_restart_on_drift_restarts_the_rollout(cluster: Cluster, operator: OperatorProcess, kind):
    operator.stop()
    cluster.create_deployment(deployment("xmpp", None, kind=kind))
    assert sidecar(cluster.wait_for_pod("xmpp")) is None
    operator.settings["restart_on_drift"] = "true"
    try:
        operator.start()
        message = cluster.wait_for_event("xmpp", "SidecarMissing", "Restarting the rollout")
        assert "xmpp-" in message
        read = getattr(cluster.apps, PATCH[kind].replace("patch", "read"))
        template = read("xmpp", cluster.namespace).spec.template
        assert "kubectl.kubernetes.io/restartedAt" in template.metadata.annotations
        if kind == "Deployment":  # a StatefulSet waits for its Pending pod to be Ready first
            wait_until(
                lambda: any(sidecar(pod) for pod in cluster.pods("xmpp")),
                30,
                "a new pod, with the sidecar",
            )
    finally:
        operator.stop()
        del operator.settings["restart_on_drift"]
        operator.start()


# --- opting in: namespaces and workloads ------------------------------------------------------


def not_prosody(name: str) -> dict[str, Any]:
    """A Deployment of something else than Prosody, not opted in."""
    container = {**prosody_pod_spec(None)["containers"][0], "name": "web", "image": "nginx:1.27"}
    return prosody_workload("Deployment", name, None, opted_in=False, containers=[container])


def test_a_labelled_namespace_gets_only_its_prosody_pods_injected(cluster: Cluster):
    cluster.create_deployment(prosody_workload("Deployment", "xmpp", None, opted_in=False))
    assert sidecar(cluster.wait_for_pod("xmpp")) is None  # not opted in yet
    cluster.core.patch_namespace(cluster.namespace, {"metadata": {"labels": {ann.INJECT: "true"}}})
    # The namespace's workloads are candidates now: the existing pod is reported.
    cluster.wait_for_interval("xmpp", "60s")
    assert "rollout restart deployment/xmpp" in cluster.wait_for_event("xmpp", "SidecarMissing")

    cluster.create_deployment(prosody_workload("Deployment", "chat", None, opted_in=False))
    cluster.create_deployment(not_prosody("web"))
    opted_out = prosody_workload("Deployment", "quiet", None, opted_in=False)
    opted_out["spec"]["template"]["metadata"]["labels"][ann.INJECT] = "false"
    cluster.create_deployment(opted_out)
    assert sidecar(cluster.wait_for_pod("chat")) is not None
    cluster.wait_for_interval("chat", "60s")
    for other in ("web", "quiet"):
        pod = cluster.wait_for_pod(other)
        assert sidecar(pod) is None and ann.STATUS not in (pod["metadata"].get("annotations") or {})
    time.sleep(2)  # give the reconciler a chance to (wrongly) act
    for other in ("web", "quiet"):
        assert cluster.service_monitor(other) is None
        assert not [e for e in cluster.events(other) if e.source.component == "prosody-operator"]


def test_a_workload_annotation_whose_pods_never_reach_the_webhook_says_what_to_add(
    cluster: Cluster,
):
    body = prosody_workload("Deployment", "xmpp", None, opted_in=False)
    body["metadata"]["annotations"] = {ann.INJECT: "true"}
    cluster.create_deployment(body)
    message = cluster.wait_for_event("xmpp", "WebhookNotCalled")
    assert f'add the label {ann.INJECT}: "true" to the pod template' in message
    assert f"kubectl label namespace {cluster.namespace} {ann.INJECT}=true" in message
    cluster.wait_for_interval("xmpp", "60s")
    assert sidecar(cluster.wait_for_pod("xmpp")) is None
    assert [e for e in cluster.events("xmpp") if e.reason == "SidecarMissing"] == []


# --- what the operator owns stays as it builds it -----------------------------------------------


def test_hand_edits_are_reverted(cluster: Cluster):
    cluster.create_deployment(deployment("xmpp", None))
    cluster.wait_for_interval("xmpp", "60s")
    cluster.custom.patch_namespaced_custom_object(
        "monitoring.coreos.com",
        "v1",
        cluster.namespace,
        "servicemonitors",
        "xmpp-prosody-metrics",
        {"spec": {"endpoints": [{"port": "metrics", "interval": "5s"}]}},
        _content_type="application/merge-patch+json",
    )
    cluster.wait_for_interval("xmpp", "60s")  # put back
    cluster.core.delete_namespaced_service("xmpp-prosody-metrics", cluster.namespace)
    wait_until(lambda: cluster.service("xmpp") is not None, 30, "the Service, made again")


# Objects as the operator's previous version wrote them (server-side applied with its field
# manager): another label scheme, and a hash of its inputs instead of the object's.
PREVIOUS_LABELS = {
    "app.kubernetes.io/managed-by": "prosody-operator",
    "prosody-operator.io/deployment": "xmpp",
}


def previous_version_objects(namespace: str, owner: dict[str, Any]) -> list[dict[str, Any]]:
    metadata = {
        "name": "xmpp-prosody-metrics",
        "namespace": namespace,
        "labels": PREVIOUS_LABELS,
        "annotations": {"prosody-operator.io/inputs-hash": "2c620c7809ec3bba"},
        "ownerReferences": [owner],
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": {"app": "xmpp"},
            "ports": [
                {"name": "metrics", "port": 9755, "targetPort": "metrics", "protocol": "TCP"}
            ],
        },
    }
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {**metadata, "labels": {**PREVIOUS_LABELS, "release": "kube-prometheus-stack"}},
        "spec": {
            "selector": {"matchLabels": PREVIOUS_LABELS},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "60s"}],
        },
    }
    return [service, monitor]


def test_an_upgrade_rolls_out_what_the_new_version_builds(
    cluster: Cluster, operator: OperatorProcess
):
    """Same inputs, other builders: every existing object is rewritten to the new build, and
    what only the previous version set is gone (server-side apply drops a manager's fields it
    no longer applies)."""
    operator.stop()
    try:
        cluster.create_deployment(deployment("xmpp", None))
        uid = cluster.apps.read_namespaced_deployment("xmpp", cluster.namespace).metadata.uid
        owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "xmpp", "uid": uid}
        owner.update(controller=True, blockOwnerDeletion=True)
        # The objects as the previous version applied them.
        for obj in previous_version_objects(cluster.namespace, owner):
            if obj["kind"] == "Service":
                cluster.core.patch_namespaced_service(
                    obj["metadata"]["name"], cluster.namespace, obj,
                    field_manager="prosody-operator", _content_type="application/apply-patch+yaml",
                )  # fmt: skip
            else:
                cluster.custom.patch_namespaced_custom_object(
                    "monitoring.coreos.com", "v1", cluster.namespace, "servicemonitors",
                    obj["metadata"]["name"], obj,
                    field_manager="prosody-operator", _content_type="application/apply-patch+yaml",
                )  # fmt: skip
        made_with_cluster_ip = cluster.service("xmpp")
        assert made_with_cluster_ip is not None
        assert made_with_cluster_ip.spec.cluster_ip not in (None, "None")
    finally:
        operator.start()

    def upgraded() -> bool:
        monitor, service = cluster.service_monitor("xmpp"), cluster.service("xmpp")
        return (
            monitor is not None
            and service is not None
            and ann.OBJECT_HASH in monitor["metadata"]["annotations"]
            and ann.OBJECT_HASH in (service.metadata.annotations or {})
        )

    wait_until(upgraded, 30, "the objects rewritten by the new version")
    monitor, service = cluster.service_monitor("xmpp"), cluster.service("xmpp")
    assert monitor is not None and service is not None
    for labels, notes in (
        (monitor["metadata"]["labels"], monitor["metadata"]["annotations"]),
        (service.metadata.labels, service.metadata.annotations),
    ):
        assert labels[ann.WORKLOAD] == "xmpp" and labels[ann.WORKLOAD_KIND] == "Deployment"
        assert "prosody-operator.io/deployment" not in labels
        assert "prosody-operator.io/inputs-hash" not in notes
    assert monitor["spec"]["selector"]["matchLabels"][ann.WORKLOAD] == "xmpp"
    assert "prosody-operator.io/deployment" not in monitor["spec"]["selector"]["matchLabels"]
    # The previous version's Service had a ClusterIP, which cannot change in place: it was
    # deleted and made again, headless.
    assert service.spec.cluster_ip == "None"
    assert service.metadata.uid != made_with_cluster_ip.metadata.uid
    assert monitor["spec"]["endpoints"][0]["scrapeTimeout"] == "10s"
