"""Prosody configs evaluated outside the operator's process, bounded in time and memory, and
cached by their inputs.

A Prosody config is a program, and one Lua C call (a backtracking `string.find` pattern) can run
for hours: the evaluation's instruction limit never fires inside a C function, and a thread
cannot be stopped. So the operator never evaluates a config in its own process. A few worker
processes (`python -m prosody_operator.evaluation`, started by the operator, importing only
prosody_config and lupa) do, one config at a time each:
- **time**: an evaluation still running after its wall-clock budget is killed (SIGKILL) with its
  worker, which is replaced; the result says so, naming the file;
- **memory**: each worker caps its own address space (RLIMIT_AS) before it reads any input, so
  whatever the config allocates, in Lua or in a C function, fails past the cap instead of
  growing the operator's container (no cgroup of its own needed, so it holds in any pod);
- **cache**: results are kept per inputs (the files, env, dialect and main path: a hash of
  them), least recently used first out past `cache_size`; so a config is evaluated once per
  content, not once per pod or reconcile. A result that hit a bound is kept for
  `retry_after` seconds only (the machine may just have been busy).

Callers choose how long they wait (`Evaluations.submit` returns a Future): an admission waits a
short budget, then injects with the fallbacks; the evaluation goes on and lands in the cache for
the reconcile that follows.

Workers speak length-prefixed JSON on their stdin/stdout (not pickle: a worker runs hostile
input, and the operator must not unpickle what it sends back).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from hashlib import sha256
from typing import IO, TYPE_CHECKING, Any, Final

from .prosody_config import (
    DIALECTS,
    NOT_EVALUATED,
    Finding,
    MetricsLocation,
    StatisticsConfig,
    evaluate_prosody_config,
)

if TYPE_CHECKING:
    from .prosody import ConfigInputs

log = logging.getLogger("prosody_operator")

MAX_REPLY: Final = 1024 * 1024  # bytes: a result is a few findings (capped) and settings
MAX_QUEUED: Final = 256  # distinct evaluations waiting for a worker; more are refused (busy)
STARTUP_TIMEOUT: Final = 60.0  # seconds a new worker may take to import its modules
_HEADER: Final = 4  # bytes of the big-endian length before each message
_PR_SET_PDEATHSIG: Final = 1  # prctl(2)
_READY: Final = b"ready"  # what a worker sends once it is set up, before any request


class Busy(Exception):
    """Too many evaluations are waiting: this one was not queued (the next reconcile asks
    again)."""


@dataclass(frozen=True)
class Limits:
    timeout: float  # seconds of wall clock per evaluation
    memory_bytes: int  # address space of a worker process
    workers: int = 2
    cache_size: int = 1024  # results kept
    retry_after: float = 600.0  # seconds a result that hit a bound is kept


# --- the wire format ---------------------------------------------------------------------------


def request_of(inputs: ConfigInputs) -> dict[str, Any]:
    return {
        "files": dict(inputs.files),
        "env": dict(inputs.env),
        "main": inputs.main,
        "dialect": inputs.dialect,
        "version_known": inputs.version_known,
    }


def key_of(request: Mapping[str, Any]) -> str:
    """The cache key: a hash of everything the evaluation depends on (the inputs themselves,
    which may be megabytes of ConfigMaps, are not kept)."""
    return sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def reply_of(config: StatisticsConfig) -> dict[str, Any]:
    metrics = config.metrics
    return {
        "provider": config.provider,
        "interval": config.interval,
        "interval_source": config.interval_source,
        "modules_enabled": sorted(config.modules_enabled),
        "findings": [[f.file, f.line, f.message] for f in config.findings],
        "metrics": None
        if metrics is None
        else [metrics.address, metrics.port, metrics.path, metrics.source],
        "dialect": config.dialect,
        "unknown_options": list(config.unknown_options),
    }


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def config_of(reply: Mapping[str, Any]) -> StatisticsConfig:
    """A worker's reply, checked field by field (ValueError when it is not what a worker
    sends)."""
    interval = reply["interval"]
    if not (interval is None or interval == "manual" or type(interval) in (int, float)):
        raise ValueError(f"interval {interval!r}")
    findings = []
    for file, line, message in reply["findings"]:
        if not (line is None or type(line) is int):
            raise ValueError(f"line {line!r}")
        findings.append(Finding(_text(file), line, _text(message)))
    metrics = None
    if reply["metrics"] is not None:
        address, port, path, source = reply["metrics"]
        if type(port) is not int:
            raise ValueError(f"port {port!r}")
        metrics = MetricsLocation(_text(address), port, _text(path), _text(source))
    dialect = reply["dialect"]
    if dialect not in DIALECTS:
        raise ValueError(f"dialect {dialect!r}")
    provider = reply["provider"]
    return StatisticsConfig(
        provider=None if provider is None else _text(provider),
        interval=float(interval) if type(interval) in (int, float) else interval,
        interval_source=_text(reply["interval_source"]),
        modules_enabled=frozenset(_text(m) for m in reply["modules_enabled"]),
        findings=tuple(findings),
        metrics=metrics,
        dialect=dialect,
        unknown_options=tuple(_text(o) for o in reply["unknown_options"]),
    )


def failed(request: Mapping[str, Any], message: str) -> StatisticsConfig:
    """The result of an evaluation that did not finish: the main file, and why."""
    return StatisticsConfig(
        provider=None,
        interval=None,
        interval_source=NOT_EVALUATED,
        modules_enabled=frozenset(),
        findings=(Finding(request["main"], None, message),),
        dialect=request["dialect"],
    )


def _write(stream: IO[bytes], data: bytes) -> None:
    stream.write(len(data).to_bytes(_HEADER, "big") + data)
    stream.flush()


# --- the worker process -----------------------------------------------------------------------


def _serve(memory_bytes: int) -> None:
    """A worker: cap the address space, then evaluate requests from stdin until it closes."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Killed with the operator's thread that started it, should the operator die first.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # Should the container run out of memory all the same, its OOM killer takes a worker first.
    with open("/proc/self/oom_score_adj", "w") as oom:
        oom.write("1000")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _write(stdout, _READY)
    while header := stdin.read(_HEADER):
        request = json.loads(stdin.read(int.from_bytes(header, "big")))
        try:
            config = evaluate_prosody_config(
                request["files"],
                main=request["main"],
                env=request["env"],
                dialect=request["dialect"],
                version_known=request["version_known"],
            )
            reply = json.dumps(reply_of(config)).encode()
        except MemoryError:
            config = failed(request, _memory_message(memory_bytes))
            reply = json.dumps(reply_of(config)).encode()
        _write(stdout, reply)
        # What a big config took goes back to the system, not kept idle: the Lua state (freed
        # when its last reference goes, maybe in a cycle) and the C heap's free pages.
        gc.collect()
        libc.malloc_trim(0)


