"""The reconcile queue: which workloads to reconcile, each queued at most once and never by two
workers at once, as client-go's workqueue does for Kubernetes' own controllers.

A storm of events about one workload (its creation, its controller's status updates, its
ConfigMap, its Service and ServiceMonitor appearing) costs one reconcile when they come faster
than the workers; events stay cheap for kopf's event loop (an `add` never blocks on the API);
and the queue holds work while this replica is not the leader, for when it becomes one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("prosody_operator")

# Seconds before a failed key is tried again: doubled at each failure in a row, up to the cap.
RETRY_FIRST = 5.0
RETRY_CAP = 300.0


class WorkQueue:
    """`add(key, item)` queues a key (its latest item kept); `workers` threads call
    `process(key, item)` while the queue is active (`resume()`), not while paused. A key being
    processed that is added again is processed again afterwards, by one worker. A `process`
    that raises is retried after a growing delay; one that succeeds resets it."""

    def __init__(
        self,
        process: Callable[[Any, Any], None],
        workers: int,
        name: str = "reconcile",
        log_extra: Callable[[Any], dict[str, Any]] = lambda key: {},
    ) -> None:
        self._process = process
        self._log_extra = log_extra  # what a log line about a key carries (logs.about)
        self._workers = workers
        self._name = name
        self._pending: dict[Hashable, Any] = {}  # in the order they were added
        self._processing: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._condition = threading.Condition()
        self._active = False
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def __len__(self) -> int:
        with self._condition:
            return len(self._pending)

    def add(self, key: Hashable, item: Any = None) -> None:
        """Queue `key`. A newer `item` replaces a queued one; None keeps it (the key alone
        says "look again", the item is still the latest known). While paused, keys only: items
        would only take memory until this replica leads, and be stale by then."""
        with self._condition:
            if not self._active:
                item = None
            if item is not None or key not in self._pending:
                self._pending[key] = item
            self._condition.notify()

    def discard(self, key: Hashable) -> None:
        """Nothing more to do for `key` (its object is gone)."""
        with self._condition:
            self._pending.pop(key, None)
            self._failures.pop(key, None)

    def start(self) -> None:
        for number in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def resume(self) -> None:
        with self._condition:
            self._active = True
            self._condition.notify_all()

    def pause(self) -> None:
        """Workers finish what they process and take nothing more; keys keep being queued (the
        items dropped: they would be stale by the time this replica leads again)."""
        with self._condition:
            self._active = False
            self._pending = dict.fromkeys(self._pending)

    def stop(self, timeout: float = 10.0) -> None:
        """Workers take nothing more; waits up to `timeout` seconds in all for what they
        process."""
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _next(self) -> tuple[Hashable, Any] | None:
        """The oldest queued key no worker is processing; None when stopped."""
        with self._condition:
            while not self._stopped:
                if self._active:
                    key = next((k for k in self._pending if k not in self._processing), None)
                    if key is not None:
                        self._processing.add(key)
                        return key, self._pending.pop(key)
                self._condition.wait()
            return None

    def _work(self) -> None:
        while (found := self._next()) is not None:
            key, item = found
            try:
                self._process(key, item)
            except Exception:
                self._retry_later(key)
            else:
                with self._condition:
                    self._failures.pop(key, None)
            finally:
                with self._condition:
                    self._processing.discard(key)
                    self._condition.notify_all()

    def _retry_later(self, key: Hashable) -> None:
        with self._condition:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (failures - 1))
        log.exception("%s failed; retrying in %g s", self._name, delay, extra=self._log_extra(key))
        timer = threading.Timer(delay, self.add, (key,))
        timer.daemon = True
        timer.start()
