"""prometheus-operator, the Prometheus pods it makes, and what the end-to-end tests and the demo do
with pods on the test node.

The chain, end to end (all real, all local):

    helm install -> prosody-operator pod -> webhook injects the sidecar into Prosody pods
    prosody-operator -> Service + ServiceMonitor
    prometheus-operator (.cache/bin, v0.85) -> Secret prometheus-<name> and a StatefulSet
    test node (kubelet, containerd) -> Prometheus pods (v3.5 and the config-reloader, images
    built from their Go modules) -> kubernetes_sd through the `kubernetes` Service -> scrape
    the sidecars at their pod IPs

* `PrometheusOperator`: the real binary on the host, with the admin kubeconfig, its web server
  on a free loopback port, limited to the given namespaces and to Prometheus objects carrying
  its `--controller-id`. It runs on the host rather than in a pod: its own install manifests are
  not this project's business, what it generates is.
* `create_prometheus()`: a ServiceAccount with read access to services, endpoints,
  endpointslices and pods of the namespace (and of any other whose ServiceMonitors it selects),
  and a `Prometheus` resource with the node's Prometheus image, so prometheus-operator's
  StatefulSet runs it on the node.
* `PrometheusPod`: one replica, read through its HTTP API at its pod IP (the host routes the pod
  network to the node). A new scrape configuration reaches it as a real kubelet delivers a
  changed Secret to a pod's volume, at its next sync of the pod: measured up to ~3 minutes here
  (its config-reloader then reloads within a second), so waits on it allow 5 minutes.
"""

from __future__ import annotations

import base64
import gzip
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client
from kubernetes.stream import stream

from . import controlplane
from .infraimages import CONFIG_RELOADER_IMAGE, PROMETHEUS_IMAGE
from .kubeapi import or_none
from .node import IMAGE_DIR, Node
from .procs import MissingPrerequisite, Process, ProcessOwner, free_port, http_ok, wait_until
from .xmpp import XmppSession

PROMETHEUS_VERSION = PROMETHEUS_IMAGE.name.rsplit(":", 1)[1]


# --- prometheus-operator ------------------------------------------------------------------------


@dataclass
class PrometheusOperator(ProcessOwner):
    """The real prometheus-operator against the local control plane (as admin)."""

    workdir: Path
    namespaces: list[str]
    controller_id: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:6]}")
    port: int = field(default_factory=free_port)
    process: Process | None = None

    def start(self, timeout: float = 60.0) -> PrometheusOperator:
        try:
            binary = controlplane.built_binary("prometheus-operator")
        except controlplane.MissingBinary as error:
            raise MissingPrerequisite(str(error)) from None
        argv = [
            str(binary),
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--controller-id={self.controller_id}",
            f"--namespaces={','.join(self.namespaces)}",
            f"--prometheus-config-reloader={CONFIG_RELOADER_IMAGE.name}",
            "--kubelet-service=",  # no kubelet Service to maintain
            "--log-level=info",
        ]
        self.process = Process(
            "prometheus-operator",
            argv,
            self.workdir / "prometheus-operator.log",
            env={"KUBECONFIG": str(controlplane.ADMIN_KUBECONFIG)},
        )
        self.process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{self.port}/healthz"), timeout)
        return self


def create_prometheus(
    api: client.ApiClient,
    namespace: str,
    name: str,
    *,
    controller_id: str,
    service_monitor_labels: dict[str, str],
    replicas: int = 1,
    other_namespaces: Sequence[str] = (),
) -> None:
    """A ServiceAccount that may discover targets in the namespace (and in `other_namespaces`),
    and a Prometheus resource selecting ServiceMonitors with `service_monitor_labels` in its own
    namespace (and in `other_namespaces`: prometheus-operator must watch them too)."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    account = f"prometheus-{name}"
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=account))
    )
    for discovered in (namespace, *other_namespaces):
        grant_discovery(rbac, discovered, account, namespace)
    spec: dict[str, Any] = {
        "image": PROMETHEUS_IMAGE.name,
        "version": PROMETHEUS_VERSION,
        "replicas": replicas,
        "serviceAccountName": account,
        "serviceMonitorSelector": {"matchLabels": service_monitor_labels},
        # Scrape results and rule evaluations show up within a second or two.
        "evaluationInterval": "1s",
    }
    if other_namespaces:  # without a selector, only its own namespace
        names = [namespace, *other_namespaces]
        spec["serviceMonitorNamespaceSelector"] = {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": names}
            ]
        }
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "monitoring.coreos.com",
        "v1",
        namespace,
        "prometheuses",
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "Prometheus",
            "metadata": {
                "name": name,
                "annotations": {"operator.prometheus.io/controller-id": controller_id},
            },
            "spec": spec,
        },
    )


def grant_discovery(
    rbac: client.RbacAuthorizationV1Api, namespace: str, account: str, account_namespace: str
) -> None:
    """Let ServiceAccount `account` discover (and so scrape) the targets in `namespace`."""
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": account},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "endpoints", "pods"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [
                {"kind": "ServiceAccount", "name": account, "namespace": account_namespace}
            ],
        },
    )


def generated_config(api: client.ApiClient, namespace: str, name: str) -> str | None:
    """The configuration prometheus-operator generated for Prometheus `name`, or None yet."""
    secret = or_none(
        lambda: client.CoreV1Api(api).read_namespaced_secret(f"prometheus-{name}", namespace)
    )
    data = ((secret and secret.data) or {}).get("prometheus.yaml.gz")
    return gzip.decompress(base64.b64decode(data)).decode() if data else None


# --- images -------------------------------------------------------------------------------------


def loaded_image(node: Node, repository: str, tag_prefix: str = "") -> str:
    """The reference of the image in the node whose repository's last segment is `repository`
    (and whose tag starts with `tag_prefix`): `make images` names them."""
    for reference in node.images():
        name, _, tag = reference.rpartition(":")
        if name.rsplit("/", 1)[-1] == repository and tag.startswith(tag_prefix):
            return reference
    raise MissingPrerequisite(
        f"no image {repository}:{tag_prefix}* in the test node (it loads {IMAGE_DIR}/*.oci.tar): "
        "run `make images`"
    )


def chart_image_values(node: Node) -> dict[str, str]:
    """`helm install --set` values that make the chart use the images built here."""
    values = {}
    for key, repository in (("image", "prosody-operator"), ("sidecar.image", "prosody-exporter")):
        name, _, tag = loaded_image(node, repository).rpartition(":")
        values |= {f"{key}.repository": name, f"{key}.tag": tag}
    return values


def prosody_image(node: Node, version: str = "0.12") -> str:
    """The Prosody image built here from Debian's packages."""
    return loaded_image(node, "prosody", version)


