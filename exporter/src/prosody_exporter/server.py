"""The HTTP server: uvicorn's httptools protocol, bounded before any request reaches the app.

What uvicorn's two HTTP/1.1 implementations bound, read in their sources (uvicorn 0.54, h11 0.16,
httptools 0.9):
- h11 buffers at most `max_incomplete_event_size` (16 KiB) of an unfinished request head and then
  refuses it; it parses one request at a time and pauses on the next pipelined one.
- httptools (llhttp) bounds nothing: it concatenates a header's name and value across reads until
  the line ends, uvicorn appends every header to a list, and every pipelined request of a read is
  parsed and queued. Eight megabytes of header from an address the allowlist refuses are read
  whole before the app can refuse them.
- Neither limits the number of header fields, the time a client takes to send its head (uvicorn's
  keep-alive timer is cancelled by the first byte), or the number of open connections.
httptools it is nonetheless: serving /metrics it measured 3-4 times h11's requests per second
(bench/README.md), and the subclass below adds every bound, before the parser sees a byte.

The subclass also answers an allowed `GET /metrics` itself, from the finished response the app
keeps, in one write: no ASGI scope, request-response cycle or task. That machinery was most of
what a scrape cost once the app's own work was cut (bench/README.md, "Profile"). Everything else,
and any /metrics request it does not take (see `_direct_answer`), goes to the app as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

Headers = list[tuple[bytes, bytes]]
# The finished response to an allowed GET /metrics from this peer with these headers; None when
# the app must answer (a refused client: the app answers 403 and counts it).
MetricsAnswer = Callable[[str | None, Headers], tuple[Headers, bytes] | None]

MAX_HEAD_BYTES = 8192  # request line and headers; Prometheus sends about 300 bytes
MAX_HEADERS = 100  # header fields in one request (Apache's default limit)
MAX_PIPELINED = 8  # requests queued behind the one being answered


def _refusal(status: bytes, text: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(text)).encode() + b"\r\nconnection: close\r\n\r\n" + text
    )


TOO_MANY_CONNECTIONS = _refusal(b"503 Service Unavailable", b"too many connections\n")
HEAD_TOO_LARGE = _refusal(b"431 Request Header Fields Too Large", b"request head too large\n")


class HeadRefused(Exception):
    """Raised from a parser callback: httptools aborts, and uvicorn answers 400 and closes."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded in bytes, fields, time and connections, answering
    an allowed GET /metrics itself.

    - While a request head is awaited, at most MAX_HEAD_BYTES are fed to the parser (counted per
      read, so a read holding many pipelined requests counts whole), else 431 and close.
    - At most MAX_HEADERS header fields, and at most MAX_PIPELINED requests queued or behind the
      first of one read, else 400 and close.
    - A complete head within `header_timeout` of the connection's start or of the previous
      response, whatever trickles in meanwhile; this also ends connections whose client does
      not read its response.
    - At most `max_connections` open: a connection over the limit gets a 503 and is closed
      before anything of it is read.
    """

    max_connections = 100
    header_timeout = 5.0

    @staticmethod
    def answer_metrics(peer: str | None, headers: Headers) -> tuple[Headers, bytes] | None:
        return None  # set by bounded_protocol(); None sends every request to the app

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._awaiting_head = True
        self._requests_in_read = 0
        # The head deadline is a time, checked by a timer that is only replaced when it fires:
        # arming a new timer per request cost as much as the rest of a direct answer.
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._direct: tuple[Headers, bytes, bool] | None = None  # headers, body, keep-alive

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(TOO_MANY_CONNECTIONS)
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._requests_in_read = 0
        if self._awaiting_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(HEAD_TOO_LARGE)
                return
        super().data_received(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS:
            raise HeadRefused("too many header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._requests_in_read += 1
        if len(self.pipeline) >= MAX_PIPELINED or self._requests_in_read > MAX_PIPELINED + 1:
            raise HeadRefused("too many pipelined requests")
        self._awaiting_head = False
        self._head_deadline = None
        self._direct = self._direct_answer()
        if self._direct is None:
            super().on_headers_complete()

    def _direct_answer(self) -> tuple[Headers, bytes, bool] | None:
        """The answer to write without the app, or None: the request goes to the app.

        Only a bodiless GET of /metrics, with no earlier answer pending (answers stay in order)
        and with the client reading what it is sent (else the app's bounded queue waits)."""
        parser = self.parser
        if (
            parser.get_method() != b"GET"
            or self.url.partition(b"?")[0] != b"/metrics"
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.flow.write_paused
            or self.expect_100_continue
            or parser.should_upgrade()
        ):
            return None
        for name, _ in self.headers:
            if name == b"content-length" or name == b"transfer-encoding":
                return None
        answer = self.answer_metrics(self.client[0] if self.client else None, self.headers)
        if answer is None:
            return None
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        return (*answer, keep_alive)

    def on_message_complete(self) -> None:
        direct, self._direct = self._direct, None
        if direct is None:
            super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0
        if direct is not None:
            self._write_answer(*direct)

    def _write_answer(self, headers: Headers, body: bytes, keep_alive: bool) -> None:
        """What uvicorn's cycle would write (its default headers first: the date), in one write,
        then what its completion does, with the head deadline as the only idle timer."""
        self.transport.writelines(
            (_response_head(self.server_state.default_headers, headers, keep_alive), body)
        )
        self.server_state.total_requests += 1
        if keep_alive:
            self._arm_head_deadline()
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # idle: the head of the next request is awaited and no pipelined request is left
        if self._awaiting_head and self.cycle.response_complete and not self.transport.is_closing():
            self._arm_head_deadline()

    def _refuse(self, answer: bytes) -> None:
        self._head_deadline = None
        self.transport.write(answer)
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.time() + self.header_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._check_head_deadline)

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        if self._head_deadline is None:  # disarmed since
            return
        if self.loop.time() < self._head_deadline:  # moved since: check again then
            self._head_timer = self.loop.call_at(self._head_deadline, self._check_head_deadline)
        elif self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read: drop what it would not take
        else:
            self.transport.close()


_HEADS: dict[tuple[int, int, bool], tuple[Headers, Headers, bytes]] = {}


def _response_head(defaults: Headers, headers: Headers, keep_alive: bool) -> bytes:
    """A 200's status line and headers, remembered per (defaults, headers) list: uvicorn replaces
    its defaults (the date) every second, the app its headers when a body changes."""
    key = (id(defaults), id(headers), keep_alive)
    known = _HEADS.get(key)
    if known is not None and known[0] is defaults and known[1] is headers:
        return known[2]
    lines = [STATUS_LINE[200]]
    for name, value in (*defaults, *headers):
        lines += (name, b": ", value, b"\r\n")
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if len(_HEADS) >= 16:
        _HEADS.clear()
    _HEADS[key] = (defaults, headers, b"".join(lines))
    return _HEADS[key][2]


def bounded_protocol(
    max_connections: int, header_timeout: float, answer_metrics: MetricsAnswer
) -> type[BoundedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits, answering
    allowed GET /metrics requests with `answer_metrics`."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "max_connections": max_connections,
            "header_timeout": header_timeout,
            "answer_metrics": staticmethod(answer_metrics),
        },
    )
