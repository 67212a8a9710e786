"""The only code that talks to Prosody.

Requests carry our own fixed headers and nothing of any scraper's: Prosody trusts X-Forwarded-For
from loopback, so forwarding a client header would let scrapers be refused or spoof their address.

Whatever Prosody (or whatever answers in its place) sends, memory stays bounded: the body is read
raw, never more than `max_body_bytes` after decoding; we ask for identity encoding, and a gzip
body sent anyway is inflated only up to that limit (a 1 MB gzip body can expand to 1 GB); an
error body is read only as far as the first few hundred bytes that go into the log.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import zlib

import httpx

from . import __version__

# Prosody ignores Accept; mod_prometheus variants that look at it get the format we parse best.
_HEADERS = {
    "Accept": "application/openmetrics-text; version=1.0.0, text/plain; version=0.0.4; q=0.5",
    "Accept-Encoding": "identity",
    "User-Agent": f"prosody-exporter/{__version__}",
}
ERROR_BODY_BYTES = 256  # of an error answer, kept for the log line
INFLATE_SLICE = 1 << 16  # bytes inflated at a time from a compressed body
_INFLATED = frozenset({"gzip", "x-gzip", "deflate"})  # zlib reads all three (wbits 32 + 15)


class ErrorReason(enum.Enum):
    TIMEOUT = "timeout"
    CONNECT = "connect"
    STATUS = "status"
    PARSE = "parse"
    TOO_LARGE = "too_large"


class UpstreamError(Exception):
    def __init__(self, reason: ErrorReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class BoundedBody:
    """Collects a body, decoding it if it is compressed, refusing it past `limit` bytes."""

    def __init__(self, content_encoding: str, limit: int) -> None:
        encoding = content_encoding.strip().lower()
        if encoding not in ("", "identity", *_INFLATED):
            raise UpstreamError(ErrorReason.PARSE, f"unsupported Content-Encoding {encoding!r}")
        self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS) if encoding in _INFLATED else None
        self._limit = limit
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        if self._inflate is None:
            self._append(chunk)
            return
        while chunk:  # in slices, however well it compresses
            self._append(self._inflate.decompress(chunk, INFLATE_SLICE))
            chunk = self._inflate.unconsumed_tail

    def _append(self, data: bytes) -> None:
        if len(data) > self._limit - len(self.data):
            raise UpstreamError(ErrorReason.TOO_LARGE, f"body larger than {self._limit} bytes")
        self.data += data

    def finish(self) -> bytearray:
        if self._inflate is not None and not self._inflate.eof:
            raise UpstreamError(ErrorReason.PARSE, "compressed body ends early")
        return self.data


class Upstream:
    """Fetches Prosody's metrics body, within a total time and size budget."""

    def __init__(self, url: str, *, host: str | None, timeout: float, max_body_bytes: int) -> None:
        headers = dict(_HEADERS)
        if host:
            headers["Host"] = host
        self._url = url
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        # trust_env=False: proxy variables in the pod must not divert a loopback request.
        self._client = httpx.AsyncClient(
            headers=headers, timeout=timeout, trust_env=False, verify=_verification(url)
        )

    async def fetch(self) -> bytearray:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._fetch()
        except (TimeoutError, httpx.TimeoutException) as error:
            raise UpstreamError(
                ErrorReason.TIMEOUT, f"no answer within {self._timeout}s"
            ) from error
        except httpx.TransportError as error:
            # Refused, reset, or a broken HTTP exchange: either way Prosody could not be read.
            detail = f"{type(error).__name__}: {error}"
            raise UpstreamError(ErrorReason.CONNECT, detail) from error

    async def _fetch(self) -> bytearray:
        async with self._client.stream("GET", self._url) as response:
            if response.status_code != 200:
                raise UpstreamError(ErrorReason.STATUS, await _error_summary(response))
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > self._max_body_bytes:
                raise UpstreamError(
                    ErrorReason.TOO_LARGE,
                    f"Content-Length {declared} > limit {self._max_body_bytes}",
                )
            body = BoundedBody(response.headers.get("Content-Encoding", ""), self._max_body_bytes)
            async for chunk in response.aiter_raw():
                body.add(chunk)
        return body.finish()

    async def aclose(self) -> None:
        await self._client.aclose()


def _verification(url: str) -> ssl.SSLContext | bool:
    """httpx's own verification (its CA bundle) for an https URL. An http URL never uses TLS
    (redirects are not followed), yet httpx would load the bundle, 2 MiB of the sidecar's RSS:
    it gets a context that trusts no certificate instead."""
    if url.startswith("https:"):
        return True
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


async def _error_summary(response: httpx.Response) -> str:
    """`HTTP 404: <the start of the body>`, reading no further than that start."""
    start = b""
    async for chunk in response.aiter_raw():
        start += chunk[: ERROR_BODY_BYTES - len(start)]
        if len(start) >= ERROR_BODY_BYTES:
            break
    text = start.decode("utf-8", "replace").strip()
    return f"HTTP {response.status_code}: {text}"
