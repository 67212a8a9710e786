"""prometheus-operator and a real Prometheus running the scrape configuration it generates.

The chain, end to end (all real, all local):

    prosody-operator -> ServiceMonitor ─┐
    PodRunner -> pods -> Endpoints  ────┤
                                        v
    prometheus-operator (.cache/bin, v0.85) -> Secret prometheus-<name> (prometheus.yaml.gz)
                                        v
    PrometheusFromOperator: Prometheus v3.5.0, built from its Go module (Debian's Prometheus has
    no Kubernetes service discovery), in a network namespace on the pod bridge,
    loading that configuration, discovering targets with kubernetes_sd through the `kubernetes`
    Service's ClusterIP, which the PodRunner serves (testinfra.apiforwarder).

* `PrometheusOperator`: the real binary, with the admin kubeconfig, its web server on a free
  loopback port, limited to the given namespaces and to Prometheus objects carrying its
  `--controller-id`. It also makes a StatefulSet, whose pods nobody runs (PodRunner only runs
  Prosody pods): fine, Prometheus runs here instead.
* `create_prometheus()`: a ServiceAccount with read access to services, endpoints,
  endpointslices and pods of the namespace, and a `Prometheus` resource whose version is the
  local Prometheus' (so the operator generates a configuration that version accepts).
* `PrometheusFromOperator`: reads the generated configuration, applies the few rewrites that
  stand in for the pod prometheus-operator would have run (see `rewrite_config`: what the
  config-reloader fills in, where the API server is and the in-cluster credential files),
  runs Prometheus, and keeps playing the config-reloader: when the Secret changes, it rewrites
  the file again and sends SIGHUP (a thread, polling every RELOAD_POLL seconds).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import yaml
from kubernetes import client

from . import controlplane, gobuild
from .kubeapi import or_none
from .layout import BIN_DIR, GO_MODULES_DIR
from .netns import Namespace
from .procs import (
    MissingPrerequisite,
    Process,
    ProcessOwner,
    free_port,
    http_ok,
    require_program,
    wait_until,
)
from .xmpp import XmppSession

# Prometheus itself is built from its Go module (testinfra/go/prometheus): Debian's package is
# built without Kubernetes service discovery. v3.5.0 (module version v0.305.0) is the version
# prometheus-operator v0.85 defaults to. The binary is not called `prometheus`, so that the
# Debian one stays first on the Makefile's PATH for the other tests.
PROMETHEUS = gobuild.PROMETHEUS
PROMETHEUS_VERSION = PROMETHEUS.release


def prometheus_binary() -> Path:
    """The Prometheus built from its module; built first when missing or stale (a cold build
    takes minutes: downloads and compile)."""
    go_version = gobuild.run_go(["version"], GO_MODULES_DIR).strip()
    if not gobuild.is_up_to_date(PROMETHEUS, go_version):
        BIN_DIR.mkdir(parents=True, exist_ok=True)
        gobuild.STAMP_DIR.mkdir(parents=True, exist_ok=True)
        gobuild.log(f"building {PROMETHEUS.name} {PROMETHEUS.release} ({PROMETHEUS.package})")
        gobuild.build_binary(PROMETHEUS, go_version)
    return PROMETHEUS.path


RELOAD_POLL = 1.0  # seconds between two reads of the generated configuration
MAX_LIFETIME = 1800.0  # seconds: by default, background threads end on their own after this


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
) -> None:
    """A ServiceAccount that may discover targets in the namespace, and a Prometheus resource
    selecting ServiceMonitors with `service_monitor_labels` in its own namespace."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    account = f"prometheus-{name}"
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=account))
    )
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
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )
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
            "spec": {
                "version": PROMETHEUS_VERSION,
                "replicas": replicas,
                "serviceAccountName": account,
                "serviceMonitorSelector": {"matchLabels": service_monitor_labels},
            },
        },
    )


def generated_config(api: client.ApiClient, namespace: str, name: str) -> str | None:
    """The configuration prometheus-operator generated for Prometheus `name`, or None yet."""
    secret = or_none(
        lambda: client.CoreV1Api(api).read_namespaced_secret(f"prometheus-{name}", namespace)
    )
    data = ((secret and secret.data) or {}).get("prometheus.yaml.gz")
    return gzip.decompress(base64.b64decode(data)).decode() if data else None


# --- Prometheus, with the generated configuration ---------------------------------------------


@dataclass(frozen=True)
class InClusterFiles:
    """What a Prometheus pod gets from Kubernetes: where the API server is, and the service
    account's CA and token files."""

    api_server: str
    ca_file: Path
    token_file: Path


def service_account_files(
    api: client.ApiClient,
    namespace: str,
    account: str,
    api_server: str,
    directory: Path,
    lifetime: float = MAX_LIFETIME,
) -> InClusterFiles:
    """A TokenRequest token (valid for `lifetime`, at least 10 minutes) and the cluster's CA."""
    directory.mkdir(parents=True, exist_ok=True)
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        account,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=max(600, int(lifetime)))
        ),
    )
    token_file, ca_file = directory / "token", directory / "ca.crt"
    token_file.write_text(token.status.token)
    ca_file.write_bytes(controlplane.ca_cert_path().read_bytes())
    return InClusterFiles(api_server, ca_file, token_file)


