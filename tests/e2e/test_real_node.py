"""What only a real node shows: memory limits enforced by the kernel, readiness computed by a
real kubelet from the injected probes, and a container killed and restarted under the operator.

The chart is installed with `sidecar.restartOnDrift=true`, so a Deployment whose pods started
without the sidecar gets its rollout restarted. The attacks (testinfra/attacks.py) come from the
host (outside the pod network: denied by the sidecar's allowlist) and from the node's network
namespace (the pod bridge's address: allowed), bounded in count and time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from kubernetes import client

from testinfra import e2e
from testinfra.kubeapi import create_namespace, or_none
from testinfra.layout import REPO_ROOT
from testinfra.node import Node
from testinfra.operator import ChartRelease
from testinfra.procs import wait_until
from testinfra.workloads import prosody_deployment

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]

SIDECAR = "prosody-exporter"
PORT = 9755
HEADER_BYTES = 8 * 1024 * 1024


def prosody_config(modules: str = '"http_openmetrics", ') -> str:
    return f"""
modules_enabled = {{ {modules}"roster", "saslauth", "ping" }}
authentication = "internal_hashed"
statistics = "internal"
statistics_interval = 2
VirtualHost "localhost"
"""


@dataclass
class Setup:
    api: client.ApiClient
    node: Node
    namespace: str
    release: ChartRelease
    image: str

    def deploy(self, name: str, config: str) -> None:
        core = client.CoreV1Api(self.api)
        core.create_namespaced_config_map(
            self.namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=f"{name}-config"),
                data={"prosody.cfg.lua": config},
            ),
        )
        client.AppsV1Api(self.api).create_namespaced_deployment(
            self.namespace, prosody_deployment(name, f"{name}-config", image=self.image)
        )

    def pod(self, name: str) -> client.V1Pod:
        return e2e.wait_for_ready_pod(self.api, self.namespace, f"app={name}")

    def attack(self, *args: str, inside: bool) -> dict[str, Any]:
        """testinfra.attacks, from the node's namespace (`inside` the pod network) or the host."""
        argv = [sys.executable, "-m", "testinfra.attacks", *args]
        argv = self.node.in_network(argv) if inside else argv
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=True
        )
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture(scope="module")
def setup(k8s_client: client.ApiClient, node: Node) -> Iterator[Setup]:
    namespace = f"node-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        create_namespace(k8s_client, namespace)
        stack.callback(
            lambda: or_none(lambda: client.CoreV1Api(k8s_client).delete_namespace(namespace))
        )
        release = ChartRelease(
            k8s_client,
            values={"sidecar.restartOnDrift": True, **e2e.chart_image_values(node)},
        )
        stack.callback(release.uninstall)
        release.install()
        yield Setup(k8s_client, node, namespace, release, e2e.prosody_image(node))


def sidecar_status(pod: client.V1Pod) -> client.V1ContainerStatus:
    return next(s for s in pod.status.container_statuses if s.name == SIDECAR)


PEAK_MEMORY = (
    "print(open('/sys/fs/cgroup/memory/memory.max_usage_in_bytes').read().strip(), "
    "open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())"
)


@pytest.mark.xfail(
    strict=True,
    reason="issue 13: the sidecar reads header lines whole before its access check; two 8 MB "
    "lines OOM-kill it under the chart's 64Mi (the exporter work bounds this; then this passes "
    "and the marker goes)",
)
def test_the_sidecar_stays_under_its_memory_limit_under_load_and_attack(setup: Setup):
    """8 MB header lines from a denied and an allowed address, 500 connections held open, and
    20 clients scraping as fast as they can: the sidecar is neither OOM-killed nor restarted,
    and keeps serving."""
    setup.deploy("target", prosody_config())
    pod = setup.pod("target")
    ip, name = pod.status.pod_ip, pod.metadata.name
    url = f"http://{ip}:{PORT}/metrics"
    assert httpx.get(url, timeout=10, trust_env=False).status_code == 403  # the host: denied
    size, header = str(HEADER_BYTES), "huge-header"
    results = [
        setup.attack(header, url, "--bytes", size, "--connections", "3", inside=False),
        setup.attack(header, url, "--bytes", size, "--connections", "3", inside=True),
        setup.attack("open-connections", ip, str(PORT), "--connections", "500", inside=True),
        setup.attack("scrape", url, "--clients", "20", "--seconds", "10", inside=True),
    ]
    pod = client.CoreV1Api(setup.api).read_namespaced_pod(name, setup.namespace)
    status = sidecar_status(pod)
    assert status.last_state.terminated is None, (status.last_state.terminated, results)
    assert status.restart_count == 0 and status.state.running, (status, results)
    peak, limit = e2e.exec_in_pod(
        setup.api, setup.namespace, name, SIDECAR, ["python3", "-c", PEAK_MEMORY]
    ).split()
    assert int(peak) < int(limit), (peak, limit, results)
    # Still serving the pod network.
    after = setup.attack("scrape", url, "--clients", "1", "--seconds", "1", inside=True)
    assert set(after["statuses"]) == {"200"}, (after, results)


