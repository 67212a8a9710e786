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
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kubernetes import client, utils

from prosody_operator import annotations as ann
from prosody_operator import names
from prosody_operator.kube import FIELD_MANAGER, Kube
from testinfra import controlplane
from testinfra.kubeapi import node_with_pod_cidrs, or_none, requests_served
from testinfra.operator import OperatorProcess
from testinfra.procs import free_port, wait_until
from testinfra.webhook import pod_admission_review
from testinfra.workloads import prosody_pod_spec, prosody_workload

pytestmark = pytest.mark.cluster

NODE_CIDRS = ["198.18.64.0/24", "2001:db8:64::/64"]
MANUAL_INTERVAL = "20"


@pytest.fixture(scope="module")
def node(k8s_client: client.ApiClient) -> Iterator[str]:
    """A Node whose spec.podCIDRs is the pod network the sidecar allows by default."""
    with node_with_pod_cidrs(k8s_client, NODE_CIDRS) as name:
        yield name


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
                names.metrics_object_name(deployment_name),
            )
        )
        return found

    def service(self, deployment_name: str) -> client.V1Service | None:
        name = names.metrics_object_name(deployment_name)
        return or_none(lambda: self.core.read_namespaced_service(name, self.namespace))

    def events(self, name: str, source: str = "") -> list[client.CoreV1Event]:
        """The Events on the object; from `source` only (the operator's: FIELD_MANAGER)."""
        selector = f"involvedObject.name={name}" + (f",source={source}" if source else "")
        events = self.core.list_namespaced_event(self.namespace, field_selector=selector)
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

    def wait_for_rollout_status(self, name: str) -> None:
        """A Deployment's status as it stays while its pods are Pending (no kubelet here)."""

        def settled() -> bool:
            found = self.apps.read_namespaced_deployment(name, self.namespace)
            status = found.status
            return bool(
                status.observed_generation == found.metadata.generation
                and status.replicas == status.updated_replicas == status.unavailable_replicas == 1
            )

        wait_until(settled, 30, f"the rollout status of {name}")
        time.sleep(1)  # the controller's last status write reaches the operator

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
    # The first pod may be admitted before the operator's first evaluation of this config ends
    # (admission waits 200 ms, then injects the fallbacks: tested in test_evaluation_cluster.py).
    # Once the reconciler has it, it is cached: a pod created now gets it at admission.
    cluster.wait_for_interval("xmpp", "45s")
    first = cluster.wait_for_pod("xmpp")
    cluster.core.delete_namespaced_pod(first["metadata"]["name"], cluster.namespace)
    wait_until(
        lambda: any(p["metadata"]["uid"] != first["metadata"]["uid"] for p in cluster.pods("xmpp")),
        60,
        "the pod made again",
    )
    (pod,) = [p for p in cluster.pods("xmpp") if p["metadata"]["uid"] != first["metadata"]["uid"]]
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


