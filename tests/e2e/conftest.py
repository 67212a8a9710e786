"""The chain every end-to-end test runs on, started once for tests/e2e (~20 s): the chart
`helm install`ed, its operator in a pod the pod runner runs, prometheus-operator, and three
Prometheus processes running the configuration it generates — replicas 0 and 1 of the Prometheus
resource `k8s` on the pod network, and one outside the pod network (198.19.x), which the sidecar's
default allowlist (the Node's podCIDRs) refuses. Each test module deploys its own Prosody
workloads into the chain's namespace (`Chain.deploy`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils

from testinfra import e2e
from testinfra.kubeapi import create_namespace, or_none
from testinfra.operator import ChartRelease
from testinfra.podrunner import INJECT_LABEL, PodRunner
from testinfra.procs import wait_until

LABELS = {"release": "e2e"}  # on the ServiceMonitors, and what the Prometheus selects
MANUAL_INTERVAL = 2  # seconds: the chart's sidecar.manualInterval
PROMETHEUS = "k8s"


@dataclass
class Chain:
    api: client.ApiClient
    namespace: str
    release: ChartRelease
    runner: PodRunner
    prometheus: list[e2e.PrometheusFromOperator]  # replicas 0 and 1, on the pod network
    outsider: e2e.PrometheusFromOperator  # the same configuration, outside the pod network
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

    def pod(self, app: str) -> Any:
        pods = self.runner.running_pods(self.namespace, f"{app}-")
        assert len(pods) == 1, f"pods of {app}: {[p.name for p in pods]}"
        return pods[0]

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

    def target(self, prometheus: e2e.PrometheusFromOperator, app: str, health: str) -> Any:
        found: list[dict[str, Any]] = []

        def has_target() -> bool:
            found[:] = [
                t
                for t in prometheus.targets()
                if t["scrapePool"] == self.job(app) and t["health"] == health
            ]
            return bool(found)

        wait_until(has_target, 60, f"{app} target {health} in {prometheus.url}", 0.5)
        return found[0]


@pytest.fixture(scope="package")
def e2e_namespace(k8s_client: client.ApiClient) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        yield create_namespace(k8s_client, name)
    finally:
        or_none(lambda: client.CoreV1Api(k8s_client).delete_namespace(name))


@pytest.fixture(scope="package")
def chain(
    k8s_client: client.ApiClient, e2e_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chain]:
    e2e.prometheus_binary()  # built once (minutes when cold), before anything starts
    work: Path = tmp_path_factory.mktemp("e2e")
    namespace = e2e_namespace
    with ExitStack() as stack:
        release = ChartRelease(
            k8s_client,
            values={"serviceMonitor.labels": LABELS, "sidecar.manualInterval": MANUAL_INTERVAL},
        )
        # The runner registers its Node first: the sidecar's allowlist is the Nodes' podCIDRs.
        runner = stack.enter_context(
            PodRunner(
                k8s_client,
                work / "pods",
                [namespace, release.namespace],
                label_selectors=(INJECT_LABEL, release.selector),
            )
        )
        stack.callback(release.uninstall)
        release.install()
        prometheus_operator = stack.enter_context(
            e2e.PrometheusOperator(work / "prometheus-operator", [namespace])
        )
        e2e.create_prometheus(
            k8s_client,
            namespace,
            PROMETHEUS,
            controller_id=prometheus_operator.controller_id,
            service_monitor_labels=LABELS,
            replicas=2,
        )
        files = e2e.service_account_files(
            k8s_client, namespace, f"prometheus-{PROMETHEUS}", runner.api_server_url, work / "sa"
        )

        def prometheus(role: str, netns: Any, replica: int) -> e2e.PrometheusFromOperator:
            return stack.enter_context(
                e2e.PrometheusFromOperator(
                    k8s_client, work / role, namespace, PROMETHEUS, netns, files, replica
                )
            )

        outside = str(runner.network.network_address + (1 << 16) + 250)  # 198.19.x.250
        yield Chain(
            k8s_client,
            namespace,
            release,
            runner,
            [prometheus(f"prom{i}", runner.attach(f"prom{i}", 250 + i), i) for i in (0, 1)],
            prometheus("outsider", runner.attach_outside("outsider", f"{outside}/32"), 0),
        )
        runner.check()
