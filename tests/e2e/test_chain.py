"""End to end, for real: prosody-operator -> pods -> prometheus-operator -> Prometheus scrapes
Prosody through the sidecar.

Everything is the real thing: the chart is installed with `helm install`; testinfra.podrunner
binds the pods to its Node and runs them in network namespaces on a bridge — the operator's pod
as the real prosody-operator, Prosody pods as Debian's Prosody and the real prosody-exporter —
reporting them Running so the controller-manager fills the Endpoints; the API server calls the
operator's webhook through the chart's Service, and the operator injects the sidecar and makes
the Service and ServiceMonitor; prometheus-operator v0.85 generates the scrape
configuration from the ServiceMonitor; Prometheus (built from its Go module) runs that
configuration, discovers the pods with kubernetes_sd through the API server, and scrapes them.

Two Deployments, on the chain of conftest.py:
* `xmpp`: statistics_interval = 3, so the ServiceMonitor and the sidecar use 3 s;
* `manual`: statistics_interval = "manual", so the sidecar is Prosody's only scraper, every
  `chain.manual_interval` seconds, whatever the number of Prometheus replicas.
The last test edits the xmpp ConfigMap and restarts its rollout: the new interval reaches the
generated configuration, the running Prometheus (reloaded) and the new pod's sidecar.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from testinfra import e2e
from testinfra.podrunner import SIDECAR
from testinfra.procs import wait_until
from testinfra.workloads import prosody_config, prosody_deployment

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.timeout(1800)]

STATISTICS_INTERVAL = 3  # seconds: statistics_interval in the xmpp ConfigMap


@pytest.fixture(scope="module", autouse=True)
def deployments(chain):
    for app, interval in (("xmpp", str(STATISTICS_INTERVAL)), ("manual", '"manual"')):
        chain.deploy(
            f"{app}-config", prosody_config(interval), prosody_deployment(app, f"{app}-config")
        )


def test_the_helm_installed_operator_injects_through_the_charts_service(chain):
    """The operator runs in the pod `helm install` made; the API server reaches its webhook at
    the endpoint of the chart's Service (the configuration names no URL), and it injected."""
    (operator,) = chain.runner.running_pods(chain.release.namespace)
    assert operator.processes["operator"].running()
    config = client.AdmissionregistrationV1Api(chain.api).read_mutating_webhook_configuration(
        chain.release.webhook_configuration
    )
    webhook = config.webhooks[0].client_config
    assert webhook.url is None
    assert webhook.service.namespace == chain.release.namespace
    slices = client.DiscoveryV1Api(chain.api).list_namespaced_endpoint_slice(
        chain.release.namespace, label_selector=f"kubernetes.io/service-name={webhook.service.name}"
    )
    assert [a for s in slices.items for e in s.endpoints for a in e.addresses] == [operator.ip]
    apps = ("xmpp", "manual")

    def running() -> bool:
        return all(chain.runner.running_pods(chain.namespace, f"{app}-") for app in apps)

    wait_until(running, 60, "the Prosody pods to run")
    for app in apps:
        pod = client.CoreV1Api(chain.api).read_namespaced_pod(chain.pod(app).name, chain.namespace)
        assert [c.name for c in pod.spec.containers] == ["prosody", SIDECAR]
        assert pod.metadata.annotations["prosody-operator.io/status"]


def test_prometheus_scrapes_prosody_through_the_sidecar(chain):
    for prometheus in chain.prometheus:
        target = chain.target(prometheus, "xmpp", "up")
        pod = chain.pod("xmpp")
        assert target["labels"]["pod"] == pod.name
        assert target["scrapeUrl"] == f"http://{pod.ip}:9755/metrics"  # the sidecar's port
        series = prometheus.wait_for_series(
            f'prosody_stats_collection_seconds_count{{pod="{pod.name}"}}'
        )
        assert series[0]["metric"]["namespace"] == chain.namespace
        assert prometheus.query(f'prosody_exporter_up{{pod="{pod.name}"}}')[0]["value"][1] == "1"


def test_scrape_interval_is_prosodys_statistics_interval(chain):
    monitor = chain.service_monitor("xmpp")
    assert monitor["spec"]["endpoints"][0]["interval"] == f"{STATISTICS_INTERVAL}s"
    job = chain.generated_job("xmpp")
    assert job is not None, "prometheus-operator generated no job for the ServiceMonitor"
    assert job["scrape_interval"] == f"{STATISTICS_INTERVAL}s"
    # ... and it is what the running Prometheus uses.
    assert chain.running_job("xmpp")["scrape_interval"] == f"{STATISTICS_INTERVAL}s"


