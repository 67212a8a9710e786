"""The whole chain, for real, on this machine: prosody-operator -> pods -> prometheus-operator ->
Prometheus scrapes Prosody through the sidecar, printing what a user wants to see.

1. a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
   kube-scheduler) and a node (kubelet, containerd, kube-proxy: testinfra/node.py), with the
   images `make images` built from the Dockerfiles loaded into it;
2. `helm install` of charts/prosody-operator with those images, as a user does; the operator's
   pod runs on the node, and the API server calls its webhook through the chart's Service;
3. a Prosody Deployment annotated for injection (the Prosody image built from Debian's
   package), its prosody.cfg.lua in a ConfigMap with statistics_interval = "manual" (the setting
   only safe with a single scraper: the sidecar is that scraper, at the chart's
   sidecar.manualInterval);
4. prometheus-operator v0.85 and a Prometheus resource selecting the operator's ServiceMonitors:
   its Prometheus v3.5 pod discovers the Prosody pod and scrapes the sidecar at the pod's IP;
5. a demo XMPP client logged in to the pod's Prosody (its account made with prosodyctl, by
   `kubectl exec`).
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
from testinfra.kubeapi import create_namespace
from testinfra.layout import CACHE_DIR
from testinfra.node import Node
from testinfra.operator import ChartRelease, helm
from testinfra.workloads import prosody_deployment

WORKDIR = CACHE_DIR / "demo"
APP = "xmpp"
LABELS = {"release": "demo"}
PROMETHEUS = "demo"
SIDECAR = "prosody-exporter"
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
    release: ChartRelease
    pod: client.V1Pod
    prometheus: e2e.PrometheusPod

    def operator_lines(self) -> Iterator[str]:
        namespace = self.release.namespace
        listed = helm("list", "--namespace", namespace, "-o", "json").stdout
        for installed in json.loads(listed):
            yield (
                f"helm release {installed['name']} ({installed['chart']}, namespace {namespace}, "
                f"revision {installed['revision']}): {installed['status']}"
            )
        for pod in client.CoreV1Api(self.api).list_namespaced_pod(namespace).items:
            ready = all(s.ready for s in pod.status.container_statuses or [])
            yield (
                f"  operator pod {pod.metadata.name}: {pod.status.phase}, IP {pod.status.pod_ip}, "
                f"ready={ready}"
            )
            for status in pod.status.container_statuses or []:
                yield f"    container {status.name}: image {status.image}"
        name = self.release.webhook_configuration
        admission = client.AdmissionregistrationV1Api(self.api)
        config = admission.read_mutating_webhook_configuration(name).webhooks[0].client_config
        service = config.service
        yield (
            f"  MutatingWebhookConfiguration {name}: service "
            f"{service.namespace}/{service.name}:{service.port}{service.path}, caBundle "
            f"{'set by the operator' if config.ca_bundle else 'MISSING'}"
        )

    def pod_lines(self) -> Iterator[str]:
        core = client.CoreV1Api(self.api)
        pod = core.read_namespaced_pod(self.pod.metadata.name, self.namespace)
        name, status = f"{self.namespace}/{pod.metadata.name}", pod.status
        yield f"Pod {name}: {status.phase}, IP {status.pod_ip}, node {pod.spec.node_name}"
        status_annotation = pod.metadata.annotations.get("prosody-operator.io/status")
        yield f"  annotation prosody-operator.io/status: {status_annotation}"
        for container in pod.spec.containers:
            status = next(s for s in pod.status.container_statuses if s.name == container.name)
            limits = (container.resources and container.resources.limits) or {}
            yield (
                f"  container {container.name} ({container.image}) ready={status.ready}, "
                f"restarts {status.restart_count}, memory limit {limits.get('memory', '-')}"
            )
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
    """The binaries built from their Go modules when missing (a cold build takes about 15
    minutes; later runs reuse them)."""
    gobuild.build_all()


def run(once: bool, interval: float) -> None:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    ensure_binaries()
    with ExitStack() as stack:
        print("starting the local Kubernetes control plane and its node ...")
        if controlplane.up():
            stack.callback(controlplane.stop)
        node = Node()
        if node.up():
            stack.callback(node.stop)
        api = stack.enter_context(
            config.new_client_from_config(config_file=str(controlplane.ADMIN_KUBECONFIG))
        )
        core = client.CoreV1Api(api)
        release = ChartRelease(
            api,
            values={
                "serviceMonitor.labels": LABELS,
                "sidecar.manualInterval": interval,
                **e2e.chart_image_values(node),
            },
        )
        namespace = create_namespace(api, f"prosody-demo-{uuid.uuid4().hex[:5]}")
        stack.callback(core.delete_namespace, namespace)
        values = " ".join(f"--set-json '{k}={json.dumps(v)}'" for k, v in release.values.items())
        print(f"helm install {release.name} charts/prosody-operator {values} ...")
        stack.callback(release.uninstall)
        release.install()
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
            namespace, prosody_deployment(APP, "prosody", image=e2e.prosody_image(node))
        )
        e2e.create_prometheus(
            api,
            namespace,
            PROMETHEUS,
            controller_id=prometheus_operator.controller_id,
            service_monitor_labels=LABELS,
        )
        pod = e2e.wait_for_ready_pod(api, namespace, f"app={APP}")
        if SIDECAR not in [c.name for c in pod.spec.containers]:
            raise RuntimeError(
                "the pod was admitted without the sidecar; see `kubectl logs` of the operator in "
                f"namespace {release.namespace}"
            )
        print(f"waiting for Prometheus {e2e.PROMETHEUS_VERSION} (prometheus-operator's pod) ...")
        prometheus = e2e.PrometheusPod(api, namespace, PROMETHEUS).wait_ready()
        print("logging in a demo XMPP client ...")
        e2e.register_in_pod(api, namespace, pod.metadata.name, "demo", "demo-password")
        session = e2e.PodXmppSession(pod.status.pod_ip, "demo", "demo-password").open()
        stack.callback(session.close)
        prometheus.wait_for_series("prosody_mod_c2s__connections > 0", timeout=90)
        prometheus.wait_for_series("prosody_exporter_scrapes_total", timeout=30)
        demo = Demo(api, namespace, release, pod, prometheus)
        print("\nThe operator, as helm installed it:")
        print("\n".join(demo.operator_lines()))
        print("\nThe injected pod:")
        print("\n".join(demo.pod_lines()))
        print()
        print("\n".join(demo.monitor_lines()))
        print("\nprosody-operator's Events on the Deployment:")
        print("\n".join(demo.event_lines()))
        print("\nWhat Prometheus sees:")
        print("\n".join(demo.prometheus_lines()))
        print(f"\nPrometheus (from this host):  {prometheus.url}/targets")
        print(
            f"The sidecar:                  http://{pod.status.pod_ip}:9755/metrics "
            "(403 from this host: it is outside the pod network)"
        )
        print(f"kubectl:                      KUBECONFIG={controlplane.ADMIN_KUBECONFIG}")
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
