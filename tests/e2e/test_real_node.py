"""What only a real node shows: memory limits enforced by the kernel, readiness computed by a
real kubelet from the injected probes, and a container killed and restarted under the operator.

On the chain of conftest.py (the chart's two operator replicas; `sidecar.restartOnDrift=true`,
so a workload whose pods started without the sidecar gets its rollout restarted). The hostile
clients are testinfra.hostile's, run from the host (outside the pod network: refused by the
sidecar's allowlist) and from the node's network namespace (the pod bridge's address: allowed),
bounded in count and time.
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
from testinfra.kubeapi import or_none
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


# --- Last: the operator's replicas killed and gone (they come back) ---------------------------


def operator_pods(chain: Chain) -> list[client.V1Pod]:
    """The operator's Ready replicas."""
    return e2e.ready_pods(chain.api, chain.release.namespace, chain.release.selector)


def webhook_endpoints(chain: Chain) -> dict[str, bool]:
    """The webhook Service's endpoints, as the API server reads them to call the webhook: the
    pod each one is, and whether it is ready (an unset `ready` counts as ready)."""
    release = chain.release
    admission = client.AdmissionregistrationV1Api(chain.api)
    configuration = admission.read_mutating_webhook_configuration(release.webhook_configuration)
    service = configuration.webhooks[0].client_config.service.name
    slices = client.DiscoveryV1Api(chain.api).list_namespaced_endpoint_slice(
        release.namespace, label_selector=f"kubernetes.io/service-name={service}"
    )
    return {
        endpoint.target_ref.name: endpoint.conditions.ready is not False
        for found in slices.items
        for endpoint in found.endpoints or ()
    }


def lease_holder(chain: Chain) -> str:
    lease = client.CoordinationV1Api(chain.api).read_namespaced_lease(
        chain.release.name, chain.release.namespace
    )
    return lease.spec.holder_identity or ""


def all_replicas_serving(chain: Chain) -> list[client.V1Pod]:
    """The chart's two replicas Ready, both endpoints of the webhook Service ready, one of them
    holding the Lease."""
    pods: list[client.V1Pod] = []

    def serving() -> bool:
        pods[:] = operator_pods(chain)
        endpoints = webhook_endpoints(chain)
        names = {p.metadata.name for p in pods}
        return (
            len(pods) == 2
            and endpoints == dict.fromkeys(names, True)
            and any(lease_holder(chain).startswith(f"{name}-") for name in names)
        )

    wait_until(serving, 180, "both operator replicas serving, one holding the Lease")
    return pods


def pods_of(chain: Chain, name: str) -> list[client.V1Pod]:
    return (
        client.CoreV1Api(chain.api)
        .list_namespaced_pod(chain.namespace, label_selector=f"app={name}")
        .items
    )


def injected(pod: client.V1Pod) -> bool:
    return SIDECAR in [c.name for c in pod.spec.containers]


def test_killing_the_leader_while_pods_are_created_leaves_every_pod_injected(chain: Chain):
    """The leader's container is killed (SIGKILL: no Lease released, no graceful stop). Once
    the kubelet has seen it die, the API server calls the webhook at the other replica only:
    Deployments created while the killed one restarts get the sidecar in every pod, and the
    other replica takes the Lease once it expires and reconciles them (their ServiceMonitors).
    (Pods created in the second before the kubelet notices can still be sent to the dead
    replica: the API server admits them without the sidecar, as for any webhook, and the
    reconciler restarts their rollout: the next test.)"""
    pods = all_replicas_serving(chain)
    holder = lease_holder(chain)
    (leader,) = [p for p in pods if holder.startswith(f"{p.metadata.name}-")]
    (other,) = [p for p in pods if p is not leader]
    chain.node.kill_container(leader.status.container_statuses[0].container_id)
    wait_until(
        lambda: webhook_endpoints(chain).get(leader.metadata.name) is False,
        60,
        "the killed replica's endpoint to be not ready",
        0.1,
    )
    names = [f"leader-killed-{i}" for i in range(4)]
    for name in names:
        deploy(chain, name, prosody_config("2"))
    wait_until(lambda: all(pods_of(chain, n) for n in names), 60, "the Deployments' pods")
    missed = [p.metadata.name for n in names for p in pods_of(chain, n) if not injected(p)]
    assert not missed, f"admitted without the sidecar: {missed}"
    log = client.CoreV1Api(chain.api).read_namespaced_pod_log(
        other.metadata.name, chain.release.namespace
    )
    admitted = [line for line in log.splitlines() if "pod admitted: injected" in line]
    for name in names:  # the other replica injected them all
        assert any(f"/{name}-" in line for line in admitted), log[-3000:]
    wait_until(
        lambda: lease_holder(chain).startswith(f"{other.metadata.name}-"),
        60,
        f"the other replica {other.metadata.name} to take the Lease",
    )
    for name in names:  # ... and reconciles
        wait_until(
            lambda name=name: or_none(lambda: chain.service_monitor(name)) is not None,
            60,
            f"the ServiceMonitor of {name}",
        )
    all_replicas_serving(chain)  # the killed one back, for what follows