def test_unchanged_findings_are_not_posted_again_on_status_updates(cluster: Cluster):
    """Every status update of a Deployment is a reconcile: a finding that has not changed is
    posted once, not once per reconcile."""
    broken = 'statistics = "internal"\nVirtualHost "example.test"\nstatistics_interval = 10\n'
    cluster.create_configmap("prosody", {"prosody.cfg.lua": broken})
    cluster.create_deployment(deployment("xmpp", "prosody"))
    cluster.wait_for_event("xmpp", "ProsodyConfig", "prosody.cfg.lua:3")
    for replicas in (2, 3, 1):  # spec and status updates, each a reconcile
        cluster.patch_workload("Deployment", "xmpp", {"spec": {"replicas": replicas}})
        wait_until(lambda replicas=replicas: len(cluster.pods("xmpp")) == replicas, 30, "the pods")
    cluster.wait_for_rollout_status("xmpp")
    findings = [e.message for e in cluster.events("xmpp") if e.reason == "ProsodyConfig"]
    assert len(findings) == len(set(findings)) >= 1, findings  # each posted once


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
    # Requests above limits: the API server would reject the pod.
    bad[ann.RESOURCES] = '{"requests": {"memory": "200Mi"}, "limits": {"memory": "100Mi"}}'
    cluster.create_deployment(deployment("xmpp", None, annotations=bad))
    pod = cluster.wait_for_pod("xmpp")
    env = sidecar_env(pod)  # injected, with the defaults in place of the invalid values
    assert env["PROSODY_EXPORTER_LISTEN_PORT"] == "9755"
    assert env["PROSODY_EXPORTER_ALLOW_CIDRS"] == ",".join(NODE_CIDRS)
    assert sidecar(pod)["resources"]["limits"] == {"memory": "104Mi"}  # type: ignore[index]
    for key in (ann.PORT, ann.ALLOW_CIDRS, ann.INTERVAL):
        cluster.wait_for_event("xmpp", "InvalidAnnotation", key)
    cluster.wait_for_event("xmpp", "InvalidAnnotation", "the memory request 200Mi is above")


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


def create_pod_warnings(cluster: Cluster, body: dict[str, Any], dry_run: bool = False) -> str:
    """Create a pod; the API server's Warning headers (admission warnings among them)."""
    query = [("dryRun", "All")] if dry_run else []
    request = cluster.api.param_serialize(
        "POST",
        f"/api/v1/namespaces/{cluster.namespace}/pods",
        query_params=query,
        header_params={"Content-Type": "application/json", "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = cluster.api.call_api(*request)
    created = json.loads(response.read())
    assert response.status == 201, created
    assert any(c["name"] == "prosody-exporter" for c in created["spec"]["containers"])
    return str(response.headers.get("Warning", ""))


def test_the_webhook_warns_the_client_and_writes_nothing(cluster: Cluster):
    """A bare pod with an invalid annotation, created for real and as a dry run: both are
    mutated and warned about; no Event is posted for either (the webhook writes nothing; for
    a workload's pods the reconciler reports on the workload)."""

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

    for name, dry_run in (("dry", True), ("wet", False)):
        assert ann.PORT in create_pod_warnings(cluster, pod(name), dry_run)
    time.sleep(2)  # give the operator a chance to (wrongly) post
    # The scheduler posts its own (no node for the pod): only the operator's count.
    assert cluster.events("dry", FIELD_MANAGER) == [] and cluster.events("wet", FIELD_MANAGER) == []


def forge_admission_review(
    operator: OperatorProcess, namespace: str, token: str, configmap: str
) -> dict[str, Any]:
    """What anyone who reaches the webhook's port can send: kopf's server checks no client
    certificate, so nothing tells the API server's calls from others."""
    spec = prosody_pod_spec(None)
    spec["volumes"] = [{"name": "config", "configMap": {"name": configmap}}]
    spec["containers"][0]["volumeMounts"] = [{"name": "config", "mountPath": "/etc/prosody"}]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"forged-{token}",
            "namespace": namespace,
            "labels": {ann.INJECT: "true"},
            "annotations": {ann.INJECT: "true", ann.PORT: f"attacker-text-{token}"},
        },
        "spec": spec,
    }
    review = pod_admission_review(pod, namespace, username="attacker")
    response = httpx.post(f"{operator.webhook_url}/inject-exporter", json=review, verify=False)
    answer: dict[str, Any] = response.json()["response"]
    return answer


def test_a_forged_admission_review_reads_nothing_outside_and_writes_nothing(
    cluster: Cluster, operator: OperatorProcess
):
    """A review for a pod in a namespace the API server never sends (kube-system) is answered
    without reading anything there; one for a served namespace may read that namespace's
    ConfigMaps (the pod's own), but posts no Event with the sender's text anywhere."""
    token = uuid.uuid4().hex[:8]
    outside = forge_admission_review(operator, "kube-system", token, "kube-root-ca.crt")
    assert outside["allowed"] and "patch" not in outside, outside
    inside = forge_admission_review(operator, cluster.namespace, token, "kube-root-ca.crt")
    assert inside["allowed"] and "patch" in inside  # injected, as for a real pod
    time.sleep(2)  # give the operator a chance to (wrongly) post
    events = cluster.core.list_event_for_all_namespaces().items
    assert not [e for e in events if token in (e.message or "")]


