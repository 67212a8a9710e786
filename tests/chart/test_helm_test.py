"""The chart's `helm test` check (files/helm_test.py), run for real against a helm-installed
operator on the test node.

`helm test` runs the hook's pod on the node: from inside the cluster it finds the operator's
Deployment ready and reaches the webhook at its Service's DNS name, over TLS its caBundle
verifies. The failures are checked by running the same script as a local process with exactly
the arguments of the release's test hook (`helm get hooks`), a token of the hook's ServiceAccount
and the cluster's CA, as its pod would have, and the API server's and the operator pod's
addresses (reachable from the host) instead of the cluster's names — the only way to point it at
an address where nothing answers without a second chart.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from testinfra import controlplane, e2e
from testinfra.node import Node
from testinfra.operator import ChartRelease, helm
from testinfra.procs import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.node]


@dataclass
class Installed:
    api: client.ApiClient
    release: ChartRelease
    workdir: Path

    def hook(self) -> dict[str, Any]:
        text = helm("get", "hooks", self.release.name, "--namespace", self.release.namespace)
        (pod,) = [d for d in yaml.safe_load_all(text.stdout) if d and d["kind"] == "Pod"]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        found: dict[str, Any] = pod
        return found

    def operator_address(self) -> str:
        # Any replica serves the webhook (helm install --wait made them Ready).
        operator = e2e.ready_pods(self.api, self.release.namespace, self.release.selector)[0]
        (container,) = operator.spec.containers
        (port,) = [p.container_port for p in container.ports if p.name == "webhook"]
        return f"{operator.status.pod_ip}:{port}"

    def credentials(self, account: str) -> tuple[Path, Path]:
        """A TokenRequest token of `account` and the cluster's CA, as files."""
        token = client.CoreV1Api(self.api).create_namespaced_service_account_token(
            account,
            self.release.namespace,
            client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[])),
        )
        token_file, ca_file = self.workdir / "token", self.workdir / "ca.crt"
        token_file.write_text(token.status.token)
        ca_file.write_bytes(controlplane.ca_cert_path().read_bytes())
        return token_file, ca_file

    def check(self, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        pod = self.hook()
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["python", "-c"]
        script, *args = container["args"]
        token_file, ca_file = self.credentials(pod["spec"]["serviceAccountName"])
        argv = [
            *args,
            f"--api-server={self.api.configuration.host}",
            f"--token-file={token_file}",
            f"--ca-file={ca_file}",
            f"--timeout={timeout:g}",
            *(extra or [f"--address={self.operator_address()}"]),
        ]
        return subprocess.run(
            [sys.executable, "-c", script, *argv],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )


@pytest.fixture(scope="module")
def installed(
    k8s_client: client.ApiClient, node: Node, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    release = ChartRelease(k8s_client, values=e2e.chart_image_values(node))
    try:
        release.install()
        yield Installed(k8s_client, release, tmp_path_factory.mktemp("helm-test"))
    finally:
        release.uninstall()


def test_helm_test_passes_as_a_pod_on_the_node(installed: Installed) -> None:
    """`helm test`: the hook pod ran on the node and exited 0, every check passed from inside
    the cluster (the Service's DNS name through CoreDNS, its ClusterIP through kube-proxy)."""
    report = installed.release.test()
    assert f"TEST SUITE:     {installed.release.name}-test" in report, report
    assert "Phase:          Succeeded" in report, report


def test_the_check_passes_against_the_running_operator(installed: Installed) -> None:
    done = installed.check()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ok", "ok", "ok"], done.stdout
    assert lines[0] == f"ok: deployment {installed.release.name}: 2/2 ready"
    assert "has a caBundle" in lines[1]
    service = f"{installed.release.name}-webhook.{installed.release.namespace}.svc"
    assert lines[2].startswith(f"ok: webhook {service}: TLS verified with the caBundle")


def test_the_check_fails_when_nothing_answers(installed: Installed) -> None:
    done = installed.check(f"--address=127.0.0.1:{free_port()}", timeout=4)
    assert done.returncode == 1
    assert "FAILED:" in done.stdout and "does not answer" in done.stdout, done.stdout


def test_the_check_fails_when_the_ca_bundle_does_not_verify_the_webhook(
    installed: Installed,
) -> None:
    """The API server would refuse the webhook's certificate: a caBundle that is not the CA of
    the operator's certificate (here the cluster's own CA)."""
    admission = client.AdmissionregistrationV1Api(installed.api)
    name = installed.release.webhook_configuration
    config = admission.read_mutating_webhook_configuration(name)
    bundles = {w.name: w.client_config.ca_bundle for w in config.webhooks}
    other = base64.b64encode(controlplane.ca_cert_path().read_bytes()).decode()

    def patch(bundle: dict[str, str]) -> None:  # every webhook of the configuration
        webhooks = [{"name": n, "clientConfig": {"caBundle": b}} for n, b in bundle.items()]
        admission.patch_mutating_webhook_configuration(name, {"webhooks": webhooks})

    patch(dict.fromkeys(bundles, other))
    try:
        done = installed.check(timeout=4)
    finally:
        patch(bundles)
    assert done.returncode == 1
    assert "the caBundle does not verify its certificate" in done.stdout, done.stdout


def test_the_check_fails_when_the_operator_is_not_ready(installed: Installed) -> None:
    """Last in this module: it scales the operator to 0."""
    client.AppsV1Api(installed.api).patch_namespaced_deployment_scale(
        installed.release.name, installed.release.namespace, {"spec": {"replicas": 0}}
    )
    done = installed.check(f"--address=127.0.0.1:{free_port()}", timeout=4)
    assert done.returncode == 1
    assert f"FAILED: deployment {installed.release.name}: 0/0 ready" in done.stdout, done.stdout
