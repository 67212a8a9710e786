"""Hostile and heavy clients of an HTTP server, bounded in count and time, run from a namespace of
the caller's choosing (the tests run them from the host, outside the pod network, and from the
test node's namespace, inside it):

    python -m testinfra.attacks huge-header URL --bytes 8388608 --connections 2
    python -m testinfra.attacks open-connections HOST PORT --connections 500 --hold 10
    python -m testinfra.attacks scrape URL --clients 20 --seconds 10

Each prints one JSON line: what it did and what came back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
import urllib.parse
from typing import Any

import httpx

TIMEOUT = 30.0  # seconds any one connection may take


def huge_header(url: str, size: int, connections: int) -> dict[str, Any]:
    """`connections` requests at once, each with one header line of `size` bytes; returns the
    status lines (or errors) they got."""
    parts = urllib.parse.urlsplit(url)
    results: list[str] = []

    def one() -> None:
        try:
            with socket.create_connection((parts.hostname, parts.port or 80), TIMEOUT) as sock:
                sock.settimeout(TIMEOUT)
                head = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nX-Fill: "
                sock.sendall(head.encode())
                chunk = b"a" * 65536
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                sock.sendall(b"\r\n\r\n")
                answer = sock.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                results.append(answer or "closed")
        except OSError as error:  # the server may close or reset on a header this size
            results.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=one) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    return {"attack": "huge-header", "bytes": size, "results": sorted(results)}


def open_connections(host: str, port: int, count: int, hold: float) -> dict[str, Any]:
    """Open `count` connections, send half a request line on each, hold them `hold` seconds."""
    sockets, refused = [], 0
    deadline = time.monotonic() + TIMEOUT
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            sock = socket.create_connection((host, port), 5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            sockets.append(sock)
        except OSError:
            refused += 1
    time.sleep(hold)
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
    return {"attack": "open-connections", "opened": len(sockets), "refused": refused}


def scrape(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads scraping as fast as answers come, for `seconds`."""
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def one() -> None:
        headers = {"Accept-Encoding": "gzip"}
        with httpx.Client(timeout=10, trust_env=False, headers=headers) as session:
            while time.monotonic() < deadline:
                try:
                    key = str(session.get(url).status_code)
                except httpx.HTTPError as error:
                    key = type(error).__name__
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + TIMEOUT)
    return {"attack": "scrape", "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testinfra.attacks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    header = commands.add_parser("huge-header")
    header.add_argument("url")
    header.add_argument("--bytes", type=int, default=8 * 1024 * 1024)
    header.add_argument("--connections", type=int, default=2)
    held = commands.add_parser("open-connections")
    held.add_argument("host")
    held.add_argument("port", type=int)
    held.add_argument("--connections", type=int, default=500)
    held.add_argument("--hold", type=float, default=10.0)
    load = commands.add_parser("scrape")
    load.add_argument("url")
    load.add_argument("--clients", type=int, default=20)
    load.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "huge-header":
        result = huge_header(args.url, args.bytes, args.connections)
    elif args.command == "open-connections":
        result = open_connections(args.host, args.port, args.connections, min(args.hold, 60.0))
    else:
        result = scrape(args.url, args.clients, min(args.seconds, 60.0))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
