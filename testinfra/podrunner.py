"""A tiny kubelet + scheduler + kube-proxy for one Node: runs the Prosody pods (and the
prosody-operator pod of a `helm install`) of the local control plane as real processes in network
namespaces, so Services get real endpoints, webhooks a real backend and Prometheus real targets.

    with PodRunner(api, workdir, ["my-namespace"]) as runner:
        ...  # pods labelled prosody-operator.io/inject=true get bound, run and reported Running

What it does, every POLL seconds in one thread (stopped by `stop()`, or after `lifetime` seconds):

* **Node**: registers its own Node with `spec.podCIDRs = [pod_cidr]` (or uses `node_name`).
* **Scheduling**: binds each unscheduled pod matching one of `label_selectors` in its namespaces
  to the Node (POST pods/binding). Other pods (e.g. the StatefulSet prometheus-operator creates)
  are left Pending.
* **Network**: a Linux bridge `pxt<pid>br` in the root namespace with the first address of the pod
  CIDR (the gateway, where the kubelet's probes come from); each pod gets a network namespace
  (`pxt-<pid>-e2e-<n>`, made by testinfra.netns, so leftovers of crashed runs are removed) joined
  to the bridge by a veth pair, with the next free address of the pod CIDR. `attach()` and
  `attach_outside()` join other namespaces (a Prometheus) to the same bridge.
* **The `kubernetes` Service**, as kube-proxy would: its ClusterIP is added to the bridge and
  testinfra.apiforwarder forwards ClusterIP:443 to the API server (`api_server_url`); the API
  server's certificate names that address, so in-cluster clients verify it as in a cluster.
* **Containers**, as local processes inside the pod's namespace:
  - the injected `prosody-exporter` sidecar runs the real `prosody-exporter` console script with
    exactly the env of its container spec (`env -i`, plus PATH) and nothing else;
  - a container whose image is `.../prosody-operator[:tag]` runs the real `prosody-operator`
    console script with the container's env plus what a kubelet adds (KUBERNETES_SERVICE_HOST
    and _PORT, HOSTNAME), in a mount namespace of its own (from `ip netns exec`, made private
    from the host) where a tmpfs covers /run and the container's volumes are bind-mounted at
    their mountPaths: emptyDir, and projected volumes with a ServiceAccount token (TokenRequest
    bound to the pod, as the kubelet asks), ConfigMap items and the pod's namespace — the
    `kube-api-access-*` volume the API server adds, so the operator logs in with in-cluster
    config. Its securityContext is not applied: the process runs as root (the venv's Python
    may live under a home folder another user cannot enter, as /root is here);
  - every other container is Prosody: Debian's `prosody`, with the files of the ConfigMap(s)
    mounted under `/etc/prosody` (read through the API; directory mounts with optional `items`,
    and `subPath` mounts of single files) and the container's literal env. Prosody cannot run
    here with a packaged config as is, so test-only settings are **appended to prosody.cfg.lua**
    after `VirtualHost "*"` (which returns to the global section): its own pidfile, data_path and
    console log, `daemonize = false` and `run_as_root = true`. Everything else is the user's:
    Prosody's HTTP server stays on its default port 5280, where the sidecar collects from
    127.0.0.1. `Include` of a relative path works (files are side by side); absolute
    `/etc/prosody/...` paths do not.
* **Status**: pods/status gets phase Running, podIP(s), hostIP, container statuses and the
  conditions PodScheduled, Initialized, ContainersReady and Ready. Readiness is what a kubelet
  computes: each container's readinessProbe (httpGet or tcpSocket, from the gateway address to
  the pod IP), or "running" when it has none. The controller-manager then fills the Endpoints and
  EndpointSlices of the Services selecting the pod. A container whose process exits is reported
  terminated (no restarts).
* **Deletion**: a pod being deleted is stopped and then deleted with grace period 0, as a kubelet
  does; `stop()` stops every pod, deletes the pods it ran (grace period 0: their Node is gone),
  the namespaces, the bridge and the Node it registered — also after a failure.

Only what the tests need is supported; anything else (image pulls, other volumes, exec probes,
restarts, liveness probes, more than one PodRunner per process: the bridge is named
after the pid) is not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from .apiforwarder import ApiForwarder
from .exporter import exporter_command
from .layout import REPO_ROOT
from .netns import Namespace, NetnsLab, delete_namespace, require_netns_support
from .operator import operator_command
from .procs import Process, pid_alive, require_program

SIDECAR = "prosody-exporter"
OPERATOR_IMAGE = "prosody-operator"  # the image's last path segment, without tag or digest
INJECT_LABEL = "prosody-operator.io/inject=true"
PROSODY_DIR = "/etc/prosody"
# What an operator container runs from the host: a volume mounted over one of them (e.g. an
# emptyDir at /tmp, with the checkout under /tmp) gets it bound back.
HOST_PATHS = sorted({REPO_ROOT, Path(sys.prefix), Path(sys.base_prefix)})
POLL = 0.5  # seconds between two passes over the pods
MAX_LIFETIME = 1800.0  # seconds: by default, the loop ends on its own after this
MAX_ERRORS = 50  # errors kept for the failure message
FIRST_POD_HOST = 10  # pods get .10, .11, ...; .2-.9 and .200 up are for attach()
LAST_POD_HOST = 199
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LINK = re.compile(r"^pxt(\d+)(br|v\d+)$")

# Appended to the user's prosody.cfg.lua: test-only settings, in the global section.
PROSODY_OVERRIDES = """
-- Appended by testinfra/podrunner.py: test-only settings for running this pod's Prosody as a
-- local process. VirtualHost "*" returns to the global section.
VirtualHost "*"
pidfile = "{dir}/prosody.pid"
data_path = "{dir}/data"
log = {{ info = "*console" }}
daemonize = false
run_as_root = true
"""


class NotYet(Exception):
    """Something a pod needs is not there yet (e.g. its namespace's kube-root-ca.crt): the next
    pass tries again, as a kubelet keeps a pod in ContainerCreating."""


def image_name(image: str) -> str:
    """`registry:5000/org/prosody-operator:0.1.0@sha256:...` -> `prosody-operator`."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ip(*args: str) -> str:
    argv = [require_netns_support(), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def cleanup_leftover_links() -> None:
    """Delete `pxt<pid>br` bridges and `pxt<pid>v<n>` veths of runs whose process is gone."""
    for link in json.loads(_ip("-j", "link", "show") or "[]"):
        name = link.get("ifname", "").split("@")[0]
        match = _LINK.match(name)
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(RuntimeError):
                _ip("link", "delete", "dev", name)


def free_pod_cidr() -> str:
    """A /24 in 198.18.96.0/19 that no route of the root namespace uses yet."""
    routes = json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]")
    used = [r["dst"] for r in routes if r.get("dst", "default") not in ("default",)]
    used_nets = []
    for text in used:
        with contextlib.suppress(ValueError):
            used_nets.append(ipaddress.ip_network(text if "/" in text else f"{text}/32"))
    for candidate in ipaddress.ip_network("198.18.96.0/19").subnets(new_prefix=24):
        if not any(candidate.overlaps(net) for net in used_nets):
            return str(candidate)
    raise RuntimeError("no free /24 in 198.18.96.0/19 for the pod network")


@dataclass
class RunningPod:
    """One pod this runner runs: its namespace, address, files and container processes."""

    namespace: str
    name: str
    uid: str
    ip: str
    netns: Namespace
    workdir: Path
    started_at: str
    processes: dict[str, Process] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    prosody_config: Path | None = None
    reported: dict[str, Any] | None = None  # the last status written (without conditions)
    conditions: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


class PodRunner:
    """Binds, runs and reports the pods of some namespaces on one Node (see the module doc)."""

    def __init__(
        self,
        api: client.ApiClient,
        workdir: Path,
        namespaces: list[str],
        *,
        pod_cidr: str | None = None,
        node_name: str | None = None,
        label_selectors: tuple[str, ...] = (INJECT_LABEL,),
        lifetime: float = MAX_LIFETIME,
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.namespaces = list(namespaces)
        self.label_selectors = label_selectors
        self.lifetime = lifetime
        self.pod_cidr = pod_cidr
        self.node_name = node_name or f"e2e-node-{uuid.uuid4().hex[:6]}"
        self._own_node = node_name is None
        self.bridge = f"pxt{os.getpid()}br"
        self.pods: dict[tuple[str, str], RunningPod] = {}
        self.errors: list[str] = []
        self._lab: NetnsLab | None = None
        self._bridge_up = False
        self._veths = 0
        self._used_hosts: set[int] = set()
        self._outside: list[str] = []  # addresses attached with attach_outside()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = workdir / "podrunner.log"
        self._api_service: ApiForwarder | None = None

    # --- addresses ---------------------------------------------------------------------------

    @property
    def network(self) -> ipaddress.IPv4Network:
        assert self.pod_cidr, "start() picks the pod CIDR"
        return ipaddress.IPv4Network(self.pod_cidr)

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace (the Node's address)."""
        return str(self.network[1])

    def host(self, index: int) -> str:
        return str(self.network[index])

    @property
    def api_server_url(self) -> str:
        """The API server as pods reach it: the `kubernetes` Service's ClusterIP, port 443."""
        assert self._api_service, "start() serves the kubernetes Service"
        return self._api_service.url

    @property
    def _kubernetes_service_ip(self) -> str:
        assert self._api_service, "start() serves the kubernetes Service"
        return self._api_service.listen_host

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PodRunner:
        require_program("prosody")
        exporter_command()  # fails now, with the make target, when missing
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            cleanup_leftover_links()
            self._lab = NetnsLab("e2e")
            self.pod_cidr = self.pod_cidr or free_pod_cidr()
            if self._own_node:
                self.core.create_node(
                    client.V1Node(
                        metadata=client.V1ObjectMeta(name=self.node_name),
                        spec=client.V1NodeSpec(pod_cidr=self.pod_cidr, pod_cidrs=[self.pod_cidr]),
                    )
                )
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            self._bridge_up = True
            _ip("addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge)
            _ip("link", "set", "dev", self.bridge, "up")
            cluster_ip = self.core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
            _ip("addr", "add", f"{cluster_ip}/32", "dev", self.bridge)
            self._api_service = ApiForwarder(cluster_ip, 443, self.lifetime).start()
            self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the loop, every pod, the namespaces, the bridge and the Node; safe to repeat."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=60)
            self._thread = None
        if self._api_service:
            self._api_service.stop()
            self._api_service = None
        for pod in list(self.pods.values()):
            self._forget(pod, delete_from_api=True)
        if self._lab:
            self._lab.close()
            self._lab = None
        if self._bridge_up:
            with contextlib.suppress(RuntimeError):
                _ip("link", "delete", "dev", self.bridge)
            self._bridge_up = False
        if self._own_node:
            with contextlib.suppress(client.ApiException):
                self.core.delete_node(self.node_name)
            self._own_node = False

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def check(self) -> None:
        """Raise with what went wrong in the loop, if anything did."""
        if self.errors:
            raise RuntimeError("pod runner errors:\n" + "\n".join(self.errors[-5:]))

    def pod(self, namespace: str, name: str) -> RunningPod | None:
        return self.pods.get((namespace, name))

    def running_pods(self, namespace: str, prefix: str = "") -> list[RunningPod]:
        return [
            p for p in self.pods.values() if p.namespace == namespace and p.name.startswith(prefix)
        ]

    # --- joining other namespaces to the bridge ------------------------------------------------

    def _veth(self, netns: Namespace, addresses: list[str]) -> None:
        self._veths += 1
        outer = f"pxt{os.getpid()}v{self._veths}"
        _ip(
            "link",
            "add",
            "name",
            outer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name,
        )
        _ip("link", "set", "dev", outer, "master", self.bridge)
        _ip("link", "set", "dev", outer, "up")
        for address in addresses:
            _ip("-n", netns.name, "addr", "add", address, "dev", "eth0")
        _ip("-n", netns.name, "link", "set", "dev", "eth0", "up")
        netns.addresses["eth0"] = list(addresses)
        # A default route through the gateway, as in a pod (nothing forwards beyond it).
        if ipaddress.ip_interface(addresses[0]).network == self.network:
            _ip("-n", netns.name, "route", "add", "default", "via", self.gateway)

    def attach(self, role: str, host: int) -> Namespace:
        """A new namespace on the bridge with address number `host` of the pod CIDR (use 200+)."""
        if host in self._used_hosts or not LAST_POD_HOST < host < self.network.num_addresses - 1:
            raise ValueError(f"host {host}: use a free one above {LAST_POD_HOST}")
        assert self._lab is not None
        netns = self._lab.namespace(role)
        self._used_hosts.add(host)
        self._veth(netns, [f"{self.host(host)}/{self.network.prefixlen}"])
        return netns

    def attach_outside(self, role: str, address: str) -> Namespace:
        """A namespace on the bridge whose address is outside the pod CIDR (e.g. a Prometheus
        elsewhere): on-link routes both ways, so it reaches the pods and the gateway directly."""
        interface = ipaddress.ip_interface(address)
        if interface.ip in self.network or not interface.ip.is_private:
            raise ValueError(f"{address}: give an address outside {self.pod_cidr}")
        assert self._lab is not None
        netns = self._lab.namespace(role)
        self._veth(netns, [f"{interface.ip}/32"])
        _ip("-n", netns.name, "route", "add", str(self.network), "dev", "eth0")
        # The `kubernetes` Service, through the Node, as from any other host of the cluster.
        service_ip = self._kubernetes_service_ip
        _ip("-n", netns.name, "route", "add", f"{service_ip}/32", "via", self.gateway)
        # The way back, in the root namespace; deleted with the bridge.
        _ip("route", "add", f"{interface.ip}/32", "dev", self.bridge)
        for pod in self.pods.values():
            _ip("-n", pod.netns.name, "route", "add", f"{interface.ip}/32", "dev", "eth0")
        self._outside.append(str(interface.ip))
        return netns

    # --- the loop ------------------------------------------------------------------------------

    def _log_line(self, message: str) -> str:
        line = f"{now()} {message}"
        with open(self._log, "a") as log:
            log.write(line + "\n")
        return line

    def _record(self, message: str) -> None:
        line = self._log_line(message)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(line)

    def _loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._pass()
            except Exception:
                self._record(traceback.format_exc())
            self._stop.wait(POLL)

    def _pass(self) -> None:
        seen: set[tuple[str, str]] = set()
        for namespace, selector in itertools.product(self.namespaces, self.label_selectors):
            try:
                pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
            except client.ApiException as error:
                if error.status == 404:
                    continue
                raise
            for pod in pods.items:
                key = (namespace, pod.metadata.name)
                seen.add(key)
                if self._stop.is_set():
                    return
                try:
                    self._sync(pod)
                except NotYet as reason:  # as a kubelet: the pod stays ContainerCreating
                    self._log_line(f"{namespace}/{pod.metadata.name}: waiting: {reason}")
                except Exception:
                    self._record(f"{namespace}/{pod.metadata.name}: {traceback.format_exc()}")
        for key in [k for k in self.pods if k not in seen]:  # deleted behind our back
            self._forget(self.pods[key], delete_from_api=False)

    def _sync(self, pod: client.V1Pod) -> None:
        meta, spec = pod.metadata, pod.spec
        key = (meta.namespace, meta.name)
        running = self.pods.get(key)
        if running and running.uid != meta.uid:  # same name, new pod
            self._forget(running, delete_from_api=False)
            running = None
        if meta.deletion_timestamp:
            if spec.node_name == self.node_name:
                if running:
                    self._forget(running, delete_from_api=False)
                self._force_delete(meta.namespace, meta.name, meta.uid)
            return
        if not spec.node_name:
            self._bind(meta.namespace, meta.name)
            return
        if spec.node_name != self.node_name:
            return
        if running is None:
            running = self._run(pod)
        self._report(pod, running)

    def _bind(self, namespace: str, name: str) -> None:
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=name),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=self.node_name),
        )
        # _preload_content=False: the client cannot deserialize the (empty) Status it returns.
        self.core.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(client.ApiException):
            # In the body: the API server ignores the query parameter when a body is sent.
            options = client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
            )
            self.core.delete_namespaced_pod(name, namespace, body=options)

    def _forget(self, pod: RunningPod, *, delete_from_api: bool) -> None:
        pod.stop()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            delete_namespace(pod.netns.name)
        self._used_hosts.discard(int(ipaddress.IPv4Address(pod.ip)) - int(self.network[0]))
        self.pods.pop(pod.key, None)
        if delete_from_api:
            self._force_delete(pod.namespace, pod.name, pod.uid)

    # --- running a pod -------------------------------------------------------------------------

    def _next_host(self) -> int:
        for host in range(FIRST_POD_HOST, LAST_POD_HOST + 1):
            if host not in self._used_hosts:
                self._used_hosts.add(host)
                return host
        raise RuntimeError(f"no free address left in {self.pod_cidr}")

    def _run(self, pod: client.V1Pod) -> RunningPod:
        meta = pod.metadata
        host = self._next_host()
        assert self._lab is not None
        netns = self._lab.namespace(f"pod{host}")
        running = RunningPod(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            ip=self.host(host),
            netns=netns,
            workdir=self.workdir / f"{meta.namespace}-{meta.name}",
            started_at=now(),
        )
        shutil.rmtree(running.workdir, ignore_errors=True)
        running.workdir.mkdir(parents=True)
        try:
            self._veth(netns, [f"{running.ip}/{self.network.prefixlen}"])
            for outside in self._outside:
                _ip("-n", netns.name, "route", "add", f"{outside}/32", "dev", "eth0")
            for container in pod.spec.containers:
                running.images[container.name] = container.image
                # The sidecar by the name the operator gives it (its image is overridable per
                # pod); the operator by its image (the chart's container name is generic).
                if container.name == SIDECAR:
                    self._start_exporter(running, container)
                elif image_name(container.image) == OPERATOR_IMAGE:
                    self._start_operator(running, pod, container)
                else:
                    self._start_prosody(running, pod, container)
        except BaseException:  # tried again from scratch on the next pass
            self._forget(running, delete_from_api=False)
            raise
        self.pods[running.key] = running  # only now: running_pods() shows whole pods
        return running

    @staticmethod
    def _literal_env(container: client.V1Container) -> list[str]:
        pairs = []
        for var in container.env or []:
            if var.value_from is not None:
                raise ValueError(f"container {container.name}: env {var.name} uses valueFrom")
            pairs.append(f"{var.name}={var.value or ''}")
        return pairs

    def _start_exporter(self, pod: RunningPod, container: client.V1Container) -> None:
        argv = ["env", "-i", PATH_ENV, *self._literal_env(container), exporter_command()]
        pod.processes[container.name] = Process(
            container.name, argv, pod.workdir / f"{container.name}.log", netns=pod.netns.name
        )

    def _start_operator(
        self, pod: RunningPod, spec: client.V1Pod, container: client.V1Container
    ) -> None:
        kubelet_env = [
            f"KUBERNETES_SERVICE_HOST={self._kubernetes_service_ip}",
            "KUBERNETES_SERVICE_PORT=443",
            f"HOSTNAME={pod.name}",
        ]
        # Runs in the mount namespace `ip netns exec` makes (private from the host's): /run gets
        # a tmpfs of its own, so mount points under it can be made without touching the host.
        # Volumes are bound from a staged mount of their folder there, so a volume mounted at
        # /tmp cannot hide the others' folders (the pod's workdir may be under /tmp); the host
        # paths the process needs (HOST_PATHS: the checkout, the venv, Python) are staged too
        # and bound back wherever a volume covers them.
        staged, volumes = "/run/.pod-volumes", pod.workdir / "volumes"
        volumes.mkdir(exist_ok=True)
        setup = [
            "set -e",
            "mount -t tmpfs pod-run /run",
            f"mkdir {staged}",
            f"mount --bind {shlex.quote(str(volumes))} {staged}",
        ]
        for index, path in enumerate(HOST_PATHS):
            setup.append(f"mkdir {staged}-host{index}")
            setup.append(f"mount --bind {shlex.quote(str(path))} {staged}-host{index}")
        targets = []
        for mount in container.volume_mounts or []:
            self._write_volume(pod, spec, mount.name)
            target = mount.mount_path
            if target == "/run" or target.startswith("/run/") or target.startswith("/var/run/"):
                setup.append(f"mkdir -p {shlex.quote(target)}")
            elif not Path(target).is_dir():
                raise ValueError(f"container {container.name}: cannot mount at {target}")
            setup.append(f"mount --bind {staged}/{mount.name} {shlex.quote(target)}")
            targets.append(Path(target))
        for index, path in enumerate(HOST_PATHS):
            if any(path == target or target in path.parents for target in targets):
                setup.append(f"mkdir -p {shlex.quote(str(path))}")
                setup.append(f"mount --bind {staged}-host{index} {shlex.quote(str(path))}")
        argv = [
            "sh", "-c", "\n".join([*setup, 'exec "$@"']), "pod-setup",
            "env", "-i", PATH_ENV, *self._literal_env(container), *kubelet_env,
            operator_command(),
        ]  # fmt: skip
        pod.processes[container.name] = Process(
            container.name, argv, pod.workdir / f"{container.name}.log", netns=pod.netns.name
        )

    def _write_volume(self, pod: RunningPod, spec: client.V1Pod, name: str) -> None:
        """Volume `name`'s folder under the pod's `volumes`: emptyDir, or projected sources."""
        volume = next(v for v in spec.spec.volumes or [] if v.name == name)
        directory = pod.workdir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        if volume.empty_dir is not None:
            return
        if volume.projected is None:
            raise ValueError(f"volume {name}: only emptyDir, projected and ConfigMap volumes")
        for source in volume.projected.sources:
            for path, text in self._projected_files(spec, source).items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(text)

    def _projected_files(self, spec: client.V1Pod, source: Any) -> dict[str, str]:
        meta = spec.metadata
        if source.service_account_token is not None:
            token = source.service_account_token
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(
                    audiences=[token.audience] if token.audience else [],
                    expiration_seconds=token.expiration_seconds,
                    bound_object_ref=client.V1BoundObjectReference(
                        api_version="v1", kind="Pod", name=meta.name, uid=meta.uid
                    ),
                )
            )
            issued = self.core.create_namespaced_service_account_token(
                spec.spec.service_account_name, meta.namespace, request
            )
            return {token.path: issued.status.token}
        if source.config_map is not None:
            try:
                config_map = self.core.read_namespaced_config_map(
                    source.config_map.name, meta.namespace
                )
            except client.ApiException as error:
                if error.status == 404:
                    raise NotYet(f"ConfigMap {source.config_map.name} not found") from None
                raise
            data = config_map.data or {}
            items = source.config_map.items
            return {i.path: data[i.key] for i in items} if items else dict(data)
        if source.downward_api is not None:
            fields = {"metadata.namespace": meta.namespace, "metadata.name": meta.name}
            return {i.path: fields[i.field_ref.field_path] for i in source.downward_api.items}
        raise ValueError(f"unsupported projected volume source: {source}")

    def _configmap_files(self, namespace: str, pod: client.V1Pod, mount: Any) -> dict[str, str]:
        """The files a ConfigMap volume mount puts under /etc/prosody, by relative path."""
        volume = next(v for v in pod.spec.volumes or [] if v.name == mount.name)
        if volume.config_map is None:
            raise ValueError(f"volume {volume.name}: only ConfigMap volumes are supported")
        data = self.core.read_namespaced_config_map(volume.config_map.name, namespace).data or {}
        items = volume.config_map.items
        files = {i.path: data[i.key] for i in items} if items else dict(data)
        base = Path(mount.mount_path).relative_to(PROSODY_DIR)
        if mount.sub_path:
            return {str(base): files[mount.sub_path]}
        return {str(base / path): text for path, text in files.items()}

    def _start_prosody(
        self, pod: RunningPod, spec: client.V1Pod, container: client.V1Container
    ) -> None:
        config_dir = pod.workdir / "etc-prosody"
        config_dir.mkdir(parents=True, exist_ok=True)
        for mount in container.volume_mounts or []:
            if mount.mount_path == PROSODY_DIR or mount.mount_path.startswith(PROSODY_DIR + "/"):
                for path, text in self._configmap_files(pod.namespace, spec, mount).items():
                    (config_dir / path).parent.mkdir(parents=True, exist_ok=True)
                    (config_dir / path).write_text(text)
        config = config_dir / "prosody.cfg.lua"
        if not config.exists():
            raise ValueError(f"container {container.name}: no prosody.cfg.lua under {PROSODY_DIR}")
        state = pod.workdir / container.name
        (state / "data").mkdir(parents=True, exist_ok=True)
        with open(config, "a") as file:
            file.write(PROSODY_OVERRIDES.format(dir=state))
        pod.prosody_config = config
        argv = [
            "env", "-i", PATH_ENV, *self._literal_env(container),
            require_program("prosody"), "--config", str(config),
        ]  # fmt: skip
        pod.processes[container.name] = Process(
            container.name, argv, pod.workdir / f"{container.name}.log", netns=pod.netns.name
        )

    # --- status --------------------------------------------------------------------------------

    def _probe_ok(self, pod: RunningPod, container: client.V1Container) -> bool:
        probe = container.readiness_probe
        action = probe and (probe.http_get or probe.tcp_socket)
        if action is None:
            return True
        port = action.port
        if isinstance(port, str) and not port.isdigit():
            port = next(p.container_port for p in container.ports or [] if p.name == port)
        if probe.tcp_socket is not None:
            try:
                socket.create_connection((pod.ip, int(port)), timeout=1.0).close()
                return True
            except OSError:
                return False
        url = f"http://{pod.ip}:{port}{probe.http_get.path or '/'}"
        try:
            return httpx.get(url, timeout=1.0, trust_env=False).status_code < 400
        except httpx.HTTPError:
            return False

    def _container_status(
        self, pod: RunningPod, container: client.V1Container, previous: dict[str, Any]
    ) -> dict[str, Any]:
        process = pod.processes[container.name]
        base = {
            "name": container.name,
            "image": container.image,
            "imageID": f"local://{pod.images[container.name]}",
            "containerID": f"process://{process.popen.pid}",
            "restartCount": 0,
        }
        if not process.running():
            state = previous.get("state", {}).get("terminated") or {
                "exitCode": process.popen.returncode,
                "reason": "Error" if process.popen.returncode else "Completed",
                "startedAt": pod.started_at,
                "finishedAt": now(),
            }
            return {**base, "ready": False, "started": False, "state": {"terminated": state}}
        ready = self._probe_ok(pod, container)
        state = {"running": {"startedAt": pod.started_at}}
        return {**base, "ready": ready, "started": True, "state": state}

    def _report(self, pod: client.V1Pod, running: RunningPod) -> None:
        previous = {s["name"]: s for s in (running.reported or {}).get("containerStatuses", [])}
        statuses = [
            self._container_status(running, c, previous.get(c.name, {}))
            for c in pod.spec.containers
        ]
        ready = all(s["ready"] for s in statuses)
        status: dict[str, Any] = {
            "phase": "Running",
            "hostIP": self.gateway,
            "hostIPs": [{"ip": self.gateway}],
            "podIP": running.ip,
            "podIPs": [{"ip": running.ip}],
            "startTime": running.started_at,
            "containerStatuses": statuses,
        }
        if status == running.reported:
            return
        values = {
            "PodScheduled": True,
            "Initialized": True,
            "ContainersReady": ready,
            "Ready": ready,
        }
        for kind, value in values.items():
            if running.conditions.get(kind, {}).get("status") != str(value):
                running.conditions[kind] = {
                    "type": kind,
                    "status": str(value),
                    "lastTransitionTime": now(),
                }
        body = {"status": {**status, "conditions": list(running.conditions.values())}}
        self.core.patch_namespaced_pod_status(running.name, running.namespace, body)
        running.reported = status
