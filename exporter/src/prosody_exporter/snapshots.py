"""Collecting from Prosody on our own cadence and keeping the last good snapshot.

One task collects; every scraper reads the snapshot it left. So k scrapers cost Prosody one
collection per interval, and there is never more than one request to Prosody in flight — which is
what makes Prosody's `statistics_interval = "manual"` safe with several Prometheus servers.

The event loop only awaits the network. Decoding, parsing, rendering and compressing run in a
worker thread, and a finished snapshot replaces the old one in a single assignment, so a scraper
sees the old snapshot or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .exposition import ExpositionError, Format, RenderedBody, render_exposition
from .selfmetrics import SelfMetrics
from .upstream import ErrorReason, UpstreamError

log = logging.getLogger("prosody_exporter")


@dataclass(frozen=True)
class Snapshot:
    collected_at: float  # time.monotonic()
    bodies: dict[Format, RenderedBody]
    families: int
    digest: bytes  # of Prosody's body: an unchanged body needs no new rendering


def build_snapshot(body: bytearray, collected_at: float, previous: Snapshot | None) -> Snapshot:
    """Runs in the worker thread, and empties `body` once read.

    Prosody with a numeric statistics_interval serves the same body until its next collection,
    so most collections reuse the previous rendering.
    """
    digest = hashlib.blake2b(body, digest_size=16).digest()
    if previous is not None and previous.digest == digest:
        return dataclasses.replace(previous, collected_at=collected_at)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UpstreamError(ErrorReason.PARSE, f"body is not UTF-8: {error}") from error
    finally:
        body.clear()  # its memory goes now, not when the caller lets go of it
    collecting = gc.isenabled()
    # The parse allocates samples by the thousand, none in a reference cycle: garbage collections
    # triggered meanwhile would only scan them, holding the GIL against the event loop.
    gc.disable()
    try:
        bodies, families = render_exposition(text)
    except ExpositionError as error:
        raise UpstreamError(ErrorReason.PARSE, str(error)) from error
    finally:
        if collecting:
            gc.enable()
    return Snapshot(collected_at, bodies, families, digest)


class SnapshotKeeper:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[bytearray]],
        metrics: SelfMetrics,
        *,
        interval: float,
        stale_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._metrics = metrics
        self._interval = interval
        self._stale_after = stale_after
        self._clock = clock
        self.snapshot: Snapshot | None = None
        self._up: bool | None = None  # None until the first collection, so it logs either way
        self._was_stale = False
        metrics.watch_snapshot(lambda: (self.age(), self.is_stale()))

    def age(self) -> float:
        return math.nan if self.snapshot is None else self._clock() - self.snapshot.collected_at

    def is_stale(self) -> bool:
        return self.snapshot is not None and self.age() > self._stale_after

    def current(self) -> Snapshot | None:
        """The snapshot to serve: the last good one, unless it is stale."""
        return None if self.is_stale() else self.snapshot

    @property
    def ready(self) -> bool:
        return self.snapshot is not None and not self.is_stale()

    async def run(self) -> None:
        """Collect every interval, for ever. Ticks keep a fixed cadence; a slow collection delays
        the next one instead of overlapping it."""
        next_tick = self._clock()
        while True:
            await self.collect_once()
            next_tick += self._interval
            now = self._clock()
            if next_tick < now:  # fell behind (slow Prosody): skip the missed ticks
                next_tick = now
            await asyncio.sleep(next_tick - now)

    async def collect_once(self) -> None:
        started = self._clock()
        try:
            snapshot = await asyncio.to_thread(
                build_snapshot, await self._fetch(), started, self.snapshot
            )
        except UpstreamError as error:
            self._metrics.upstream_errors.labels(error.reason.value).inc()
            self._set_up(False, error)
        else:
            self.snapshot = snapshot
            self._metrics.last_success.set(time.time())
            self._set_up(True, None)
        finally:
            self._metrics.collect_duration.observe(self._clock() - started)
        self._note_staleness()

    def _set_up(self, up: bool, error: UpstreamError | None) -> None:
        self._metrics.up.set(1 if up else 0)
        if up == self._up:
            return
        self._up = up
        if up:
            families = self.snapshot.families if self.snapshot else 0
            log.info("upstream up: collected %d metric families from Prosody", families)
        else:
            log.warning("upstream down: %s%s", error, _hint(error))

    def _note_staleness(self) -> None:
        stale = self.is_stale()
        if stale != self._was_stale:
            self._was_stale = stale
            if stale:
                log.warning(
                    "snapshot stale: last good collection %.0fs ago (limit %.0fs); "
                    "serving only the exporter's own metrics",
                    self.age(),
                    self._stale_after,
                )
            else:
                log.info("snapshot fresh again")


def _hint(error: UpstreamError | None) -> str:
    if error and error.reason is ErrorReason.STATUS and "No statistics provider" in error.detail:
        return ' (set statistics = "internal" in the global section of the Prosody config)'
    if error and error.reason is ErrorReason.STATUS and "HTTP 403" in error.detail:
        return " (Prosody refused us: check openmetrics_allow_ips / openmetrics_allow_cidr)"
    return ""