def rewrite_config(text: str, files: InClusterFiles, pod: str, shard: int = 0) -> dict[str, Any]:
    """The generated configuration, with what the Prometheus pod would have had instead.

    Every rewrite, and nothing else:
    1. `$(POD_NAME)` and `$(SHARD)` are replaced by the pod's name and shard number, as the
       config-reloader sidecar does from its environment in a pod (they are in the external
       label `prometheus_replica` and in the sharding `keep` rule of every job);
    2. each `kubernetes_sd_configs` entry gets `api_server` (the `kubernetes` Service's
       ClusterIP), `tls_config` (the CA file) and `authorization` (the token file): in a pod,
       client-go's in-cluster config finds these in KUBERNETES_SERVICE_HOST and
       /var/run/secrets/kubernetes.io/serviceaccount/.
    """
    text = text.replace("$(POD_NAME)", pod).replace("$(SHARD)", str(shard))
    config: dict[str, Any] = yaml.safe_load(text)
    for job in config.get("scrape_configs") or []:
        for sd in job.get("kubernetes_sd_configs") or []:
            assert "api_server" not in sd, f"unexpected api_server in {job['job_name']}"
            sd["api_server"] = files.api_server
            sd["tls_config"] = {"ca_file": str(files.ca_file)}
            sd["authorization"] = {"credentials_file": str(files.token_file)}
    return config


@dataclass
class PrometheusFromOperator(ProcessOwner):
    """Debian's Prometheus in network namespace `netns`, running prometheus-operator's generated
    configuration for Prometheus `name` (replica `replica`)."""

    api: client.ApiClient
    workdir: Path
    namespace: str
    name: str
    netns: Namespace
    files: InClusterFiles
    replica: int = 0
    port: int = 9090
    lifetime: float = MAX_LIFETIME  # seconds the config-reloader thread runs at most
    process: Process | None = None
    reloads: int = 0
    _last: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return self.netns.address("eth0", 4)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(self.config_file.read_text())
        return loaded

    def _write_config(self) -> bool:
        """Write the rewritten generated configuration; True when it changed."""
        text = generated_config(self.api, self.namespace, self.name)
        if text is None or text == self._last:
            return False
        pod = f"prometheus-{self.name}-{self.replica}"
        config = rewrite_config(text, self.files, pod)
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self._last = text
        return True

    def start(self, timeout: float = 60.0) -> PrometheusFromOperator:
        binary = str(prometheus_binary())
        self.workdir.mkdir(parents=True, exist_ok=True)
        wait_until(
            self._write_config, timeout, f"prometheus-operator's config for {self.name}", 0.5
        )
        self.process = Process(
            "prometheus",
            [
                binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address={self.address}:{self.port}",
            ],
            self.workdir / "prometheus.log",
            netns=self.netns.name,
        )
        self.process.wait_ready(lambda: http_ok(self.url + "/-/ready"), timeout)
        self._thread = threading.Thread(target=self._reloader, name="reloader", daemon=True)
        self._thread.start()
        return self

    def _reloader(self) -> None:
        """What prometheus-config-reloader does in the pod: new configuration, SIGHUP."""
        deadline = time.monotonic() + self.lifetime
        while not self._stop.wait(RELOAD_POLL) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # a failed read is retried next time
                if self._write_config() and self.process:
                    self.process.signal(1)  # SIGHUP
                    self.reloads += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        super().stop()

    # --- the HTTP API ---------------------------------------------------------------------------

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

    def wait_for_target(self, health: str, timeout: float = 60.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def has_target() -> bool:
            found[:] = [t for t in self.targets() if t["health"] == health]
            return bool(found)

        wait_until(has_target, timeout, f"a target with health {health} in {self.url}", 0.5)
        return found[0]

    def wait_for_series(self, promql: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def has_series() -> bool:
            found[:] = self.query(promql)
            return bool(found)

        wait_until(has_series, timeout, f"{promql} in {self.url}", interval=0.5)
        return found


# --- an XMPP client inside a pod's network namespace --------------------------------------------


def register_in_pod(
    prosody_config: Path, user: str, password: str, host: str = "localhost"
) -> None:
    """Create an account with prosodyctl and the pod's Prosody configuration."""
    argv = [require_program("prosodyctl"), "--config", str(prosody_config), "register"]
    subprocess.run([*argv, user, host, password], check=True, capture_output=True, timeout=60)


class PodXmppSession(XmppSession):
    """testinfra.xmpp's real client, run inside a pod's network namespace, logged in to the
    pod's Prosody on 127.0.0.1:`port` (Prosody's default c2s port)."""

    def __init__(self, netns: Namespace, user: str, password: str, port: int = 5222) -> None:
        super().__init__(SimpleNamespace(c2s_port=port), user, password)  # type: ignore[arg-type]
        self._argv = netns.argv(self._argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m testinfra.e2e build`: build the end-to-end tests' Prometheus ahead of time."""
    args = argv if argv is not None else sys.argv[1:]
    if args != ["build"]:
        print("usage: python -m testinfra.e2e build", file=sys.stderr)
        return 2
    print(prometheus_binary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