def writes_to_metrics_objects(api: client.ApiClient) -> float:
    """Writes the API server has served for Services and ServiceMonitors."""
    return requests_served(
        api, ("services", "servicemonitors"), ("APPLY", "PATCH", "UPDATE", "CREATE")
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
    operator.apply_identity()  # the chart's RBAC with sidecar.restartOnDrift: patch on workloads
    try:
        assert may(operator, "patch", "apps", KINDS_PLURAL[kind], cluster.namespace)
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
        operator.apply_identity()
        operator.start()


def test_restart_on_drift_waits_for_a_ready_webhook_endpoint(
    cluster: Cluster, operator: OperatorProcess
):
    """With its webhook Service known (the chart's), the operator restarts a rollout for pods
    without the sidecar only once that Service has a ready endpoint, as the API server reads
    it from the EndpointSlices: before, the new pods would lack the sidecar too. It says so
    once in its log, and looks again every few seconds. No pod runs the webhook here (the
    operator is a local process, called at its URL): the Service has no selector, and this
    test writes its EndpointSlice, as the endpoint-slice controller does for the chart's."""
    discovery = client.DiscoveryV1Api(operator.api)
    service = f"{operator.fullname}-webhook"

    def endpoint_slice(ready: bool) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": service, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.18.64.10"], "conditions": {"ready": ready}}],
            "ports": [{"name": "https", "port": 9443, "protocol": "TCP"}],
        }

    def reconciles() -> float:
        text = httpx.get(operator.metrics_url, timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("prosody_operator_reconciles_total{")
        )

    operator.stop()
    cluster.create_deployment(deployment("xmpp", None))
    assert sidecar(cluster.wait_for_pod("xmpp")) is None
    operator.settings["restart_on_drift"] = "true"
    operator.settings["webhook_service"] = f"{operator.namespace}/{service}"
    operator.apply_identity()
    cluster.core.create_namespaced_service(
        operator.namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name=service),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=443, target_port=9443)]),
        ),
    )
    discovery.create_namespaced_endpoint_slice(operator.namespace, endpoint_slice(ready=False))
    logged = len(operator.log_text())
    try:
        assert may(operator, "list", "discovery.k8s.io", "endpointslices", operator.namespace)
        assert not may(operator, "list", "discovery.k8s.io", "endpointslices", cluster.namespace)
        operator.start()
        message = cluster.wait_for_event("xmpp", "SidecarMissing", "once the webhook Service")
        assert f"{operator.namespace}/{service} has a ready endpoint" in message
        seen = reconciles()
        wait_until(lambda: reconciles() >= seen + 2, 60, "the workload to be looked at again")
        template = cluster.apps.read_namespaced_deployment("xmpp", cluster.namespace).spec.template
        assert "kubectl.kubernetes.io/restartedAt" not in (template.metadata.annotations or {})
        deferred = operator.log_text()[logged:].count("rollout restart deferred")
        assert deferred == 1, operator.log_text()[logged:]

        discovery.replace_namespaced_endpoint_slice(
            service, operator.namespace, endpoint_slice(ready=True)
        )
        cluster.wait_for_event("xmpp", "SidecarMissing", "Restarting the rollout.")
        template = cluster.apps.read_namespaced_deployment("xmpp", cluster.namespace).spec.template
        assert "kubectl.kubernetes.io/restartedAt" in template.metadata.annotations
        wait_until(
            lambda: any(sidecar(pod) for pod in cluster.pods("xmpp")),
            30,
            "a new pod, with the sidecar",
        )
    finally:
        operator.stop()
        del operator.settings["restart_on_drift"], operator.settings["webhook_service"]
        or_none(lambda: discovery.delete_namespaced_endpoint_slice(service, operator.namespace))
        or_none(lambda: cluster.core.delete_namespaced_service(service, operator.namespace))
        operator.apply_identity()
        operator.start()


