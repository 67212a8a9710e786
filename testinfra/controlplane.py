"""A real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler.

    python -m testinfra.controlplane build   # build binaries into .cache/bin (make cluster-bins)
    python -m testinfra.controlplane up      # start it, or do nothing if it is already up
    python -m testinfra.controlplane status  # exit 0 when up
    python -m testinfra.controlplane down    # stop it and remove .cache/cluster

Everything listens on 127.0.0.1 on free ports picked at start (see .cache/cluster/ports.json; the
API server's URL is in the admin kubeconfig). The processes run in their own session, so they
outlive `up` (and `make cluster`) until `down`. Pods run only once a node is up
(testinfra/node.py, `make node`); until then they stay Pending.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from . import daemons, gobuild
from .addresses import KUBERNETES_SERVICE_IP, SERVICE_CIDR
from .daemons import Component, spawn
from .layout import BIN_DIR, CACHE_DIR, CLUSTER_DIR, CRD_DIR
from .pki import CertificateAuthority, KeyPair, new_private_key, private_key_pem, public_key_pem

ADMIN_KUBECONFIG = CLUSTER_DIR / "admin.kubeconfig"
PKI_DIR = CLUSTER_DIR / "pki"
LOG_DIR = CLUSTER_DIR / "logs"
PORTS_FILE = CLUSTER_DIR / "ports.json"
# Outside CLUSTER_DIR because `down` deletes that folder while holding the lock.
LOCK_FILE = CACHE_DIR / "cluster.lock"

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Every name the API server's serving certificate must carry, as in a kubeadm cluster.
APISERVER_HOSTS = (
    "127.0.0.1",
    "localhost",
    KUBERNETES_SERVICE_IP,
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
ADMISSION_PLUGINS = (
    "NamespaceLifecycle",
    "LimitRanger",
    "ServiceAccount",
    "NodeRestriction",
    "TaintNodesByCondition",
    "PodSecurity",
    "Priority",
    "DefaultTolerationSeconds",
    "DefaultStorageClass",
    "StorageObjectInUseProtection",
    "PersistentVolumeClaimResize",
    "RuntimeClass",
    "CertificateApproval",
    "CertificateSigning",
    "ClusterTrustBundleAttest",
    "CertificateSubjectRestriction",
    "DefaultIngressClass",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionWebhook",
    "ResourceQuota",
)
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",  # the Prometheus Operator runs Prometheus as a StatefulSet
    "endpoints-controller",
    "endpointslice-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    # Namespaces get the kube-root-ca.crt ConfigMap that service-account token volumes use.
    "root-ca-certificate-publisher-controller",
    # The ResourceQuota admission plugin refuses objects until this fills in quota usage.
    "resourcequota-controller",
    # Fills the built-in admin/edit/view ClusterRoles, which are empty aggregates without it.
    "clusterrole-aggregation-controller",
    # Deletes the pods of a Node that is gone (a test node that was stopped), as in a cluster.
    "pod-garbage-collector-controller",
    # Lifts the not-ready taint a Node is created with once its kubelet reports it Ready.
    "node-lifecycle-controller",
    # The chart's PodDisruptionBudget gets its status.
    "disruption-controller",
)
START_TIMEOUT = 60.0


class ControlPlaneError(RuntimeError):
    """The control plane could not be started; the message names the component and its log."""


class MissingBinary(ControlPlaneError):
    """A binary the control plane needs has not been built or installed."""


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def pick_free(cls) -> Ports:
        return cls(*free_ports(5))

    @classmethod
    def load(cls) -> Ports:
        return cls(**json.loads(PORTS_FILE.read_text()))

    def save(self) -> None:
        PORTS_FILE.write_text(json.dumps(asdict(self), indent=2) + "\n")


def free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is picked, so the ports differ from one another.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


# --- binaries -----------------------------------------------------------------------------------


def built_binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.exists():
        raise MissingBinary(f"{name} is missing at {path}: `make cluster-bins` builds it")
    return path


def etcd_binary() -> Path:
    # Debian's etcd-server (3.4) works with this kube-apiserver; a built one would take priority.
    found = shutil.which("etcd", path=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise MissingBinary("etcd is not installed: `make system-packages` installs etcd-server")
    return Path(found)


# --- processes ----------------------------------------------------------------------------------


# Started in this order, stopped in the reverse one.
COMPONENT_NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def component(name: str, binary: Path, args: tuple[str, ...]) -> Component:
    return Component(name, binary, args, CLUSTER_DIR)


def running_pid(name: str) -> int | None:
    return daemons.running_pid(CLUSTER_DIR, name)


def wait_until_ready(component: Component, pid: int, is_ready: Callable[[], bool]) -> None:
    daemons.wait_until_ready(component, pid, is_ready, START_TIMEOUT, ControlPlaneError)


# --- HTTP checks --------------------------------------------------------------------------------


def admin_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(PKI_DIR / "ca.crt"))
    context.load_cert_chain(PKI_DIR / "admin.crt", PKI_DIR / "admin.key")
    return context


def http_request(
    url: str,
    context: ssl.SSLContext | None = None,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def responds_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        status, body = http_request(url, context)
    except OSError:  # not listening yet, or TLS not set up yet
        return False
    return status == 200 and body.strip() in (
        b"ok",
        b'{"health":"true"}',
        b'{"health":"true","reason":""}',
    )


def apiserver_url(ports: Ports) -> str:
    return f"https://127.0.0.1:{ports.apiserver}"


def apiserver_ready(ports: Ports) -> bool:
    return responds_ok(f"{apiserver_url(ports)}/readyz", admin_tls_context())


# --- configuration ------------------------------------------------------------------------------


def write_pki() -> None:
    """CA, serving certificates, client certificates and the service-account signing key."""
    PKI_DIR.mkdir(parents=True)
    ca = CertificateAuthority.create("testinfra-kubernetes-ca")
    ca.key_pair.write(PKI_DIR, "ca")
    ca.issue_server("kube-apiserver", APISERVER_HOSTS).write(PKI_DIR, "apiserver")
    ca.issue_client("kubernetes-admin", ("system:masters",)).write(PKI_DIR, "admin")
    ca.issue_client("system:kube-controller-manager").write(PKI_DIR, "controller-manager")
    serving = ca.issue_server("kube-controller-manager", ("127.0.0.1", "localhost"))
    serving.write(PKI_DIR, "controller-manager-serving")
    ca.issue_client("system:kube-scheduler").write(PKI_DIR, "scheduler")
    serving = ca.issue_server("kube-scheduler", ("127.0.0.1", "localhost"))
    serving.write(PKI_DIR, "scheduler-serving")
    # How the API server authenticates to kubelets (logs, exec, port-forward).
    ca.issue_client("kube-apiserver-kubelet-client", ("system:masters",)).write(
        PKI_DIR, "apiserver-kubelet-client"
    )
    # The aggregation layer's own CA, as in kubeadm: the API server proxies requests to extension
    # API servers with this client certificate, and components read its CA to trust them.
    front_proxy_ca = CertificateAuthority.create("testinfra-front-proxy-ca")
    front_proxy_ca.key_pair.write(PKI_DIR, "front-proxy-ca")
    front_proxy_ca.issue_client("front-proxy-client").write(PKI_DIR, "front-proxy-client")
    service_account_key = new_private_key()
    (PKI_DIR / "sa.key").write_bytes(private_key_pem(service_account_key))
    (PKI_DIR / "sa.pub").write_bytes(public_key_pem(service_account_key))


def kubeconfig(server: str, user: str, client: KeyPair) -> dict:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    ca_pem = (PKI_DIR / "ca.crt").read_bytes()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert_pem),
                    "client-key-data": b64(client.key_pem),
                },
            }
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def write_kubeconfig(path: Path, server: str, user: str, client_name: str) -> None:
    config = kubeconfig(server, user, KeyPair.read(PKI_DIR, client_name))
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def etcd_component(ports: Ports) -> Component:
    client_url = f"http://127.0.0.1:{ports.etcd_client}"
    peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
    return component(
        "etcd",
        etcd_binary(),
        (
            "--name=testinfra",
            f"--data-dir={CLUSTER_DIR / 'etcd'}",
            # Plain HTTP is enough: it only listens on loopback and only the API server talks to it.
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=testinfra={peer_url}",
            "--logger=zap",
            "--log-outputs=stderr",
        ),
    )


def apiserver_component(ports: Ports) -> Component:
    pki = PKI_DIR
    return component(
        "kube-apiserver",
        built_binary("kube-apiserver"),
        (
            f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
            # Privileged pods are allowed by the server, so only PodSecurity can refuse them.
            "--allow-privileged=true",
            # The `kubernetes` Service cannot have a loopback endpoint (validation refuses it):
            # the test node writes its own, where it serves the API server to its pods.
            "--endpoint-reconciler-type=none",
            # Webhooks and aggregated APIs behind a Service are called at its endpoints' pod
            # addresses (routed to the test node), not at its ClusterIP: ClusterIPs exist only
            # inside the node's network namespace, where its kube-proxy programs them.
            "--enable-aggregator-routing=true",
            "--profiling=false",
        ),
    )


def controller_args(name: str, port: int) -> tuple[str, ...]:
    """What the controller manager and the scheduler share: their kubeconfig (`name`), their
    HTTPS health port on loopback, a single instance (waiting for a leader lease would only slow
    the start)."""
    kubeconfig_path = CLUSTER_DIR / f"{name}.kubeconfig"
    return (
        f"--kubeconfig={kubeconfig_path}",
        f"--authentication-kubeconfig={kubeconfig_path}",
        f"--authorization-kubeconfig={kubeconfig_path}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={PKI_DIR / f'{name}-serving.crt'}",
        f"--tls-private-key-file={PKI_DIR / f'{name}-serving.key'}",
        "--leader-elect=false",
        "--profiling=false",
    )


def controller_manager_component(ports: Ports) -> Component:
    return component(
        "kube-controller-manager",
        built_binary("kube-controller-manager"),
        (
            *controller_args("controller-manager", ports.controller_manager),
            f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={PKI_DIR / 'sa.key'}",
            f"--root-ca-file={PKI_DIR / 'ca.crt'}",
            # Each controller acts as its own service account, limited by RBAC, as in kubeadm.
            "--use-service-account-credentials=true",
        ),
    )


def scheduler_component(ports: Ports) -> Component:
    return component(
        "kube-scheduler",
        built_binary("kube-scheduler"),
        controller_args("scheduler", ports.scheduler),
    )


def components(ports: Ports) -> tuple[Component, ...]:
    """In start order; checks every binary first, so a missing one fails before anything
    starts."""
    return (
        etcd_component(ports),
        apiserver_component(ports),
        controller_manager_component(ports),
        scheduler_component(ports),
    )


# --- Prometheus Operator CRDs -------------------------------------------------------------------


CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def crd_files() -> list[Path]:
    files = sorted(CRD_DIR.glob("*.yaml"))
    if not files:
        raise MissingBinary(
            f"no Prometheus Operator CRDs in {CRD_DIR}: `make cluster-bins` copies them"
        )
    return files


def crd_name(path: Path) -> str:
    # A text search: PyYAML cannot load these files (it rejects the enum value "=").
    match = re.search(r"^metadata:\n(?:  .*\n)*?  name: (\S+)$", path.read_text(), re.MULTILINE)
    if match is None:
        raise ControlPlaneError(f"no metadata.name in {path}")
    return match.group(1)


def apply_crd(ports: Ports, path: Path) -> str:
    """Server-side apply of one upstream CRD file, sent as is; returns the CRD's name."""
    name = crd_name(path)
    url = f"{apiserver_url(ports)}{CRD_API}/{name}?fieldManager=testinfra&force=true"
    status, body = http_request(
        url, admin_tls_context(), "PATCH", path.read_bytes(), "application/apply-patch+yaml"
    )
    if status not in (200, 201):
        raise ControlPlaneError(f"applying CRD {path.name} failed ({status}): {body[:500]!r}")
    return name


