"""The CIDR guard against real source addresses: clients in their own network namespaces.

    allowed ns                          pod ns                             denied ns
    eth0 198.18.1.2/24   <-veth->  to-allowed 198.18.1.1/24
         2001:db8:1::2/64                     2001:db8:1::1/64
                                   to-denied  198.19.1.1/24     <-veth->  eth0 198.19.1.2/24
                                              2001:db8:2::1/64                 2001:db8:2::2/64

In the pod namespace: a real Prosody on 127.0.0.1 (each supported version in turn), and two real
exporters listening on "::" (dual-stack), both allowing only the allowed client's networks. The
second one also trusts the allowed client's own addresses as a proxy. Nothing is faked in-process:
every request is made by a client process inside its namespace, so the exporter sees the kernel's
peer address.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from testinfra.exporter import ExporterProcess
from testinfra.netns import HttpResult, Namespace, NetnsLab, check_interface
from testinfra.procs import MissingPrerequisite, Process, wait_until
from testinfra.prosody import VERSIONS, build_prosody_config, installation

pytestmark = pytest.mark.netns

PROSODY_HTTP_PORT = 5280  # the pod namespace is new, so any port is free
PROSODY_C2S_PORT = 5222
PLAIN_PORT = 9755  # exporter without trusted proxies
PROXIED_PORT = 9756  # exporter trusting the allowed client as a proxy

ALLOWED_NETS = "198.18.1.0/24,2001:db8:1::/64"
# Addresses no namespace has, on the allowed side: a client behind the proxy.
BEHIND_PROXY = {4: "198.18.1.3", 6: "2001:db8:1::3"}

OM = {"Accept": "application/openmetrics-text; version=1.0.0"}


@dataclass
class Lab:
    pod: Namespace
    allowed: Namespace
    denied: Namespace

    def allowed_ip(self, version: int) -> str:
        return self.allowed.address("eth0", version)

    def denied_ip(self, version: int) -> str:
        return self.denied.address("eth0", version)

    def url(self, client: Namespace, version: int, port: int, path: str) -> str:
        """The pod's address on the client's link, so the client's own address is the source."""
        host = self.pod.address(f"to-{client.role}", version)
        return f"http://{host}:{port}{path}" if version == 4 else f"http://[{host}]:{port}{path}"


def start_prosody(pod: Namespace, workdir: Path, version: str) -> Process:
    binary = installation(version).prosody
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    config = workdir / "prosody.cfg.lua"
    config.write_text(
        build_prosody_config(
            workdir,
            http_port=PROSODY_HTTP_PORT,
            c2s_port=PROSODY_C2S_PORT,
            statistics_interval="manual",
        )
    )
    process = Process(
        f"prosody {version}",
        [binary, "--config", str(config)],
        workdir / "prosody.log",
        netns=pod.name,
    )
    url = f"http://127.0.0.1:{PROSODY_HTTP_PORT}/metrics"
    try:
        process.wait_ready(lambda: pod.http_get(url, timeout=1).status == 200, timeout=30)
    except BaseException:
        process.stop()
        raise
    return process


def start_exporter(pod: Namespace, workdir: Path, port: int, **settings: str) -> ExporterProcess:
    exporter = ExporterProcess(
        workdir,
        f"http://127.0.0.1:{PROSODY_HTTP_PORT}/metrics",
        interval=1.0,
        settings={"allow_cidrs": ALLOWED_NETS, **settings},
        listen_host="::",
        port=port,
        netns=pod.name,
    ).start()
    assert exporter.process is not None
    ready = f"http://[::1]:{port}/readyz"  # loopback of the pod; the probes are open anyway
    try:
        exporter.process.wait_ready(lambda: pod.http_get(ready, timeout=1).status == 200, 30)
    except BaseException:
        exporter.stop()
        raise
    return exporter


def build_topology(netns: NetnsLab) -> Lab:
    pod, allowed, denied = (netns.namespace(role) for role in ("pod", "allowed", "denied"))
    netns.connect(
        pod, "to-allowed", ["198.18.1.1/24", "2001:db8:1::1/64"],
        allowed, "eth0", ["198.18.1.2/24", "2001:db8:1::2/64"],
    )  # fmt: skip
    netns.connect(
        pod, "to-denied", ["198.19.1.1/24", "2001:db8:2::1/64"],
        denied, "eth0", ["198.19.1.2/24", "2001:db8:2::2/64"],
    )  # fmt: skip
    return Lab(pod, allowed, denied)


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"prosody-{version}" for version in VERSIONS])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("netns")
    with ExitStack() as stack:
        missing = None
        try:
            topology = build_topology(stack.enter_context(NetnsLab("access")))
        except MissingPrerequisite as error:  # no root, no iproute2, no veth: fail, never skip
            missing = str(error)
        if missing:
            pytest.fail(missing, pytrace=False)
        prosody = start_prosody(topology.pod, workdir / "prosody", request.param)
        stack.callback(prosody.stop)  # runs before the namespaces go
        yield topology


