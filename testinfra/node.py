"""The test node: a real kubelet and kube-proxy (v1.34, built with the control plane) with
containerd 1.6, runc and the CNI bridge, running the cluster's pods from images loaded from OCI
archives, in namespaces of its own.

    python -m testinfra.node up      # start it (the control plane must be up), or nothing if up
    python -m testinfra.node status  # exit 0 when up
    python -m testinfra.node down    # stop it and remove .cache/node

How it sits on the host (every change is undone by `down`, also after a crash, by the next `up`):

* **Network**: a network namespace `pxnode<slot>` joined to the host by a veth pair
  (testinfra/addresses.py: the link's /30 and the pod network's /24, one slot per node on the
  machine). The host routes the pod network to the node, so the API server reaches webhooks at
  pod addresses and tests reach pods; nothing else is routed (pods reach no other network). The
  CNI bridge, IP forwarding and kube-proxy's iptables rules all live in the node's namespace.
  Nothing listens in the host's: testinfra/apiforwarder.py serves the API server inside the node,
  on 127.0.0.1 (kubelet, kube-proxy) and at the `kubernetes` Service's endpoint (pods), and
  CoreDNS (v1.12.1, kubeadm's for 1.34) serves the cluster's names to the pods, both at
  NODE_LOCAL_IP on the node's loopback interface.
* **Mounts**: containerd, the kubelet and kube-proxy share a mount namespace of their own, where
  tmpfs folders cover /run, /var/lib and /var/log (the kubelet writes under /var/lib/kubelet and
  /var/log/containers whatever its flags say) and files of ours cover the three /proc/sys
  settings the kubelet insists on (vm/overcommit_memory, kernel/panic, kernel/panic_on_oops):
  it sees the values it wants, the host keeps its own.
* **cgroups**: a folder `pxnode<slot>` in every cgroup hierarchy holds everything the node runs
  (its daemons in `node/`, the pods in `kubepods/`, the kubelet's cgroupRoot): `down` kills every
  process in it and removes it.

The node registers as Node `testinfra-node` with `spec.podCIDRs` set (what a cloud's IPAM or the
controller-manager's would set), and its kubelet authenticates as `system:node:testinfra-node`
(Node authorizer, NodeRestriction), kube-proxy as `system:kube-proxy`, CoreDNS as
`system:coredns` (kubeadm's ClusterRole of that name).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from kubernetes import client, config

from . import controlplane, daemons, infraimages
from .addresses import NODE_API_PORT, NODE_LOCAL_IP, SERVICE_CIDR, SLOTS, NodeAddresses
from .apiforwarder import FORWARDING
from .daemons import Component
from .layout import BIN_DIR, CACHE_DIR, REPO_ROOT
from .procs import MissingPrerequisite, require_program, wait_until

NODE_DIR = CACHE_DIR / "node"
NODE_NAME = "testinfra-node"
# The product's images (`make images`) and the node's own (testinfra/infraimages.py).
IMAGE_DIR = CACHE_DIR / "images"
CNI_BIN_DIR = Path("/usr/lib/cni")
# Slots are the machine's, not a checkout's: one lock for every checkout choosing one.
SLOT_LOCK = Path("/tmp/testinfra-node-slots.lock")
START_TIMEOUT = 120.0
# What the kubelet checks at start (protectKernelDefaults) and would otherwise write to the host.
KERNEL_SETTINGS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
# Covered by tmpfs folders in the node's mount namespace: what the node writes there stays there.
PRIVATE_DIRS = ("/run", "/var/lib", "/var/log")
APPLY = "application/apply-patch+yaml"  # server-side apply
COMPONENT_NAMES = ("holder", "containerd", "apiforwarder", "coredns", "kubelet", "kube-proxy")
DNS_READY_PORT = 8181  # CoreDNS's `ready` plugin, on the node's address


class NodeError(RuntimeError):
    """The node could not be started or stopped; the message says why and where to look."""


def log(message: str) -> None:
    print(f"[testinfra] {message}", file=sys.stderr, flush=True)


# --- the host: namespaces, links, cgroups ----------------------------------------------------


def run(argv: list[str], timeout: float = 60.0, check: bool = True) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise NodeError(f"`{shlex.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, name=systemd, the v2 one)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, after = line.split(" - ", 1)
        if after.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(before.split()[4]))
    return mounts


def cgroup_processes(root: Path) -> list[int]:
    """The pids in a cgroup folder and every folder under it."""
    pids = []
    for procs in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(line) for line in procs.read_text().split()]
    return pids


@dataclass(frozen=True)
class Slot:
    """What the node in slot `number` has on the host."""

    number: int

    @property
    def addresses(self) -> NodeAddresses:
        return NodeAddresses(self.number)

    @property
    def name(self) -> str:
        """Of its network namespace, its host-side link and its cgroup folders."""
        return f"pxnode{self.number}"

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.name

    def cgroups(self) -> list[Path]:
        return [mount / self.name for mount in cgroup_mounts()]

    def exists(self) -> bool:
        return self.netns_path.exists() or any(path.exists() for path in self.cgroups())

    def processes(self) -> list[int]:
        return [pid for path in self.cgroups() for pid in cgroup_processes(path)]

    # --- making it -----------------------------------------------------------------------------

    def create(self) -> None:
        """The network namespace, the link and route, and the cgroup folders."""
        ip = require_program("ip")
        net = self.addresses
        run([ip, "netns", "add", self.name])
        run([ip, "-n", self.name, "link", "set", "lo", "up"])
        run([ip, "-n", self.name, "addr", "add", f"{NODE_LOCAL_IP}/32", "dev", "lo"])
        run([
            ip, "link", "add", self.name, "type", "veth", "peer", "name", "eth0",
            "netns", self.name,
        ])  # fmt: skip
        prefix = net.link.prefixlen
        run([ip, "addr", "add", f"{net.host_ip}/{prefix}", "dev", self.name])
        run([ip, "-n", self.name, "addr", "add", f"{net.node_ip}/{prefix}", "dev", "eth0"])
        run([ip, "link", "set", self.name, "up"])
        run([ip, "-n", self.name, "link", "set", "eth0", "up"])
        # Deleted with the link: the host reaches the pods through the node.
        run([ip, "route", "add", str(net.pod_cidr), "via", net.node_ip, "dev", self.name])
        # The node forwards between its link and its pod bridge, in its own namespace only.
        self.enter_net(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        for path in self.cgroups():
            for folder in (path, path / "node"):
                folder.mkdir(exist_ok=True)
                for name in ("cpuset.cpus", "cpuset.mems"):  # empty until copied from the parent
                    if (folder / name).exists():
                        (folder / name).write_text((folder.parent / name).read_text())

    def enter_net(self, argv: list[str]) -> str:
        return run([require_program("nsenter"), f"--net={self.netns_path}", *argv])

    def join_cgroups(self) -> str:
        """Shell lines that move the shell into the node's `node/` cgroups."""
        return "".join(
            f"echo $$ > {shlex.quote(str(path / 'node' / 'cgroup.procs'))}\n"
            for path in self.cgroups()
        )

    # --- removing it ---------------------------------------------------------------------------

    def kill_processes(self, timeout: float = 30.0) -> None:
        """SIGKILL everything in the node's cgroups until none is left (each pass catches what
        the previous one's victims forked)."""
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise NodeError(f"processes left in the cgroups of {self.name}: {pids}")
            time.sleep(0.1)

    def remove(self) -> None:
        """Everything `create` made and the node added since; safe to repeat."""
        self.kill_processes()
        for path in self.cgroups():
            if path.exists():
                # Deepest first: a cgroup folder can be removed only once it has no children.
                for folder in sorted(path.rglob("*/"), key=lambda p: -len(p.parts)):
                    if folder.is_dir():
                        with contextlib.suppress(FileNotFoundError):
                            folder.rmdir()
                with contextlib.suppress(FileNotFoundError):
                    path.rmdir()
        if self.netns_path.exists():
            run([require_program("ip"), "netns", "delete", self.name])  # the link goes with it
        # The kernel destroys a namespace, and the link with it, a moment after its last user.
        wait_until(lambda: not self.link_exists(), 30, f"the link {self.name} to go")

    def link_exists(self) -> bool:
        return Path("/sys/class/net", self.name).exists()