def _memory_message(memory_bytes: int) -> str:
    return (
        "the operator stopped evaluating the config: its evaluation process needed more than "
        f"{memory_bytes // (1024 * 1024)} MiB"
    )


# --- the operator's side ------------------------------------------------------------------------


class _Worker:
    """One worker process, started ahead of its first request and again after it was killed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes] | None:
        """The running worker, started if need be; None if it does not come up."""
        if self.process is not None and self.process.poll() is None:
            return self.process
        self.process = process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(self.limits.memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Nothing of the operator's environment (its API server's address, ...).
            env={"PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert process.stdout is not None
        ready = _read_message(process.stdout, time.monotonic() + STARTUP_TIMEOUT, len(_READY))
        if ready != _READY:
            log.error("a config evaluation process did not start (pid %d)", process.pid)
            self.kill()
            return None
        return process

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def evaluate(self, request: Mapping[str, Any]) -> tuple[StatisticsConfig, bool]:
        """The result, and whether it is one of a bound hit here (time or memory: worth another
        try later, the machine may have been busy)."""
        process = self.start()
        if process is None:
            return failed(request, "the operator could not start a config evaluation process"), True
        assert process.stdin is not None and process.stdout is not None
        deadline = time.monotonic() + self.limits.timeout
        try:
            _write(process.stdin, json.dumps(request).encode())
            body = _read_message(process.stdout, deadline, MAX_REPLY)
        except OSError:  # the worker died: a broken pipe
            body = None
        except _TooLarge:
            self.kill()
            return failed(request, "the operator could not evaluate the config: its result is "
                          f"larger than {MAX_REPLY} bytes"), False  # fmt: skip
        if body is None:
            return self._stopped(request, process, deadline), True
        try:
            return config_of(json.loads(body)), False
        except (ValueError, KeyError, TypeError) as error:
            self.kill()
            return failed(request, f"the operator could not evaluate the config: {error}"), False

    def _stopped(
        self, request: Mapping[str, Any], process: subprocess.Popen[bytes], deadline: float
    ) -> StatisticsConfig:
        """No reply: past the budget (kill it), or the worker died (out of memory)."""
        timed_out = process.poll() is None and time.monotonic() >= deadline
        self.kill()
        if timed_out:
            log.warning(
                "evaluating %s (Prosody %s) took longer than %gs: evaluation process %d killed",
                request["main"], request["dialect"], self.limits.timeout, process.pid,
            )  # fmt: skip
            return failed(
                request,
                f"the operator stopped evaluating the config after {self.limits.timeout:g} s: "
                "is there an endless loop, or a string pattern that never finishes? (Prosody "
                "would hang at startup too)",
            )
        log.warning(
            "config evaluation process %d ended without a result (exit status %s)",
            process.pid, process.returncode,
        )  # fmt: skip
        return failed(request, _memory_message(self.limits.memory_bytes) + " (or it crashed)")


class _TooLarge(Exception):
    pass


def _read_message(stream: IO[bytes], deadline: float, limit: int) -> bytes | None:
    """One length-prefixed message; None at end of file or past the deadline; _TooLarge past
    `limit` bytes."""
    header = _read(stream, _HEADER, deadline)
    if header is None:
        return None
    length = int.from_bytes(header, "big")
    if length > limit:
        raise _TooLarge
    return _read(stream, length, deadline)


def _read(stream: IO[bytes], length: int, deadline: float) -> bytes | None:
    """`length` bytes, or None at end of file or past the deadline."""
    chunks: list[bytes] = []
    left = length
    fd = stream.fileno()
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not poll.poll(wait * 1000):
            return None
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


@dataclass
class _Cached:
    config: StatisticsConfig
    expires: float | None  # monotonic time; None: kept until evicted


class Evaluations:
    """The pool of workers, their queue and the cache; thread-safe. Its threads: one per
    worker, started with it."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._pending: dict[str, Future[StatisticsConfig]] = {}
        self._queue: list[tuple[str, dict[str, Any]]] = []  # FIFO, under _lock
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self.evaluated = 0  # evaluations run by the workers (not answered from the cache)
        self._workers = [_Worker(limits) for _ in range(limits.workers)]
        self._threads = [
            threading.Thread(target=self._run, args=(worker,), name=f"evaluation-{n}", daemon=True)
            for n, worker in enumerate(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: ConfigInputs) -> Future[StatisticsConfig]:
        """The result for `inputs`: done at once when cached, else when a worker has it.
        Raises Busy when too many evaluations wait already."""
        request = request_of(inputs)
        key = key_of(request)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and (cached.expires is None or cached.expires > self._clock()):
                self._cache.move_to_end(key)
                future: Future[StatisticsConfig] = Future()
                future.set_result(cached.config)
                return future
            if key in self._pending:
                return self._pending[key]
            if len(self._queue) >= MAX_QUEUED:
                raise Busy(f"{len(self._queue)} config evaluations are waiting already")
            future = self._pending[key] = Future()
            self._queue.append((key, request))
            self._ready.notify()
            return future

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def pids(self) -> list[int]:
        """The worker processes running now."""
        return [w.process.pid for w in self._workers if w.process and w.process.poll() is None]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _run(self, worker: _Worker) -> None:
        # Here, not at the top: the workers import this module, and need no metrics.
        from . import metrics

        worker.start()  # ahead of the first request: a budget is for evaluating, not importing
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    worker.kill()
                    return
                key, request = self._queue.pop(0)
            started = time.perf_counter()
            try:
                config, bounded = worker.evaluate(request)
            except Exception as error:  # never leave a caller waiting
                log.exception("config evaluation failed")
                worker.kill()
                message = f"the operator could not evaluate the config: {error}"
                config, bounded = failed(request, message), True
            outcome = "error" if bounded else "problems" if config.findings else "ok"
            metrics.record_evaluation(outcome, time.perf_counter() - started)
            if bounded:
                worker.start()  # a fresh one, ready for the next request
            self._done(key, config, bounded)

    def _done(self, key: str, config: StatisticsConfig, bounded: bool) -> None:
        with self._lock:
            self.evaluated += 1
            expires = self._clock() + self.limits.retry_after if bounded else None
            self._cache[key] = _Cached(config, expires)
            self._cache.move_to_end(key)
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
            future = self._pending.pop(key)
        future.set_result(config)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
