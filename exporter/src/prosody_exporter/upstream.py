"""The only code that talks to Prosody.

Requests carry our own fixed headers and nothing of any scraper's: Prosody trusts X-Forwarded-For
from loopback, so forwarding a client header would let scrapers be refused or spoof their address.
"""

from __future__ import annotations

import asyncio
import enum

import httpx

from . import __version__

# Prosody ignores Accept; mod_prometheus variants that look at it get the format we parse best.
_HEADERS = {
    "Accept": "application/openmetrics-text; version=1.0.0, text/plain; version=0.0.4; q=0.5",
    "User-Agent": f"prosody-exporter/{__version__}",
}


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
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False)

    async def fetch(self) -> str:
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

    async def _fetch(self) -> str:
        async with self._client.stream("GET", self._url) as response:
            if response.status_code != 200:
                text = (await response.aread())[:200].decode("utf-8", "replace").strip()
                raise UpstreamError(ErrorReason.STATUS, f"HTTP {response.status_code}: {text}")
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > self._max_body_bytes:
                raise self._too_large(f"Content-Length {declared}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_body_bytes:
                    raise self._too_large(f"more than {size} bytes")
                chunks.append(chunk)
        try:
            return b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError as error:
            raise UpstreamError(ErrorReason.PARSE, f"body is not UTF-8: {error}") from error

    def _too_large(self, what: str) -> UpstreamError:
        return UpstreamError(ErrorReason.TOO_LARGE, f"{what} > limit {self._max_body_bytes}")

    async def aclose(self) -> None:
        await self._client.aclose()
