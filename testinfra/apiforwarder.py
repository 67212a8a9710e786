"""The API server, served inside the test node's network namespace.

The API server listens on the host's 127.0.0.1 only, which no other network namespace can reach.
This program creates its listening sockets *inside* the node's namespace (a socket stays in the
namespace it was made in) and connects to the API server from the host's, forwarding bytes both
ways — TLS stays end to end, between the client and the API server:

    python -m testinfra.apiforwarder --netns /run/netns/NAME --to 127.0.0.1:PORT \\
        127.0.0.1:PORT 198.18.94.1:6443

* `127.0.0.1:PORT` in the node: the kubelet and kube-proxy use the admin kubeconfig's URL, whose
  address the API server's certificate names;
* `198.18.94.1:6443` (NODE_LOCAL_IP, on the node's loopback interface): the endpoint of the
  `kubernetes` Service, which kube-proxy sends pods to (they connect to its ClusterIP, which the
  certificate names too).

Nothing listens in the host's namespace. A thread per direction per connection, at most
MAX_CONNECTIONS at once. testinfra/node.py starts it with the node and stops it with the node.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Iterator

MAX_CONNECTIONS = 256
FORWARDING = "forwarding"  # printed once every listening socket is open
CLONE_NEWNET = 0x40000000


def address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


@contextlib.contextmanager
def network_namespace(path: str) -> Iterator[None]:
    """Run the block in the network namespace at `path` (this thread only), then come back."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(path) as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


class Forwarder:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def serve(self, server: socket.socket) -> None:
        while True:
            downstream, _ = server.accept()
            if not self.slots.acquire(blocking=False):
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                downstream.close()
                self.slots.release()
                continue
            upstream.settimeout(None)
            done = threading.Barrier(2, action=self.slots.release)
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self.pump, args=(a, b, done), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket, done: threading.Barrier) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()
            source.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testinfra.apiforwarder", description=__doc__)
    parser.add_argument("--netns", required=True, help="the node's network namespace file")
    parser.add_argument("--to", required=True, type=address, help="the API server (host side)")
    parser.add_argument("listen", nargs="+", type=address, help="addresses inside the node")
    args = parser.parse_args(argv)
    with network_namespace(args.netns):
        servers = [socket.create_server(listen) for listen in args.listen]
    forwarder = Forwarder(args.to)
    threads = [threading.Thread(target=forwarder.serve, args=(s,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print(f"{FORWARDING} {args.listen} in {args.netns} to {args.to}", flush=True)
    for thread in threads:
        thread.join()
    return os.EX_SOFTWARE  # a server socket failed


if __name__ == "__main__":
    raise SystemExit(main())
