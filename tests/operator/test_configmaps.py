"""The ConfigMaps kept for the webhook: only what was read for opted-in pods and workloads, kept
current by ConfigMap events, within a byte cap."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest

from prosody_operator.configmaps import ConfigMapCache, Data


def config(kib: int) -> dict[str, str]:
    return {"prosody.cfg.lua": "-" * (kib * 1024 - len("prosody.cfg.lua"))}


class Api:
    """The API server's ConfigMaps of one namespace, with the reads counted."""

    def __init__(self, **stored: Data) -> None:
        self.stored = dict(stored)
        self.reads: list[set[str]] = []

    def read(self, names: set[str]) -> Mapping[str, Data]:
        self.reads.append(set(names))
        return {name: self.stored[name] for name in names if name in self.stored}


def test_what_was_read_is_kept_and_events_refresh_it():
    cache, api = ConfigMapCache(), Api(prosody={"prosody.cfg.lua": "statistics_interval = 45"})
    cache.update("chat", "unrelated", config(1))  # a ConfigMap event for one nothing mounts
    assert len(cache) == 0 and cache.get("chat", "unrelated") is None
    assert cache.read_through("chat", {"prosody", "absent"}, api.read) == {
        "prosody": {"prosody.cfg.lua": "statistics_interval = 45"}
    }
    assert cache.read_through("chat", {"prosody"}, api.read) == {
        "prosody": {"prosody.cfg.lua": "statistics_interval = 45"}
    }
    assert api.reads == [{"prosody", "absent"}]  # the second came from memory
    cache.update("chat", "prosody", {"prosody.cfg.lua": "statistics_interval = 90"})
    assert cache.get("chat", "prosody") == {"prosody.cfg.lua": "statistics_interval = 90"}
    cache.update("chat", "prosody", None)  # deleted
    assert cache.get("chat", "prosody") is None and cache.bytes == 0


def test_a_change_seen_during_a_read_wins_over_what_the_read_returned():
    cache = ConfigMapCache()

    def read_then_changed(names: set[str]) -> Mapping[str, Data]:
        # The API server answered with the old data; its change event arrives before the reply.
        cache.update("chat", "prosody", {"prosody.cfg.lua": "statistics_interval = 90"})
        return {"prosody": {"prosody.cfg.lua": "statistics_interval = 45"}}

    found = cache.read_through("chat", {"prosody"}, read_then_changed)
    assert found == {"prosody": {"prosody.cfg.lua": "statistics_interval = 45"}}  # this caller's
    assert cache.get("chat", "prosody") is None  # not kept: the next pod reads it again
    assert cache.read_through("chat", {"prosody"}, Api(prosody=config(1)).read) == {
        "prosody": config(1)
    }


def test_a_failed_read_keeps_nothing_and_leaves_nothing_behind():
    cache = ConfigMapCache()

    def failing(names: set[str]) -> Mapping[str, Data]:
        raise ConnectionError("the API server went away")

    with pytest.raises(ConnectionError):
        cache.read_through("chat", {"prosody"}, failing)
    assert len(cache) == 0 and not cache._reads


def test_past_the_cap_the_least_recently_used_go_and_it_says_so_once(
    caplog: pytest.LogCaptureFixture,
):
    cache = ConfigMapCache(capacity=10 * 1024)
    api = Api(**{f"c{n}": config(3) for n in range(5)})
    with caplog.at_level(logging.WARNING, logger="prosody_operator"):
        for n in range(4):
            cache.read_through("chat", {f"c{n}"}, api.read)
        cache.get("chat", "c1")  # used: kept
        cache.read_through("chat", {"c4"}, api.read)
    assert cache.bytes <= 10 * 1024
    assert [n for n in range(5) if cache.get("chat", f"c{n}")] == [1, 3, 4]
    full = [r.getMessage() for r in caplog.records if "cache is full" in r.getMessage()]
    assert len(full) == 1 and "read from the API server" in full[0], full
