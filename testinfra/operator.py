"""The real `prosody-operator` against the local control plane, two ways:

* `ChartRelease`: `helm install` of charts/prosody-operator, as a user does; the test node runs
  the operator's pod, and the API server calls its webhook through the chart's Service;
* `OperatorProcess`: the operator as a local process on loopback, with the chart's RBAC only
  (a token of the chart's ServiceAccount, never admin) — for tests that need its log, its
  restart or a free hand with its settings, and no pod network.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, utils
from kubernetes.dynamic import DynamicClient

from . import controlplane
from . import helm as chart
from .kubeapi import or_none
from .procs import Process, ProcessOwner, free_port, http_ok, venv_command, wait_until

IDENTITY_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# What the chart makes once for all replicas, and the operator only updates.
SHARED_KINDS = ("MutatingWebhookConfiguration", "Lease", "Secret")


def operator_command() -> str:
    return venv_command("prosody-operator")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real helm, against the local control plane (as admin, like a user installing)."""
    done = chart.helm(*args, "--kubeconfig", str(controlplane.ADMIN_KUBECONFIG), check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"helm {args[0]} failed: {done.stderr.strip()}")
    return done


@dataclass
class ChartRelease:
    """The chart, installed with `helm install --create-namespace --wait` into a namespace named
    like the release. Start the test node first (and set the image values to images it has,
    testinfra.e2e.chart_image_values): `--wait` lasts until the operator's pod is Ready."""

    api: client.ApiClient
    values: dict[str, Any] = field(default_factory=dict)  # --set-json key=value
    name: str = field(default_factory=lambda: f"prosody-operator-{uuid.uuid4().hex[:6]}")

    @property
    def namespace(self) -> str:
        return self.name

    @property
    def selector(self) -> str:
        """The label selector of the operator's pod."""
        return f"app.kubernetes.io/instance={self.name}"

    @property
    def webhook_configuration(self) -> str:
        """Cluster-scoped, so named after the release: no two installs share it."""
        return self.name

    def install(self, timeout: float = 90.0) -> ChartRelease:
        """Install, then wait for what makes the webhook answer the API server: the caBundle the
        operator fills in at start-up, and a ready endpoint behind the chart's Service."""
        values = {"webhook.configurationName": self.webhook_configuration, **self.values}
        argv = chart.template_args(self.name, self.namespace, set_values=values)
        helm("install", *argv, "--create-namespace", "--wait", "--timeout", f"{timeout:g}s")
        wait_until(self.webhook_ready, 30, "the operator's webhook (caBundle, ready endpoint)")
        return self

    def webhook_ready(self) -> bool:
        admission = client.AdmissionregistrationV1Api(self.api)
        config = admission.read_mutating_webhook_configuration(self.webhook_configuration)
        webhook = config.webhooks[0].client_config
        slices = client.DiscoveryV1Api(self.api).list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={webhook.service.name}"
        )
        endpoints = [e for s in slices.items for e in s.endpoints or []]
        ready = any(e.conditions and e.conditions.ready for e in endpoints)
        return bool(webhook.ca_bundle) and ready

    def test(self, timeout: float = 180.0) -> str:
        """`helm test`: the chart's test pod, run on the node; helm's report. (The pod is
        deleted once it succeeds, so `--logs` cannot follow it.)"""
        argv = ["test", self.name, "--namespace", self.namespace]
        return helm(*argv, "--timeout", f"{timeout:g}s").stdout

    def uninstall(self) -> None:
        """`helm uninstall`, then the namespace; safe after a failed install."""
        helm("uninstall", self.name, "--namespace", self.namespace, "--wait", check=False)
        or_none(lambda: client.CoreV1Api(self.api).delete_namespace(self.namespace))


def service_account_kubeconfig(
    api: client.ApiClient, namespace: str, name: str, path: Path
) -> None:
    """A kubeconfig that authenticates only with a TokenRequest token of the ServiceAccount."""
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    )
    admin = yaml.safe_load(controlplane.ADMIN_KUBECONFIG.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": name, "user": {"token": token.status.token}}],
        "contexts": [
            {"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": name}}
        ],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))


