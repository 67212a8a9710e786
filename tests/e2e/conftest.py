"""The chain every end-to-end test runs on, started once for tests/e2e, on the test node: the
chart `helm install`ed with the images built here (its two operator replicas in pods,
restartOnDrift on, and the chart's ServiceMonitor of the operator's own metrics),
prometheus-operator, and the two Prometheus pods of the Prometheus resource `k8s` that
prometheus-operator's StatefulSet runs; they select the ServiceMonitors of the chain's namespace
and the operator's in the release's namespace. Each test module deploys its own Prosody
workloads into the chain's namespace (`Chain.deploy`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kubernetes import client, utils

from testinfra import e2e
from testinfra.kubeapi import create_namespace, or_none
from testinfra.node import Node
from testinfra.operator import ChartRelease

LABELS = {"release": "e2e"}  # on the ServiceMonitors, and what the Prometheus selects
OPERATOR_SCRAPE_INTERVAL = "5s"  # the chart's metrics.serviceMonitor.interval (default 30s)
MANUAL_INTERVAL = 2  # seconds: the chart's sidecar.manualInterval
PROMETHEUS = "k8s"
SIDECAR = "prosody-exporter"


@dataclass
class Chain:
    api: client.ApiClient
    namespace: str
    release: ChartRelease
    node: Node
    prometheus: list[e2e.PrometheusPod]  # replicas 0 and 1
    manual_interval: int = MANUAL_INTERVAL  # the chart's sidecar.manualInterval

    def deploy(self, configmap: str, config: str, workload: dict[str, Any]) -> None:
        """A user's Prosody: its config in a ConfigMap, and the workload that mounts it."""
        client.CoreV1Api(self.api).create_namespaced_config_map(
            self.namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=configmap), data={"prosody.cfg.lua": config}
            ),
        )
        utils.create_from_dict(self.api, workload, namespace=self.namespace)

    def pod(self, app: str) -> client.V1Pod:
        """The one Ready pod labelled app=`app` (a Deployment of testinfra.workloads)."""
        return e2e.wait_for_ready_pod(self.api, self.namespace, f"app={app}")

    def service_monitor(self, app: str) -> dict[str, Any]:
        found: dict[str, Any] = client.CustomObjectsApi(self.api).get_namespaced_custom_object(  # type: ignore[assignment]
            "monitoring.coreos.com",
            "v1",
            self.namespace,
            "servicemonitors",
            f"{app}-prosody-metrics",
        )
        return found

    def job(self, app: str) -> str:
        return f"serviceMonitor/{self.namespace}/{app}-prosody-metrics/0"

    def generated_job(self, app: str) -> dict[str, Any] | None:
        text = e2e.generated_config(self.api, self.namespace, PROMETHEUS)
        jobs = (yaml.safe_load(text) or {}).get("scrape_configs") or [] if text else []
        return next((j for j in jobs if j["job_name"] == self.job(app)), None)

    def running_job(self, app: str, replica: int = 0) -> dict[str, Any]:
        """The job as the running Prometheus reports its configuration."""
        running = yaml.safe_load(self.prometheus[replica].running_config())
        jobs = {j["job_name"]: j for j in running.get("scrape_configs") or []}
        found: dict[str, Any] = jobs.get(self.job(app), {})
        return found

    def target(self, prometheus: e2e.PrometheusPod, app: str, health: str) -> Any:
        return prometheus.wait_for_target(self.job(app), health)

    def scraped(self, app: str, pod: str, replica: int = 0) -> bool:
        """Whether Prometheus `replica` scrapes pod `pod` of `app` successfully now."""
        return any(
            t["scrapePool"] == self.job(app) and t["health"] == "up" and t["labels"]["pod"] == pod
            for t in self.prometheus[replica].targets()
        )


@pytest.fixture(scope="package")
def e2e_namespace(k8s_client: client.ApiClient) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        yield create_namespace(k8s_client, name)
    finally:
        or_none(lambda: client.CoreV1Api(k8s_client).delete_namespace(name))


@pytest.fixture(scope="package")
def chain(
    k8s_client: client.ApiClient,
    node: Node,
    e2e_namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Chain]:
    namespace = e2e_namespace
    with ExitStack() as stack:
        release = ChartRelease(
            k8s_client,
            values={
                "serviceMonitor.labels": LABELS,
                "metrics.serviceMonitor.enabled": True,
                "metrics.serviceMonitor.labels": LABELS,
                "metrics.serviceMonitor.interval": OPERATOR_SCRAPE_INTERVAL,
                "sidecar.manualInterval": MANUAL_INTERVAL,
                # What a Deployment whose pods missed the webhook needs (test_real_node.py).
                "sidecar.restartOnDrift": True,
                **e2e.chart_image_values(node),
            },
        )
        stack.callback(release.uninstall)
        release.install()
        prometheus_operator = stack.enter_context(
            e2e.PrometheusOperator(
                tmp_path_factory.mktemp("prometheus-operator"), [namespace, release.namespace]
            )
        )
        e2e.create_prometheus(
            k8s_client,
            namespace,
            PROMETHEUS,
            controller_id=prometheus_operator.controller_id,
            service_monitor_labels=LABELS,
            replicas=2,
            other_namespaces=[release.namespace],
        )
        yield Chain(
            k8s_client,
            namespace,
            release,
            node,
            [e2e.PrometheusPod(k8s_client, namespace, PROMETHEUS, i).wait_ready() for i in (0, 1)],
        )
