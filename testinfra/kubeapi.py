"""What the tests, the demo and the benchmarks all do with the Kubernetes API."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from .procs import wait_until

T = TypeVar("T")


def or_none(call: Callable[[], T]) -> T | None:
    """`call()`, or None when the object is not there (404): reads, and deletes that need not
    find anything."""
    try:
        return call()
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def create_namespace(api: client.ApiClient, name: str, timeout: float = 30.0) -> str:
    """Create namespace `name` and wait for its default ServiceAccount: the ServiceAccount
    admission plugin refuses pods until the controller has created it."""
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def has_default_account() -> bool:
        return or_none(lambda: core.read_namespaced_service_account("default", name)) is not None

    wait_until(has_default_account, timeout, f"the default ServiceAccount of {name}")
    return name


@contextlib.contextmanager
def node_with_pod_cidrs(api: client.ApiClient, cidrs: list[str]) -> Iterator[str]:
    """A Node object (no kubelet behind it) whose spec.podCIDRs are `cidrs`: the pod network the
    sidecar allows by default; deleted afterwards."""
    core = client.CoreV1Api(api)
    name = f"node-{uuid.uuid4().hex[:6]}"
    core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1NodeSpec(pod_cidr=cidrs[0], pod_cidrs=cidrs),
        )
    )
    try:
        yield name
    finally:
        or_none(lambda: core.delete_node(name))  # gone already when a run was interrupted


def namespace_gone(api: client.ApiClient, name: str) -> bool:
    return or_none(lambda: client.CoreV1Api(api).read_namespace(name)) is None


def requests_served(
    api: client.ApiClient, resources: Collection[str], verbs: Collection[str]
) -> float:
    """Requests the API server has served for these resources and verbs (all clients), from
    its own metrics."""
    method, url, headers, body, _ = api.param_serialize("GET", "/metrics")
    response = api.call_api(method, url, headers, body)
    text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "apiserver_request"
        for sample in family.samples
        if sample.name == "apiserver_request_total"
        and sample.labels.get("resource") in resources
        and sample.labels.get("verb") in verbs
    )
