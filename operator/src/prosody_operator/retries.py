"""Reconciles that failed for a reason that passes (the API server restarting or overloaded, a
5xx, a conflict) are run again later: kopf does not retry event handlers, and the next event
for the workload may never come."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable

log = logging.getLogger("prosody_operator")

# Seconds before each attempt: doubling, then every 5 minutes until one succeeds.
DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 300.0)


class Retries:
    """At most one pending retry per key; a success forgets the key's attempts."""

    def __init__(self, delays: tuple[float, ...] = DELAYS) -> None:
        self._delays = delays
        self._attempts: dict[Hashable, int] = {}
        self._pending: dict[Hashable, threading.Timer] = {}
        self._lock = threading.Lock()

    def failed(self, key: Hashable, again: Callable[[], None]) -> float:
        """Run `again` after the key's next delay (unless a retry is pending); the delay."""
        with self._lock:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            delay = self._delays[min(attempt, len(self._delays) - 1)]
            if key not in self._pending:
                timer = threading.Timer(delay, self._run, (key, again))
                timer.daemon = True
                self._pending[key] = timer
                timer.start()
        return delay

    def succeeded(self, key: Hashable) -> None:
        with self._lock:
            self._attempts.pop(key, None)

    def _run(self, key: Hashable, again: Callable[[], None]) -> None:
        with self._lock:
            self._pending.pop(key, None)
        try:
            again()
        except Exception:  # not one that passes: logged, as kopf logs a handler's
            log.exception("retrying %s failed", key)

    def __len__(self) -> int:
        """Retries pending."""
        return len(self._pending)