def test_prosody_stays_ready_while_its_sidecar_is_broken(setup: Setup):
    """A Prosody without mod_http_openmetrics: the sidecar collects nothing (its /readyz says
    so), yet the kubelet keeps the pod Ready, since the injected readiness probe asks only
    whether the sidecar runs. Prosody keeps serving its Services."""
    setup.deploy("broken", prosody_config(modules=""))
    pod = setup.pod("broken")
    name, ip = pod.metadata.name, pod.status.pod_ip

    def sidecar_reports_broken() -> bool:
        return (
            httpx.get(f"http://{ip}:{PORT}/readyz", timeout=5, trust_env=False).status_code == 503
        )

    wait_until(sidecar_reports_broken, 60, "the sidecar's /readyz to report no collection")
    ready_since = next(c for c in pod.status.conditions if c.type == "Ready").last_transition_time
    # Several of the injected probe's periods (10 s) go by; the kubelet never marks it unready.
    time.sleep(35)
    pod = client.CoreV1Api(setup.api).read_namespaced_pod(name, setup.namespace)
    ready = next(c for c in pod.status.conditions if c.type == "Ready")
    assert (ready.status, ready.last_transition_time) == ("True", ready_since)
    assert sidecar_status(pod).ready and sidecar_status(pod).restart_count == 0
    assert sidecar_reports_broken()


@pytest.mark.xfail(
    strict=False,
    reason="found on the test node: back from the kill, the operator restarts the rollouts "
    "before its own webhook endpoint is Ready, so the new pods lack the sidecar too, and the "
    "10-minute cool-down keeps it from restarting again (it depends on timing: XPASS when the "
    "webhook is Ready first)",
)
def test_killing_the_operator_while_pods_are_created_leaves_none_unreported(setup: Setup):
    """The operator's container is killed; Deployments created meanwhile get pods without the
    sidecar (the webhook fails open). Once the kubelet has restarted the operator, each such
    Deployment gets a SidecarMissing Event and its rollout restarted, and every pod ends up
    injected."""
    core = client.CoreV1Api(setup.api)
    operator = e2e.wait_for_ready_pod(setup.api, setup.release.namespace, setup.release.selector)
    restarts = operator.status.container_statuses[0].restart_count
    setup.node.kill_container(operator.status.container_statuses[0].container_id)
    names = [f"storm-{i}" for i in range(4)]
    for name in names:
        setup.deploy(name, prosody_config())

    def pods_of(name: str) -> list[client.V1Pod]:
        return core.list_namespaced_pod(setup.namespace, label_selector=f"app={name}").items

    wait_until(lambda: all(pods_of(n) for n in names), 60, "the storm's pods to be created")
    missed = {
        name
        for name in names
        for pod in pods_of(name)
        if SIDECAR not in [c.name for c in pod.spec.containers]
    }
    assert missed, "every pod was injected: the operator came back before any was created"

    def restarted() -> bool:
        pods = e2e.ready_pods(setup.api, setup.release.namespace, setup.release.selector)
        return bool(pods) and pods[0].status.container_statuses[0].restart_count > restarts

    wait_until(restarted, 120, "the kubelet to restart the operator's container")

    def all_injected() -> bool:
        for name in names:
            pods = pods_of(name)
            if len(pods) != 1 or SIDECAR not in [c.name for c in pods[0].spec.containers]:
                return False
        return True

    wait_until(all_injected, 240, "every storm Deployment's pods to have the sidecar")
    for name in missed:
        events = core.list_namespaced_event(
            setup.namespace, field_selector=f"involvedObject.name={name},reason=SidecarMissing"
        ).items
        assert events, f"no SidecarMissing Event on Deployment {name}"
