"""The exporter with event-loop stall and garbage-collection probes: `python -m bench.stallprobe`.

Runs `prosody_exporter.main.main()` unchanged, plus:
- a ticker on the event loop that asks to wake every TICK seconds and records how late it woke
  (a late tick is a stall: one callback, a GC pause or a queue of ready callbacks held the loop);
- `gc.callbacks`, recording each collection's generation and duration (any thread).
When it shuts down (SIGTERM) it writes both to the JSON file named by $STALLPROBE_OUT.
Used by `make bench-exporter` for its collections-and-the-tail table; never part of the product.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from typing import Any

import uvicorn

from prosody_exporter import main as exporter_main

TICK = 0.005  # seconds
lags: list[float] = []
collections: list[tuple[int, float]] = []
_gc_started = 0.0


def on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        collections.append((info["generation"], time.perf_counter() - _gc_started))


async def ticker() -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append(time.perf_counter() - before - TICK)


class ProbedServer(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        collections.clear()  # start-up's own collection (before gc.freeze) is not serving
        self._ticker = asyncio.get_running_loop().create_task(ticker())

    async def shutdown(self, sockets: Any = None) -> None:
        # uvicorn re-raises SIGTERM once it has shut down, so the results are written here.
        write_results()
        await super().shutdown(sockets)


def write_results() -> None:
    path = os.environ.get("STALLPROBE_OUT")
    if path:
        with open(path, "w") as out:
            json.dump({"tick_s": TICK, "lags_s": lags, "gc": collections}, out)


def main() -> None:
    gc.callbacks.append(on_gc)
    exporter_main.uvicorn.Server = ProbedServer  # type: ignore[misc]
    exporter_main.main()


if __name__ == "__main__":
    main()
