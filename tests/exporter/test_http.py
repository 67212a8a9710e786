"""HTTP/1.x on one connection, on raw sockets against the real exporter process: keep-alive,
pipelined requests answered in order, Connection: close and HTTP/1.0, the header timeout after a
response, and a client that pipelines without reading its answers."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testinfra import hostile
from testinfra.procs import wait_until
from testinfra.standin import PROSODY_LIKE_LINE, Answer, StandInProsody, exposition_of

DATA = Path(__file__).parent / "data"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def request(path: str, method: str = "GET", version: str = "1.1", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: sidecar"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_reply(stream, method: str = "GET") -> Reply:
    """One response, framed by its Content-Length (every answer of the exporter has one)."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if method == "HEAD" else int(headers["content-length"])
    body = stream.read(length)
    assert len(body) == length, (headers, body)
    return Reply(int(status_line.split()[1]), headers, body)


def closed_by_server(sock: socket.socket, seconds: float = 10.0) -> bool:
    """Whether the server closes the connection within `seconds`; it must send nothing more."""
    sock.settimeout(seconds)
    try:
        sent = sock.recv(1024)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert sent == b"", f"the server answered: {sent!r}"
    return True


def openmetrics_scrapes(exporter) -> float:
    """Scrapes answered in OpenMetrics (sample_value's own scrapes are Prometheus text)."""
    return exporter.sample_value("prosody_exporter_scrapes_total", format="openmetrics") or 0


@pytest.fixture
def exporter(start_exporter):
    with StandInProsody(Answer(body=(DATA / "prosody-0.12.txt").read_bytes())) as standin:
        yield start_exporter(standin.url, settings={"header_timeout": "2"})


def test_keep_alive_many_requests_on_one_connection(exporter):
    count = 300
    before = openmetrics_scrapes(exporter)
    with hostile.connect("127.0.0.1", exporter.port) as sock, sock.makefile("rb") as stream:
        for i in range(count):
            accept = OPENMETRICS if i % 2 else "text/plain"
            sock.sendall(request("/metrics", Accept=accept, Accept_Encoding="identity"))
            reply = read_reply(stream)
            assert reply.status == 200, reply
            assert reply.headers["content-type"] == (OPENMETRICS if i % 2 else PROMETHEUS_TEXT)
            assert "connection" not in reply.headers  # kept alive
            assert {"date", "vary", "cache-control"} <= reply.headers.keys()
            assert b"prosody_stats_collection_seconds_count" in reply.body
            assert reply.body.endswith(b"# EOF\n") == bool(i % 2)
        # a probe and a 404 on the same connection, after all of those
        sock.sendall(request("/healthz") + request("/no-such-page"))
        assert (read_reply(stream).status, read_reply(stream).status) == (200, 404)
    # each scrape counted once (the counter in a response may be up to 1 s old)
    expected = before + count // 2
    wait_until(lambda: openmetrics_scrapes(exporter) >= expected, 5, "the scrapes to be counted")
    assert openmetrics_scrapes(exporter) == expected


def test_pipelined_requests_are_answered_in_order(exporter):
    batch = [
        ("GET", "/metrics", {"Accept_Encoding": "identity"}, 200),
        ("GET", "/healthz", {}, 200),
        ("GET", "/metrics", {"Accept": OPENMETRICS, "Accept_Encoding": "gzip"}, 200),
        ("GET", "/no-such-page", {}, 404),
        ("HEAD", "/metrics", {"Accept_Encoding": "identity"}, 200),
        ("POST", "/metrics", {"Content_Length": "5"}, 405),
        ("GET", "/metrics?name=x", {"Accept_Encoding": "identity"}, 200),
        ("GET", "/readyz", {}, 200),
        ("GET", "/metrics", {"Accept": OPENMETRICS, "Accept_Encoding": "identity"}, 200),
    ]
    data = b"".join(
        request(path, method, **headers) + (b"hello" if method == "POST" else b"")
        for method, path, headers, _ in batch
    )
    with hostile.connect("127.0.0.1", exporter.port) as sock, sock.makefile("rb") as stream:
        for round_ in range(3):
            sock.sendall(data)  # one write: the server reads them all at once
            for method, path, headers, status in batch:
                reply = read_reply(stream, method)
                assert reply.status == status, (round_, method, path, reply)
                if method == "GET" and path.startswith("/metrics"):
                    accept = headers.get("Accept", "text/plain")
                    assert reply.headers["content-type"].startswith(accept.split(";")[0])
                    gzipped = reply.headers.get("content-encoding") == "gzip"
                    assert gzipped == (headers["Accept_Encoding"] == "gzip")
                if path in ("/healthz", "/readyz"):
                    assert reply.body == b"ok\n"


@pytest.mark.parametrize(
    ("version", "headers"),
    [("1.0", {}), ("1.0", {"Connection": "keep-alive"}), ("1.1", {"Connection": "close"})],
    ids=["http-1.0", "http-1.0-keep-alive", "connection-close"],
)
@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_the_server_closes_after_one_answer_when_asked_to(exporter, version, headers, path):
    with hostile.connect("127.0.0.1", exporter.port) as sock, sock.makefile("rb") as stream:
        sock.sendall(request(path, version=version, **headers) + request(path))
        reply = read_reply(stream)
        assert reply.status == 200 and reply.headers["connection"] == "close", reply
        assert closed_by_server(sock)  # the second request is never answered


def test_a_head_trickling_in_after_a_response_is_ended_by_the_header_timeout(exporter):
    """After a response, a client has `header_timeout` for its next head: a byte now and then
    does not keep the connection (uvicorn's own keep-alive timer stops at the first byte)."""
    with hostile.connect("127.0.0.1", exporter.port) as sock, sock.makefile("rb") as stream:
        sock.sendall(request("/metrics"))
        assert read_reply(stream).status == 200
        sock.sendall(hostile.REQUEST_LINE)  # a head that never ends
        for _ in range(100):  # a byte every 0.2 s for 20 s, ten times header_timeout
            if closed_by_server(sock, 0.2):
                return
            try:
                sock.send(b"x")
            except OSError:
                return  # closed
        raise AssertionError("the server kept a connection whose head never completed")


def test_a_client_pipelining_without_reading_gets_no_more_answers(start_exporter):
    """Requests written one by one while the answers (400 KB each) go unread: once its write
    buffer is full, the server stops answering and reading instead of writing an answer per
    request. The kernel's send buffer takes a few answers first (up to tcp_wmem's maximum)."""
    body = exposition_of(400_000, PROSODY_LIKE_LINE)
    kernel_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    with StandInProsody(Answer(body=body)) as standin:
        exporter = start_exporter(standin.url)
        before = openmetrics_scrapes(exporter)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake
            sock.settimeout(10)
            sock.connect(("127.0.0.1", exporter.port))
            one = request("/metrics", Accept=OPENMETRICS, Accept_Encoding="identity")
            for _ in range(200):
                sock.sendall(one)
                time.sleep(0.01)
            # Not a timed assertion: the bound below holds however long this waits; the wait
            # lets the count in the exporter's answers (cached up to 1 s) show what it did.
            time.sleep(1.5)
            answered = openmetrics_scrapes(exporter) - before
    # what the kernel holds, the answer in the server's buffer, and one waiting in the app
    assert 1 <= answered <= kernel_max // len(body) + 2, answered
