"""Hostile configs against the real operator process and the real API server: the evaluation
runs in the operator's worker processes, bounded, and admission never waits on it for long.

No kubelet runs here (pods stay Pending): what is checked is what the API server stored, the
Events, and the operator's own threads and processes (from /proc).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, utils

from testinfra.operator import OperatorProcess
from testinfra.procs import pid_alive, wait_until
from testinfra.workloads import prosody_config, prosody_pod, prosody_workload

pytestmark = pytest.mark.cluster

EVALUATION_TIMEOUT = 2  # seconds: the operator's budget per evaluation
WORKERS = 2
FALLBACK_INTERVAL = "25"  # the official image's PROSODY_STATISTICS_INTERVAL, in the pods' env
# One Lua C call that backtracks for hours: the instruction limit never fires inside it.
NEVER_ENDS = prosody_config(
    "45", extra='string.find(string.rep("a", 40), string.rep("a*", 40) .. "b")'
)
SIDECAR = "prosody-exporter"


@pytest.fixture(scope="module")
def operator(
    k8s_client: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        k8s_client,
        tmp_path_factory.mktemp("operator"),
        settings={
            "exporter_image": "registry.test/prosody-exporter:test",
            "pod_cidrs": "198.18.64.0/24",
            "evaluation_timeout": str(EVALUATION_TIMEOUT),
            "evaluation_workers": str(WORKERS),
        },
    )
    process.install_identity()
    try:
        process.start()
        yield process
    finally:
        process.uninstall()


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def threads(pid: int) -> int:
    return int(status(pid)["Threads"])


def kib(value: str) -> int:
    return int(value.split()[0])


def sidecar_env(pod: client.V1Pod) -> dict[str, str] | None:
    for container in pod.spec.containers:
        if container.name == SIDECAR:
            return {e.name: e.value for e in container.env or []}
    return None


def events(core: client.CoreV1Api, namespace: str, name: str, reason: str) -> list[str]:
    found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [e.message or "" for e in found.items if e.reason == reason]


def test_a_config_that_never_finishes_delays_no_pod(
    k8s_client: client.ApiClient, namespace: str, operator: OperatorProcess
):
    """Ten replicas whose config hangs its evaluation: every pod is admitted with the sidecar
    (with the fallback interval: the admission waits 200 ms, not for the evaluation), a Warning
    names the file, the evaluation process is killed, and the operator's threads and processes
    do not grow with the pods."""
    assert operator.process is not None
    pid = operator.process.popen.pid
    # What may grow: kopf's executor for sync handlers (asyncio's default size), one thread for
    # follow-up reconciles. Nothing per pod, nothing per evaluation.
    most_threads = threads(pid) + min(32, (os.cpu_count() or 1) + 4) + 1
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="prosody"), data={"prosody.cfg.lua": NEVER_ENDS}
        ),
    )

    def deploy(name: str, replicas: int) -> list[client.V1Pod]:
        body = prosody_workload(
            "Deployment",
            name,
            "prosody",
            env={"PROSODY_STATISTICS_INTERVAL": FALLBACK_INTERVAL},
        )
        body["spec"]["replicas"] = replicas
        utils.create_from_dict(k8s_client, body, namespace=namespace)

        def created() -> list[client.V1Pod]:
            return list(core.list_namespaced_pod(namespace, label_selector=f"app={name}").items)

        wait_until(lambda: len(created()) == replicas, 120, f"{replicas} pods of {name}")
        return created()

    pods = deploy("xmpp", 10)
    for pod in pods:
        env = sidecar_env(pod)
        assert env is not None, f"{pod.metadata.name} has no sidecar"
        assert env["PROSODY_EXPORTER_INTERVAL"] == f"{FALLBACK_INTERVAL}s"
        assert env["PROSODY_EXPORTER_UPSTREAM_URL"] == "http://127.0.0.1:5280/metrics"

    def warned() -> bool:
        return any(
            "prosody.cfg.lua: the operator stopped evaluating the config after "
            f"{EVALUATION_TIMEOUT} s" in message
            for message in events(core, namespace, "xmpp", "ProsodyConfig")
        )

    wait_until(warned, 60, "a ProsodyConfig Warning naming the file")
    killed = [int(n) for n in re.findall(r"evaluation process (\d+) killed", operator.log_text())]
    assert killed, operator.log_text()[-2000:]
    assert not any(pid_alive(worker) for worker in killed)
    # The ServiceMonitor follows the fallback too, and says so.
    monitor = client.CustomObjectsApi(k8s_client).get_namespaced_custom_object(
        "monitoring.coreos.com", "v1", namespace, "servicemonitors", "xmpp-prosody-metrics"
    )
    assert monitor["spec"]["endpoints"][0]["interval"] == f"{FALLBACK_INTERVAL}s"  # type: ignore[index]

    # Ten more pods of the same config: a cached result, no new evaluation, and nothing grows.
    assert threads(pid) <= most_threads
    more = deploy("chat", 10)
    assert all(sidecar_env(pod) for pod in more)
    wait_until(lambda: bool(events(core, namespace, "chat", "ProsodyConfig")), 60, "chat's Warning")
    workers = children(pid)
    assert len(workers) == WORKERS, workers  # none stuck, none leaked
    assert threads(pid) <= most_threads, (threads(pid), most_threads)
    killed_again = re.findall(r"evaluation process (\d+) killed", operator.log_text())
    assert len(killed_again) == len(killed)  # the cached result served "chat"
    # What it costs: the operator and its workers (each capped by its address space).
    memory = {p: kib(status(p)["VmRSS"]) // 1024 for p in [pid, *workers]}
    print(f"operator threads {threads(pid)}, RSS MiB (operator, workers): {memory}")
    assert all(kib(status(w)["VmPeak"]) <= 128 * 1024 for w in workers)

    # And a pod with a config that evaluates: the cached hang did not stop anything.
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="good"),
            data={"prosody.cfg.lua": prosody_config("40")},
        ),
    )
    started = time.monotonic()
    created = core.create_namespaced_pod(namespace, prosody_pod("solo", "good"))
    print(f"admission of a pod with a fresh config: {time.monotonic() - started:.3f}s")
    env = sidecar_env(created)
    assert env is not None and env["PROSODY_EXPORTER_INTERVAL"] in ("40s", "60s")


def test_a_config_with_thousands_of_findings_posts_21_events_once(
    k8s_client: client.ApiClient, namespace: str, operator: OperatorProcess
):
    """At most 20 findings of one evaluation and a line saying how many more; reconciles after
    that (here: the Deployment's status updates and a label) post none of them again."""
    config = prosody_config(
        "45", extra='for i = 1, 3000 do VirtualHost("host" .. i) statistics_interval = 5 end'
    )
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="prosody"), data={"prosody.cfg.lua": config}
        ),
    )
    utils.create_from_dict(
        k8s_client, prosody_workload("Deployment", "xmpp", "prosody"), namespace=namespace
    )

    def summarized() -> bool:
        return any("more finding(s)" in m for m in events(core, namespace, "xmpp", "ProsodyConfig"))

    wait_until(summarized, 60, "the summary finding")
    first = events(core, namespace, "xmpp", "ProsodyConfig")
    assert len(first) == 21, first
    assert any("and 2980 more finding(s)" in m for m in first)
    apps = client.AppsV1Api(k8s_client)
    apps.patch_namespaced_deployment("xmpp", namespace, {"metadata": {"labels": {"touch": "1"}}})
    apps.patch_namespaced_deployment("xmpp", namespace, {"spec": {"replicas": 2}})
    wait_until(
        lambda: len(core.list_namespaced_pod(namespace, label_selector="app=xmpp").items) == 2,
        60,
        "the second pod",
    )
    time.sleep(3)  # the reconciles of those changes
    assert sorted(events(core, namespace, "xmpp", "ProsodyConfig")) == sorted(first)