@pytest.fixture(scope="module")
def plain(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The exporter with no trusted proxies; yields its port."""
    exporter = start_exporter(lab.pod, tmp_path_factory.mktemp("plain"), PLAIN_PORT)
    yield PLAIN_PORT
    exporter.stop()


@pytest.fixture(scope="module")
def proxied(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The exporter trusting the allowed client's own two addresses as a proxy; yields its port."""
    proxies = f"{lab.allowed_ip(4)}/32,{lab.allowed_ip(6)}/128"
    exporter = start_exporter(
        lab.pod, tmp_path_factory.mktemp("proxied"), PROXIED_PORT, trusted_proxy_cidrs=proxies
    )
    yield PROXIED_PORT
    exporter.stop()


def get(
    lab: Lab, client: Namespace, version: int, port: int, path: str = "/metrics", **headers: str
) -> HttpResult:
    sent = {**OM, **{name.replace("_", "-"): value for name, value in headers.items()}}
    result = client.http_get(lab.url(client, version, port, path), sent)
    assert result.status is not None, f"{client.role} over IPv{version}: {result.error}"
    return result


def assert_forbidden(result: HttpResult) -> None:
    assert result.status == 403, (result.status, result.body[:300])
    assert result.body == "forbidden: not_allowed\n"
    assert result.headers["content-type"].startswith("text/plain")


def denied_count(lab: Lab, port: int) -> float:
    body = get(lab, lab.allowed, 4, port).body
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if (
                sample.name == "prosody_exporter_denied_requests_total"
                and sample.labels.get("reason") == "not_allowed"
            ):
                return float(sample.value)
    raise AssertionError("prosody_exporter_denied_requests_total not in exposition")


IP_VERSIONS = pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])


@IP_VERSIONS
def test_allowed_client_gets_prosody_metrics(lab, plain, version):
    result = get(lab, lab.allowed, version, plain)
    assert result.status == 200, result.body[:300]
    assert "prosody_stats_collection_seconds_count" in result.body
    assert result.body.endswith("# EOF\n")


@IP_VERSIONS
def test_denied_client_gets_a_short_403_and_is_counted(lab, plain, version):
    before = denied_count(lab, plain)
    assert_forbidden(get(lab, lab.denied, version, plain))
    # The exporter's own metrics in a response may be up to 1 s old (app.MetricsResponses).
    wait_until(lambda: denied_count(lab, plain) >= before + 1, 5, "the denial to be counted")
    assert denied_count(lab, plain) == before + 1


@IP_VERSIONS
def test_guard_comes_before_routing(lab, plain, version):
    """An unknown path is refused too, rather than telling a denied client what exists."""
    assert_forbidden(get(lab, lab.denied, version, plain, "/no-such-page"))
    assert get(lab, lab.allowed, version, plain, "/no-such-page").status == 404


@IP_VERSIONS
def test_probes_are_open_to_the_denied_client(lab, plain, version):
    for path in ("/healthz", "/readyz"):
        result = get(lab, lab.denied, version, plain, path)
        assert (result.status, result.body) == (200, "ok\n"), path


@IP_VERSIONS
def test_forwarded_for_from_an_untrusted_peer_is_ignored(lab, plain, version):
    """No trusted proxies: the denied client naming the allowed client changes nothing."""
    result = get(lab, lab.denied, version, plain, x_forwarded_for=lab.allowed_ip(version))
    assert_forbidden(result)


@IP_VERSIONS
def test_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_is_ignored(lab, proxied, version):
    """Trusted proxies configured, but the denied client is not one of them."""
    for forwarded in (lab.allowed_ip(version), BEHIND_PROXY[version]):
        assert_forbidden(get(lab, lab.denied, version, proxied, x_forwarded_for=forwarded))


@IP_VERSIONS
def test_trusted_proxy_forwarding_a_denied_client_is_refused(lab, proxied, version):
    """The proxy itself is allowed, but the client it forwards for is judged instead."""
    assert get(lab, lab.allowed, version, proxied).status == 200  # its own requests pass
    forwarded = lab.denied_ip(version)
    assert_forbidden(get(lab, lab.allowed, version, proxied, x_forwarded_for=forwarded))


@IP_VERSIONS
def test_trusted_proxy_forwarding_an_allowed_client_is_served(lab, proxied, version):
    """The client behind the proxy is allowed; what it wrote itself (the left part) is not
    believed, so a denied address there changes nothing."""
    behind = BEHIND_PROXY[version]
    for forwarded in (behind, f"{lab.denied_ip(version)}, {behind}"):
        result = get(lab, lab.allowed, version, proxied, x_forwarded_for=forwarded)
        assert result.status == 200, (forwarded, result.body[:300])
        assert "prosody_stats_collection_seconds_count" in result.body


def test_netns_helpers_refuse_addresses_outside_the_test_ranges():
    for text in ("10.0.0.1/24", "192.168.1.1/24", "198.20.0.1/24", "2001:db9::1/64", "fd00::1/64"):
        with pytest.raises(ValueError, match="outside the ranges"):
            check_interface(text)