def test_xmpp_session_shows_in_c2s_connections(chain):
    pod = chain.pod("xmpp")
    e2e.register_in_pod(pod.prosody_config, "alice", "alice-password")
    session = e2e.PodXmppSession(pod.netns, "alice", "alice-password").open()
    try:
        chain.prometheus[0].wait_for_series(
            f'sum(prosody_mod_c2s__connections{{pod="{pod.name}"}}) >= 1', timeout=60
        )
    finally:
        session.close()


def test_prometheus_outside_the_pod_network_is_refused(chain):
    target = chain.target(chain.outsider, "xmpp", "down")
    assert "403" in target["lastError"], target["lastError"]
    # The same configuration, scraping from the pod network, succeeds.
    chain.target(chain.prometheus[0], "xmpp", "up")


def test_manual_mode_two_replicas_one_collection_per_interval(chain):
    pod = chain.pod("manual")
    assert chain.service_monitor("manual")["spec"]["endpoints"][0]["interval"] == (
        f"{chain.manual_interval}s"
    )
    for prometheus in chain.prometheus:
        chain.target(prometheus, "manual", "up")
    promql = f'prosody_stats_collection_seconds_count{{pod="{pod.name}"}}'
    chain.prometheus[0].wait_for_series(promql)

    def collections() -> float:
        values = [float(r["value"][1]) for r in chain.prometheus[0].query(promql)]
        return max(values)

    window = 10 * chain.manual_interval
    first = collections()
    started = time.monotonic()
    time.sleep(window)
    done = collections() - first
    elapsed = time.monotonic() - started
    # Prosody collects on every request in manual mode: with both replicas scraping it
    # directly it would collect twice per interval. Through the sidecar: once.
    expected = elapsed / chain.manual_interval
    assert expected - 3 <= done <= expected + 3, (done, expected)


def test_changing_the_configmap_interval_reaches_prometheus_and_the_restarted_pod(chain):
    """Last: it edits the xmpp ConfigMap and restarts the xmpp rollout."""
    new = STATISTICS_INTERVAL + 2
    client.CoreV1Api(chain.api).patch_namespaced_config_map(
        "xmpp-config", chain.namespace, {"data": {"prosody.cfg.lua": prosody_config(str(new))}}
    )
    wait_until(
        lambda: (chain.generated_job("xmpp") or {}).get("scrape_interval") == f"{new}s",
        60,
        f"prometheus-operator's configuration with scrape_interval {new}s",
    )

    wait_until(
        lambda: chain.running_job("xmpp").get("scrape_interval") == f"{new}s",
        30,
        "Prometheus to reload the new configuration",
    )

    # The Event says to restart the rollout; the new pod's sidecar then collects at the new
    # interval, and Prometheus scrapes the new pod (the old one is stopped and deleted).
    old_pod = chain.pod("xmpp").name
    restarted = {"kubectl.kubernetes.io/restartedAt": str(time.time())}
    client.AppsV1Api(chain.api).patch_namespaced_deployment(
        "xmpp",
        chain.namespace,
        {"spec": {"template": {"metadata": {"annotations": restarted}}}},
    )

    def replaced() -> bool:
        names = [p.name for p in chain.runner.running_pods(chain.namespace, "xmpp-")]
        return len(names) == 1 and names[0] != old_pod

    wait_until(replaced, 60, "the restarted xmpp pod to replace the old one")
    pod = chain.pod("xmpp")
    core = client.CoreV1Api(chain.api)
    sidecar = next(
        c
        for c in core.read_namespaced_pod(pod.name, chain.namespace).spec.containers
        if c.name == "prosody-exporter"
    )
    assert {e.name: e.value for e in sidecar.env}["PROSODY_EXPORTER_INTERVAL"] == f"{new}s"
    wait_until(
        lambda: (
            not core.list_namespaced_pod(
                chain.namespace, field_selector=f"metadata.name={old_pod}"
            ).items
        ),
        30,
        f"{old_pod} to be deleted",
    )
    wait_until(
        lambda: chain.target(chain.prometheus[0], "xmpp", "up")["labels"]["pod"] == pod.name,
        60,
        f"Prometheus to scrape {pod.name}",
    )
    chain.runner.check()
