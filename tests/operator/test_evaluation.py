"""Configs evaluated out of the operator's process (evaluation.py): each bound — time, memory,
cache size — with a config that needs it, against the real worker processes.

The config that never finishes is a backtracking `string.find`: one Lua C call, which the
instruction limit cannot stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from types import SimpleNamespace

import pytest

from prosody_operator import evaluation
from prosody_operator.controller import Controller
from prosody_operator.evaluation import Busy, Evaluations, Limits
from prosody_operator.prosody import ConfigInputs
from prosody_operator.prosody_config import DIALECTS, StatisticsConfig
from prosody_operator.settings import OperatorSettings
from testinfra.procs import wait_until

MAIN = "prosody.cfg.lua"
CONFIG = 'modules_enabled = { "http_openmetrics" }\nstatistics_interval = 45\n'
NEVER_ENDS = CONFIG + 'string.find(string.rep("a", 40), string.rep("a*", 40) .. "b")\n'
# 30 MB in Lua (under its own 64 MiB limit), and copies of it on the Python side: ~120 MiB.
BIG_STRING = 'statistics = string.rep("x", 30e6)\n'
MiB = 1024 * 1024
# Generous: a result comes within the budget plus a worker's restart. A bound that does not
# hold fails the test here instead of hanging it.
RESULT_TIMEOUT = 60.0


def inputs(text: str, dialect: str = "0.12") -> ConfigInputs:
    return ConfigInputs(((MAIN, text),), (), dialect=dialect)  # type: ignore[arg-type]


@pytest.fixture
def pool(request: pytest.FixtureRequest) -> Iterator[Evaluations]:
    limits = getattr(request, "param", Limits(timeout=1.0, memory_bytes=128 * MiB, workers=1))
    evaluations = Evaluations(limits)
    yield evaluations
    evaluations.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_config_evaluates_in_a_worker(pool: Evaluations):
    config = pool.submit(inputs(CONFIG)).result(RESULT_TIMEOUT)
    assert (config.interval, config.interval_source) == (45.0, "prosody.cfg.lua:2")
    assert config.metrics is not None and config.metrics.port == 5280
    thirteen = pool.submit(inputs("statistics_interval = Lua.tonumber('30')\n", "13"))
    assert thirteen.result(RESULT_TIMEOUT).interval == 30.0


def test_an_evaluation_past_its_budget_is_killed_with_its_worker(pool: Evaluations):
    wait_until(lambda: bool(pool.pids()), RESULT_TIMEOUT, "the worker to start")
    [worker] = pool.pids()
    config = pool.submit(inputs(NEVER_ENDS)).result(RESULT_TIMEOUT)
    [finding] = config.findings
    assert finding.file == MAIN
    assert "stopped evaluating the config after 1 s" in finding.message
    assert config.interval is None
    assert not alive(worker)  # killed, and reaped
    # A fresh worker evaluates the next config.
    assert pool.submit(inputs(CONFIG)).result(RESULT_TIMEOUT).interval == 45.0
    assert pool.pids() and pool.pids() != [worker]


@pytest.mark.parametrize(
    "pool", [Limits(timeout=30.0, memory_bytes=96 * MiB, workers=1)], indirect=True
)
def test_a_worker_past_its_memory_cap_fails_the_evaluation_not_the_operator(pool: Evaluations):
    """Lua's own limit (64 MiB) does not bound what Python makes of a big value: the worker's
    address-space cap does."""
    config = pool.submit(inputs(BIG_STRING)).result(RESULT_TIMEOUT)
    assert [f.message for f in config.findings] == [
        "the operator stopped evaluating the config: it needed more memory than an evaluation "
        "may use"
    ]
    assert pool.submit(inputs(CONFIG)).result(RESULT_TIMEOUT).interval == 45.0


def test_the_same_config_without_the_cap_takes_that_memory():
    """The other side of the test above: with room, the same config evaluates (so it is the
    cap that stopped it)."""
    roomy = Evaluations(Limits(timeout=30.0, memory_bytes=1024 * MiB, workers=1))
    try:
        config = roomy.submit(inputs(BIG_STRING)).result(RESULT_TIMEOUT)
    finally:
        roomy.close()
    assert 'statistics = "xxxx' in config.findings[0].message
    assert len(config.findings[0].message) <= 512  # and what it reports stays small


@pytest.mark.parametrize(
    "pool", [Limits(timeout=10.0, memory_bytes=128 * MiB, workers=1, cache_size=3)], indirect=True
)
def test_the_cache_keeps_the_last_results_only(pool: Evaluations):
    configs = [CONFIG + f"-- {n}\n" for n in range(5)]
    for text in configs:
        pool.submit(inputs(text)).result(RESULT_TIMEOUT)
    assert (pool.evaluated, pool.cached()) == (5, 3)
    pool.submit(inputs(configs[-1])).result(RESULT_TIMEOUT)  # kept
    assert pool.evaluated == 5
    pool.submit(inputs(configs[0])).result(RESULT_TIMEOUT)  # forgotten: evaluated again
    assert (pool.evaluated, pool.cached()) == (6, 3)
    # The dialect is part of the inputs.
    pool.submit(inputs(configs[0], "13")).result(RESULT_TIMEOUT)
    assert pool.evaluated == 7


def test_many_callers_of_one_config_share_one_evaluation(pool: Evaluations):
    futures = []

    def submit() -> None:
        futures.append(pool.submit(inputs(NEVER_ENDS)))

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = {id(f.result(RESULT_TIMEOUT)) for f in futures}
    assert len(results) == 1 and pool.evaluated == 1


def test_a_result_that_hit_the_budget_is_tried_again_later():
    """The machine may have been busy: unlike a config's own errors, a timeout is kept for
    `retry_after` seconds only."""
    now = [0.0]
    limits = Limits(timeout=0.5, memory_bytes=128 * MiB, workers=1, retry_after=600.0)
    pool = Evaluations(limits, clock=lambda: now[0])
    try:
        for config in (NEVER_ENDS, CONFIG):
            pool.submit(inputs(config)).result(RESULT_TIMEOUT)
            pool.submit(inputs(config)).result(RESULT_TIMEOUT)
        assert pool.evaluated == 2
        now[0] = 601.0
        pool.submit(inputs(NEVER_ENDS)).result(RESULT_TIMEOUT)
        pool.submit(inputs(CONFIG)).result(RESULT_TIMEOUT)
        assert pool.evaluated == 3  # the timeout again, not the config that evaluated
    finally:
        pool.close()


def test_too_many_waiting_evaluations_are_refused(pool: Evaluations, monkeypatch):
    monkeypatch.setattr(evaluation, "MAX_QUEUED", 2)
    running = pool.submit(inputs(NEVER_ENDS))
    wait_until(lambda: not pool._queue, RESULT_TIMEOUT, "the worker to take the first one")
    waiting = [pool.submit(inputs(CONFIG + f"-- {n}\n")) for n in range(2)]
    with pytest.raises(Busy):
        pool.submit(inputs(CONFIG + "-- one too many\n"))
    assert running.result(RESULT_TIMEOUT).interval is None
    assert [w.result(RESULT_TIMEOUT).interval for w in waiting] == [45.0, 45.0]


OPERATOR = textwrap.dedent(
    """
    import sys
    from prosody_operator.evaluation import Evaluations, Limits
    from prosody_operator.prosody import ConfigInputs
    pool = Evaluations(Limits(timeout=3600.0, memory_bytes=128 * 1024 * 1024, workers=1))
    config = 'string.find(string.rep("a", 40), string.rep("a*", 40) .. "b")'
    pool.submit(ConfigInputs((("prosody.cfg.lua", config),), ()))
    while not pool.pids():
        pass
    print(pool.pids()[0], flush=True)
    sys.stdin.read()
    """
)


def test_workers_die_with_the_operator():
    """An operator killed mid-evaluation leaves no worker spinning (each worker asks the kernel
    for SIGKILL when the operator's thread that started it ends)."""
    operator = subprocess.Popen(
        [sys.executable, "-c", OPERATOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert operator.stdout is not None
    worker = int(operator.stdout.readline())
    assert alive(worker)
    operator.send_signal(signal.SIGKILL)
    operator.wait()
    wait_until(lambda: not alive(worker), RESULT_TIMEOUT, f"worker {worker} to die")


def test_a_caller_waits_its_budget_in_all_then_falls_back(pool: Evaluations):
    """What admission does: at most its wait for every dialect together, then None (the
    fallbacks); the evaluation goes on, and its result is there for the next caller. The
    evaluator makes no API call, so the Controller gets a stand-in for Kube (nothing to reach)."""
    controller = Controller(OperatorSettings(), SimpleNamespace(post_event=None), pool)  # type: ignore[arg-type]
    waiting: list[Future[StatisticsConfig]] = []
    unknown = replace(inputs(NEVER_ENDS), version_known=False)
    evaluate = controller.evaluator(0.2, waiting)
    first, second = (replace(unknown, dialect=d) for d in DIALECTS)
    assert evaluate(first) is None
    assert len(pool._pending) == 2  # both dialects queued at once, not one after the other
    assert evaluate(second) is None
    assert len(waiting) == 2
    for future in waiting:
        assert "stopped evaluating" in future.result(RESULT_TIMEOUT).findings[0].message
    assert pool.evaluated == 2
    again = controller.evaluator(0.0, [])(unknown)
    assert again is not None and again.interval is None
