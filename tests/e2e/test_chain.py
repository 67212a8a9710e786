"""End to end, for real: prosody-operator -> pods -> prometheus-operator -> Prometheus scrapes
Prosody through the sidecar.

Everything is the real thing, on the test node (testinfra/node.py: kubelet, containerd, kube-proxy):
the chart is installed with `helm install` and its operator runs from the operator image built
from operator/Dockerfile; Prosody pods run the Prosody image built from Debian's package; the API
server calls the operator's webhook through the chart's Service, and the operator injects the
sidecar (the image built from exporter/Dockerfile, under the securityContext and memory limit the
operator writes) and makes the Service and ServiceMonitor; prometheus-operator v0.85 generates the
scrape configuration and a StatefulSet whose Prometheus pods (v3.5, with the config-reloader)
discover the pods with kubernetes_sd through the `kubernetes` Service and scrape them at their
pod IPs.

On the chain of conftest.py, three Deployments (module-scoped):
* `xmpp`: statistics_interval = 3, so the ServiceMonitor and the sidecar use 3 s;
* `manual`: statistics_interval = "manual", so the sidecar is Prosody's only scraper, every
  chart's sidecar.manualInterval seconds, whatever the number of Prometheus replicas;
* `xmpp13`: Prosody 13.0 (its image, and its version in the pod annotation), whose config uses
  13.0's list methods, which 0.12 cannot read.
Two Prometheus replicas run the generated configuration; they also scrape the operator's two
replicas through the chart's own ServiceMonitor (metrics.serviceMonitor). The host, outside the
pod network (the sidecar's default allowlist is the Nodes' podCIDRs), is refused. The last test
edits the xmpp ConfigMap and restarts its rollout: the new interval reaches the generated
configuration, the running Prometheus (reloaded by its config-reloader) and the new pod's
sidecar.
"""

from __future__ import annotations

import json
import time
from functools import partial

import httpx
import pytest
import yaml
from kubernetes import client

from testinfra import e2e
from testinfra.kubeapi import or_none
from testinfra.procs import wait_until
from testinfra.workloads import prosody_config, prosody_deployment
from tools import chart

from .conftest import OPERATOR_SCRAPE_INTERVAL, SIDECAR, Chain

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]

STATISTICS_INTERVAL = 3  # seconds: statistics_interval in the xmpp ConfigMap
INTERVAL_13 = 4  # seconds: statistics_interval in the xmpp13 ConfigMap
PROSODY_13_CONFIG = f"""
modules_enabled = {{ "roster", "saslauth" }}
modules_enabled:append {{ "http_openmetrics", "ping" }} -- Prosody 13.0's list methods
authentication = "internal_hashed"
statistics = "internal"
statistics_interval = {INTERVAL_13}
VirtualHost "localhost"
"""


def chart_sidecar_memory_limit() -> str:
    """The chart's default sidecar memory limit, which the operator writes into the pods."""
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    limit: str = values["sidecar"]["resources"]["limits"]["memory"]
    return limit


