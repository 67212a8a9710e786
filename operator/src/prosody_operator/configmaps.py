"""The ConfigMaps opted-in pods mount, kept in memory so the webhook finds Prosody's config
without an API call (that read was most of its latency).

It holds only what was read for an opted-in workload or pod, so no tenant fills the operator's
memory with ConfigMaps nothing mounts; ConfigMap events keep what it holds current. A read races
those events: each read takes a ticket, which a change seen before it returns voids, so a change
wins over what the read returned. Past `capacity` bytes the least recently used are
dropped, and read from the API again when a pod needs them (logged once).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger("prosody_operator")

# Bytes of ConfigMap data kept (keys and values). A ConfigMap holds at most 1 MiB; Prosody's
# configs are a few KiB. The chart's memory limit for the operator is 256Mi.
CAPACITY_BYTES = 32 * 1024 * 1024

Key = tuple[str, str]  # namespace, name
Data = Mapping[str, str]
Reader = Callable[[set[str]], Mapping[str, Data]]  # names -> the data of those that exist


def _size(data: Data) -> int:
    return sum(len(key) + len(value) for key, value in data.items())


class ConfigMapCache:
    def __init__(self, capacity: int = CAPACITY_BYTES) -> None:
        self._capacity = capacity
        self._items: OrderedDict[Key, tuple[int, Data]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._full_logged = False
        # Reads under way -> their ticket; a change to the ConfigMap meanwhile voids it.
        self._reads: dict[Key, object] = {}

    def get(self, namespace: str, name: str) -> Data | None:
        with self._lock:
            found = self._items.get((namespace, name))
            if found is None:
                return None
            self._items.move_to_end((namespace, name))
            return found[1]

    def read_through(self, namespace: str, names: Iterable[str], read: Reader) -> dict[str, Data]:
        """The named ConfigMaps that exist: the ones kept, and the others as `read` returns them,
        which are then kept unless a change was seen during the read."""
        wanted = set(names)
        found = {}
        for name in wanted:
            data = self.get(namespace, name)
            if data is not None:
                found[name] = data
        missing = wanted - found.keys()
        if not missing:
            return found
        tickets = {name: object() for name in missing}
        with self._lock:
            for name, ticket in tickets.items():
                self._reads[namespace, name] = ticket
        read_data: Mapping[str, Data] = {}
        try:
            read_data = read(missing)
        finally:
            with self._lock:
                for name, ticket in tickets.items():
                    if self._reads.get((namespace, name)) is ticket:
                        del self._reads[namespace, name]
                        if name in read_data:
                            self._store((namespace, name), read_data[name])
        return {**found, **read_data}

    def update(self, namespace: str, name: str, data: Data | None) -> None:
        """A ConfigMap changed (None: it was deleted): refresh it, if it is kept, and void the
        reads of it under way."""
        with self._lock:
            self._reads.pop((namespace, name), None)
            if (namespace, name) not in self._items:
                return
            if data is None:
                self._drop((namespace, name))
            else:
                self._store((namespace, name), data)

    def _store(self, key: Key, data: Data) -> None:
        size = _size(data)
        self._drop(key)
        self._items[key] = (size, dict(data))
        self._bytes += size
        while self._bytes > self._capacity:
            evicted, (evicted_size, _) = self._items.popitem(last=False)
            self._bytes -= evicted_size
            if not self._full_logged:
                self._full_logged = True
                log.warning(
                    "the ConfigMap cache is full (%d bytes): the least recently used are "
                    "dropped and read from the API server when a pod needs them "
                    "(first: %s/%s)",
                    self._capacity,
                    *evicted,
                )

    def _drop(self, key: Key) -> None:
        found = self._items.pop(key, None)
        if found is not None:
            self._bytes -= found[0]

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