@contextlib.contextmanager
def slot_lock() -> Iterator[None]:
    with SLOT_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def routed_networks() -> list[ipaddress.IPv4Network]:
    """What the host's routes cover, except the default route."""
    routes = json.loads(run([require_program("ip"), "-j", "-4", "route", "show", "table", "all"]))
    networks = []
    for route in routes:
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.IPv4Network(route["dst"], strict=False))
    return [network for network in networks if network.prefixlen > 0]


def claim_slot() -> Slot:
    """The first slot nobody uses: neither a live node (its cgroups hold processes) nor anything
    else routed on the host (network namespace labs of other tests). A node that died leaves a
    slot whose cgroups are empty: it is cleaned and reused. Call it holding slot_lock()."""
    routed = routed_networks()
    for number in range(SLOTS):
        slot = Slot(number)
        if slot.exists():
            if slot.processes():
                continue
            slot.remove()
            routed = routed_networks()
        net = slot.addresses
        if any(n.overlaps(net.pod_cidr) or n.overlaps(net.link) for n in routed):
            continue
        try:
            slot.create()
        except BaseException:
            slot.remove()
            raise
        return slot
    raise NodeError(f"all {SLOTS} node slots of this machine are in use")


# --- configuration -----------------------------------------------------------------------------


def containerd_config(node: Node, slot: Slot) -> str:
    return f"""\
version = 2
root = "{node.directory / "containerd"}"
state = "/run/containerd"
oom_score = 0

[grpc]
  address = "{node.socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{infraimages.PAUSE.name}"
  # Without CAP_SYS_RESOURCE, runc cannot lower a process's oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  # Pods are addressed only in the node's namespace: no streaming server outside it.
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{node.directory / "cni"}"
"""