KINDS_PLURAL = {"Deployment": "deployments", "StatefulSet": "statefulsets"}


def may(
    operator: OperatorProcess,
    verb: str,
    group: str,
    resource: str,
    namespace: str | None = None,
    name: str | None = None,
) -> bool:
    """Whether the operator's ServiceAccount may, as the API server's authorizer answers."""
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{operator.namespace}:{operator.fullname}",
            groups=["system:serviceaccounts", f"system:serviceaccounts:{operator.namespace}"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=resource, namespace=namespace, name=name
            ),
        )
    )
    answer = client.AuthorizationV1Api(operator.api).create_subject_access_review(review)
    return bool(answer.status.allowed)


def test_least_privilege(cluster: Cluster, operator: OperatorProcess):
    """The rights this suite's operator runs with (the chart's defaults): no patch on
    workloads without restartOnDrift, and of webhook configurations only get and patch of its
    own — which its server-side apply of the caBundle needs (it started: it applied it)."""
    webhooks = ("admissionregistration.k8s.io", "mutatingwebhookconfigurations")
    assert not may(operator, "create", *webhooks)
    assert may(operator, "patch", *webhooks, name=operator.webhook_configuration)
    assert not may(operator, "patch", *webhooks, name="someone-elses")
    assert not may(operator, "delete", *webhooks, name=operator.webhook_configuration)
    for resource in ("deployments", "statefulsets", "daemonsets"):
        assert may(operator, "watch", "apps", resource, cluster.namespace)
        assert not may(operator, "patch", "apps", resource, cluster.namespace)
    assert not may(operator, "get", "", "secrets", cluster.namespace)
    # EndpointSlices only with restartOnDrift, and then only its own namespace's.
    for namespace in (operator.namespace, cluster.namespace):
        assert not may(operator, "list", "discovery.k8s.io", "endpointslices", namespace)


def limited(body: dict[str, Any]) -> dict[str, Any]:
    """Prosody's container with requests and limits, as a namespace's ResourceQuota requires."""
    (container,) = body["spec"]["template"]["spec"]["containers"]
    both = {"cpu": "100m", "memory": "128Mi"}
    container["resources"] = {"requests": both, "limits": both}
    return body


def test_a_resource_quota_requiring_cpu_limits(cluster: Cluster, operator: OperatorProcess):
    """A namespace whose ResourceQuota requires CPU and memory requests and limits of every
    container. With the chart's defaults the sidecar has no CPU limit, and the API server would
    reject the whole pod ("must specify limits.cpu"): it is admitted without the sidecar, and a
    Warning InjectionFailed on the workload names the quota and the value to set. With
    sidecar.resources.limits.cpu set, pods are admitted with the sidecar."""
    hard = {
        "requests.cpu": "4",
        "limits.cpu": "4",
        "requests.memory": "4Gi",
        "limits.memory": "4Gi",
    }
    cluster.core.create_namespaced_resource_quota(
        cluster.namespace,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="compute"), spec=client.V1ResourceQuotaSpec(hard=hard)
        ),
    )
    # The API server admits no pod until the quota controller has computed the quota's status.
    wait_until(
        lambda: bool(
            cluster.core.read_namespaced_resource_quota("compute", cluster.namespace).status.hard
        ),
        30,
        "the quota's status",
    )
    cluster.create_deployment(limited(deployment("xmpp", None)))
    # (A pod created before the operator saw the quota is rejected; the ReplicaSet retries.)
    assert sidecar(cluster.wait_for_pod("xmpp", timeout=60)) is None
    message = cluster.wait_for_event("xmpp", "InjectionFailed", "ResourceQuota compute")
    assert "requires limits.cpu of every container" in message
    assert "sidecar.resources" in message

    operator.stop()
    operator.settings["sidecar_cpu_limit"] = "200m"
    try:
        operator.start()
        cluster.create_deployment(limited(deployment("chat", None)))
        with_sidecar = sidecar(cluster.wait_for_pod("chat", timeout=60))
        assert with_sidecar is not None and with_sidecar["resources"]["limits"]["cpu"] == "200m"
    finally:
        operator.stop()
        del operator.settings["sidecar_cpu_limit"]
        operator.start()