# --- pods ---------------------------------------------------------------------------------------


def pod_ready(pod: client.V1Pod | None) -> bool:
    conditions = (pod and pod.status and pod.status.conditions) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def ready_pods(api: client.ApiClient, namespace: str, selector: str) -> list[client.V1Pod]:
    """The Ready pods matching a label selector, none of them being deleted."""
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if pod_ready(p) and p.metadata.deletion_timestamp is None]


def wait_for_ready_pod(
    api: client.ApiClient, namespace: str, selector: str, timeout: float = 120.0
) -> client.V1Pod:
    """The one Ready pod matching `selector` (waiting for it, and for any other to go)."""
    found: list[client.V1Pod] = []

    def one_ready() -> bool:
        found[:] = ready_pods(api, namespace, selector)
        everything = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)
        return len(found) == 1 and len(everything.items) == 1

    wait_until(one_ready, timeout, f"one Ready pod {selector} in {namespace}", 0.5)
    return found[0]


def exec_in_pod(
    api: client.ApiClient, namespace: str, pod: str, container: str, argv: list[str]
) -> str:
    """`kubectl exec`: through the API server to the kubelet and containerd."""
    output: str = stream(
        client.CoreV1Api(api).connect_get_namespaced_pod_exec,
        pod,
        namespace,
        container=container,
        command=argv,
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _request_timeout=60,
    )
    return output


def register_in_pod(
    api: client.ApiClient, namespace: str, pod: str, user: str, password: str
) -> None:
    """Create an account the way an admin does: prosodyctl, in the Prosody container."""
    argv = ["prosodyctl", "register", user, "localhost", password]
    exec_in_pod(api, namespace, pod, "prosody", argv)


class PodXmppSession(XmppSession):
    """testinfra.xmpp's real client, from the host to a Prosody pod's c2s port."""

    def __init__(self, pod_ip: str, user: str, password: str, port: int = 5222) -> None:
        super().__init__(None, user, password, host=pod_ip, port=port)


# --- Prometheus pods ----------------------------------------------------------------------------


@dataclass
class PrometheusPod:
    """Replica `replica` of Prometheus `name`: the pod prometheus-operator's StatefulSet made."""

    api: client.ApiClient
    namespace: str
    name: str
    replica: int = 0
    port: int = 9090

    @property
    def pod_name(self) -> str:
        return f"prometheus-{self.name}-{self.replica}"

    def pod(self) -> client.V1Pod | None:
        core = client.CoreV1Api(self.api)
        return or_none(lambda: core.read_namespaced_pod(self.pod_name, self.namespace))

    @property
    def ip(self) -> str:
        pod = self.pod()
        assert pod is not None and pod.status.pod_ip, f"{self.pod_name} has no IP yet"
        return str(pod.status.pod_ip)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> PrometheusPod:
        wait_until(lambda: pod_ready(self.pod()), timeout, f"{self.pod_name} to be Ready", 0.5)
        return self

    def api_get(self, path: str, **params: str) -> Any:
        response = httpx.get(
            f"{self.url}/api/v1/{path}", params=params, timeout=10, trust_env=False
        )
        response.raise_for_status()
        return response.json()["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api_get("query", query=promql)["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api_get("targets")["activeTargets"]
        return targets

    def running_config(self) -> str:
        """The configuration Prometheus runs now, as it reports it."""
        yaml_text: str = self.api_get("status/config")["yaml"]
        return yaml_text

    def wait_for_target(self, job: str, health: str, timeout: float = 300.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def has_target() -> bool:
            found[:] = [
                t for t in self.targets() if t["scrapePool"] == job and t["health"] == health
            ]
            return bool(found)

        wait_until(has_target, timeout, f"a {job} target {health} in {self.url}", 0.5)
        return found[0]

    def wait_for_series(self, promql: str, timeout: float = 90.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def has_series() -> bool:
            found[:] = self.query(promql)
            return bool(found)

        wait_until(has_series, timeout, f"{promql} in {self.url}", interval=0.5)
        return found