def cni_config(slot: Slot) -> dict[str, object]:
    net = slot.addresses
    return {
        "cniVersion": "0.4.0",
        "name": "testinfra",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cbr0",
                "isGateway": True,
                "ipMasq": False,  # the pods reach nothing outside the cluster
                "hairpinMode": True,  # a pod reaching itself through a Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(net.pod_cidr), "gateway": net.pod_gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],  # ClusterIPs are routed through the node
                    "dataDir": "/var/lib/cni/networks",
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node: Node, slot: Slot) -> dict[str, object]:
    net = slot.addresses
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This host has cgroup v1 (a hybrid layout): kubelet 1.34 refuses it unless told.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{slot.name}",
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "address": net.node_ip,
        "healthzBindAddress": net.node_ip,
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(controlplane.ca_cert_path())},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [NODE_LOCAL_IP],
        "failSwapOn": False,
        # Checks the /proc/sys settings (ours, in the node's mount namespace) instead of writing.
        "protectKernelDefaults": True,
        "oomScoreAdj": 0,
        # Its KUBE-FIREWALL chains are kube-proxy's business here.
        "makeIPTablesUtilChains": False,
        # The machine is shared: no eviction, no image garbage collection on its disk's state.
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "localStorageCapacityIsolation": False,
        "podLogsDir": str(node.directory / "pod-logs"),
        "serializeImagePulls": False,
        "registerNode": True,
        "rotateCertificates": False,
        # Readiness reported quickly: tests wait on it.
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
    }


def kube_proxy_config(node: Node, slot: Slot) -> dict[str, object]:
    net = slot.addresses
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(node.directory / "kube-proxy.kubeconfig")},
        "hostnameOverride": node.name,
        "mode": "iptables",
        "clusterCIDR": str(net.pod_cidr),
        "bindAddress": net.node_ip,
        "healthzBindAddress": f"{net.node_ip}:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Conntrack's table size is the host's (only the initial namespace may set it): leave it.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def corefile(node: Node, slot: Slot) -> str:
    """The cluster's DNS names (Services, pods), served to the node's pods at NODE_LOCAL_IP:53;
    nothing else is resolved (pods reach nothing outside the cluster)."""
    return f"""\
cluster.local in-addr.arpa ip6.arpa {{
    errors
    ready {slot.addresses.node_ip}:{DNS_READY_PORT}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {node.directory / "coredns.kubeconfig"}
        pods insecure
    }}
    cache 5
}}
"""


# What kubeadm grants CoreDNS (ClusterRole system:coredns).
COREDNS_RULES = [
    {
        "apiGroups": [""],
        "resources": ["endpoints", "services", "pods", "namespaces"],
        "verbs": ["list", "watch"],
    },
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["list", "watch"],
    },
]