def test_with_every_replica_gone_rollouts_restart_once_the_webhook_is_ready(chain: Chain):
    """The operator's Deployment scaled to 0, Deployments created meanwhile (no webhook: their
    pods are admitted without the sidecar), then scaled back to the chart's replicas. Each
    such Deployment gets a SidecarMissing Event and, with restartOnDrift, its rollout restarted
    only once the webhook Service has a ready endpoint (a restart before would make pods that
    lack it too, and the cool-down would keep them so): every pod ends up injected.

    Whether the leader reconciles before its webhook endpoint is ready depends on timing, so
    the test holds the endpoints back: the webhook Service selects no pod (an extra selector
    label) until the replicas lead and have reported the drift, then selects them again."""
    release = chain.release
    core, apps = client.CoreV1Api(chain.api), client.AppsV1Api(chain.api)
    replicas = apps.read_namespaced_deployment(release.name, release.namespace).spec.replicas
    assert replicas == 2  # the chart's default
    all_replicas_serving(chain)
    service = f"{release.name}-webhook"

    def scale(count: int) -> None:
        apps.patch_namespaced_deployment_scale(
            release.name, release.namespace, {"spec": {"replicas": count}}
        )

    def select_none(hold: bool) -> None:
        patch = {"spec": {"selector": {"e2e.prosody-operator.io/hold": "true" if hold else None}}}
        core.patch_namespaced_service(service, release.namespace, patch)

    scale(0)
    wait_until(
        lambda: (
            not core.list_namespaced_pod(release.namespace, label_selector=release.selector).items
        ),
        120,
        "every operator replica to be gone",
    )
    names = [f"replicas-gone-{i}" for i in range(4)]
    for name in names:
        deploy(chain, name, prosody_config("2"))
    wait_until(lambda: all(pods_of(chain, n) for n in names), 60, "the Deployments' pods")
    assert not [p for n in names for p in pods_of(chain, n) if injected(p)]
    select_none(True)
    try:
        scale(replicas)

        def drift_reported(name: str) -> bool:
            events = core.list_namespaced_event(
                chain.namespace, field_selector=f"involvedObject.name={name},reason=SidecarMissing"
            ).items
            return any("once the webhook Service" in e.message for e in events)

        for name in names:
            wait_until(lambda name=name: drift_reported(name), 180, f"SidecarMissing on {name}")

        def leader() -> client.V1Pod | None:
            """The replica holding the Lease: it reconciled, but may not be Ready yet (leading
            does not wait for the webhook to serve)."""
            holder = lease_holder(chain)
            pods = core.list_namespaced_pod(release.namespace, label_selector=release.selector)
            return next((p for p in pods.items if holder.startswith(f"{p.metadata.name}-")), None)

        wait_until(lambda: leader() is not None, 30, "the replica holding the Lease")
        leading = leader()
        assert leading is not None
        log = core.read_namespaced_pod_log(leading.metadata.name, release.namespace)
        for name in names:
            assert (
                sum(f"/{name}] rollout restart deferred" in line for line in log.splitlines()) == 1
            ), log[-3000:]
            template = apps.read_namespaced_deployment(name, chain.namespace).spec.template
            assert "kubectl.kubernetes.io/restartedAt" not in (template.metadata.annotations or {})
        assert webhook_endpoints(chain) == {}
    finally:
        select_none(False)

    def all_injected() -> bool:
        return all(
            len(pods) == 1 and injected(pods[0]) for pods in (pods_of(chain, n) for n in names)
        )

    wait_until(all_injected, 300, "every pod of those Deployments to have the sidecar")
    for name in names:
        template = apps.read_namespaced_deployment(name, chain.namespace).spec.template
        assert "kubectl.kubernetes.io/restartedAt" in template.metadata.annotations
    all_replicas_serving(chain)
