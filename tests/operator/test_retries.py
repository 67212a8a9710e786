"""Retries of reconciles that failed for a reason that passes (retries.py)."""

from __future__ import annotations

import threading

from prosody_operator.retries import Retries
from testinfra.procs import wait_until


def test_one_pending_retry_per_key_with_growing_delays():
    ran: list[str] = []
    done = threading.Event()
    retries = Retries(delays=(0.05, 0.1, 0.2))

    def again() -> None:
        ran.append("xmpp")
        done.set()

    assert retries.failed("xmpp", again) == 0.05
    assert retries.failed("xmpp", again) == 0.1  # still pending: not a second timer
    assert retries.failed("xmpp", again) == 0.2
    assert retries.failed("xmpp", again) == 0.2  # the last delay, from then on
    assert len(retries) == 1
    assert done.wait(10)
    wait_until(lambda: len(retries) == 0, 10, "the retry to finish")
    assert ran == ["xmpp"]
    retries.succeeded("xmpp")
    assert retries.failed("xmpp", lambda: None) == 0.05  # a success starts over
