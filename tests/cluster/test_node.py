"""The test node (testinfra/node.py) changes nothing on the host that outlives it, and listens
nowhere on the host but loopback.

A node of its own (its own folder, Node name and slot) runs a pod while the host is inspected, and
is stopped with the pod still running: `down` must clean up after live containers too.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from testinfra import infraimages
from testinfra.e2e import wait_for_ready_pod
from testinfra.node import Node, Slot, cgroup_mounts

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(600)]

SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
)
# Where a kubelet or containerd writes by default; the node keeps them in its mount namespace.
DEFAULT_PATHS = (
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/etc/cni/net.d",
)


def command(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def listening() -> set[str]:
    """Local addresses of the host namespace's listening TCP and UDP sockets."""
    return {line.split()[3] for line in command("ss", "-Hltun").splitlines()}


def host_state() -> dict[str, Any]:
    """What the node could change that belongs to the whole host."""
    return {
        "iptables rules": command("iptables-save").count("\n-A "),
        "sysctls": {key: Path("/proc/sys", key).read_text() for key in SYSCTLS},
        "paths": [path for path in DEFAULT_PATHS if Path(path).exists()],
    }


def traces(node: Node, slot: Slot) -> dict[str, list[str]]:
    """What the node made on the host (others' namespaces and links may come and go meanwhile)."""
    net, name = slot.addresses, slot.name
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    routes = command("ip", "route", "show", "table", "all").splitlines()
    return {
        "links": [
            link["ifname"]
            for link in json.loads(command("ip", "-j", "link"))
            if link["ifname"] == name
        ],
        "routes": [r for r in routes if str(net.pod_cidr) in r or str(net.link) in r],
        "netns": [n for n in command("ip", "netns", "list").split() if n == name],
        "mounts": [m for m in mounts if name in m or str(node.directory) in m],
        "cgroups": [str(m / name) for m in cgroup_mounts() if (m / name).exists()],
    }


@pytest.fixture
def own_node(control_plane: None, tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "node", "testinfra-lifecycle", image_dir=None)
    try:
        yield node
    finally:
        node.down()


def test_the_node_runs_pods_and_leaves_the_host_as_it_found_it(
    own_node: Node, k8s_client: client.ApiClient, namespace: str
):
    before, listening_before = host_state(), listening()
    assert own_node.up()
    slot = own_node.recorded_slot()
    assert slot is not None
    made = traces(own_node, slot)
    assert all(made[key] for key in ("links", "routes", "netns", "cgroups")), made
    # A pod running the pause image as its container, pinned to this node.
    client.CoreV1Api(k8s_client).create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "sleeper", "labels": {"app": "sleeper"}},
            "spec": {
                "nodeName": own_node.name,
                "containers": [{"name": "sleeper", "image": infraimages.PAUSE.name}],
            },
        },
    )
    pod = wait_for_ready_pod(k8s_client, namespace, "app=sleeper")
    assert ipaddress.ip_address(pod.status.pod_ip) in own_node.addresses.pod_cidr
    # Nothing new listens in the host's namespace but on loopback.
    for address in listening() - listening_before:
        host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
        assert host in ("127.0.0.1", "::1"), address
    # The kubelet saw the kernel settings it insists on; the host kept its own.
    assert host_state()["sysctls"] == before["sysctls"]

    own_node.down()
    assert host_state() == before
    assert traces(own_node, slot) == {key: [] for key in made}
    assert (
        client.CoreV1Api(k8s_client)
        .list_node(field_selector=f"metadata.name={own_node.name}")
        .items
        == []
    )