def mount_script(node: Node) -> str:
    """Run at the start of the node's mount namespace; ends by exec'ing its arguments."""
    lines = ["set -e"]
    for directory in PRIVATE_DIRS:
        lines.append(f"mount -t tmpfs -o mode=0755 testinfra-node {directory}")
    for key in KERNEL_SETTINGS:
        path = node.directory / "sysctl" / key.replace("/", ".")
        lines.append(f"mount --bind {shlex.quote(str(path))} /proc/sys/{key}")
    lines.append('exec "$@"')
    return "\n".join(lines)


# --- the node ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node of the local control plane, with its files under `directory`, loading the
    images in `image_dir` (and the node's own)."""

    directory: Path = NODE_DIR
    name: str = NODE_NAME
    image_dir: Path | None = IMAGE_DIR

    @property
    def socket(self) -> Path:
        return self.directory / "containerd.sock"

    @property
    def slot_file(self) -> Path:
        return self.directory / "slot"

    def recorded_slot(self) -> Slot | None:
        try:
            return Slot(int(self.slot_file.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def running(self, name: str) -> int | None:
        return daemons.running_pid(self.directory, name)

    def api(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(controlplane.ADMIN_KUBECONFIG))

    # --- state ---------------------------------------------------------------------------------

    def is_up(self) -> bool:
        """Every component runs and the Node is Ready."""
        if not all(self.running(name) for name in COMPONENT_NAMES):
            return False
        try:
            with self.api() as api:
                return node_ready(client.CoreV1Api(api).read_node(self.name))
        except (OSError, client.ApiException):
            return False

    @property
    def addresses(self) -> NodeAddresses:
        slot = self.recorded_slot()
        if slot is None:
            raise NodeError(f"no node has been started from {self.directory}")
        return slot.addresses

    # --- up ------------------------------------------------------------------------------------

    def up(self) -> bool:
        """Start the node; False when it was already up (then it only loads the archives that
        changed since it loaded them, e.g. after `make images`)."""
        with controlplane.exclusive_lock():
            if self.is_up():
                self.load_images(self.image_archives())
                return False
            started = time.monotonic()
            binaries = self.check_prerequisites()
            archives = self.image_archives()
            self.stop_locked()
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
            try:
                with slot_lock():  # until the holder runs in the slot's cgroups: then it is ours
                    slot = claim_slot()
                    self.slot_file.write_text(str(slot.number))
                    self.write_files(slot)
                    holder = self.spawn_holder(slot, binaries)
                self.start(slot, holder, binaries, archives)
            except BaseException:
                self.stop_locked()  # the logs stay for the error message to point at
                raise
            log(
                f"node {self.name} up in {time.monotonic() - started:.1f} s: pods in "
                f"{slot.addresses.pod_cidr}, logs in {self.directory / 'logs'}"
            )
            return True

    def check_prerequisites(self) -> dict[str, str]:
        if os.geteuid() != 0:
            raise MissingPrerequisite("the test node needs root (containerd, namespaces, cgroups)")
        if not controlplane.is_up():
            raise NodeError("the control plane is not up: `make cluster` starts it")
        for private in PRIVATE_DIRS:
            if REPO_ROOT.is_relative_to(private):
                raise NodeError(f"the checkout ({REPO_ROOT}) must not be under {private}")
        if len(str(self.socket)) > 100:
            raise NodeError(f"{self.socket}: too long a path for a unix socket")
        binaries = {
            name: require_program(name, "make system-packages")
            for name in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables")
        }
        for name in ("nsenter", "unshare", "ip"):
            binaries[name] = require_program(name, "make system-packages")
        if not (CNI_BIN_DIR / "bridge").exists():
            raise MissingPrerequisite(
                f"no CNI plugins in {CNI_BIN_DIR}: `make system-packages` installs "
                "containernetworking-plugins"
            )
        for name in ("kubelet", "kube-proxy", "coredns"):
            path = BIN_DIR / name
            if not path.exists():
                raise MissingPrerequisite(f"{path} is missing: run `make cluster-bins`")
            binaries[name] = str(path)
        return binaries

    def image_archives(self) -> list[Path]:
        """Without an image_dir, only the pause image."""
        if self.image_dir is None:
            return infraimages.build_all(prometheus=False)
        return [*infraimages.build_all(), *sorted(self.image_dir.glob("*.oci.tar"))]

    def start(
        self, slot: Slot, holder: int, binaries: dict[str, str], archives: list[Path]
    ) -> None:
        containerd = self.component(
            slot, holder, "containerd", binaries["containerd"],
            "--config", str(self.directory / "containerd.toml"),
        )  # fmt: skip
        self.wait(containerd, self.launch(containerd), self.containerd_ready)
        self.load_images(archives)
        net = slot.addresses
        with self.api() as api:
            self.register(api, slot)
            forwarder = self.forwarder(slot)
            self.wait(forwarder, self.launch(forwarder), lambda: FORWARDING in log_of(forwarder))
            dns = self.component(
                slot, holder, "coredns", binaries["coredns"],
                "-conf", str(self.directory / "Corefile"), "-dns.port", "53",
            )  # fmt: skip
            kubelet, proxy = (
                self.kubelet(slot, holder, binaries),
                self.kube_proxy(slot, holder, binaries),
            )
            pids = {c.name: self.launch(c) for c in (dns, kubelet, proxy)}
            core = client.CoreV1Api(api)
            self.wait(kubelet, pids["kubelet"], lambda: node_ready(core.read_node(self.name)))
            healthz = f"http://{net.node_ip}:10256/healthz"
            self.wait(proxy, pids["kube-proxy"], lambda: http_ok(healthz))
            ready = f"http://{net.node_ip}:{DNS_READY_PORT}/ready"
            self.wait(dns, pids["coredns"], lambda: http_ok(ready))

    def launch(self, component: Component) -> int:
        return daemons.spawn(component, self.environment())

    @staticmethod
    def wait(component: Component, pid: int, ready: Callable[[], bool]) -> None:
        daemons.wait_until_ready(component, pid, ready, START_TIMEOUT, NodeError)

    # --- the pieces ------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The components' whole environment (the caller's proxies and the like stay out)."""
        path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        return {"PATH": path, "HOME": str(self.directory), "PYTHONPATH": str(REPO_ROOT)}

    def write_files(self, slot: Slot) -> None:
        ca = controlplane.certificate_authority()
        pki = self.directory / "pki"
        pki.mkdir()
        ca.issue_client(f"system:node:{self.name}", ("system:nodes",)).write(pki, "kubelet")
        ca.issue_client("system:kube-proxy").write(pki, "kube-proxy")
        ca.issue_client("system:coredns").write(pki, "coredns")
        # The admin kubeconfig's URL, which the API forwarder serves inside the node too.
        server = controlplane.apiserver_url(controlplane.Ports.load())
        users = {"kubelet": f"system:node:{self.name}", "kube-proxy": "kube-proxy"}
        for name, user in {**users, "coredns": "coredns"}.items():
            path = self.directory / f"{name}.kubeconfig"
            config_text = controlplane.kubeconfig(
                server, user, controlplane.KeyPair.read(pki, name)
            )
            path.write_text(yaml.safe_dump(config_text, sort_keys=False))
        (self.directory / "containerd.toml").write_text(containerd_config(self, slot))
        (self.directory / "Corefile").write_text(corefile(self, slot))
        (self.directory / "cni").mkdir()
        (self.directory / "cni" / "10-testinfra.conflist").write_text(
            json.dumps(cni_config(slot), indent=2)
        )
        (self.directory / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(self, slot)))
        (self.directory / "kube-proxy.yaml").write_text(
            yaml.safe_dump(kube_proxy_config(self, slot))
        )
        (self.directory / "sysctl").mkdir()
        for key, value in KERNEL_SETTINGS.items():
            (self.directory / "sysctl" / key.replace("/", ".")).write_text(value + "\n")
        (self.directory / "pod-logs").mkdir()

    def spawn_holder(self, slot: Slot, binaries: dict[str, str]) -> int:
        """`sleep`, holding the node's mount namespace (set up by mount_script) open."""
        wrapper = (
            "sh", "-c", slot.join_cgroups() + 'exec "$@"', "sh",
            binaries["nsenter"], f"--net={slot.netns_path}",
            binaries["unshare"], "--mount", "--propagation", "private",
            "sh", "-c", mount_script(self), "sh",
        )  # fmt: skip
        sleep = Path(require_program("sleep"))
        holder = Component("holder", sleep, ("infinity",), self.directory, wrapper)
        pid = self.launch(holder)

        def mounted() -> bool:
            with contextlib.suppress(FileNotFoundError):
                return f" {PRIVATE_DIRS[-1]} tmpfs " in Path(f"/proc/{pid}/mounts").read_text()
            return False

        self.wait(holder, pid, mounted)
        return pid

    def component(self, slot: Slot, holder: int, name: str, binary: str, *args: str) -> Component:
        """A component in the node's cgroups, network and mount namespaces."""
        wrapper = (
            "sh", "-c", slot.join_cgroups() + 'exec "$@"', "sh",
            require_program("nsenter"), f"--target={holder}", "--mount", "--net", "--",
        )  # fmt: skip
        return Component(name, Path(binary), args, self.directory, wrapper)

    def containerd_ready(self) -> bool:
        return self.ctr("version", check=False) is not None

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> str | None:
        argv = [require_program("ctr"), "--address", str(self.socket), "--namespace", "k8s.io"]
        done = subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            if check:
                raise NodeError(f"`ctr {' '.join(args)}` failed: {done.stderr.strip()}")
            return None
        return done.stdout

    def load_images(self, archives: list[Path]) -> None:
        """Import each OCI archive that changed since it was last imported into containerd's
        k8s.io namespace (the kubelet's), unpacked for the overlayfs snapshotter, under the names
        the archives carry."""
        record = self.directory / "loaded-images.json"
        loaded = json.loads(record.read_text()) if record.exists() else {}
        changed = [a for a in archives if loaded.get(str(a)) != a.stat().st_mtime_ns]
        if not changed:
            return
        started = time.monotonic()
        # Two at a time: unpacking a layer (gunzip, then files) keeps one core busy.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda a: self.ctr("images", "import", str(a)), changed))
        record.write_text(json.dumps({**loaded, **{str(a): a.stat().st_mtime_ns for a in changed}}))
        names = ", ".join(archive.name for archive in changed)
        log(f"loaded {names} in {time.monotonic() - started:.1f} s")

    def images(self) -> list[str]:
        listed = self.ctr("images", "list", "--quiet") or ""
        return [line for line in listed.splitlines() if not line.startswith("sha256:")]

    def in_network(self, argv: list[str]) -> list[str]:
        """`argv` run in the node's network namespace: there it reaches pods from the pod
        bridge's address, inside the pod network, as another pod would."""
        slot = self.recorded_slot()
        if slot is None:
            raise NodeError(f"no node has been started from {self.directory}")
        return [require_program("nsenter"), f"--net={slot.netns_path}", *argv]

    def kill_container(self, container_id: str) -> None:
        """SIGKILL a container's processes, as the kernel's OOM killer or a crash would; the
        kubelet sees it exit and restarts it."""
        self.ctr("tasks", "kill", "--signal", "SIGKILL", container_id.removeprefix("containerd://"))

    def register(self, api: client.ApiClient, slot: Slot) -> None:
        """The Node with its pod network (the kubelet keeps spec as found), the `kubernetes`
        Service's endpoint (the API forwarder, at the address every node has for it) and what
        CoreDNS may read."""
        core = client.CoreV1Api(api)
        with contextlib.suppress(client.ApiException):
            core.delete_node(self.name)
        cidr = str(slot.addresses.pod_cidr)
        core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(name=self.name),
                spec=client.V1NodeSpec(pod_cidr=cidr, pod_cidrs=[cidr]),
            )
        )
        address, port = NODE_LOCAL_IP, NODE_API_PORT
        metadata = {"name": "kubernetes", "namespace": "default"}
        apply = {"field_manager": "testinfra", "force": True, "_content_type": APPLY}
        endpoints = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": metadata,
            "subsets": [
                {
                    "addresses": [{"ip": address}],
                    "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
                }
            ],
        }
        core.patch_namespaced_endpoints("kubernetes", "default", endpoints, **apply)
        # What kube-proxy reads. The endpointslice controller leaves alone a Service without
        # a selector, such as this one.
        endpoint_slice = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                **metadata,
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "testinfra",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }
        discovery = client.DiscoveryV1Api(api)
        discovery.patch_namespaced_endpoint_slice("kubernetes", "default", endpoint_slice, **apply)
        # CoreDNS's rights, as kubeadm grants them (its client certificate's user).
        rbac = client.RbacAuthorizationV1Api(api)
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": COREDNS_RULES,
        }
        rbac.patch_cluster_role("system:coredns", role, **apply)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}
            ],
        }
        rbac.patch_cluster_role_binding("system:coredns", binding, **apply)

    def forwarder(self, slot: Slot) -> Component:
        """In the node's cgroups; it enters the node's network namespace itself."""
        api_port = controlplane.Ports.load().apiserver
        return Component(
            "apiforwarder",
            Path(sys.executable),
            (
                "-m", "testinfra.apiforwarder",
                f"--netns={slot.netns_path}",
                f"--to=127.0.0.1:{api_port}",
                f"127.0.0.1:{api_port}",
                f"{NODE_LOCAL_IP}:{NODE_API_PORT}",
            ),
            self.directory,
            ("sh", "-c", slot.join_cgroups() + 'exec "$@"', "sh"),
        )  # fmt: skip

    def kubelet(self, slot: Slot, holder: int, binaries: dict[str, str]) -> Component:
        return self.component(
            slot,
            holder,
            "kubelet",
            binaries["kubelet"],
            f"--config={self.directory / 'kubelet.yaml'}",
            f"--kubeconfig={self.directory / 'kubelet.kubeconfig'}",
            "--root-dir=/var/lib/kubelet",
            f"--hostname-override={self.name}",
            f"--node-ip={slot.addresses.node_ip}",
        )

    def kube_proxy(self, slot: Slot, holder: int, binaries: dict[str, str]) -> Component:
        return self.component(
            slot,
            holder,
            "kube-proxy",
            binaries["kube-proxy"],
            f"--config={self.directory / 'kube-proxy.yaml'}",
        )

    # --- down ------------------------------------------------------------------------------------

    def stop_locked(self) -> None:
        """Unregister and stop the node, and undo what it changed on the host; keeps its
        folder (logs included). Safe to repeat, and after a crash."""
        slot = self.recorded_slot()
        if controlplane.is_up():
            with self.api() as api:
                forget_node(api, self.name)
        if slot is not None:
            with slot_lock():
                slot.remove()

    def stop(self) -> None:
        with controlplane.exclusive_lock():
            self.stop_locked()

    def down(self) -> None:
        with controlplane.exclusive_lock():
            self.stop_locked()
            shutil.rmtree(self.directory, ignore_errors=True)


