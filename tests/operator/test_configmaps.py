"""The ConfigMaps kept for the webhook: only what the reconciler put there, within a byte cap."""

from __future__ import annotations

import logging

import pytest

from prosody_operator.configmaps import ConfigMapCache


def config(kib: int) -> dict[str, str]:
    return {"prosody.cfg.lua": "-" * (kib * 1024 - len("prosody.cfg.lua"))}


def test_only_what_was_put_is_kept_and_events_refresh_it():
    cache = ConfigMapCache()
    cache.update("chat", "unrelated", config(1))  # a ConfigMap event for one nothing mounts
    assert len(cache) == 0 and cache.get("chat", "unrelated") is None
    cache.put("chat", "prosody", {"prosody.cfg.lua": "statistics_interval = 45"})
    cache.update("chat", "prosody", {"prosody.cfg.lua": "statistics_interval = 90"})
    assert cache.get("chat", "prosody") == {"prosody.cfg.lua": "statistics_interval = 90"}
    cache.update("chat", "prosody", None)  # deleted
    assert cache.get("chat", "prosody") is None and cache.bytes == 0


def test_past_the_cap_the_least_recently_used_go_and_it_says_so_once(
    caplog: pytest.LogCaptureFixture,
):
    cache = ConfigMapCache(capacity=10 * 1024)
    with caplog.at_level(logging.WARNING, logger="prosody_operator"):
        for n in range(4):
            cache.put("chat", f"c{n}", config(3))
        cache.get("chat", "c1")  # used: kept
        cache.put("chat", "c4", config(3))
    assert cache.bytes <= 10 * 1024
    assert [n for n in range(5) if cache.get("chat", f"c{n}")] == [1, 3, 4]
    full = [r.getMessage() for r in caplog.records if "cache is full" in r.getMessage()]
    assert len(full) == 1 and "read from the API server" in full[0], full
