"""The operator's memory against what tenants create, measured on its own process, against the
real control plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, utils

from testinfra.operator import OperatorProcess
from testinfra.procs import wait_until
from testinfra.workloads import prosody_workload

pytestmark = pytest.mark.cluster


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) / 1024


@pytest.fixture
def operator(k8s_client: client.ApiClient, tmp_path: Path) -> Iterator[OperatorProcess]:
    # glibc's malloc raises its mmap threshold as large blocks are freed, and then keeps freed
    # 1 MB strings in its heap: fixed, they go back to the system and RSS shows what is kept.
    threshold = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    process = OperatorProcess(k8s_client, tmp_path / "operator", environment=threshold)
    process.install_identity()
    try:
        yield process.start()
    finally:
        process.uninstall()


TENANT_MB = 64


def config(interval: int) -> dict[str, str]:
    return {"prosody.cfg.lua": f'statistics = "internal"\nstatistics_interval = {interval}\n'}


def test_configmaps_nothing_mounts_take_no_memory(
    k8s_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """A tenant's ConfigMaps with Lua files that no opted-in workload mounts (64 MB of them)
    are not kept: the operator's RSS settles below half their size (kept, they took all of it;
    not kept, 10-25 MiB of buffers and heap stay). kopf holds each object's last event for its
    batching idle timeout, 5 s, hence the wait."""
    core = client.CoreV1Api(k8s_client)
    custom = client.CustomObjectsApi(k8s_client)

    def configmap(name: str, data: dict[str, str]) -> None:
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data)
        core.create_namespaced_config_map(namespace, body)

    def interval() -> str | None:
        monitors = custom.list_namespaced_custom_object(
            "monitoring.coreos.com", "v1", namespace, "servicemonitors"
        )
        items = monitors["items"]  # type: ignore[index]
        return items[0]["spec"]["endpoints"][0]["interval"] if items else None

    assert operator.process is not None
    pid = operator.process.popen.pid
    configmap("prosody", config(45))
    body = prosody_workload("Deployment", "xmpp", "prosody")
    utils.create_from_dict(k8s_client, body, namespace=namespace)
    wait_until(lambda: interval() == "45s", 30, "the ServiceMonitor")
    before = rss_mib(pid)
    for n in range(TENANT_MB):
        configmap(f"tenant-{n}", {"tenant.cfg.lua": "-" * 1_000_000})
    # A change after them in the watch: once it is handled, they were seen.
    core.patch_namespaced_config_map("prosody", namespace, {"data": config(50)})
    wait_until(lambda: interval() == "50s", 30, "the ServiceMonitor to follow")
    grown: list[float] = []

    def settled() -> bool:
        grown[:] = [rss_mib(pid) - before]
        return grown[0] < TENANT_MB / 2

    try:
        wait_until(settled, 60, "the operator's RSS to settle")
    except TimeoutError:
        pytest.fail(f"the operator keeps them: its RSS grew by {grown[0]:.1f} MiB")
