"""The HTTP side: /metrics behind the CIDR guard, /healthz and /readyz for the kubelet.

FastAPI is the application: its routes answer the probes, 404 and 405, and its lifespan runs
the collection. In front of it, `Exporter` (the ASGI callable uvicorn serves) applies the
allowlist to every request before any routing, and answers GET /metrics itself from finished
bodies: a scrape is the hot path, and FastAPI's middleware, routing and Request/Response objects
were most of its cost (bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om_exposition
from starlette.types import Receive, Scope, Send

from . import __version__
from .access import AccessPolicy, DenyReason
from .exposition import EMPTY_BODY, Format, accepts_gzip, negotiate_format
from .selfmetrics import SelfMetrics
from .settings import Settings
from .snapshots import Snapshot, SnapshotKeeper
from .upstream import Upstream

# The kubelet probes from the node's address, which is outside the pod network; the probes
# reveal nothing but "ok", so they stay open. Everything else is behind the allowlist.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Decisions and negotiations are remembered per distinct header value; a client sending endless
# distinct values only empties the memo now and then (at most 256 request heads' worth of text).
MEMO_SIZE = 256

Headers = list[tuple[bytes, bytes]]


def _self_metrics_tail(metrics: SelfMetrics, fmt: Format) -> bytes:
    if fmt is Format.OPENMETRICS:
        tail: bytes = om_exposition.generate_latest(metrics.registry)
    else:
        tail = text_exposition.generate_latest(metrics.registry)
    return tail


@dataclass(frozen=True)
class _Cached:
    snapshot: Snapshot | None
    made_at: float
    headers: Headers
    content: bytes


class MetricsResponses:
    """Finished /metrics responses, per format and encoding, reused for up to `max_age` seconds.

    Rendering our own metrics was most of a response's cost; with many scrapers, rendering them
    once per `max_age` instead of once per request multiplies throughput. The exporter's own
    metrics in a response are therefore at most `max_age` old; Prosody's are as fresh as the
    snapshot, since a new snapshot always makes a new body.
    """

    def __init__(
        self,
        keeper: SnapshotKeeper,
        metrics: SelfMetrics,
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keeper = keeper
        self._metrics = metrics
        self._max_age = max_age
        self._clock = clock
        self._cache: dict[tuple[Format, bool], _Cached] = {}

    def get(self, fmt: Format, gzip: bool) -> tuple[Headers, bytes]:
        now, snapshot = self._clock(), self._keeper.current()
        cached = self._cache.get((fmt, gzip))
        if cached and cached.snapshot is snapshot and now - cached.made_at < self._max_age:
            return cached.headers, cached.content
        body = snapshot.bodies[fmt] if snapshot else EMPTY_BODY
        content = body.with_tail(_self_metrics_tail(self._metrics, fmt), gzip)
        headers = [
            (b"content-type", fmt.content_type.encode()),
            (b"content-length", str(len(content)).encode()),
            (b"vary", b"Accept, Accept-Encoding"),
            (b"cache-control", b"no-store"),
            *([(b"content-encoding", b"gzip")] if gzip else []),
        ]
        self._cache[(fmt, gzip)] = _Cached(snapshot, now, headers, content)
        return headers, content


def _header_values(headers: Headers, name: bytes) -> tuple[str, ...]:
    return tuple(value.decode("latin-1") for key, value in headers if key == name)


def _forbidden(reason: DenyReason) -> tuple[Headers, bytes]:
    body = f"forbidden: {reason.value}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    return headers, body


class Exporter:
    """The ASGI app uvicorn serves: the allowlist for every request, before any routing, then
    GET /metrics from `MetricsResponses`, and everything else from the FastAPI app."""

    def __init__(
        self, api: FastAPI, policy: AccessPolicy, metrics: SelfMetrics, responses: MetricsResponses
    ) -> None:
        self.api = api
        self._policy = policy
        self._responses = responses
        self._trust_forwarded = bool(policy.trusted_proxies)
        self._decisions: dict[tuple[str | None, tuple[str, ...]], DenyReason | None] = {}
        self._negotiated: dict[tuple[str | None, str | None], tuple[Format, bool]] = {}
        self._scrapes = {fmt: metrics.scrapes.labels(fmt.name.lower()) for fmt in Format}
        self._denied = {reason: metrics.denied.labels(reason.value) for reason in DenyReason}
        self._forbidden = {reason: _forbidden(reason) for reason in DenyReason}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.api(scope, receive, send)
            return
        denied = self._decide(scope)
        if denied is not None:
            self._denied[denied].inc()
            await _respond(send, 403, *self._forbidden[denied])
        elif scope["path"] == "/metrics" and scope["method"] == "GET":
            await _respond(send, 200, *self.metrics_response(scope["headers"]))
        else:
            await self.api(scope, receive, send)  # HEAD /metrics, 404, 405

    def _decide(self, scope: Scope) -> DenyReason | None:
        """Why the request is refused (None: allowed)."""
        peer = scope.get("client")
        key = (
            peer[0] if peer else None,
            _header_values(scope["headers"], b"x-forwarded-for") if self._trust_forwarded else (),
        )
        if key not in self._decisions:
            if len(self._decisions) >= MEMO_SIZE:
                self._decisions.clear()
            self._decisions[key] = self._policy.decide(*key)
        return self._decisions[key]

    def metrics_response(self, headers: Headers) -> tuple[Headers, bytes]:
        fmt, gzip = self._negotiate(headers)
        self._scrapes[fmt].inc()
        return self._responses.get(fmt, gzip)

    def _negotiate(self, headers: Headers) -> tuple[Format, bool]:
        accept = accept_encoding = None  # the first of each, as Starlette's headers.get() gives
        for name, value in headers:
            if name == b"accept" and accept is None:
                accept = value.decode("latin-1")
            elif name == b"accept-encoding" and accept_encoding is None:
                accept_encoding = value.decode("latin-1")
        key = (accept, accept_encoding)
        negotiated = self._negotiated.get(key)
        if negotiated is None:
            if len(self._negotiated) >= MEMO_SIZE:
                self._negotiated.clear()
            negotiated = negotiate_format(accept), accepts_gzip(accept_encoding)
            self._negotiated[key] = negotiated
        return negotiated


async def _respond(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, upstream: Upstream | None = None) -> Exporter:
    upstream = upstream or Upstream(
        str(settings.upstream_url),
        host=settings.upstream_host,
        timeout=settings.upstream_timeout,
        max_body_bytes=settings.max_body_bytes,
    )
    metrics = SelfMetrics()
    keeper = SnapshotKeeper(
        upstream.fetch,
        metrics,
        interval=settings.interval,
        stale_after=settings.stale_after_seconds,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(keeper.run(), name="collect-from-prosody")
        app.state.collector_task = task
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await upstream.aclose()

    api = FastAPI(
        title="prosody-exporter",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # No OpenTelemetry here: checking for a configured provider cost every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    policy = AccessPolicy(settings.allow_cidrs, settings.trusted_proxy_cidrs)
    exporter = Exporter(api, policy, metrics, MetricsResponses(keeper, metrics))

    async def metrics_head(request: Request) -> Response:
        """HEAD /metrics; a GET is answered in front."""
        headers, content = exporter.metrics_response(request.scope["headers"])
        response = Response(content)
        response.raw_headers = headers
        return response

    # A plain Starlette route, as GET /metrics always was: it answers HEAD too, and 405 otherwise.
    api.router.add_route("/metrics", metrics_head, methods=["GET"])

    @api.get("/healthz")
    async def healthz() -> Response:
        task: asyncio.Task[None] | None = getattr(api.state, "collector_task", None)
        if task is not None and task.done():  # the collection loop died: restart us
            return Response("collector stopped\n", status_code=500, media_type="text/plain")
        return Response("ok\n", media_type="text/plain")

    @api.get("/readyz")
    async def readyz() -> Response:
        if keeper.ready:
            return Response("ok\n", media_type="text/plain")
        reason = "no collection yet" if keeper.snapshot is None else "snapshot stale"
        return Response(f"not ready: {reason}\n", status_code=503, media_type="text/plain")

    return exporter
