"""The ConfigMaps opted-in workloads mount, kept in memory so the webhook finds Prosody's config
without an API call (that read was most of its latency).

Only the reconciler adds to it, with what it read for a workload it serves, so no tenant fills
the operator's memory with ConfigMaps nothing mounts; ConfigMap events keep what it holds
current. Past `capacity` bytes the least recently used are dropped, and the webhook reads those
from the API instead (logged once).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping

log = logging.getLogger("prosody_operator")

# Bytes of ConfigMap data kept (keys and values). A ConfigMap holds at most 1 MiB; Prosody's
# configs are a few KiB. The chart's memory limit for the operator is 256Mi.
CAPACITY_BYTES = 32 * 1024 * 1024

Key = tuple[str, str]  # namespace, name
Data = Mapping[str, str]


def _size(data: Data) -> int:
    return sum(len(key) + len(value) for key, value in data.items())


class ConfigMapCache:
    def __init__(self, capacity: int = CAPACITY_BYTES) -> None:
        self._capacity = capacity
        self._items: OrderedDict[Key, tuple[int, Data]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._full_logged = False

    def get(self, namespace: str, name: str) -> Data | None:
        with self._lock:
            found = self._items.get((namespace, name))
            if found is None:
                return None
            self._items.move_to_end((namespace, name))
            return found[1]

    def put(self, namespace: str, name: str, data: Data) -> None:
        """Keep a ConfigMap an opted-in workload mounts."""
        size = _size(data)
        with self._lock:
            self._drop((namespace, name))
            self._items[namespace, name] = (size, dict(data))
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

    def update(self, namespace: str, name: str, data: Data | None) -> None:
        """A ConfigMap changed (None: it was deleted): refresh it, if it is kept."""
        with self._lock:
            if (namespace, name) not in self._items:
                return
            if data is None:
                self._drop((namespace, name))
                return
        self.put(namespace, name, data)

    def _drop(self, key: Key) -> None:
        found = self._items.pop(key, None)
        if found is not None:
            self._bytes -= found[0]

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
