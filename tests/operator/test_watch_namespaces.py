"""Two installs in one cluster, each serving its own namespace (PROSODY_OPERATOR_WATCH_NAMESPACES,
the chart's watchNamespaces): each injects and reconciles only there, with its own settings, and
never acts on the other's namespace. Both are the real operator against the real control plane,
each with the chart's RBAC for that value: what it does in namespaces is granted by a RoleBinding
in its namespace only, so it could not act elsewhere even if it tried."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from prosody_operator.builders import SIDECAR_NAME
from testinfra.kubeapi import create_namespace, or_none
from testinfra.operator import OperatorProcess
from testinfra.procs import wait_until
from testinfra.workloads import prosody_deployment

pytestmark = pytest.mark.cluster

INSTALLS = ("a", "b")
CONFIG = 'modules_enabled = { "http_openmetrics" }\nstatistics_interval = 45\n'


@pytest.fixture
def namespaces(k8s_client: client.ApiClient) -> Iterator[dict[str, str]]:
    names = {install: f"team-{install}-{uuid.uuid4().hex[:6]}" for install in INSTALLS}
    try:
        for name in names.values():
            create_namespace(k8s_client, name)
        yield names
    finally:
        for name in names.values():
            or_none(lambda n=name: client.CoreV1Api(k8s_client).delete_namespace(n))  # type: ignore[misc]


def service_monitor_labels(api: client.ApiClient, namespace: str) -> dict[str, str] | None:
    found: dict[str, Any] | None = or_none(
        lambda: client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[arg-type,return-value]
            "monitoring.coreos.com", "v1", namespace, "servicemonitors", "xmpp-prosody-metrics"
        )
    )
    return dict(found["metadata"]["labels"]) if found else None


def sidecar_images(api: client.ApiClient, namespace: str) -> list[str]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="app=xmpp").items
    return [c.image for p in pods for c in p.spec.containers if c.name == SIDECAR_NAME]


def test_two_installs_each_serve_only_their_namespace(
    k8s_client: client.ApiClient, namespaces: dict[str, str], tmp_path: Path
) -> None:
    core, apps = client.CoreV1Api(k8s_client), client.AppsV1Api(k8s_client)
    admission = client.AdmissionregistrationV1Api(k8s_client)
    operators = {
        install: OperatorProcess(
            k8s_client,
            tmp_path / install,
            watch_namespaces=[namespaces[install]],
            settings={
                "exporter_image": f"registry.test/exporter-{install}:1",
                "service_monitor_labels": f"install={install}",
            },
        )
        for install in INSTALLS
    }
    try:
        for operator in operators.values():
            operator.install_identity()
            operator.start()
        for install, operator in operators.items():
            configuration = admission.read_mutating_webhook_configuration(
                operator.webhook_configuration
            )
            expression = configuration.webhooks[0].namespace_selector.match_expressions[0]
            assert (expression.operator, expression.values) == ("In", [namespaces[install]])

        for namespace in namespaces.values():
            core.create_namespaced_config_map(
                namespace,
                client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name="prosody"),
                    data={"prosody.cfg.lua": CONFIG},
                ),
            )
            apps.create_namespaced_deployment(namespace, prosody_deployment("xmpp", "prosody"))

        for namespace in namespaces.values():
            wait_until(
                lambda n=namespace: bool(service_monitor_labels(k8s_client, n)),  # type: ignore[misc]
                30,
                f"the ServiceMonitor in {namespace}",
            )
            wait_until(
                lambda n=namespace: bool(sidecar_images(k8s_client, n)),  # type: ignore[misc]
                30,
                f"an injected pod in {namespace}",
            )
        for install, namespace in namespaces.items():
            assert service_monitor_labels(k8s_client, namespace)["install"] == install  # type: ignore[index]
            assert sidecar_images(k8s_client, namespace) == [f"registry.test/exporter-{install}:1"]
            other = next(o for i, o in operators.items() if i != install)
            assert namespace not in other.log_text(), f"the other install acted in {namespace}"
    finally:
        for operator in operators.values():
            operator.uninstall()
