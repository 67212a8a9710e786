"""End to end on a StatefulSet laid out as jitsi-helm lays out its Prosody (the most used chart
that runs Prosody: testinfra.workloads.jitsi_prosody_statefulset), on the chain of conftest.py.

The pod runs the Prosody image built here in place of jitsi's own (which renders its config from
templates at start-up). Opted in the way a jitsi-helm user can, with the chart's own
`prosody.podLabels` value: its pod gets the sidecar, the operator makes a Service and a
ServiceMonitor owned by the StatefulSet, prometheus-operator generates the job, and the Prometheus
pods scrape Prosody through the sidecar at the config's statistics_interval. Last, a ConfigMap
edit and the restart the Event advises (`kubectl rollout restart statefulset/...`) bring the new
interval to the StatefulSet's new pod.
"""

from __future__ import annotations

import time

import httpx
import pytest
from kubernetes import client

from testinfra import e2e
from testinfra.procs import wait_until
from testinfra.workloads import INJECT, jitsi_prosody_statefulset, prosody_config

from .conftest import SIDECAR, Chain

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]

RELEASE = "jitsi"
NAME = f"{RELEASE}-prosody"  # the StatefulSet, as jitsi-helm names it
CONFIGMAP = f"{NAME}-config"
INTERVAL = 4  # seconds: statistics_interval in the ConfigMap


def jitsi_config(interval: int) -> str:
    """Jitsi serves BOSH on the pod network (its Service, and the kubelet's probes of
    /http-bind); Prosody 0.12's HTTP server listens on loopback only unless told otherwise."""
    return prosody_config(str(interval), modules=("bosh",), extra='http_interfaces = { "*" }')


def sidecar_interval(api: client.ApiClient, namespace: str, pod: str) -> str:
    spec = client.CoreV1Api(api).read_namespaced_pod(pod, namespace).spec
    sidecar = next(c for c in spec.containers if c.name == SIDECAR)
    return str({e.name: e.value for e in sidecar.env}["PROSODY_EXPORTER_INTERVAL"])


def events(api: client.ApiClient, namespace: str, reason: str) -> list[str]:
    found = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=StatefulSet,involvedObject.name={NAME}"
    )
    return [e.message for e in found.items if e.reason == reason]


@pytest.fixture(scope="module")
def statefulset(chain: Chain) -> str:
    workload = jitsi_prosody_statefulset(RELEASE, CONFIGMAP, pod_labels={INJECT: "true"})
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    container["image"] = e2e.prosody_image(chain.node)
    chain.deploy(CONFIGMAP, jitsi_config(INTERVAL), workload)
    pod(chain)  # Ready: jitsi's /http-bind probe for Prosody, /healthz for the sidecar
    return NAME


def pod(chain: Chain) -> client.V1Pod:
    """The StatefulSet's pod, Ready as the kubelet reports it."""
    return e2e.wait_for_ready_pod(
        chain.api, chain.namespace, f"statefulset.kubernetes.io/pod-name={NAME}-0"
    )


def test_the_statefulset_gets_the_sidecar_a_service_and_a_service_monitor(
    chain: Chain, statefulset: str
):
    pod = client.CoreV1Api(chain.api).read_namespaced_pod(f"{NAME}-0", chain.namespace)
    assert [c.name for c in pod.spec.containers] == ["prosody", SIDECAR]
    assert sidecar_interval(chain.api, chain.namespace, f"{NAME}-0") == f"{INTERVAL}s"

    monitor = chain.service_monitor(NAME)
    (owner,) = monitor["metadata"]["ownerReferences"]
    uid = client.AppsV1Api(chain.api).read_namespaced_stateful_set(NAME, chain.namespace)
    assert (owner["kind"], owner["name"], owner["uid"]) == ("StatefulSet", NAME, uid.metadata.uid)
    assert monitor["spec"]["endpoints"][0]["interval"] == f"{INTERVAL}s"
    service = client.CoreV1Api(chain.api).read_namespaced_service(
        f"{NAME}-prosody-metrics", chain.namespace
    )
    assert service.metadata.owner_references[0].kind == "StatefulSet"
    assert service.spec.selector == {
        "app.kubernetes.io/name": "prosody",
        "app.kubernetes.io/instance": RELEASE,
    }
    wait_until(
        lambda: bool(events(chain.api, chain.namespace, "MetricsConfigured")),
        30,
        "a MetricsConfigured Event on the StatefulSet",
    )


def test_prometheus_scrapes_the_statefulset_through_the_sidecar(chain: Chain, statefulset: str):
    job = chain.generated_job(NAME)
    assert job is not None and job["scrape_interval"] == f"{INTERVAL}s"
    url = f"http://{pod(chain).status.pod_ip}:9755/metrics"
    for prometheus in chain.prometheus:
        target = chain.target(prometheus, NAME, "up")
        assert target["labels"]["pod"] == f"{NAME}-0"
        assert target["scrapeUrl"] == url
    series = chain.prometheus[0].wait_for_series(
        f'prosody_stats_collection_seconds_count{{pod="{NAME}-0"}}'
    )
    assert series[0]["metric"]["namespace"] == chain.namespace
    # The host, outside the pod network: refused.
    assert httpx.get(url, timeout=10, trust_env=False).status_code == 403


def test_a_config_edit_and_the_advised_restart_reach_the_new_pod(chain: Chain, statefulset: str):
    new = INTERVAL + 2
    client.CoreV1Api(chain.api).patch_namespaced_config_map(
        CONFIGMAP, chain.namespace, {"data": {"prosody.cfg.lua": jitsi_config(new)}}
    )
    wait_until(
        lambda: (chain.generated_job(NAME) or {}).get("scrape_interval") == f"{new}s",
        60,
        f"prometheus-operator's job with scrape_interval {new}s",
    )
    advice = f"kubectl -n {chain.namespace} rollout restart statefulset/{NAME}"
    wait_until(
        lambda: any(advice in m for m in events(chain.api, chain.namespace, "MetricsConfigured")),
        30,
        "the Event advising the restart",
    )

    old_uid = pod(chain).metadata.uid
    restarted = {"kubectl.kubernetes.io/restartedAt": str(time.time())}
    client.AppsV1Api(chain.api).patch_namespaced_stateful_set(
        NAME, chain.namespace, {"spec": {"template": {"metadata": {"annotations": restarted}}}}
    )

    def replaced() -> bool:  # a StatefulSet's new pod has the old one's name
        pods = e2e.ready_pods(chain.api, chain.namespace, f"app.kubernetes.io/instance={RELEASE}")
        return len(pods) == 1 and pods[0].metadata.uid != old_uid

    wait_until(replaced, 120, f"the restarted {NAME}-0 to replace the old one")
    assert sidecar_interval(chain.api, chain.namespace, f"{NAME}-0") == f"{new}s"
    url = f"http://{pod(chain).status.pod_ip}:9755/metrics"

    def scraped() -> bool:
        targets = chain.prometheus[0].targets()
        return any(t["scrapeUrl"] == url and t["health"] == "up" for t in targets)

    wait_until(scraped, 300, "Prometheus to scrape the new pod")
