"""Events: what the planner reports, and the one log both paths (admission, reconcile) post
through, so that level-triggered reconciles and many pods of one workload do not flood it with
the same Event."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .workloads import ObjectRef

# Objects whose Events are remembered; the least recently reported is forgotten first.
MEMORY_OBJECTS = 10_000


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


class EventLog:
    """Posts an Event only when it is new for its object (by reason and message).

    A report can also settle reasons: those of its reasons it does not carry again are
    forgotten, so they are posted anew when they come back (a reconcile knows every condition
    it checks; an admission knows only its pod's)."""

    def __init__(
        self, post: Callable[[ObjectRef, Event], None], capacity: int = MEMORY_OBJECTS
    ) -> None:
        self._post = post
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, ...], frozenset[tuple[str, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Objects whose Events are remembered."""
        return len(self._seen)

    def remember(self, uid: str, reason: str, message: str) -> None:
        """An Event posted before this process started (still kept by the API server): not
        posted again while the condition lasts."""
        with self._lock:
            key = (uid,)
            self._seen[key] = self._seen.pop(key, frozenset()) | {(reason, message)}
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)

    def report(
        self, target: ObjectRef, events: Iterable[Event], settles: Collection[str] = ()
    ) -> list[Event]:
        """Post what is new; returns what was posted."""
        key = (target.uid,) if target.uid else target.key
        events = list(dict.fromkeys(events))
        with self._lock:
            seen = self._seen.pop(key, frozenset())
            new = [e for e in events if (e.reason, e.message) not in seen]
            kept = {(reason, message) for reason, message in seen if reason not in settles}
            remembered = frozenset(kept | {(e.reason, e.message) for e in events})
            if remembered:  # objects with nothing to report take no room
                self._seen[key] = remembered
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        for event in new:
            self._post(target, event)
        return new
