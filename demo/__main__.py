"""The whole chain, for real, on this machine: prosody-operator -> pods -> prometheus-operator ->
Prometheus scrapes Prosody through the sidecar, printing what a user wants to see.

1. a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager);
2. prosody-operator, with the chart's ServiceAccount and RBAC;
3. a Prosody Deployment annotated for injection, its prosody.cfg.lua in a ConfigMap with
   statistics_interval = "manual" (the setting only safe with a single scraper: the sidecar is
   that scraper, at the operator's manual interval);
4. testinfra.podrunner, standing in for the kubelet and scheduler of one Node: it runs the pod's
   containers (Debian's Prosody, the real prosody-exporter) in a network namespace;
5. prometheus-operator v0.85 and a Prometheus resource selecting the operator's ServiceMonitors;
6. Prometheus v3.5, running the configuration prometheus-operator generated, discovering the pod
   through the API server; a demo XMPP client logged in to the pod's Prosody.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import yaml
from kubernetes import client, config

from testinfra import controlplane, e2e, gobuild
from testinfra.layout import CACHE_DIR
from testinfra.operator import OperatorProcess
from testinfra.podrunner import PodRunner, RunningPod
from testinfra.procs import wait_until
from testinfra.workloads import prosody_deployment

WORKDIR = CACHE_DIR / "demo"
APP = "xmpp"
LABELS = {"release": "demo"}
PROMETHEUS = "demo"
LIFETIME = 24 * 3600.0  # seconds the demo's background loops (pod runner, forwarder...) run
QUERIES = {
    "Prosody collections (manual mode, one per exporter interval)": (
        "prosody_stats_collection_seconds_count"
    ),
    "c2s connections (one demo XMPP client is logged in)": "sum(prosody_mod_c2s__connections)",
    "exporter: upstream up": "prosody_exporter_up",
    "exporter: snapshot age (s)": "prosody_exporter_snapshot_age_seconds",
    "exporter: scrapes served": "sum(prosody_exporter_scrapes_total)",
}
PROSODY_CONFIG = """\
-- The user's Prosody configuration, as the ConfigMap holds it.
modules_enabled = { "http_openmetrics", "roster", "saslauth", "ping" }
authentication = "internal_hashed"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
statistics = "internal"
statistics_interval = "manual"
VirtualHost "localhost"
"""


@dataclass
class Demo:
    api: client.ApiClient
    namespace: str
    pod: RunningPod
    prometheus: e2e.PrometheusFromOperator

    def pod_lines(self) -> Iterator[str]:
        core = client.CoreV1Api(self.api)
        pod = core.read_namespaced_pod(self.pod.name, self.namespace)
        name, status = f"{self.namespace}/{pod.metadata.name}", pod.status
        yield f"Pod {name}: {status.phase}, IP {status.pod_ip}, node {pod.spec.node_name}"
        status_annotation = pod.metadata.annotations.get("prosody-operator.io/status")
        yield f"  annotation prosody-operator.io/status: {status_annotation}"
        for container in pod.spec.containers:
            status = next(s for s in pod.status.container_statuses if s.name == container.name)
            yield f"  container {container.name} ({container.image}) ready={status.ready}"
            for var in container.env or []:
                yield f"    {var.name}={var.value}"

    def monitor_lines(self) -> Iterator[str]:
        monitor: dict[str, Any] = client.CustomObjectsApi(self.api).get_namespaced_custom_object(  # type: ignore[assignment]
            "monitoring.coreos.com",
            "v1",
            self.namespace,
            "servicemonitors",
            f"{APP}-prosody-metrics",
        )
        endpoint = monitor["spec"]["endpoints"][0]
        annotations = monitor["metadata"]["annotations"]
        yield (
            f"ServiceMonitor {monitor['metadata']['name']}: interval {endpoint['interval']}, "
            f"scrapeTimeout {endpoint['scrapeTimeout']}"
        )
        yield f"  interval from: {annotations.get('prosody-operator.io/interval-source')}"
        yield f"  selected by:   {annotations.get('prosody-operator.io/selected-by')}"
        yield f"  labels:        {json.dumps(monitor['metadata']['labels'], sort_keys=True)}"
        job = f"serviceMonitor/{self.namespace}/{APP}-prosody-metrics/0"
        generated = e2e.generated_config(self.api, self.namespace, PROMETHEUS) or ""
        jobs = {j["job_name"]: j for j in (yaml_load(generated).get("scrape_configs") or [])}
        interval = jobs.get(job, {}).get("scrape_interval", "(not generated yet)")
        yield f"prometheus-operator's generated job {job}: scrape_interval {interval}"

    def event_lines(self) -> Iterator[str]:
        events = client.CoreV1Api(self.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={APP}"
        )

        def when(event: client.CoreV1Event) -> Any:
            return event.event_time or event.last_timestamp or event.metadata.creation_timestamp

        for event in sorted(events.items, key=when):
            source = event.reporting_component or (event.source and event.source.component)
            if source and "prosody" in source:
                yield f"  {event.type} {event.reason}: {event.message}"

    def prometheus_lines(self) -> Iterator[str]:
        for target in self.prometheus.targets():
            error = target["lastError"] or "-"
            yield f"  target {target['scrapeUrl']}: health={target['health']} last error={error}"
        for title, promql in QUERIES.items():
            results = self.prometheus.query(promql)
            values = ", ".join(r["value"][1] for r in results) or "(no data yet)"
            yield f"  {title:<62} {promql} = {values}"


def yaml_load(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text) if text else None
    return loaded or {}


def ensure_binaries() -> None:
    """The control plane's binaries and Prometheus, built from their Go modules when missing
    (a cold build takes about 15 minutes; later runs reuse them)."""
    gobuild.build_all()
    e2e.prometheus_binary()


def run(once: bool, interval: float) -> None:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    ensure_binaries()
    with ExitStack() as stack:
        print("starting the local Kubernetes control plane ...")
        if controlplane.up():
            stack.callback(controlplane.stop)
        api = stack.enter_context(
            config.new_client_from_config(config_file=str(controlplane.ADMIN_KUBECONFIG))
        )
        core = client.CoreV1Api(api)
        namespace = f"prosody-demo-{uuid.uuid4().hex[:5]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        stack.callback(core.delete_namespace, namespace)
        wait_until(
            lambda: bool(core.list_namespaced_service_account(namespace).items), 30, "namespace"
        )
        print("starting the pod runner (kubelet and scheduler of one Node) ...")
        runner = stack.enter_context(
            PodRunner(api, WORKDIR / "pods", [namespace], lifetime=LIFETIME)
        )
        print(f"starting prosody-operator (manual interval {interval:g}s) ...")
        operator = OperatorProcess(
            api,
            WORKDIR / "operator",
            settings={
                "service_monitor_labels": ",".join(f"{k}={v}" for k, v in LABELS.items()),
                "manual_interval": f"{interval:g}",
            },
        )
        operator.install_identity()
        stack.callback(operator.uninstall)
        operator.start()
        forwarder = stack.enter_context(e2e.ApiForwarder(runner.gateway, LIFETIME))
        print("starting prometheus-operator ...")
        prometheus_operator = stack.enter_context(
            e2e.PrometheusOperator(WORKDIR / "prometheus-operator", [namespace])
        )
        print('deploying Prosody (statistics_interval = "manual", in a ConfigMap) ...')
        core.create_namespaced_config_map(
            namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="prosody"),
                data={"prosody.cfg.lua": PROSODY_CONFIG},
            ),
        )
        client.AppsV1Api(api).create_namespaced_deployment(
            namespace, prosody_deployment(APP, "prosody")
        )
        e2e.create_prometheus(
            api,
            namespace,
            PROMETHEUS,
            controller_id=prometheus_operator.controller_id,
            service_monitor_labels=LABELS,
        )
        files = e2e.service_account_files(
            api, namespace, f"prometheus-{PROMETHEUS}", forwarder.url, WORKDIR / "sa", LIFETIME
        )
        wait_until(lambda: bool(runner.running_pods(namespace)), 60, "the Prosody pod to run")
        pod = runner.running_pods(namespace)[0]
        print(f"starting Prometheus {e2e.PROMETHEUS_VERSION} with the generated configuration ...")
        prometheus = stack.enter_context(
            e2e.PrometheusFromOperator(
                api,
                WORKDIR / "prometheus",
                namespace,
                PROMETHEUS,
                runner.attach("prom", 250),
                files,
                lifetime=LIFETIME,
            )
        )
        print("logging in a demo XMPP client ...")
        assert pod.prosody_config is not None
        e2e.register_in_pod(pod.prosody_config, "demo", "demo-password")
        session = e2e.PodXmppSession(pod.netns, "demo", "demo-password").open()
        stack.callback(session.close)
        prometheus.wait_for_series("prosody_mod_c2s__connections > 0", timeout=90)
        prometheus.wait_for_series("prosody_exporter_scrapes_total", timeout=30)
        demo = Demo(api, namespace, pod, prometheus)
        print("\nThe injected pod:")
        print("\n".join(demo.pod_lines()))
        print()
        print("\n".join(demo.monitor_lines()))
        print("\nprosody-operator's Events on the Deployment:")
        print("\n".join(demo.event_lines()))
        print("\nWhat Prometheus sees:")
        print("\n".join(demo.prometheus_lines()))
        print(f"\nThrough the sidecar (from this host): http://{pod.ip}:9755/metrics")
        print(f"Prometheus:                           {prometheus.url}/targets")
        print(f"kubectl:                              KUBECONFIG={controlplane.ADMIN_KUBECONFIG}")
        runner.check()
        if once:
            return
        print("\nRunning until Ctrl-C; refreshing every 10s.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                time.sleep(10)
                print("\n".join(demo.prometheus_lines()), flush=True)
        except KeyboardInterrupt:
            print("\nstopping ...")


def main() -> None:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--once", action="store_true", help="print once and exit (for CI)")
    parser.add_argument("--interval", type=float, default=2.0, help="exporter interval, seconds")
    args = parser.parse_args()
    run(args.once, args.interval)


if __name__ == "__main__":
    main()
