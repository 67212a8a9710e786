"""The HTTP side: /metrics behind the CIDR guard, /healthz and /readyz for the kubelet."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om_exposition
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__
from .access import AccessPolicy
from .exposition import EMPTY_BODY, Format, accepts_gzip, negotiate_format
from .selfmetrics import SelfMetrics
from .settings import Settings
from .snapshots import Snapshot, SnapshotKeeper
from .upstream import Upstream

# The kubelet probes from the node's address, which is outside the pod network; the probes
# reveal nothing but "ok", so they stay open. Everything else is behind the allowlist.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class AccessGuard:
    """ASGI middleware: refuses requests whose client is not allowed, before any routing."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, metrics: SelfMetrics) -> None:
        self._app = app
        self._policy = policy
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        peer = scope.get("client")
        forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
        decision = self._policy.decide(peer[0] if peer else None, forwarded)
        if decision.denied is None:
            await self._app(scope, receive, send)
            return
        self._metrics.denied.labels(decision.denied.value).inc()
        body = f"forbidden: {decision.denied.value}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


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
    content: bytes


class MetricsResponses:
    """Finished /metrics bodies, per format and encoding, reused for up to `max_age` seconds.

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

    def content(self, fmt: Format, gzip: bool) -> bytes:
        now, snapshot = self._clock(), self._keeper.current()
        cached = self._cache.get((fmt, gzip))
        if cached and cached.snapshot is snapshot and now - cached.made_at < self._max_age:
            return cached.content
        body = snapshot.bodies[fmt] if snapshot else EMPTY_BODY
        content = body.with_tail(_self_metrics_tail(self._metrics, fmt), gzip)
        self._cache[(fmt, gzip)] = _Cached(snapshot, now, content)
        return content


def create_app(settings: Settings, upstream: Upstream | None = None) -> FastAPI:
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

    app = FastAPI(
        title="prosody-exporter",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.keeper = keeper
    app.state.metrics = metrics

    responses = MetricsResponses(keeper, metrics)

    async def serve_metrics(request: Request) -> Response:
        fmt = negotiate_format(request.headers.get("accept"))
        gzip = accepts_gzip(request.headers.get("accept-encoding"))
        metrics.scrapes.labels(fmt.name.lower()).inc()
        headers = {"Vary": "Accept, Accept-Encoding", "Cache-Control": "no-store"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        return Response(responses.content(fmt, gzip), media_type=fmt.content_type, headers=headers)

    # A plain Starlette route: the hot path needs none of FastAPI's request validation.
    app.router.add_route("/metrics", serve_metrics, methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> Response:
        task: asyncio.Task[None] | None = getattr(app.state, "collector_task", None)
        if task is not None and task.done():  # the collection loop died: restart us
            return Response("collector stopped\n", status_code=500, media_type="text/plain")
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        if keeper.ready:
            return Response("ok\n", media_type="text/plain")
        reason = "no collection yet" if keeper.snapshot is None else "snapshot stale"
        return Response(f"not ready: {reason}\n", status_code=503, media_type="text/plain")

    policy = AccessPolicy(settings.allow_cidrs, settings.trusted_proxy_cidrs)
    app.add_middleware(AccessGuard, policy=policy, metrics=metrics)
    return app
