"""The chart's `helm test` check (files/helm_test.py), run for real against a helm-installed
operator.

No kubelet runs here yet, so `helm test` cannot start its pod: testinfra.podrunner runs the
operator's pod for real (its webhook behind the chart's Service, its caBundle applied at
start-up), and the check runs as a local process with exactly the script and arguments of the
release's test hook (`helm get hooks`), a token of the hook's ServiceAccount and the cluster's CA,
as its pod would have. Two addresses differ, both chosen by arguments of the check: the API
server's own (the `kubernetes` Service's ClusterIP is the same for every local control plane on
this machine, so from the host it may reach another test run's), and the operator pod's for the
webhook (ClusterIPs are not served here; the API server, too, reaches the webhook at the pod's
address). TLS is still verified for the Service's name.
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
from testinfra.operator import ChartRelease, helm
from testinfra.podrunner import PodRunner
from testinfra.procs import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.netns]


@dataclass
class Installed:
    api: client.ApiClient
    release: ChartRelease
    runner: PodRunner
    workdir: Path

    def hook(self) -> dict[str, Any]:
        text = helm("get", "hooks", self.release.name, "--namespace", self.release.namespace)
        (pod,) = [d for d in yaml.safe_load_all(text.stdout) if d and d["kind"] == "Pod"]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        found: dict[str, Any] = pod
        return found

    def operator_address(self) -> str:
        operator = self.runner.running_pods(self.release.namespace)[0]  # any replica serves
        deployment = client.AppsV1Api(self.api).read_namespaced_deployment(
            self.release.name, self.release.namespace
        )
        (container,) = deployment.spec.template.spec.containers
        (port,) = [p.container_port for p in container.ports if p.name == "webhook"]
        return f"{operator.ip}:{port}"

    def check(self, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        pod = self.hook()
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["python", "-c"]
        script, *args = container["args"]
        files = e2e.service_account_files(
            self.api,
            self.release.namespace,
            pod["spec"]["serviceAccountName"],
            self.api.configuration.host,
            self.workdir / "sa",
        )
        argv = [
            *args,
            f"--api-server={files.api_server}",
            f"--token-file={files.token_file}",
            f"--ca-file={files.ca_file}",
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
    k8s_client: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("helm-test")
    release = ChartRelease(k8s_client)
    with PodRunner(
        k8s_client, workdir / "pods", [release.namespace], label_selectors=(release.selector,)
    ) as runner:
        try:
            release.install()
            yield Installed(k8s_client, release, runner, workdir)
        finally:
            release.uninstall()


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
    other = base64.b64encode(controlplane.ca_cert_path().read_bytes()).decode()

    def with_bundle(bundle: str | None = None) -> dict[str, Any]:
        """Every webhook's caBundle set to `bundle`, or back to what it was."""
        webhooks = [
            {"name": w.name, "clientConfig": {"caBundle": bundle or w.client_config.ca_bundle}}
            for w in config.webhooks
        ]
        return {"webhooks": webhooks}

    admission.patch_mutating_webhook_configuration(name, with_bundle(other))
    try:
        done = installed.check(timeout=4)
    finally:
        admission.patch_mutating_webhook_configuration(name, with_bundle())
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