@dataclass
class OperatorProcess(ProcessOwner):
    """Installs the chart's ServiceAccount and RBAC, then runs the operator with that identity."""

    api: client.ApiClient
    workdir: Path
    settings: dict[str, str] = field(default_factory=dict)  # extra PROSODY_OPERATOR_* values
    environment: dict[str, str] = field(default_factory=dict)  # more of the process's env
    # The chart's watchNamespaces: the operator's setting, and RoleBindings instead of a
    # ClusterRoleBinding for what it does in namespaces.
    watch_namespaces: list[str] = field(default_factory=list)
    release: str = field(default_factory=lambda: f"pot-{uuid.uuid4().hex[:6]}")
    webhook_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def namespace(self) -> str:
        return self.release

    @property
    def fullname(self) -> str:
        """What the chart names the ServiceAccount and the RBAC objects."""
        return f"{self.release}-prosody-operator"

    @property
    def webhook_configuration(self) -> str:
        return self.release

    def install_identity(self) -> None:
        """The namespace, and what the chart installs besides the operator's Deployment and
        Services: its identity, the webhook configuration (the operator has no right to create
        one), and the Lease and certificate Secret replicas share (`replica_settings`). The
        configuration calls the webhook at its loopback URL instead of the chart's Service, as
        `url` is what the operator then applies (with the caBundle)."""
        client.CoreV1Api(self.api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))
        )
        for obj in self._chart_objects():
            if obj["kind"] == "MutatingWebhookConfiguration":
                for webhook in obj["webhooks"]:
                    webhook["clientConfig"] = {"url": f"{self.webhook_url}/inject-exporter"}
            if obj["kind"] in SHARED_KINDS:
                utils.create_from_dict(self.api, obj)
        self.apply_identity()

    def replica_settings(self) -> dict[str, str]:
        """The settings the chart gives every replica: the Lease whose holder reconciles and
        the Secret they share their webhook certificate through."""
        shared = {o["kind"]: o["metadata"]["name"] for o in self._chart_objects()}
        return {
            "leader_election_lease": f"{self.namespace}/{shared['Lease']}",
            "webhook_cert_secret": f"{self.namespace}/{shared['Secret']}",
        }

    def replica(self, workdir: Path) -> OperatorProcess:
        """Another replica of this release (same identity, settings and Lease), with ports and
        a log of its own; not started."""
        return OperatorProcess(
            self.api,
            workdir,
            settings=dict(self.settings),
            environment=dict(self.environment),
            watch_namespaces=list(self.watch_namespaces),
            release=self.release,
        )

    def apply_identity(self) -> None:
        """The chart's ServiceAccount and RBAC for the current settings (its rights follow
        `restart_on_drift`, the chart's sidecar.restartOnDrift), server-side applied."""
        dynamic = DynamicClient(self.api)
        for obj in self._chart_objects():
            if obj["kind"] in IDENTITY_KINDS:
                resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
                namespace = None
                if resource.namespaced:
                    namespace = obj["metadata"].get("namespace", self.namespace)
                resource.server_side_apply(
                    obj, namespace=namespace, field_manager="testinfra", force_conflicts=True
                )

    def _chart_objects(self) -> list[dict[str, Any]]:
        return chart.render_objects(
            self.release,
            self.namespace,
            set_values={
                "webhook.configurationName": self.webhook_configuration,
                "watchNamespaces": self.watch_namespaces,
                "sidecar.restartOnDrift": self.settings.get("restart_on_drift") == "true",
                "test.enabled": False,  # the `helm test` identity is not the operator's
            },
        )

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.workdir / "operator.kubeconfig"),
            "PROSODY_OPERATOR_WEBHOOK_HOST": "127.0.0.1",
            "PROSODY_OPERATOR_WEBHOOK_PORT": str(self.webhook_port),
            "PROSODY_OPERATOR_WEBHOOK_URL": self.webhook_url,
            "PROSODY_OPERATOR_WEBHOOK_CONFIGURATION": self.webhook_configuration,
            "PROSODY_OPERATOR_HEALTH_PORT": str(self.health_port),
            "PROSODY_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "PROSODY_OPERATOR_WATCH_NAMESPACES": ",".join(self.watch_namespaces),
            **{f"PROSODY_OPERATOR_{k.upper()}": v for k, v in self.settings.items()},
            **self.environment,
        }

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        service_account_kubeconfig(
            self.api, self.namespace, self.fullname, self.workdir / "operator.kubeconfig"
        )
        before = self._ca_bundle()
        cert_dir = self.settings.get("webhook_cert_dir")
        mounted = base64.b64encode((Path(cert_dir) / "ca.crt").read_bytes()) if cert_dir else b""
        self.process = Process(
            "prosody-operator", [operator_command()], self.workdir / "operator.log", env=self.env()
        )

        def ready() -> bool:
            """Alive, and its CA in the webhook configuration (a self-made one is new at each
            start, unless replicas share it)."""
            if not http_ok(f"http://127.0.0.1:{self.health_port}/healthz"):
                return False
            if self.settings.get("webhook_cert_secret"):
                return http_ok(self.readyz_url)  # ready once it applied the configuration
            bundle = self._ca_bundle()
            return bundle == mounted.decode() if mounted else bundle not in ("", before)

        self.process.wait_ready(ready, timeout)
        return self

    def _ca_bundle(self) -> str:
        admission = client.AdmissionregistrationV1Api(self.api)
        config = or_none(
            lambda: admission.read_mutating_webhook_configuration(self.webhook_configuration)
        )
        return (config and config.webhooks[0].client_config.ca_bundle) or ""

    def uninstall(self) -> None:
        """What `helm uninstall` and the operator's own objects leave: nothing."""
        self.stop()
        rbac = client.RbacAuthorizationV1Api(self.api)
        admission = client.AdmissionregistrationV1Api(self.api)
        workloads = f"{self.fullname}-workloads"
        for delete in (
            lambda: admission.delete_mutating_webhook_configuration(self.webhook_configuration),
            *(
                lambda namespace=namespace: rbac.delete_namespaced_role_binding(
                    workloads, namespace
                )
                for namespace in self.watch_namespaces
            ),
            lambda: rbac.delete_cluster_role_binding(workloads),
            lambda: rbac.delete_cluster_role(workloads),
            lambda: rbac.delete_cluster_role_binding(self.fullname),
            lambda: rbac.delete_cluster_role(self.fullname),
            lambda: client.CoreV1Api(self.api).delete_namespace(self.namespace),
        ):
            or_none(delete)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def readyz_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/readyz"

    def log_text(self) -> str:
        return (self.workdir / "operator.log").read_text(errors="replace")
