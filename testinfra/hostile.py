"""Hostile HTTP clients, on real sockets: what the sidecar must survive in bounded memory.

Each function opens its own TCP connections to (host, port), misbehaves in one way, and returns
what the server did (`Outcome`: the status line's code if one came, whether the server closed,
how many bytes it took). Every loop is bounded in bytes, connections and seconds. Used by
tests/exporter/test_hostile.py, `make bench-exporter` (peak RSS under each attack) and the
real-container check, with the exporter run as a process, a container or a pod.

`Flood` runs one of them on many connections at once, from threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

REQUEST_LINE = b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n"
MINIMAL_REQUEST = REQUEST_LINE + b"\r\n"


@dataclass
class Outcome:
    status: int | None  # the first response's status code, if one came
    closed: bool  # the server closed (or reset) the connection
    sent: int  # bytes the server accepted before that
    responses: int = 0  # status lines read
    seconds: float = 0.0  # from connecting to the end of the exchange


def connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _read_answers(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """Everything the server sends within `seconds`, and whether it then closed."""
    received = bytearray()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(received), False
        except OSError:  # reset
            return bytes(received), True
        if not chunk:
            return bytes(received), True
        received += chunk
        if len(received) > 1 << 20:  # enough to judge
            return bytes(received), False
    return bytes(received), False


def _outcome(received: bytes, closed: bool, sent: int, started: float) -> Outcome:
    statuses = [
        int(line.split()[1])
        for line in received.split(b"\r\n")
        if line.startswith(b"HTTP/1.") and len(line.split()) > 1 and line.split()[1].isdigit()
    ]
    return Outcome(
        status=statuses[0] if statuses else None,
        closed=closed,
        sent=sent,
        responses=len(statuses),
        seconds=time.monotonic() - started,
    )


def _send_all(sock: socket.socket, data: bytes, chunk: int = 65536) -> tuple[int, bool]:
    """Send as much of `data` as the server takes; (bytes sent, whether it closed on us)."""
    sent = 0
    view = memoryview(data)
    while sent < len(data):
        try:
            sent += sock.send(view[sent : sent + chunk])
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
        except TimeoutError:
            return sent, False
    return sent, False


def huge_header(host: str, port: int, size: int = 8 << 20, seconds: float = 10.0) -> Outcome:
    """One request with a single header line of `size` bytes."""
    started = time.monotonic()
    with connect(host, port, seconds) as sock:
        data = REQUEST_LINE + b"X-Filler: " + b"a" * size + b"\r\n\r\n"
        sent, closed = _send_all(sock, data)
        received, closed_after = _read_answers(sock, 1.0 if closed else seconds)
    return _outcome(received, closed or closed_after, sent, started)


def many_headers(host: str, port: int, count: int = 2000, seconds: float = 10.0) -> Outcome:
    """One request with `count` tiny header fields."""
    started = time.monotonic()
    with connect(host, port, seconds) as sock:
        data = REQUEST_LINE + b"".join(b"x%d: y\r\n" % i for i in range(count)) + b"\r\n"
        sent, closed = _send_all(sock, data)
        received, closed_after = _read_answers(sock, seconds)
    return _outcome(received, closed or closed_after, sent, started)


def pipelined(host: str, port: int, count: int = 1000, seconds: float = 10.0) -> Outcome:
    """`count` requests written at once, before reading any answer."""
    started = time.monotonic()
    with connect(host, port, seconds) as sock:
        sent, closed = _send_all(sock, MINIMAL_REQUEST * count)
        received, closed_after = _read_answers(sock, seconds)
    return _outcome(received, closed or closed_after, sent, started)


def slow_head(host: str, port: int, every: float = 0.2, seconds: float = 10.0) -> Outcome:
    """A request head trickling in one byte every `every` seconds, for at most `seconds`."""
    started = time.monotonic()
    deadline = started + seconds
    with connect(host, port, seconds) as sock:
        sent, closed = _send_all(sock, REQUEST_LINE)
        received = b""
        while not closed and time.monotonic() < deadline:
            received, closed = _read_answers(sock, every)
            if received or closed:
                break
            try:
                sent += sock.send(b"x")
            except OSError:
                closed = True
    return _outcome(received, closed, sent, started)


def unread_response(
    host: str, port: int, hold: float = 10.0, accept_encoding: str = "identity"
) -> Outcome:
    """Requests /metrics, then does not read for `hold` seconds; then reads what is left."""
    started = time.monotonic()
    with connect(host, port, hold + 10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel takes little
        request = REQUEST_LINE + f"Accept-Encoding: {accept_encoding}\r\n\r\n".encode()
        sent, closed = _send_all(sock, request)
        time.sleep(hold)
        received, closed_after = _read_answers(sock, 2.0)
    return _outcome(received, closed or closed_after, sent, started)


def idle_connection(host: str, port: int, hold: float = 10.0) -> Outcome:
    """Connects and sends nothing for at most `hold` seconds."""
    started = time.monotonic()
    with connect(host, port, hold + 10) as sock:
        received, closed = _read_answers(sock, hold)
    return _outcome(received, closed, 0, started)


@dataclass
class Flood:
    """One hostile client on `connections` connections at once, each in its own thread."""

    client: Callable[[], Outcome]
    connections: int

    def run(self, timeout: float = 60.0) -> list[Outcome]:
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def one() -> None:
            try:
                outcome = self.client()
            except OSError:  # refused or reset while connecting: the server said no
                outcome = Outcome(status=None, closed=True, sent=0)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(self.connections)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            with contextlib.suppress(RuntimeError):
                thread.join(max(0.0, deadline - time.monotonic()))
        return outcomes
