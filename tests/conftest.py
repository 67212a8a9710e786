"""Fixtures shared by every test folder: the local Kubernetes control plane and its API client.

The control plane is started once per session, or reused when `make cluster` already runs one
(then it is left running). Tests that use it are marked `cluster`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from testinfra import controlplane
from testinfra.kubeapi import create_namespace, or_none


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
