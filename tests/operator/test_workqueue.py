"""The reconcile queue (workqueue.py): each key queued once, never processed by two workers at
once, held while paused, retried after a failure; its real worker threads, no API."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from prosody_operator import handlers, workqueue
from prosody_operator.workqueue import WorkQueue
from testinfra.procs import wait_until

WAIT = 10.0  # generous: the workers are threads of a busy machine


class Recorder:
    """A `process` that records (key, item) calls and how many ran at once; a key in `hold`
    waits for `release` to be set."""

    def __init__(self, hold: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self.hold = hold
        self.holding = threading.Event()
        self.release = threading.Event()
        self.running: dict[Any, int] = {}
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self, key: Any, item: Any) -> None:
        with self._lock:
            self.running[key] = self.running.get(key, 0) + 1
            self.overlapped |= self.running[key] > 1
            self.calls.append((key, item))
        try:
            if key in self.hold:
                self.holding.set()
                assert self.release.wait(WAIT)
        finally:
            with self._lock:
                self.running[key] -= 1

    def count(self, key: Any) -> int:
        with self._lock:
            return sum(1 for called, _ in self.calls if called == key)


@pytest.fixture
def queues() -> Iterator[list[WorkQueue]]:
    """Queues a test made; stopped afterwards."""
    made: list[WorkQueue] = []
    yield made
    for queue in made:
        queue.resume()  # a held key's worker must be able to finish
        queue.stop()


def new_queue(queues: list[WorkQueue], process: Any, workers: int = 2) -> WorkQueue:
    queue = WorkQueue(process, workers, name=f"test-queue-{len(queues)}")
    queues.append(queue)
    return queue


def test_a_key_added_many_times_is_processed_once_with_its_latest_item(queues):
    recorder = Recorder()
    queue = new_queue(queues, recorder)
    queue.resume()  # active, no workers yet: the adds pile up
    queue.add("chat/xmpp", {"generation": 1})
    queue.add("chat/xmpp", {"generation": 2})
    queue.add("chat/xmpp")  # "look again": the item already queued stays
    queue.add("chat/other", {"generation": 1})
    assert len(queue) == 2
    queue.start()
    wait_until(lambda: len(recorder.calls) == 2 and len(queue) == 0, WAIT, "the two keys")
    assert sorted(recorder.calls, key=str) == [
        ("chat/other", {"generation": 1}),
        ("chat/xmpp", {"generation": 2}),
    ]


def test_a_key_added_while_processed_runs_again_once_and_never_twice_at_once(queues):
    recorder = Recorder(hold=frozenset({"chat/xmpp"}))
    queue = new_queue(queues, recorder, workers=4)
    queue.start()
    queue.resume()
    queue.add("chat/xmpp", "first")
    assert recorder.holding.wait(WAIT)
    for n in range(5):  # a storm of events while the first reconcile runs
        queue.add("chat/xmpp", f"event {n}")
    queue.add("chat/other")  # other keys go on meanwhile
    wait_until(lambda: recorder.count("chat/other") == 1, WAIT, "the other key")
    assert recorder.count("chat/xmpp") == 1  # the idle workers did not take it
    recorder.release.set()
    wait_until(lambda: recorder.count("chat/xmpp") == 2 and len(queue) == 0, WAIT, "the rerun")
    queue.stop()  # all workers done: nothing more could run
    assert [item for key, item in recorder.calls if key == "chat/xmpp"] == ["first", "event 4"]
    assert not recorder.overlapped


def test_paused_it_keeps_keys_without_items_and_processes_them_on_resume(queues):
    recorder = Recorder()
    queue = new_queue(queues, recorder)
    queue.start()
    queue.resume()
    queue.pause()
    queue.add("chat/xmpp", {"stale": "by the time this replica leads"})
    queue.add("chat/xmpp")
    assert len(queue) == 1
    assert recorder.calls == []
    queue.resume()
    wait_until(lambda: len(recorder.calls) == 1, WAIT, "the key after resume")
    assert recorder.calls == [("chat/xmpp", None)]  # the item was not kept while paused


def test_pausing_drops_queued_items_and_lets_a_running_key_finish(queues):
    recorder = Recorder(hold=frozenset({"chat/running"}))
    queue = new_queue(queues, recorder, workers=1)
    queue.start()
    queue.resume()
    queue.add("chat/running", "item")
    assert recorder.holding.wait(WAIT)
    queue.add("chat/queued", "item")  # the one worker is busy: it stays queued
    queue.pause()
    recorder.release.set()
    wait_until(lambda: recorder.running.get("chat/running") == 0, WAIT, "the running key")
    assert recorder.count("chat/queued") == 0 and len(queue) == 1
    queue.resume()
    wait_until(lambda: recorder.count("chat/queued") == 1, WAIT, "the queued key")
    assert recorder.calls[-1] == ("chat/queued", None)


def test_discarded_keys_are_not_processed(queues):
    recorder = Recorder()
    queue = new_queue(queues, recorder)
    queue.resume()
    queue.add("chat/gone", "item")
    queue.add("chat/kept", "item")
    queue.discard("chat/gone")
    queue.start()
    wait_until(lambda: len(recorder.calls) == 1, WAIT, "the kept key")
    queue.stop()
    assert recorder.calls == [("chat/kept", "item")]


def test_stop_ends_the_workers_and_processes_nothing_more(queues):
    recorder = Recorder()
    queue = new_queue(queues, recorder, workers=3)
    queue.start()
    queue.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("test-queue-0-")]
    queue.resume()
    queue.add("chat/xmpp")
    assert len(queue) == 1 and recorder.calls == []  # queued, and nobody takes it


def test_stopping_reconciles_releases_the_lease_after_the_reconcile_under_way(queues):
    """SIGTERM (handlers.stop_reconciling): the workers finish what they process before the
    Lease is released, so the replica taking over never reconciles a workload this one still
    writes. The elector is a stand-in recording when it was stopped (the real one, against the
    API server: test_high_availability.py)."""
    recorder = Recorder(hold=frozenset({"chat/xmpp"}))
    queue = new_queue(queues, recorder)
    queue.start()
    queue.resume()
    queue.add("chat/xmpp")
    assert recorder.holding.wait(WAIT)
    released: list[bool] = []  # whether the reconcile was still running at the release

    class Elector:
        def stop(self) -> None:
            released.append(recorder.running.get("chat/xmpp", 0) > 0)

    stopping = threading.Thread(
        target=handlers.stop_reconciling, args=(kopf.Memo(queue=queue, elector=Elector()),)
    )
    stopping.start()
    threading.Timer(0.3, recorder.release.set).start()
    stopping.join(WAIT)
    assert released == [False]


def test_stop_waits_for_the_workers_at_most_its_timeout_in_all(queues):
    recorders = Recorder(hold=frozenset({"a", "b", "c"}))
    queue = new_queue(queues, recorders, workers=3)
    queue.start()
    queue.resume()
    for key in ("a", "b", "c"):
        queue.add(key)
    wait_until(lambda: sum(recorders.running.values()) == 3, WAIT, "three keys processed at once")
    started = time.monotonic()
    queue.stop(timeout=0.5)
    assert time.monotonic() - started < 1.4  # not 0.5 s for each of the three workers
    recorders.release.set()


def test_a_failing_key_is_retried_until_it_succeeds(queues, monkeypatch):
    monkeypatch.setattr(workqueue, "RETRY_FIRST", 0.01)
    outcomes = iter([RuntimeError("API down"), RuntimeError("still down"), None])
    calls: list[str] = []

    def process(key: str, item: Any) -> None:
        calls.append(key)
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    queue = new_queue(queues, process, workers=1)
    queue.start()
    queue.resume()
    queue.add("chat/xmpp")
    wait_until(lambda: len(calls) == 3, WAIT, "two retries, then success")
    queue.stop()
    assert calls == ["chat/xmpp"] * 3  # no retry after the success
