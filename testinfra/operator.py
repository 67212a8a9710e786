"""The real `prosody-operator` as a process, against the local control plane, with the chart's
RBAC: it authenticates with a token of the chart's ServiceAccount, never as admin."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, utils

from . import controlplane
from .layout import REPO_ROOT
from .procs import MissingPrerequisite, Process, ProcessOwner, free_port, http_ok

CHART = REPO_ROOT / "charts" / "prosody-operator"


def helm_binary() -> str:
    try:
        return str(controlplane.built_binary("helm"))
    except controlplane.MissingBinary as error:
        raise MissingPrerequisite(str(error)) from None


def render_chart(
    release: str, namespace: str, values: dict[str, Any], *show_only: str
) -> list[dict[str, Any]]:
    """`helm template` with the real helm: the objects the chart would install."""
    argv = [helm_binary(), "template", release, str(CHART), "--namespace", namespace]
    for key, value in values.items():
        argv += ["--set-string", f"{key}={value}"]
    for template in show_only:
        argv += ["--show-only", template]
    rendered = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


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
    release: str = field(default_factory=lambda: f"pot-{uuid.uuid4().hex[:6]}")
    webhook_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
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
        client.CoreV1Api(self.api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))
        )
        objects = render_chart(
            self.release,
            self.namespace,
            {"webhook.configurationName": self.webhook_configuration},
            "templates/serviceaccount.yaml",
            "templates/rbac.yaml",
        )
        for obj in objects:
            utils.create_from_dict(self.api, obj, namespace=self.namespace)

    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.workdir / "operator.kubeconfig"),
            "PROSODY_OPERATOR_WEBHOOK_HOST": "127.0.0.1",
            "PROSODY_OPERATOR_WEBHOOK_PORT": str(self.webhook_port),
            "PROSODY_OPERATOR_WEBHOOK_URL": f"https://127.0.0.1:{self.webhook_port}",
            "PROSODY_OPERATOR_WEBHOOK_CONFIGURATION": self.webhook_configuration,
            "PROSODY_OPERATOR_HEALTH_PORT": str(self.health_port),
            **{f"PROSODY_OPERATOR_{k.upper()}": v for k, v in self.settings.items()},
        }

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        service_account_kubeconfig(
            self.api, self.namespace, self.fullname, self.workdir / "operator.kubeconfig"
        )
        command = Path(sys.executable).parent / "prosody-operator"
        if not command.exists():
            raise MissingPrerequisite("prosody-operator is not installed: run `make venv`")
        self.process = Process(
            "prosody-operator", [str(command)], self.workdir / "operator.log", env=self.env()
        )
        self.process.wait_ready(self._ready, timeout)
        return self

    def _ready(self) -> bool:
        if not http_ok(f"http://127.0.0.1:{self.health_port}/healthz"):
            return False
        admission = client.AdmissionregistrationV1Api(self.api)
        try:
            config = admission.read_mutating_webhook_configuration(self.webhook_configuration)
        except client.ApiException:
            return False
        url = config.webhooks[0].client_config.url or ""
        return url.startswith(f"https://127.0.0.1:{self.webhook_port}/")

    def uninstall(self) -> None:
        """What `helm uninstall` and the operator's own objects leave: nothing."""
        self.stop()
        rbac = client.RbacAuthorizationV1Api(self.api)
        admission = client.AdmissionregistrationV1Api(self.api)
        for delete in (
            lambda: admission.delete_mutating_webhook_configuration(self.webhook_configuration),
            lambda: rbac.delete_cluster_role_binding(self.fullname),
            lambda: rbac.delete_cluster_role(self.fullname),
            lambda: client.CoreV1Api(self.api).delete_namespace(self.namespace),
        ):
            try:
                delete()
            except client.ApiException as error:
                if error.status != 404:
                    raise

    def log_text(self) -> str:
        return (self.workdir / "operator.log").read_text(errors="replace")