def forget_node(api: client.ApiClient, name: str) -> None:
    """Delete the pods bound to the node (grace period 0: nobody is left to stop them) and the
    Node, so namespaces being deleted are not kept Terminating."""
    core = client.CoreV1Api(api)
    pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
    for pod in pods.items:
        with contextlib.suppress(client.ApiException):
            core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0),
            )
    with contextlib.suppress(client.ApiException):
        core.delete_node(name)


def node_ready(node: client.V1Node) -> bool:
    conditions = (node.status and node.status.conditions) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def log_of(component: Component) -> str:
    try:
        return component.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


# --- CLI ----------------------------------------------------------------------------------------


def print_status(node: Node) -> bool:
    for name in COMPONENT_NAMES:
        pid = node.running(name)
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"{name:24} {state:20} log: {node.directory / 'logs' / (name + '.log')}")
    up = node.is_up()
    print(f"{'node ' + node.name:24} {'up (Ready)' if up else 'not up'}")
    if up:
        net = node.addresses
        print(f"{'pod network':24} {net.pod_cidr} (routed via {net.node_ip})")
        print(f"{'services':24} {SERVICE_CIDR}")
        print(f"{'images':24} {', '.join(node.images())}")
    return up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testinfra.node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    command = parser.parse_args(argv).command
    node = Node()
    try:
        if command == "up":
            if not node.up():
                log(f"node {node.name} already up")
        elif command == "down":
            node.down()
        else:
            return 0 if print_status(node) else 1
    except (NodeError, MissingPrerequisite, controlplane.ControlPlaneError) as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
