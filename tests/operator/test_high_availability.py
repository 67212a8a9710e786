"""Two replicas of the real operator sharing the chart's Lease, against the real control plane:
both serve the webhook, the Lease's holder alone reconciles, a SIGKILLed leader is replaced,
a SIGTERMed one hands the Lease over at once and keeps its webhook serving, not ready, for
`shutdown_delay` seconds; and a restarted replica posts no Event again.

The replicas run as local processes (testinfra.operator.OperatorProcess) with the chart's RBAC,
Lease and certificate Secret. They run on one host, so the webhook configuration, which calls a
URL rather than the chart's Service, points at whichever applied it last: each replica's webhook
is also called directly, with the AdmissionReview the API server would send, over TLS checked
against the configuration's caBundle. Who reconciles is shown by the API server's objects (the
Lease's holder, each Event posted once) and by each replica's own /metrics.

One test, in steps: each step starts from what the previous one left (who leads, what was
posted), as a real rollout does.
"""

from __future__ import annotations

import base64
import json
import signal
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kubernetes import client, utils
from kubernetes.watch import Watch
from prometheus_client.parser import text_string_to_metric_families

from prosody_operator import names
from testinfra.kubeapi import node_with_pod_cidrs, or_none
from testinfra.operator import OperatorProcess
from testinfra.procs import wait_until
from testinfra.webhook import pod_admission_review
from testinfra.workloads import prosody_config, prosody_pod, prosody_workload

pytestmark = pytest.mark.cluster

NODE_CIDRS = ["198.18.65.0/24", "2001:db8:65::/64"]
SHUTDOWN_DELAY = 120  # long enough to look at a stopping replica; the test never waits it out
# Generous: a takeover after a SIGKILL waits for the Lease's 15 s duration, on a busy machine.
TAKEOVER = 120.0


@pytest.fixture
def pod_network(k8s_client: client.ApiClient) -> Iterator[str]:
    """A Node with podCIDRs: the sidecar's default allowlist, without which none is injected."""
    with node_with_pod_cidrs(k8s_client, NODE_CIDRS) as name:
        yield name


@pytest.fixture
def first(
    k8s_client: client.ApiClient, pod_network: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The release's identity, Lease and Secret, and its first replica's settings (not started)."""
    operator = OperatorProcess(
        k8s_client,
        tmp_path / "replica-0",
        settings={
            "exporter_image": "registry.test/prosody-exporter:test",
            "shutdown_delay": str(SHUTDOWN_DELAY),
            "log_format": "json",
        },
    )
    operator.install_identity()
    operator.settings.update(operator.replica_settings())
    try:
        yield operator
    finally:
        operator.uninstall()


# --- what each replica says, and what the API server holds -------------------------------------


def metric(operator: OperatorProcess, name: str, **labels: str) -> float:
    """A sample of the replica's own /metrics (0 when it has none yet)."""
    text = httpx.get(operator.metrics_url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def leading(operator: OperatorProcess) -> bool:
    return metric(operator, "prosody_operator_leader") == 1


def reconciles(operator: OperatorProcess) -> float:
    return metric(operator, "prosody_operator_reconciles_total")


def lease(api: client.ApiClient, operator: OperatorProcess) -> client.V1Lease:
    namespace, _, name = operator.settings["leader_election_lease"].partition("/")
    return client.CoordinationV1Api(api).read_namespaced_lease(name, namespace)


def holder(api: client.ApiClient, operator: OperatorProcess) -> str:
    return lease(api, operator).spec.holder_identity or ""


def operator_events(api: client.ApiClient, namespace: str, name: str) -> list[tuple[str, str]]:
    """(reason, message) of the operator's Events on the object, one per posted Event."""
    events = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},source=prosody-operator"
    )
    found = []
    for event in events.items:
        found += [(event.reason, event.message)] * (event.count or 1)
    return found


def monitored(api: client.ApiClient, namespace: str, name: str) -> bool:
    """The workload has its ServiceMonitor, and its Event saying so."""
    monitor = or_none(
        lambda: client.CustomObjectsApi(api).get_namespaced_custom_object(
            "monitoring.coreos.com",
            "v1",
            namespace,
            "servicemonitors",
            names.metrics_object_name(name),
        )
    )
    reasons = {reason for reason, _ in operator_events(api, namespace, name)}
    return monitor is not None and "NotSelectedByPrometheus" in reasons