def crd_established(ports: Ports, name: str) -> bool:
    status, body = http_request(f"{apiserver_url(ports)}{CRD_API}/{name}", admin_tls_context())
    found = (json.loads(body).get("status") or {}) if status == 200 else {}
    conditions = found.get("conditions") or []  # null while the CRD is being set up
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def wait_for_crds(ports: Ports, names: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(names)
    while pending:
        pending = [name for name in pending if not crd_established(ports, name)]
        if pending and time.monotonic() > deadline:
            raise ControlPlaneError(f"CRDs not Established after {START_TIMEOUT:.0f} s: {pending}")
        time.sleep(0.2 if pending else 0)


# --- up / down ----------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock() -> Iterator[None]:
    """Serialises up/down between processes (e.g. two pytest sessions)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def is_up() -> bool:
    """All its processes run and the API server answers /readyz."""
    if not all(running_pid(name) for name in COMPONENT_NAMES):
        return False
    try:
        return apiserver_ready(Ports.load())
    except (FileNotFoundError, OSError, ssl.SSLError, TypeError):  # TypeError: an old ports.json
        return False


def up() -> bool:
    """Start the control plane; returns False when it was already up (then nothing changes)."""
    with exclusive_lock():
        if is_up():
            return False
        started = time.monotonic()
        ports = Ports.pick_free()
        parts = components(ports)
        crds = crd_files()
        stop_processes()  # leftovers of an earlier cluster that is only partly up
        shutil.rmtree(CLUSTER_DIR, ignore_errors=True)
        LOG_DIR.mkdir(parents=True)
        ports.save()
        write_pki()
        try:
            start(ports, *parts, crds=crds)
        except BaseException:
            stop_processes()  # the logs stay for the error message to point at
            raise
        elapsed = time.monotonic() - started
        log(f"control plane up in {elapsed:.1f} s; kubeconfig: {ADMIN_KUBECONFIG}")
        return True


def start(
    ports: Ports,
    etcd: Component,
    apiserver: Component,
    controller_manager: Component,
    scheduler: Component,
    *,
    crds: list[Path],
) -> None:
    server = apiserver_url(ports)
    write_kubeconfig(ADMIN_KUBECONFIG, server, "kubernetes-admin", "admin")
    for name, user in (
        ("controller-manager", "system:kube-controller-manager"),
        ("scheduler", "system:kube-scheduler"),
    ):
        write_kubeconfig(CLUSTER_DIR / f"{name}.kubeconfig", server, user, name)
    etcd_url = f"http://127.0.0.1:{ports.etcd_client}/health"
    wait_until_ready(etcd, spawn(etcd), lambda: responds_ok(etcd_url))
    wait_until_ready(apiserver, spawn(apiserver), lambda: apiserver_ready(ports))
    # The controllers start while the CRDs are applied; neither needs the other.
    pids = {component.name: spawn(component) for component in (controller_manager, scheduler)}
    crd_names = [apply_crd(ports, path) for path in crds]
    context = ssl.create_default_context(cafile=str(PKI_DIR / "ca.crt"))
    for component, port in (
        (controller_manager, ports.controller_manager),
        (scheduler, ports.scheduler),
    ):
        url = f"https://127.0.0.1:{port}/healthz"
        wait_until_ready(component, pids[component.name], lambda url=url: responds_ok(url, context))
    wait_for_crds(ports, crd_names)


def restart_apiserver() -> float:
    """Stop kube-apiserver (SIGTERM, as a rolling control-plane upgrade does) and start it
    again on the same port and state; returns the seconds it was away."""
    with exclusive_lock():
        ports = Ports.load()
        stopped = time.monotonic()
        daemons.stop_process(CLUSTER_DIR, "kube-apiserver")
        apiserver = apiserver_component(ports)
        wait_until_ready(apiserver, spawn(apiserver), lambda: apiserver_ready(ports))
        return time.monotonic() - stopped


def stop_processes() -> None:
    """Stop the components (newest first) but keep .cache/cluster, logs included."""
    for name in reversed(COMPONENT_NAMES):
        daemons.stop_process(CLUSTER_DIR, name)


def stop() -> None:
    with exclusive_lock():
        stop_processes()


def down() -> None:
    """Stop the components and remove all cluster state."""
    with exclusive_lock():
        stop_processes()
        shutil.rmtree(CLUSTER_DIR, ignore_errors=True)


def certificate_authority() -> CertificateAuthority:
    """The running cluster's CA, e.g. to issue a webhook certificate the API server trusts."""
    return CertificateAuthority.load(PKI_DIR)


def ca_cert_path() -> Path:
    return PKI_DIR / "ca.crt"


# --- CLI ----------------------------------------------------------------------------------------


def print_status() -> bool:
    for name in COMPONENT_NAMES:
        pid = running_pid(name)
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"{name:24} {state:20} log: {LOG_DIR / (name + '.log')}")
    ready = is_up()
    print(f"{'control plane':24} {'up' if ready else 'not up'}")
    if ready:
        print(f"{'API server':24} {apiserver_url(Ports.load())}")
        print(f"{'kubeconfig':24} {ADMIN_KUBECONFIG}")
    return ready


def log(message: str) -> None:
    print(f"[testinfra] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testinfra.controlplane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("build", "up", "down", "status"))
    command = parser.parse_args(argv).command
    try:
        if command == "build":
            gobuild.build_all()
        elif command == "up":
            if not up():
                log(f"control plane already up; kubeconfig: {ADMIN_KUBECONFIG}")
        elif command == "down":
            down()
        else:
            return 0 if print_status() else 1
    except (ControlPlaneError, gobuild.BuildError) as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