# --- faults: the API server, the operator ---------------------------------------------------


def test_a_write_the_api_server_fails_is_retried(cluster: Cluster, operator: OperatorProcess):
    """A real 500: a validating webhook the API server cannot reach, with failurePolicy Fail,
    on this namespace's ServiceMonitors. The reconcile of a ConfigMap change fails; once the
    API server accepts writes again, it is retried without any further event."""
    cluster.create_configmap("prosody", {"prosody.cfg.lua": prosody_config("45")})
    cluster.create_deployment(deployment("xmpp", "prosody"))
    cluster.wait_for_interval("xmpp", "45s")
    cluster.wait_for_rollout_status("xmpp")  # no status update comes to reconcile it again
    admission = client.AdmissionregistrationV1Api(cluster.api)
    failing = f"fail-{cluster.namespace}"
    admission.create_validating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": failing},
            "webhooks": [
                {
                    "name": "fail.prosody-operator.test",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 1,
                    "rules": [
                        {
                            "apiGroups": ["monitoring.coreos.com"],
                            "apiVersions": ["v1"],
                            "resources": ["servicemonitors"],
                            "operations": ["CREATE", "UPDATE"],
                        }
                    ],
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}
                    },
                    "clientConfig": {"url": f"https://127.0.0.1:{free_port()}/"},  # nobody
                }
            ],
        }
    )
    try:
        cluster.replace_configmap("prosody", {"prosody.cfg.lua": prosody_config("90")})
        wait_until(lambda: "failed calling webhook" in operator.log_text(), 30, "the write to fail")
    finally:
        admission.delete_validating_webhook_configuration(failing)
    cluster.wait_for_interval("xmpp", "90s", timeout=60)


def test_the_api_server_restarting(cluster: Cluster, operator: OperatorProcess):
    """kube-apiserver stopped and started again (a control-plane upgrade): the operator keeps
    running, its watches resume, and what changed after the restart is followed."""
    cluster.create_configmap("prosody", {"prosody.cfg.lua": prosody_config("45")})
    cluster.create_deployment(deployment("xmpp", "prosody"))
    cluster.wait_for_interval("xmpp", "45s")
    away = controlplane.restart_apiserver()
    assert operator.process is not None and operator.process.running(), f"away {away:.1f} s"
    cluster.replace_configmap("prosody", {"prosody.cfg.lua": prosody_config("90")})
    cluster.wait_for_interval("xmpp", "90s", timeout=90)
    cluster.create_deployment(deployment("chat", None))
    assert sidecar(cluster.wait_for_pod("chat", timeout=60)) is not None
    cluster.wait_for_interval("chat", "60s", timeout=60)


def test_the_operator_killed_mid_reconcile(cluster: Cluster, operator: OperatorProcess):
    """SIGKILL while ten workloads are being reconciled: started again, it converges on every
    one of them, with one Service and one ServiceMonitor each (it keeps no state of its own)."""
    assert operator.process is not None
    names = [f"xmpp-{n}" for n in range(10)]
    for name in names:
        cluster.create_deployment(deployment(name, None))
    wait_until(lambda: cluster.service_monitor(names[0]) is not None, 30, "the first reconcile")
    operator.process.signal(signal.SIGKILL)
    operator.process.popen.wait()
    operator.start()
    for name in names:
        cluster.wait_for_interval(name, "60s", timeout=60)
    monitors = cluster.custom.list_namespaced_custom_object(
        "monitoring.coreos.com", "v1", cluster.namespace, "servicemonitors"
    )
    services = cluster.core.list_namespaced_service(cluster.namespace)
    assert len(monitors["items"]) == len(services.items) == len(names)  # type: ignore[index]


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