def injected_by(api: client.ApiClient, operator: OperatorProcess, namespace: str) -> bool:
    """Whether this replica's webhook, called directly over TLS the webhook configuration's
    caBundle verifies (the certificate the replicas share), injects the sidecar."""
    configuration = client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(
        operator.webhook_configuration
    )
    ca = base64.b64decode(configuration.webhooks[0].client_config.ca_bundle).decode()
    context = ssl.create_default_context(cadata=ca)
    pod = prosody_pod(f"direct-{uuid.uuid4().hex[:6]}", None)
    response = httpx.post(
        f"{operator.webhook_url}/inject-exporter",
        json=pod_admission_review(pod, namespace),
        verify=context,
        timeout=10,
    )
    response.raise_for_status()
    answer = response.json()["response"]
    patch = json.loads(base64.b64decode(answer.get("patch") or "W10="))
    return answer["allowed"] and any(
        op["path"].startswith("/spec/containers") and "prosody-exporter" in json.dumps(op)
        for op in patch
    )


def create_workload(api: client.ApiClient, namespace: str, name: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name),
            data={"prosody.cfg.lua": prosody_config("30")},
        ),
    )
    utils.create_from_dict(api, prosody_workload("Deployment", name, name), namespace=namespace)


# --- the test ----------------------------------------------------------------------------------


def test_two_replicas_one_leader_takeover_and_handover(
    k8s_client: client.ApiClient, first: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    api = k8s_client
    a = first.start()
    wait_until(lambda: leading(a), 60, "the first replica to take the Lease")
    replicas = [first.replica(tmp_path / f"replica-{n}") for n in (1, 2)]
    b, c = replicas
    try:
        b.start()
        # Both serve the webhook; only the Lease's holder reconciles.
        assert injected_by(api, a, namespace)
        assert injected_by(api, b, namespace)
        assert metric(b, "prosody_operator_admissions_total", result="injected") == 1
        assert holder(api, a)
        create_workload(api, namespace, "before")
        wait_until(lambda: monitored(api, namespace, "before"), 60, "the first reconcile")
        assert leading(a) and not leading(b)
        assert reconciles(a) >= 1 and reconciles(b) == 0
        assert metric(b, "prosody_operator_events_posted_total") == 0
        posted = operator_events(api, namespace, "before")
        assert len(posted) == len(set(posted)) >= 1, posted  # one replica posted them

        # SIGKILL the leader: the other takes the Lease over once its duration has passed
        # (nobody released it) and reconciles what came meanwhile.
        held_by_a = holder(api, a)
        a.process.signal(signal.SIGKILL)  # type: ignore[union-attr]
        create_workload(api, namespace, "meanwhile")
        wait_until(lambda: monitored(api, namespace, "meanwhile"), TAKEOVER, "the takeover")
        assert leading(b)
        assert holder(api, b) not in ("", held_by_a)
        assert reconciles(b) >= 1
        # Its reconcile of the workload the dead leader had reconciled posted nothing again.
        assert operator_events(api, namespace, "before") == posted

        # A restarted replica (a new process: it remembers the Events posted before it).
        c.start()
        assert injected_by(api, c, namespace)
        assert not leading(c)

        # SIGTERM the leader: it empties the Lease's holder at once (before anybody could take
        # it over), says not ready and keeps admitting pods while its endpoint would go.
        namespace_of_lease, _, lease_name = a.settings["leader_election_lease"].partition("/")
        version = lease(api, b).metadata.resource_version
        b.process.signal(signal.SIGTERM)  # type: ignore[union-attr]
        watch = Watch()
        released = False
        for change in watch.stream(
            client.CoordinationV1Api(api).list_namespaced_lease,
            namespace_of_lease,
            field_selector=f"metadata.name={lease_name}",
            resource_version=version,
            timeout_seconds=60,
        ):
            if not change["object"].spec.holder_identity:
                released = True
                watch.stop()
        assert released, "the Lease's holder was never emptied"
        assert httpx.get(b.readyz_url).status_code == 503
        assert b.process.running()  # type: ignore[union-attr]
        assert injected_by(api, b, namespace)
        wait_until(lambda: leading(c), TAKEOVER, "the restarted replica to take over")
        assert b.process.running(), "the stopping replica no longer serves"  # type: ignore[union-attr]

        # The new leader reconciled every workload again and posted nothing it had not.
        wait_until(lambda: reconciles(c) >= 2, 60, "the new leader's reconciles")
        assert operator_events(api, namespace, "before") == posted
        assert metric(c, "prosody_operator_events_posted_total") == 0
        # The logs are JSON lines, those about an object naming it: the pod it admitted, the
        # workload it reconciled.
        about = [
            (line.get("kind"), line.get("namespace"), line.get("name"))
            for line in map(json.loads, b.log_text().splitlines())
        ]
        assert ("Deployment", namespace, "meanwhile") in about
        assert any(kind == "Pod" and where == namespace for kind, where, _ in about)
    finally:
        for replica in replicas:
            replica.stop()
