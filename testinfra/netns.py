"""Network namespaces joined by veth pairs, so tests can connect from real source addresses.

    with NetnsLab("access") as lab:
        pod, client = lab.namespace("pod"), lab.namespace("client")
        lab.connect(pod, "to-client", ["198.18.1.1/24"], client, "eth0", ["198.18.1.2/24"])
        result = client.http_get("http://198.18.1.1:8080/")

Rules this module enforces or follows:

* Addresses come only from 198.18.0.0/15 (RFC 2544, benchmarking) and 2001:db8::/32 (RFC 3849,
  documentation); `connect` refuses anything else.
* Both ends of every veth pair are created directly inside namespaces of the lab (`ip -n A link
  add ... peer ... netns B`), so nothing is ever added to the root namespace and deleting the
  namespaces removes every link. No namespace forwards, so traffic stays between the two ends of
  each pair (and each namespace's loopback).
* IPv6 addresses are added with `nodad`, so they are usable at once instead of "tentative".
* Namespace names are `pxt-<pid>-<lab>-<role>`. `close()` (run by `with` even when setting up
  fails halfway) is idempotent; `cleanup_leftovers()` (run by every new lab) removes namespaces
  of earlier runs whose process is gone, with any process still inside them.
* Needing root and iproute2 is a failure, never a skip: `NetnsUnavailable` says what is missing
  and to run `make system-packages`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .procs import MissingPrerequisite, pid_alive, wait_until

PREFIX = "pxt"
ALLOWED_RANGES = (
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("2001:db8::/32"),
)
COMMAND_TIMEOUT = 15.0  # seconds for one `ip` command
LINK_UP_TIMEOUT = 10.0  # seconds for a new veth pair to carry traffic
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")
_LIVE: set[str] = set()  # namespaces this process created and has not deleted yet


class NetnsUnavailable(MissingPrerequisite):
    """Namespaces cannot be made here; the message names what is missing."""


def require_netns_support() -> str:
    """The path of `ip`, once root and iproute2 are known to be there."""
    ip = shutil.which("ip")
    if ip is None:
        raise NetnsUnavailable(
            "ip (iproute2) is not installed, and network namespace tests need it: "
            "run `make system-packages`"
        )
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            f"network namespace tests need root (running as uid {os.geteuid()}); "
            "run them as root after `make system-packages`"
        )
    return ip


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [require_netns_support(), *args]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        message = f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
        if re.search(
            r"not permitted|Permission denied|Unknown device type|not supported", result.stderr
        ):
            raise NetnsUnavailable(
                f"{message}; network namespace tests need root with CAP_SYS_ADMIN and "
                "CAP_NET_ADMIN, veth support in the kernel and iproute2 (`make system-packages`)"
            )
        raise RuntimeError(message)
    return result


def list_namespaces() -> list[str]:
    """Names from `ip netns list` (its lines look like "name (id: 3)" or "name")."""
    lines = _ip("netns", "list").stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def _kill_processes_inside(name: str) -> None:
    """SIGKILL what still runs in one of our namespaces (a server a crashed run left behind)."""
    result = _ip("netns", "pids", name, check=False)
    for pid in (int(word) for word in result.stdout.split() if word.isdigit()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def delete_namespace(name: str) -> None:
    """Delete one namespace (and so its links); nothing happens when it is already gone."""
    if name in list_namespaces():
        _kill_processes_inside(name)
        _ip("netns", "delete", name)
    _LIVE.discard(name)


def cleanup_leftovers() -> list[str]:
    """Delete `pxt-<pid>-...` namespaces of runs that are over; returns their names.

    A run is over when its process is gone, or when it has this process's id (a container
    restarted with the same pids) but this process did not create the namespace. Live runs of
    other processes, such as a colleague's test session, are left alone.
    """
    removed = []
    for name in list_namespaces():
        match = _NAME.match(name)
        if not match or name in _LIVE:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            delete_namespace(name)
            removed.append(name)
    return removed


def _operstate(namespace: Namespace, interface: str) -> str:
    shown = json.loads(_ip("-j", "-n", namespace.name, "link", "show", "dev", interface).stdout)
    return str(shown[0].get("operstate", "")) if shown else ""


def _wait_until_up(namespace: Namespace, interface: str) -> None:
    wait_until(
        lambda: _operstate(namespace, interface) == "UP",
        LINK_UP_TIMEOUT,
        f"{interface} in {namespace.name} to be up",
        interval=0.05,
    )


def check_interface(text: str) -> str:
    """An address with its link's prefix length, refused outside ALLOWED_RANGES."""
    interface = ipaddress.ip_interface(text)
    if interface.network.prefixlen == interface.max_prefixlen:
        raise ValueError(f"{text}: give the prefix length of the link (e.g. /24 or /64)")
    first, last = interface.network[0], interface.network[-1]
    if not any(first in r and last in r for r in ALLOWED_RANGES):
        ranges = ", ".join(str(r) for r in ALLOWED_RANGES)
        raise ValueError(f"{text} is outside the ranges tests may use ({ranges})")
    return str(interface)


