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
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
    """uvicorn's httptools protocol, bounded in bytes, fields, time and connections.

    - While a request head is awaited, at most MAX_HEAD_BYTES are fed to the parser (counted per
      read, so a read holding many pipelined requests counts whole), else 431 and close.
    - At most MAX_HEADERS header fields and MAX_PIPELINED queued requests, else 400 and close.
    - A complete head within `header_timeout` of the connection's start or of the previous
      response, whatever trickles in meanwhile; this also ends connections whose client does
      not read its response.
    - At most `max_connections` open: a connection over the limit gets a 503 and is closed
      before anything of it is read.
    """

    max_connections = 100
    header_timeout = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._awaiting_head = True
        self._header_fields = 0
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(TOO_MANY_CONNECTIONS)
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(HEAD_TOO_LARGE)
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_fields = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        if self._header_fields > MAX_HEADERS:
            raise HeadRefused("too many header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:
            raise HeadRefused("too many pipelined requests")
        self._awaiting_head = False
        self._cancel_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self._awaiting_head and self.cycle.response_complete  # no pipelined request left
        if idle and not self.transport.is_closing():
            self._arm_head_deadline()

    def _refuse(self, answer: bytes) -> None:
        self._cancel_head_deadline()
        self.transport.write(answer)
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read: drop what it would not take
        else:
            self.transport.close()


def bounded_protocol(max_connections: int, header_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_connections": max_connections, "header_timeout": header_timeout},
    )
