"""End to end in PodMonitor mode, on the chain of conftest.py (the test node): no Service, and the
Prometheus pods scrape Prosody's sidecar through the configuration prometheus-operator generates
from the operator's PodMonitor.

A Prosody Deployment (`pods`) gets its Service and ServiceMonitor first, as the chain's release
is installed. Then, as a user would: `helm upgrade --reuse-values` sets `serviceMonitor.kind:
PodMonitor` with a relabeling (a `cluster` label on every target) and a metric relabeling (drop
`prosody_exporter_build_info`), and the Prometheus resource gets a `podMonitorSelector`. The
operator replaces the Service and ServiceMonitor with a PodMonitor, and Prometheus scrapes the
same pod through the `podMonitor/...` job with both relabelings applied (once the kubelet has
delivered the new configuration to the Prometheus pods: minutes, see testinfra.e2e). Afterwards
the release is rolled back and the selector removed, so the chain is as the other modules expect
it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from testinfra import e2e
from testinfra import helm as chart
from testinfra.operator import helm
from testinfra.procs import wait_until
from testinfra.workloads import prosody_config, prosody_deployment, prosody_pod

from .conftest import LABELS, PROMETHEUS, Chain

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]

APP = "pods"
MONITOR = f"{APP}-prosody-metrics"
INTERVAL = 3  # seconds: statistics_interval in its ConfigMap
MONITORING = ("monitoring.coreos.com", "v1")
MODE = {
    "serviceMonitor.kind": "PodMonitor",
    "serviceMonitor.relabelings": [{"targetLabel": "cluster", "replacement": "e2e"}],
    "serviceMonitor.metricRelabelings": [
        {"sourceLabels": ["__name__"], "regex": "prosody_exporter_build_info", "action": "drop"}
    ],
}


def kinds(chain: Chain) -> set[str]:
    """Which of the operator's objects exist for the Deployment."""
    custom, core = client.CustomObjectsApi(chain.api), client.CoreV1Api(chain.api)
    found = set()
    for kind, plural in (("ServiceMonitor", "servicemonitors"), ("PodMonitor", "podmonitors")):
        items = custom.list_namespaced_custom_object(*MONITORING, chain.namespace, plural)
        if any(m["metadata"]["name"] == MONITOR for m in items["items"]):
            found.add(kind)
    services = core.list_namespaced_service(chain.namespace).items
    return found | ({"Service"} if any(s.metadata.name == MONITOR for s in services) else set())


def events(chain: Chain, reason: str) -> list[str]:
    found = client.CoreV1Api(chain.api).list_namespaced_event(
        chain.namespace, field_selector=f"involvedObject.kind=Deployment,involvedObject.name={APP}"
    )
    return [e.message for e in found.items if e.reason == reason]


def upgraded(chain: Chain, *argv: str) -> None:
    """`helm upgrade` or `rollback` of the chain's release, then wait until the restarted
    operator's webhook injects again: it makes a new CA at start-up, and until that is in the
    webhook configuration the API server's calls fail (and are ignored). A dry-run pod shows it."""
    release = chain.release
    helm(*argv, "--namespace", release.namespace, "--wait", "--timeout", "120s")
    core = client.CoreV1Api(chain.api)

    def injects() -> bool:
        pod = core.create_namespaced_pod(chain.namespace, prosody_pod("probe", None), dry_run="All")
        return any(c.name == "prosody-exporter" for c in pod.spec.containers)

    wait_until(injects, 60, "the restarted operator's webhook to inject")


def select_pod_monitors(chain: Chain, selector: dict[str, Any] | None) -> None:
    client.CustomObjectsApi(chain.api).patch_namespaced_custom_object(
        *MONITORING, chain.namespace, "prometheuses", PROMETHEUS,
        {"spec": {"podMonitorSelector": selector}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pod_monitor_mode(chain: Chain) -> Iterator[str]:
    """The Deployment, first with a ServiceMonitor; then the release in PodMonitor mode."""
    workload = prosody_deployment(APP, f"{APP}-config", image=e2e.prosody_image(chain.node))
    chain.deploy(f"{APP}-config", prosody_config(str(INTERVAL)), workload)
    wait_until(lambda: kinds(chain) == {"Service", "ServiceMonitor"}, 60, "the ServiceMonitor")
    chain.pod(APP)  # Ready
    release = chain.release
    try:
        select_pod_monitors(chain, {"matchLabels": LABELS})
        argv = chart.template_args(release.name, release.namespace, set_values=MODE)
        upgraded(chain, "upgrade", *argv, "--reuse-values")
        yield APP
    finally:
        upgraded(chain, "rollback", release.name)
        select_pod_monitors(chain, None)
        wait_until(
            lambda: kinds(chain) == {"Service", "ServiceMonitor"}, 60, "the ServiceMonitor, back"
        )


def test_the_service_and_service_monitor_give_way_to_a_pod_monitor(chain, pod_monitor_mode):
    wait_until(lambda: kinds(chain) == {"PodMonitor"}, 60, "only a PodMonitor")
    removed = f"deleted Service {MONITOR} and ServiceMonitor {MONITOR}"
    wait_until(lambda: any(removed in m for m in events(chain, "MetricsRemoved")), 30, removed)
    selected = f"PodMonitor {MONITOR} is selected by Prometheus {chain.namespace}/{PROMETHEUS}"
    wait_until(lambda: selected in events(chain, "SelectedByPrometheus"), 30, selected)


def test_prometheus_scrapes_the_pod_through_the_pod_monitor_job(chain, pod_monitor_mode):
    job_name = f"podMonitor/{chain.namespace}/{MONITOR}/0"

    def generated() -> dict[str, Any] | None:
        text = e2e.generated_config(chain.api, chain.namespace, PROMETHEUS)
        jobs = (yaml.safe_load(text) or {}).get("scrape_configs") or [] if text else []
        return next((job for job in jobs if job["job_name"] == job_name), None)

    wait_until(lambda: generated() is not None, 60, f"prometheus-operator's job {job_name}")
    job = generated()
    assert job is not None and job["scrape_interval"] == f"{INTERVAL}s"

    pod = chain.pod(APP)
    name = pod.metadata.name
    prometheus = chain.prometheus[0]
    target = prometheus.wait_for_target(job_name, "up")  # minutes: see testinfra.e2e
    assert target["scrapeUrl"] == f"http://{pod.status.pod_ip}:9755/metrics"  # the sidecar's port
    assert target["labels"]["pod"] == name
    assert target["labels"]["service"] == MONITOR  # as a ServiceMonitor's: alerts, dashboard
    assert target["labels"]["cluster"] == "e2e"  # serviceMonitor.relabelings

    scraped = f'prosody_exporter_up{{pod="{name}", job="{chain.namespace}/{MONITOR}"}}'
    series = prometheus.wait_for_series(scraped)
    assert series[0]["metric"]["cluster"] == "e2e"
    assert series[0]["value"][1] == "1"
    prometheus.wait_for_series(
        f'prosody_stats_collection_seconds_count{{cluster="e2e", pod="{name}"}}'
    )
    # serviceMonitor.metricRelabelings: the family is dropped from what the PodMonitor scrapes.
    assert prometheus.query(f'prosody_exporter_build_info{{cluster="e2e", pod="{name}"}}') == []