@dataclass(frozen=True)
class HttpResult:
    status: int | None  # None when no response came (the error says why)
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None


# One request, run inside the namespace by the tests' own interpreter (which has httpx).
_HTTP_CLIENT = r"""
import json, sys
import httpx
url, headers, timeout = sys.argv[1:4]
try:
    r = httpx.get(url, headers=json.loads(headers), timeout=float(timeout), trust_env=False)
    result = {"status": r.status_code, "body": r.text, "headers": dict(r.headers)}
except httpx.HTTPError as error:
    result = {"status": None, "error": f"{type(error).__name__}: {error}"}
print(json.dumps(result))
"""


@dataclass
class Namespace:
    """One network namespace of a lab, with its addresses by interface."""

    name: str
    role: str
    addresses: dict[str, list[str]] = field(default_factory=dict)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside this namespace."""
        return [require_netns_support(), "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def address(self, interface: str, version: int) -> str:
        """The address (without prefix length) of one family on one interface."""
        for text in self.addresses.get(interface, []):
            parsed = ipaddress.ip_interface(text)
            if parsed.version == version:
                return str(parsed.ip)
        raise KeyError(f"{self.name} has no IPv{version} address on {interface}")

    def http_get(
        self, url: str, headers: dict[str, str] | None = None, *, timeout: float = 5.0
    ) -> HttpResult:
        """One GET from a new process inside this namespace, so the kernel picks the source
        address from this namespace's own addresses. No retries: callers bound their loops."""
        argv = [sys.executable, "-c", _HTTP_CLIENT, url, json.dumps(headers or {}), str(timeout)]
        done = self.run(argv, timeout=timeout + 30.0, check=False)
        if done.returncode != 0:
            return HttpResult(None, error=f"client exited {done.returncode}: {done.stderr[-2000:]}")
        return HttpResult(**json.loads(done.stdout))


class NetnsLab:
    """Namespaces and veth pairs that exist between __enter__ (or creation) and close()."""

    def __init__(self, label: str = "lab") -> None:
        if not re.fullmatch(r"[a-z0-9]{1,12}", label):
            raise ValueError(f"lab label {label!r}: use 1-12 lowercase letters or digits")
        require_netns_support()
        self.prefix = f"{PREFIX}-{os.getpid()}-{label}-"
        self.namespaces: list[Namespace] = []
        cleanup_leftovers()

    def namespace(self, role: str) -> Namespace:
        """A new namespace with its loopback up."""
        if not re.fullmatch(r"[a-z0-9]{1,16}", role):
            raise ValueError(f"role {role!r}: use 1-16 lowercase letters or digits")
        name = self.prefix + role
        delete_namespace(name)  # only a leftover can have this name before we create it
        _ip("netns", "add", name)
        _LIVE.add(name)
        namespace = Namespace(name, role)
        self.namespaces.append(namespace)
        _ip("-n", name, "link", "set", "dev", "lo", "up")
        return namespace

    def connect(
        self,
        a: Namespace,
        a_interface: str,
        a_addresses: Sequence[str],
        b: Namespace,
        b_interface: str,
        b_addresses: Sequence[str],
    ) -> None:
        """A veth pair from `a_interface` in `a` to `b_interface` in `b`, addressed and up.

        Addresses are interfaces ("198.18.1.1/24", "2001:db8:1::1/64"): both ends of one link
        share its networks, so no routes are needed.
        """
        for interface in (a_interface, b_interface):
            if not re.fullmatch(r"[a-z0-9-]{1,15}", interface):
                raise ValueError(f"interface {interface!r}: 1-15 of a-z, 0-9 and -")
        a_checked = [check_interface(text) for text in a_addresses]
        b_checked = [check_interface(text) for text in b_addresses]
        _ip(
            "-n", a.name, "link", "add", "name", a_interface, "type", "veth",
            "peer", "name", b_interface, "netns", b.name,
        )  # fmt: skip
        for namespace, interface, addresses in (
            (a, a_interface, a_checked),
            (b, b_interface, b_checked),
        ):
            for text in addresses:
                family = "-6" if ipaddress.ip_interface(text).version == 6 else "-4"
                extra = ["nodad"] if family == "-6" else []
                _ip("-n", namespace.name, family, "addr", "add", text, "dev", interface, *extra)
            _ip("-n", namespace.name, "link", "set", "dev", interface, "up")
            namespace.addresses.setdefault(interface, []).extend(addresses)  # as checked
        # The kernel attaches a link's queue only when its carrier change is processed (up to a
        # second later); until then packets are dropped, so wait for both ends to be UP.
        for namespace, interface in ((a, a_interface), (b, b_interface)):
            _wait_until_up(namespace, interface)

    def close(self) -> None:
        """Delete every namespace of this lab (their links go with them); safe to repeat."""
        errors = []
        for namespace in reversed(self.namespaces):
            try:
                delete_namespace(namespace.name)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                errors.append(str(error))
        self.namespaces.clear()
        if errors:
            raise RuntimeError("could not delete every namespace: " + "; ".join(errors))

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
