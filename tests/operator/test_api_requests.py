"""What admissions and reconciles cost the API server, counted by the real kube-apiserver's own
metrics."""

from __future__ import annotations

import pytest
from kubernetes import client

from prosody_operator import annotations as ann
from prosody_operator import builders
from prosody_operator.controller import Controller, Indexes
from prosody_operator.kube import Kube
from prosody_operator.settings import OperatorSettings
from testinfra.kubeapi import requests_served
from testinfra.workloads import prosody_pod_spec, prosody_workload

pytestmark = pytest.mark.cluster


def test_admissions_do_not_list_nodes_when_none_has_pod_cidrs(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    """Nodes without spec.podCIDRs (Calico, Cilium IPAM): the index knows them, and no
    admission lists every Node again to find none (each of 20 did)."""
    controller = Controller(OperatorSettings(), Kube(k8s_client))
    indexes = Indexes(
        node_pod_cidrs={None: [[]]},  # one Node, no podCIDRs
        namespaces={namespace: {}},
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "xmpp", "namespace": namespace, "labels": {ann.INJECT: "true"}},
        "spec": prosody_pod_spec(None),
    }
    before = requests_served(k8s_client, ("nodes",), ("LIST",))
    for _ in range(20):
        plan = controller.admit(pod, indexes)
        assert plan.patch is not None and any("loopback" in w for w in plan.warnings)
    assert (
        requests_served(k8s_client, ("nodes",), ("LIST",)) - before <= 2
    )  # another client's, at most


def test_admissions_read_a_configmap_once_and_see_its_changes(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    """The webhook keeps the ConfigMaps it read for opted-in pods (each read was most of an
    admission's time): 20 admissions of pods mounting one read it once. Its change, as the
    operator's ConfigMap watch hands it over (called directly here: no kopf runs in this test),
    is what the next pod gets."""
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="prosody"),
            data={"prosody.cfg.lua": "statistics_interval = 45\n"},
        ),
    )
    controller = Controller(OperatorSettings(), Kube(k8s_client))
    indexes = Indexes(node_pod_cidrs={None: [["198.18.0.0/24"]]}, namespaces={namespace: {}})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "xmpp", "namespace": namespace, "labels": {ann.INJECT: "true"}},
        "spec": prosody_pod_spec("prosody"),
    }

    def interval() -> str | None:
        plan = controller.admit(pod, indexes)
        assert plan.patch is not None
        env = builders.sidecar_env(plan.patch)
        return (env or {}).get(builders.INTERVAL_ENV)

    before = requests_served(k8s_client, ("configmaps",), ("GET",))
    assert {interval() for _ in range(20)} == {"45s"}
    assert requests_served(k8s_client, ("configmaps",), ("GET",)) - before <= 3  # 2: others'
    controller.configmaps.update(
        namespace, "prosody", {"prosody.cfg.lua": "statistics_interval = 90\n"}
    )
    assert interval() == "90s"


def test_a_new_workload_is_reconciled_without_reading_what_it_makes(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    """Its Service and ServiceMonitor are neither in the index nor written yet: taken as absent
    and made by applies that take nothing over (someone else's of that name makes them fail:
    test_objects_of_our_name_that_are_not_ours_are_never_changed_or_deleted), not looked for
    first (two reads for each new workload, a fifth of its requests). The next reconcile,
    before the index has seen them, reads them neither: our writes stand for them."""
    body = client.AppsV1Api(k8s_client).create_namespaced_deployment(
        namespace, prosody_workload("Deployment", "xmpp", None)
    )
    workload = k8s_client.sanitize_for_serialization(body)
    controller = Controller(OperatorSettings(), Kube(k8s_client))
    indexes = Indexes(node_pod_cidrs={None: [["198.18.0.0/24"]]}, namespaces={namespace: {}})
    resources = ("services", "servicemonitors")
    before = requests_served(k8s_client, resources, ("GET",))
    first = controller.reconcile(workload, indexes)
    second = controller.reconcile(workload, indexes)
    # Another client's, at most: had the first reconcile looked for them, that alone is 2.
    assert requests_served(k8s_client, resources, ("GET",)) - before <= 1
    assert first is not None and {o["kind"] for o in first.apply} == {"Service", "ServiceMonitor"}
    assert second is not None and not second.apply
    core, custom = client.CoreV1Api(k8s_client), client.CustomObjectsApi(k8s_client)
    service = core.read_namespaced_service("xmpp-prosody-metrics", namespace)
    assert service.metadata.owner_references[0].uid == workload["metadata"]["uid"]
    custom.get_namespaced_custom_object(
        "monitoring.coreos.com", "v1", namespace, "servicemonitors", "xmpp-prosody-metrics"
    )
