"""Events: what the planner reports, and the one log they are posted through, so that
level-triggered reconciles (every status update of a workload is one) do not flood it with the
same Event."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .workloads import ObjectRef

# Objects whose Events are remembered; the least recently reported is forgotten first.
MEMORY_OBJECTS = 10_000
# Seconds after which an Event still reported is posted again, and after which an object that
# reported nothing is forgotten: half the API server's default --event-ttl (1 h), so a finding
# that persists stays in `kubectl describe` (as client-go's event series keep a repeated Event
# alive), and an object deleted meanwhile takes no memory for long.
REPOST_SECONDS = 1800.0


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" or "Warning"
    reason: str
    message: str

    @classmethod
    def normal(cls, reason: str, message: str) -> Event:
        return cls("Normal", reason, message)

    @classmethod
    def warning(cls, reason: str, message: str) -> Event:
        return cls("Warning", reason, message)


# (reason, message) -> when it was last posted (the log's clock).
_Posted = dict[tuple[str, str], float]


class EventLog:
    """Posts an Event only when it is new for its object (by reason and message), or was last
    posted more than `repost_after` seconds ago.

    A report can also settle reasons: those of its reasons it does not carry again are
    forgotten, so they are posted anew when they come back (a reconcile knows every condition
    it checks)."""

    def __init__(
        self,
        post: Callable[[ObjectRef, Event], None],
        capacity: int = MEMORY_OBJECTS,
        repost_after: float = REPOST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._post = post
        self._capacity = capacity
        self._repost_after = repost_after
        self._clock = clock
        # Object -> when it last reported, and what; the least recently reported first.
        self._seen: OrderedDict[tuple[str, ...], tuple[float, _Posted]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, uid: str, reason: str, message: str) -> None:
        """An Event posted before this process started (still kept by the API server): not
        posted again while the condition lasts."""
        with self._lock:
            now = self._clock()
            _, posted = self._seen.pop((uid,), (now, {}))
            self._seen[(uid,)] = (now, {**posted, (reason, message): now})
            self._forget(now - self._repost_after)

    def report(
        self, target: ObjectRef, events: Iterable[Event], settles: Collection[str] = ()
    ) -> list[Event]:
        """Post what is new; returns what was posted."""
        key = (target.uid,) if target.uid else target.key
        events = list(dict.fromkeys(events))
        with self._lock:
            now = self._clock()
            fresh = now - self._repost_after
            _, before = self._seen.pop(key, (now, {}))
            seen = {k: at for k, at in before.items() if at > fresh}
            new = [e for e in events if (e.reason, e.message) not in seen]
            remembered = {k: at for k, at in seen.items() if k[0] not in settles}
            # Carried again: remembered from when it was posted, so it is posted again in time.
            remembered.update(
                {(e.reason, e.message): seen.get((e.reason, e.message), now) for e in events}
            )
            if remembered:  # objects with nothing to report take no room
                self._seen[key] = (now, remembered)
            self._forget(fresh)
        for event in new:
            self._post(target, event)
        return new

    def _forget(self, fresh: float) -> None:
        """Past the capacity, the least recently reported objects; and the objects that reported
        nothing for `repost_after` seconds (deleted ones among them)."""
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        while self._seen and next(iter(self._seen.values()))[0] <= fresh:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        """How many objects are remembered."""
        return len(self._seen)
