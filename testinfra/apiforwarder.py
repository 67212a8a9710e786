"""The API server, seen from a pod network: it listens on 127.0.0.1 only, which another network
namespace cannot reach. `ApiForwarder` forwards `<host>:<port>` (an address of the root namespace
on the pod bridge) to it over TCP — TLS stays end to end, between the client and the API server —
with a thread per direction per connection, at most MAX_CONNECTIONS at once, all closed by
`stop()`. testinfra.podrunner serves the `kubernetes` Service's ClusterIP:443 with it, as
kube-proxy would."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from . import controlplane

MAX_CONNECTIONS = 64


class ApiForwarder:
    """TCP from `listen_host:listen_port` (0: a free port) to the API server on loopback, for
    `lifetime` seconds at most."""

    def __init__(self, listen_host: str, listen_port: int, lifetime: float) -> None:
        self.listen_host = listen_host
        self.lifetime = lifetime  # seconds the accepting thread runs at most
        self.port = listen_port
        self.target = ("127.0.0.1", controlplane.Ports.load().apiserver)
        self._server: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.listen_host}:{self.port}"

    def start(self) -> ApiForwarder:
        # reuse_port: pod runners of two processes may each serve the same ClusterIP:443; the
        # kernel spreads connections over them, and either reaches the same API server.
        server = socket.create_server((self.listen_host, self.port), reuse_port=True)
        server.settimeout(0.5)
        self._server, self.port = server, server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="api-forwarder", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._server is not None
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                downstream, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if len(self._sockets) >= 2 * MAX_CONNECTIONS:
                    downstream.close()
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            downstream.settimeout(None)
            with self._lock:
                self._sockets |= {downstream, upstream}
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                with self._lock:
                    self._sockets.discard(sock)

    def stop(self) -> None:
        self._stop.set()
        if self._server:
            self._server.close()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> ApiForwarder:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