def bytes_of(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.fixture(scope="module", autouse=True)
def deployments(chain: Chain) -> None:
    image, image_13 = e2e.prosody_image(chain.node), e2e.prosody_image(chain.node, "13")
    version_13 = {"prosody-operator.io/prosody-version": image_13.rsplit(":", 1)[1]}
    for app, config, app_image, pod_annotations in (
        ("xmpp", prosody_config(str(STATISTICS_INTERVAL)), image, {}),
        ("manual", prosody_config('"manual"'), image, {}),
        ("xmpp13", PROSODY_13_CONFIG, image_13, version_13),
    ):
        workload = prosody_deployment(
            app, f"{app}-config", image=app_image, annotations=pod_annotations
        )
        chain.deploy(f"{app}-config", config, workload)


def container_status(pod: client.V1Pod, name: str) -> client.V1ContainerStatus:
    return next(s for s in pod.status.container_statuses if s.name == name)


def test_the_helm_installed_operator_injects_through_the_charts_service(chain: Chain):
    """The operator runs in the chart's two replicas `helm install` made, from the image built
    here; the API server reaches its webhook at the endpoints of the chart's Service (the
    configuration names no URL), and it injected."""
    operators: list[client.V1Pod] = []

    def both_ready() -> bool:  # the chart's operator.replicas
        operators[:] = e2e.ready_pods(chain.api, chain.release.namespace, chain.release.selector)
        return len(operators) == 2

    wait_until(both_ready, 120, "the operator's two replicas Ready")
    for operator in operators:
        status = container_status(operator, "operator")
        assert status.state.running and status.restart_count == 0
        assert status.image == e2e.loaded_image(chain.node, "prosody-operator")
    config = client.AdmissionregistrationV1Api(chain.api).read_mutating_webhook_configuration(
        chain.release.webhook_configuration
    )
    webhook = config.webhooks[0].client_config
    assert webhook.url is None
    assert webhook.service.namespace == chain.release.namespace
    slices = client.DiscoveryV1Api(chain.api).list_namespaced_endpoint_slice(
        chain.release.namespace, label_selector=f"kubernetes.io/service-name={webhook.service.name}"
    )
    addresses = sorted(a for s in slices.items for e in s.endpoints for a in e.addresses)
    assert addresses == sorted(operator.status.pod_ip for operator in operators)
    for app in ("xmpp", "manual", "xmpp13"):
        pod = chain.pod(app)
        assert [c.name for c in pod.spec.containers] == ["prosody", SIDECAR]
        assert pod.metadata.annotations["prosody-operator.io/status"]
        for name in ("prosody", SIDECAR):
            assert container_status(pod, name).state.running, name


# What the sidecar's own process reports about itself, run in its container with `kubectl exec`
# (which the kubelet starts under the container's securityContext, in its cgroup).
SELF_REPORT = """
import json, os
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
try:
    open("/written-at-run-time", "w")
    root = "writable"
except OSError as error:
    root = error.strerror
limit = open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip()
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "capabilities": status["CapEff"].strip(),
    "seccomp": status["Seccomp"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "root": root, "memory_limit": int(limit),
}))
"""


def test_the_sidecar_runs_under_the_injected_security_context_and_memory_limit(chain: Chain):
    """What the operator wrote is what the kubelet and runc enforce: uid 65532, no capabilities,
    seccomp filtering (RuntimeDefault), no privilege escalation, a read-only root filesystem and
    the chart's memory limit."""
    pod = chain.pod("xmpp")
    sidecar = next(c for c in pod.spec.containers if c.name == SIDECAR)
    limit = chart_sidecar_memory_limit()
    assert sidecar.resources.limits["memory"] == limit
    assert container_status(pod, SIDECAR).image == e2e.loaded_image(chain.node, SIDECAR)
    argv = ["python3", "-c", SELF_REPORT]
    report = json.loads(
        e2e.exec_in_pod(chain.api, chain.namespace, pod.metadata.name, SIDECAR, argv)
    )
    assert report == {
        "uid": 65532,
        "gid": 65532,
        "capabilities": "0000000000000000",
        "seccomp": "2",  # filter mode
        "no_new_privs": "1",
        "root": "Read-only file system",
        "memory_limit": bytes_of(limit),
    }


def test_prometheus_scrapes_prosody_through_the_sidecar(chain: Chain):
    pod = chain.pod("xmpp")
    name = pod.metadata.name
    for prometheus in chain.prometheus:
        target = chain.target(prometheus, "xmpp", "up")
        assert target["labels"]["pod"] == name
        # At the pod's IP, on the sidecar's port: Prometheus runs in a pod of the pod network.
        assert target["scrapeUrl"] == f"http://{pod.status.pod_ip}:9755/metrics"
        series = prometheus.wait_for_series(
            f'prosody_stats_collection_seconds_count{{pod="{name}"}}'
        )
        assert series[0]["metric"]["namespace"] == chain.namespace
        assert prometheus.query(f'prosody_exporter_up{{pod="{name}"}}')[0]["value"][1] == "1"


def test_prometheus_scrapes_both_operator_replicas_through_the_charts_service_monitor(
    chain: Chain,
):
    """The chart's ServiceMonitor selects its metrics Service: both Prometheus replicas scrape
    both operator replicas at their pod IPs, at the chart's interval, and the series the chart's
    alerts read (selected by `namespace` and `job`, as they select them) come one per replica:
    exactly one leads, and its workload counts are the ones that are not zero."""
    release = chain.release
    (service,) = (
        client.CoreV1Api(chain.api)
        .list_namespaced_service(
            release.namespace,
            label_selector=f"{release.selector},app.kubernetes.io/component=metrics",
        )
        .items
    )
    job = f"serviceMonitor/{release.namespace}/{service.metadata.name}/0"
    operators = e2e.ready_pods(chain.api, release.namespace, release.selector)
    assert len(operators) == 2, [p.metadata.name for p in operators]
    urls = {operator_metrics_url(pod) for pod in operators}
    names = {pod.metadata.name for pod in operators}
    alerts_select = f'namespace="{release.namespace}", job="{service.metadata.name}"'
    for prometheus in chain.prometheus:
        wait_until(
            partial(scrapes, prometheus, job, urls), 300, f"{prometheus.pod_name} to scrape {urls}"
        )
        running = yaml.safe_load(prometheus.running_config())
        (scrape_config,) = [c for c in running["scrape_configs"] if c["job_name"] == job]
        assert scrape_config["scrape_interval"] == OPERATOR_SCRAPE_INTERVAL
        prometheus.wait_for_series(f"count(prosody_operator_leader{{{alerts_select}}}) == 2")
        # xmpp, manual and xmpp13, once the leader has reconciled them all.
        workloads = f'prosody_operator_workloads{{{alerts_select}, state="injected"}}'
        prometheus.wait_for_series(f"max({workloads}) == 3")
        leader = {
            s["metric"]["pod"]: float(s["value"][1])
            for s in prometheus.query(f"prosody_operator_leader{{{alerts_select}}}")
        }
        assert set(leader) == names and sorted(leader.values()) == [0.0, 1.0], leader
        injected = {s["metric"]["pod"]: float(s["value"][1]) for s in prometheus.query(workloads)}
        # The leader counts the three; the other replica, which does not reconcile, none.
        assert injected == {pod: 3.0 * lead for pod, lead in leader.items()}, (injected, leader)


def operator_metrics_url(pod: client.V1Pod) -> str:
    (container,) = pod.spec.containers
    port = next(p.container_port for p in container.ports if p.name == "metrics")
    return f"http://{pod.status.pod_ip}:{port}/metrics"


def scrapes(prometheus: e2e.PrometheusPod, job: str, urls: set[str]) -> bool:
    """Whether `prometheus` scrapes exactly `urls` in `job`, all up."""
    targets = [t for t in prometheus.targets() if t["scrapePool"] == job]
    return (
        {t["scrapeUrl"] for t in targets if t["health"] == "up"}
        == urls
        == {t["scrapeUrl"] for t in targets}
    )


def test_scrape_interval_is_prosodys_statistics_interval(chain: Chain):
    monitor = chain.service_monitor("xmpp")
    assert monitor["spec"]["endpoints"][0]["interval"] == f"{STATISTICS_INTERVAL}s"
    job = chain.generated_job("xmpp")
    assert job is not None, "prometheus-operator generated no job for the ServiceMonitor"
    assert job["scrape_interval"] == f"{STATISTICS_INTERVAL}s"
    # ... and it is what the running Prometheus uses.
    assert chain.running_job("xmpp")["scrape_interval"] == f"{STATISTICS_INTERVAL}s"


def test_prosody_13_is_read_in_its_dialect_and_scraped(chain: Chain):
    """The pod runs the Prosody 13.0 image; the operator reads its config as 13.0 does (0.12
    cannot evaluate `:append`), and Prometheus scrapes 13.0's own metrics through the sidecar."""
    monitor = chain.service_monitor("xmpp13")
    assert monitor["spec"]["endpoints"][0]["interval"] == f"{INTERVAL_13}s"
    pod = chain.pod("xmpp13")
    chain.target(chain.prometheus[0], "xmpp13", "up")
    (info,) = chain.prometheus[0].wait_for_series(f'prosody_info{{pod="{pod.metadata.name}"}}')
    assert info["metric"]["version"].startswith("13."), info


def test_xmpp_session_shows_in_c2s_connections(chain: Chain):
    pod = chain.pod("xmpp")
    e2e.register_in_pod(chain.api, chain.namespace, pod.metadata.name, "alice", "alice-password")
    session = e2e.PodXmppSession(pod.status.pod_ip, "alice", "alice-password").open()
    try:
        chain.prometheus[0].wait_for_series(
            f'sum(prosody_mod_c2s__connections{{pod="{pod.metadata.name}"}}) >= 1', timeout=60
        )
    finally:
        session.close()


def test_a_scraper_outside_the_pod_network_is_refused(chain: Chain):
    """The host's address on its link to the node is outside the Nodes' podCIDRs: 403, while
    the Prometheus pods, on the pod network, scrape the same URL."""
    pod = chain.pod("xmpp")
    url = f"http://{pod.status.pod_ip}:9755/metrics"
    response = httpx.get(url, timeout=10, trust_env=False)
    assert response.status_code == 403, response.text
    target = chain.target(chain.prometheus[0], "xmpp", "up")
    assert target["scrapeUrl"] == url


def test_manual_mode_two_replicas_one_collection_per_interval(chain: Chain):
    pod = chain.pod("manual")
    assert chain.service_monitor("manual")["spec"]["endpoints"][0]["interval"] == (
        f"{chain.manual_interval}s"
    )
    for prometheus in chain.prometheus:
        chain.target(prometheus, "manual", "up")
    promql = f'prosody_stats_collection_seconds_count{{pod="{pod.metadata.name}"}}'
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


def test_changing_the_configmap_interval_reaches_prometheus_and_the_restarted_pod(chain: Chain):
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
    # The config-reloader sidecar sees the new Secret once the kubelet has updated the volume
    # (at its next sync of the pod: minutes, see testinfra.e2e) and has Prometheus reload it.
    wait_until(
        lambda: chain.running_job("xmpp").get("scrape_interval") == f"{new}s",
        300,
        "Prometheus to reload the new configuration",
    )

    # The Event says to restart the rollout; the new pod's sidecar then collects at the new
    # interval, and Prometheus scrapes the new pod (the old one is stopped and deleted).
    old_pod = chain.pod("xmpp").metadata.name
    restarted = {"kubectl.kubernetes.io/restartedAt": str(time.time())}
    client.AppsV1Api(chain.api).patch_namespaced_deployment(
        "xmpp",
        chain.namespace,
        {"spec": {"template": {"metadata": {"annotations": restarted}}}},
    )
    core = client.CoreV1Api(chain.api)
    wait_until(
        lambda: or_none(lambda: core.read_namespaced_pod(old_pod, chain.namespace)) is None,
        120,
        f"{old_pod} to be stopped and deleted",
    )
    pod = chain.pod("xmpp")
    sidecar = next(c for c in pod.spec.containers if c.name == SIDECAR)
    assert {e.name: e.value for e in sidecar.env}["PROSODY_EXPORTER_INTERVAL"] == f"{new}s"
    name = pod.metadata.name
    wait_until(lambda: chain.scraped("xmpp", name), 300, f"Prometheus to scrape {name}")
