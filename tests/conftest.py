"""Fixtures shared by every test folder: the local Kubernetes control plane, its API client and
the test node.

The control plane and the node are started once per session, or reused when `make cluster` /
`make node` already run them (then they are left running). Tests that use them are marked
`cluster` and `node`. The `node` tests run last: while the node is registered, the Nodes'
podCIDRs (the sidecar's default allowlist) include its pod network, and pods other tests create
get scheduled and run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from testinfra import controlplane
from testinfra.kubeapi import create_namespace, or_none
from testinfra.node import Node, NodeError
from testinfra.procs import MissingPrerequisite


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked `node` last, in their order."""
    items.sort(key=lambda item: item.get_closest_marker("node") is not None)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[None]:
    """A running control plane; fails (never skips) with the reason when it cannot start."""
    try:
        started_here, problem = controlplane.up(), None
    except controlplane.ControlPlaneError as error:
        started_here, problem = False, str(error)
    if problem:  # failed outside the except block, so the report shows the reason alone
        pytest.fail(f"the local Kubernetes control plane did not start: {problem}", pytrace=False)
    yield
    if started_here:
        # The logs stay in .cache/cluster/logs for a look after a failure; `up` clears them.
        controlplane.stop()


@pytest.fixture(scope="session")
def k8s_client(control_plane: None) -> Iterator[client.ApiClient]:
    """An API client with the admin (system:masters) credentials."""
    api_client = config.new_client_from_config(config_file=str(controlplane.ADMIN_KUBECONFIG))
    with api_client:
        yield api_client


@pytest.fixture
def namespace(k8s_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards; its default ServiceAccount exists."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        yield create_namespace(k8s_client, name)
    finally:
        or_none(lambda: client.CoreV1Api(k8s_client).delete_namespace(name))


@pytest.fixture(scope="session")
def node(control_plane: None) -> Iterator[Node]:
    """The test node, Ready; fails (never skips) with the reason when it cannot start."""
    test_node = Node()
    try:
        started_here, problem = test_node.up(), None
    except (NodeError, MissingPrerequisite, controlplane.ControlPlaneError) as error:
        started_here, problem = False, str(error)
    if problem:
        pytest.fail(f"the test node did not start: {problem}", pytrace=False)
    yield test_node
    if started_here:
        test_node.stop()  # its logs stay in .cache/node/logs; `up` clears them