def test_objects_of_our_name_that_are_not_ours_are_never_changed_or_deleted(cluster: Cluster):
    """A user's own Service of the name the operator would use: not taken over while opted in
    (Warning NameConflict; the ServiceMonitor, free, is made), not deleted on opt-out."""
    theirs = client.V1Service(
        metadata=client.V1ObjectMeta(name="xmpp-prosody-metrics", labels={"mine": "yes"}),
        spec=client.V1ServiceSpec(selector={"app": "other"}, ports=[client.V1ServicePort(port=80)]),
    )
    cluster.core.create_namespaced_service(cluster.namespace, theirs)
    before = cluster.service("xmpp")
    assert before is not None
    cluster.create_deployment(deployment("xmpp", None))
    message = cluster.wait_for_event("xmpp", "NameConflict", "Service xmpp-prosody-metrics")
    assert "left as it is" in message
    cluster.wait_for_interval("xmpp", "60s")
    cluster.patch_workload(
        "Deployment",
        "xmpp",
        {"spec": {"template": {"metadata": {"annotations": {ann.INJECT: "false"}}}}},
    )
    wait_until(lambda: cluster.service_monitor("xmpp") is None, 30, "our ServiceMonitor deleted")
    after = cluster.service("xmpp")
    assert after is not None and after.metadata.uid == before.metadata.uid
    assert after.metadata.resource_version == before.metadata.resource_version  # untouched


def test_a_delete_names_the_uid_it_observed(cluster: Cluster):
    """A real 409: the object observed was replaced by another of the same name before the
    delete; the delete carries the uid observed, so the API server refuses it and the new
    object stays."""
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "xmpp-prosody-metrics", "namespace": cluster.namespace},
        "spec": {"ports": [{"port": 80}]},
    }
    old = cluster.core.create_namespaced_service(cluster.namespace, body)
    cluster.core.delete_namespaced_service("xmpp-prosody-metrics", cluster.namespace)
    new = cluster.core.create_namespaced_service(cluster.namespace, body)
    observed = {**body, "metadata": {**body["metadata"], "uid": old.metadata.uid}}
    Kube(cluster.api).delete(observed)  # the 409 is "not ours any more": no error
    service = cluster.service("xmpp")
    assert service is not None and service.metadata.uid == new.metadata.uid
    Kube(cluster.api).delete({**body, "metadata": {**body["metadata"], "uid": new.metadata.uid}})
    assert cluster.service("xmpp") is None


LONG_NAME = "chat." + "a" * 248  # 253 characters: the longest name a Deployment may have


def test_any_workload_name_gets_objects_of_its_own(cluster: Cluster):
    """Dots, a leading digit, 253 characters, two names alike in their first 63: each gets a
    valid Service and ServiceMonitor of its own (the names are cut, with a hash)."""
    workloads = ["chat.example.org", "0chat", LONG_NAME, LONG_NAME[:-1] + "b"]
    for name in workloads:
        body = deployment("xmpp", None)
        body["metadata"]["name"] = name
        cluster.create_deployment(body)
    for name in workloads:
        cluster.wait_for_interval(name, "60s")
        service = cluster.service(name)
        assert service is not None
        assert service.metadata.labels[ann.WORKLOAD] == names.label_value(name)
        assert service.metadata.owner_references[0].name == name
    assert not [e for name in workloads for e in cluster.events(name) if e.reason == "NameConflict"]


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
