"""Benchmark: the prosody-exporter sidecar against Prosody scraped directly and against nginx.

`make bench-exporter` runs it (`python -m bench.exporter [--duration S] [--interval S] ...`).
Everything is real and on 127.0.0.1: Debian's Prosody 0.12 (testinfra/prosody.py), the installed
`prosody-exporter` (testinfra/exporter.py), Debian's nginx as the sidecar a user could deploy
instead (bench/nginx.py: allow/deny, a 5 s cache with proxy_cache_lock, X-Forwarded-For cleared)
and `wrk` as the load generator (C, one thread, so the client leaves the servers as much CPU as
it can). Every target gets the headers Prometheus sends.

1. Throughput and latency (wrk, 1/10/50 connections, each run bounded by --duration and
   MAX_REQUESTS) of Prosody direct, nginx and the sidecar, back to back, for four payloads all
   served by a real Prosody: the stock test config (~3 KB) and 26 VirtualHosts each with a MUC
   and an HTTP file share component (~100 KB, per-host series), each with `statistics_interval`
   60 (Prosody serves a cached collection) and "manual" (every request to Prosody runs a
   collection: the mode the sidecar exists for).
2. Collections and the tail: the ~100 KB manual payload at 50 connections with the sidecar run
   under bench/stallprobe.py, once with no collection during the run (interval 600 s) and once
   collecting every --interval: requests/s, p50/p99, event-loop lag and garbage-collection pauses.
3. Prosody collections per sidecar interval with k = 1 and 5 scrapers (every SCRAPE_PERIOD s),
   direct vs through the sidecar, read from `prosody_stats_collection_seconds_count`.
4. Memory: idle RSS of the sidecar and of nginx (master and workers) after a few scrapes; the
   sidecar's VmRSS/VmHWM after each payload's runs; each dependency's share (RSS of a fresh
   interpreter importing the serving modules one by one).
5. Attacks (testinfra/hostile.py, and the stand-in for what a real Prosody cannot send): a fresh
   sidecar per attack, its peak RSS (VmHWM) after it, and what the sidecar did. The worst peak
   x 1.5, rounded up to a MiB, is the memory limit the measurements call for.

Results go to stdout as tables and to .cache/results/bench-exporter.json, whose keys are:

- machine: cpus (usable cores), cpu_model, python, prosody, nginx, wrk (package versions),
  loadavg_start and loadavg_end (1/5/15 min: other work on the machine makes the numbers noisy).
- settings: duration_s, warmup_s, max_requests, connections, sidecar_interval_s, window_s,
  scrape_period_s, scrapers (the k values), accept, accept_encoding.
- payloads: one object per payload: name, source, statistics_interval (60 or "manual"),
  virtual_hosts, body_bytes {direct, nginx, sidecar_identity, sidecar_gzip} (one response
  each), sidecar_memory_kib {VmRSS, VmHWM}, and runs: one object per connection count with
  connections, direct, nginx and sidecar (each {requests_per_s, p50_ms, p99_ms, requests,
  errors, duration_s, bytes_per_response}), rps_ratio and p99_ratio (sidecar / direct),
  rps_vs_nginx and p99_vs_nginx (sidecar / nginx).
- tail: one object per sidecar interval: interval_s, load (as above), collections (during the
  run), loop_lag_ms {p50, p99, max}, gc {generation: {count, total_ms, max_ms}}.
- collections: one object per (target, k): target ("direct" or "sidecar"), scrapers (k),
  window_s, collections (Prosody's count during the window), per_interval (collections per
  sidecar interval), expected ([low, high]: sidecar, the ticks a window that long holds, i.e.
  exactly one per interval; direct, one per successful scrape), scrapes_ok, scrapes_failed.
- memory: idle_kib {sidecar, nginx} (VmRSS; nginx summed over its processes), imports: list of
  {module, rss_kib, added_kib}.
- attacks: name, detail, connections, outcome (what the sidecar did), peak_kib (VmHWM),
  rss_after_kib; memory_limit: {worst_peak_kib, recommended_mi, default_mi (the operator's
  sidecar_memory_limit)}.
- targets: name, goal, measured (text), passed (bool).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.nginx import NginxSidecar
from bench.report import (
    format_table,
    memory_kib,
    percentile,
    target,
    targets_table,
    write_results,
)
from bench.report import machine as machine_basics
from prosody_exporter.settings import Settings as ExporterSettings
from testinfra import hostile
from testinfra.exporter import ExporterProcess, default_memory_limit_mib
from testinfra.layout import CACHE_DIR
from testinfra.procs import MissingPrerequisite, require_program
from testinfra.prosody import ProsodyServer
from testinfra.standin import (
    PROSODY_LIKE_LINE,
    SHORT_LINE,
    Answer,
    StandInProsody,
    exposition_of,
    gzip_bomb,
)

WORKDIR = CACHE_DIR / "bench-exporter"

# What Prometheus 2.x/3.x sends when scraping (scrape_protocols default, compression on).
ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_HEADERS = {"Accept": ACCEPT, "Accept-Encoding": "gzip"}

CONNECTIONS = (1, 10, 50)
SCRAPERS = (1, 5)
SCRAPE_PERIOD = 0.2  # seconds between one scraper's scrapes in part 3
MAX_REQUESTS = 300_000  # per wrk run, on top of its time limit
LARGE_HOSTS = 26  # VirtualHosts (each with a MUC and an upload component) for ~100 KB
NO_COLLECTION_INTERVAL = 600.0  # a sidecar interval no run lasts

# Targets the sidecar is held to (issue 15: ratios to nginx in the same run, on 2 cores).
MIN_RPS_RATIO = 2.0  # sidecar / direct, every run
MIN_RPS_VS_NGINX = 0.7  # at 50 connections
MAX_P99_VS_NGINX = 3.0  # at 50 connections
MAX_IDLE_RSS_MIB = 45.0
MEMORY_LIMIT_FACTOR = 1.5  # default memory limit >= worst attack peak x this

WRK_SCRIPT = """
wrk.method = "GET"
wrk.headers["Accept"] = "{accept}"
wrk.headers["Accept-Encoding"] = "gzip"
local max_requests = {max_requests}
local sent = 0
local req = nil

function init(args)
  req = wrk.format()
end

function request()
  sent = sent + 1
  if sent > max_requests then
    wrk.thread:stop()
  end
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"p50_us\\":%d," ..
    "\\"p99_us\\":%d,\\"errors\\":%d}}\\n",
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


@dataclass(frozen=True)
class Payload:
    name: str
    statistics_interval: str | int
    virtual_hosts: int  # extra VirtualHosts beyond "localhost"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


PAYLOADS = (
    Payload("3 KB, interval 60", 60, 0),
    Payload("3 KB, manual", "manual", 0),
    Payload("100 KB, interval 60", 60, LARGE_HOSTS),
    Payload("100 KB, manual", "manual", LARGE_HOSTS),
)


@dataclass(frozen=True)
class Load:
    """One wrk run's figures."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    duration_s: float
    bytes_per_response: float


# --- load generation -------------------------------------------------------------------------


def write_wrk_script(workdir: Path) -> Path:
    path = workdir / "prometheus-headers.lua"
    path.write_text(WRK_SCRIPT.format(accept=ACCEPT, max_requests=MAX_REQUESTS))
    return path


def run_wrk(url: str, connections: int, duration: int, script: Path) -> Load:
    argv = [
        "wrk",
        "--threads=1",
        f"--connections={connections}",
        f"--duration={duration}s",
        "--timeout=10s",  # Prometheus' default scrape_timeout
        f"--script={script}",
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH-JSON ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(lines[-1].removeprefix("BENCH-JSON "))
    seconds = raw["duration_us"] / 1e6
    return Load(
        requests_per_s=raw["requests"] / seconds,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=raw["requests"],
        errors=raw["errors"],
        duration_s=seconds,
        bytes_per_response=raw["bytes"] / max(1, raw["requests"]),
    )


# --- servers ---------------------------------------------------------------------------------


def extra_hosts(count: int) -> str:
    """VirtualHosts whose components add per-host series (MUC rooms, upload histograms)."""
    return "".join(
        f'VirtualHost "h{i}.bench"\n'
        f'Component "muc.h{i}.bench" "muc"\n'
        f'Component "upload.h{i}.bench" "http_file_share"\n'
        for i in range(count)
    )


@contextlib.contextmanager
def prosody(workdir: Path, interval: str | int, hosts: int = 0) -> Iterator[ProsodyServer]:
    server = ProsodyServer(workdir, statistics_interval=interval, extra_global=extra_hosts(hosts))
    try:
        yield server.start(timeout=120)
    finally:
        server.stop()


@contextlib.contextmanager
def sidecar(
    workdir: Path,
    upstream_url: str,
    interval: float,
    settings: dict[str, str] | None = None,
    command: list[str] | None = None,
    wait_for_ready: bool = True,
) -> Iterator[ExporterProcess]:
    exporter = ExporterProcess(
        workdir, upstream_url, interval=interval, settings=settings or {}, command=command
    )
    try:
        yield exporter.start(wait_for_ready=wait_for_ready, timeout=60)
    finally:
        exporter.stop()


@contextlib.contextmanager
def nginx(workdir: Path, upstream_url: str) -> Iterator[NginxSidecar]:
    server = NginxSidecar(workdir, upstream_url)
    try:
        yield server.start()
    finally:
        server.stop()


def pid_of(exporter: ExporterProcess) -> int:
    assert exporter.process is not None
    return exporter.process.popen.pid


def body_sizes(direct_url: str, nginx_url: str, sidecar_url: str) -> dict[str, int]:
    with httpx.Client(headers=PROMETHEUS_HEADERS, trust_env=False, timeout=10) as client:
        direct = client.get(direct_url)
        proxied = client.get(nginx_url)
        gzipped = client.get(sidecar_url)
        identity = client.get(sidecar_url, headers={"Accept-Encoding": "identity"})
    for response in (direct, proxied, gzipped, identity):
        response.raise_for_status()
    return {
        "direct": len(direct.content),
        "nginx": proxied.num_bytes_downloaded,
        "sidecar_identity": len(identity.content),
        "sidecar_gzip": gzipped.num_bytes_downloaded,
    }


# --- part 1: throughput and latency ----------------------------------------------------------


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline; None when the baseline has no figure (no request completed)."""
    return value / baseline if baseline else None


def ratio_ok(value: float | None) -> bool:
    return value is None or value >= MIN_RPS_RATIO


def show_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def drain(prosody_url: str) -> None:
    """Wait until Prosody has answered what a run left queued: it answers requests one at a time,
    also those whose client is gone, and nginx's next cache refresh would wait behind them."""
    httpx.get(prosody_url, headers=PROMETHEUS_HEADERS, trust_env=False, timeout=120)


def compare(urls: dict[str, str], connections: int, args: argparse.Namespace) -> dict[str, Any]:
    """Direct, nginx and the sidecar back to back, so all see the same background load."""
    loads = {}
    for name, url in urls.items():
        loads[name] = run_wrk(url, connections, args.duration, args.script)
        drain(urls["direct"])
    d, n, s = loads["direct"], loads["nginx"], loads["sidecar"]
    return {
        "connections": connections,
        **{name: asdict(load) for name, load in loads.items()},
        "rps_ratio": ratio(s.requests_per_s, d.requests_per_s),
        "p99_ratio": ratio(s.p99_ms, d.p99_ms),
        "rps_vs_nginx": ratio(s.requests_per_s, n.requests_per_s),
        "p99_vs_nginx": ratio(s.p99_ms, n.p99_ms),
    }


def describe_source(payload: Payload) -> str:
    if not payload.virtual_hosts:
        return "real Prosody, test config (1 VirtualHost)"
    return (
        f"real Prosody, {payload.virtual_hosts + 1} VirtualHosts"
        f" ({payload.virtual_hosts} with MUC + HTTP upload components)"
    )


def bench_payload(payload: Payload, args: argparse.Namespace) -> dict[str, Any]:
    workdir = WORKDIR / payload.slug
    hosts = payload.virtual_hosts
    print(f"  {payload.name}: {describe_source(payload)}, nginx and the sidecar", flush=True)
    with (
        prosody(workdir / "prosody", payload.statistics_interval, hosts) as server,
        nginx(workdir / "nginx", server.metrics_url) as proxy,
        sidecar(workdir, server.metrics_url, args.interval) as exporter,
    ):
        urls = {
            "direct": server.metrics_url,
            "nginx": proxy.metrics_url,
            "sidecar": exporter.base_url + "/metrics",
        }
        sizes = body_sizes(urls["direct"], urls["nginx"], urls["sidecar"])
        for url in urls.values():
            run_wrk(url, 10, args.warmup, args.script)
            drain(urls["direct"])
        runs = []
        for connections in CONNECTIONS:
            runs.append(compare(urls, connections, args))
            row = runs[-1]
            print(
                f"    c={connections:<3} direct {row['direct']['requests_per_s']:8.0f}/s"
                f"  nginx {row['nginx']['requests_per_s']:8.0f}/s"
                f"  sidecar {row['sidecar']['requests_per_s']:8.0f}/s",
                flush=True,
            )
        memory = memory_kib(pid_of(exporter))
    return {
        "name": payload.name,
        "source": describe_source(payload),
        "statistics_interval": payload.statistics_interval,
        "virtual_hosts": hosts + 1,
        "body_bytes": sizes,
        "sidecar_memory_kib": memory,
        "runs": runs,
    }


# --- part 2: collections and the tail --------------------------------------------------------


def gc_summary(collections: list[tuple[int, float]]) -> dict[str, dict[str, float]]:
    summary = {}
    for generation in (0, 1, 2):
        pauses = [seconds * 1000 for gen, seconds in collections if gen == generation]
        summary[str(generation)] = {
            "count": len(pauses),
            "total_ms": sum(pauses),
            "max_ms": max(pauses, default=0.0),
        }
    return summary


def bench_tail(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ~100 KB manual payload at 50 connections, with and without collections in the run."""
    workdir = WORKDIR / "tail"
    results = []
    print("  collections and the tail: 100 KB, manual, 50 connections", flush=True)
    probe = [sys.executable, "-m", "bench.stallprobe"]
    with prosody(workdir / "prosody", "manual", LARGE_HOSTS) as server:
        for interval in (NO_COLLECTION_INTERVAL, args.interval):
            out = workdir / f"stalls-{interval:g}.json"
            os.environ["STALLPROBE_OUT"] = str(out)
            try:
                with sidecar(workdir, server.metrics_url, interval, command=probe) as exporter:
                    url = exporter.base_url + "/metrics"
                    run_wrk(url, 10, args.warmup, args.script)
                    before = collection_count(server.metrics_url)
                    load = run_wrk(url, 50, args.duration, args.script)
                    collections = collection_count(server.metrics_url) - before - 1
            finally:
                del os.environ["STALLPROBE_OUT"]
            probed = json.loads(out.read_text())
            lags = [lag * 1000 for lag in probed["lags_s"]]
            results.append(
                {
                    "interval_s": interval,
                    "load": asdict(load),
                    "collections": collections,
                    "loop_lag_ms": {
                        "p50": percentile(lags, 0.5),
                        "p99": percentile(lags, 0.99),
                        "max": max(lags, default=math.nan),
                    },
                    "gc": gc_summary([tuple(c) for c in probed["gc"]]),
                }
            )
    return results


# --- part 3: Prosody collections per interval ------------------------------------------------

COUNT_LINE = re.compile(r"^prosody_stats_collection_seconds_count (\S+)$", re.MULTILINE)


def collection_count(prosody_url: str) -> int:
    """Prosody's collection count. In manual mode this read runs a collection itself, and the
    value it returns already includes that one."""
    text = httpx.get(prosody_url, headers=PROMETHEUS_HEADERS, trust_env=False, timeout=10).text
    match = COUNT_LINE.search(text)
    if match is None:
        raise RuntimeError("prosody_stats_collection_seconds_count not in Prosody's output")
    return int(float(match.group(1)))


def scrape_periodically(
    url: str, seconds: float, tally: dict[str, int], lock: threading.Lock
) -> None:
    """One scraper: every SCRAPE_PERIOD seconds, at most seconds / SCRAPE_PERIOD times."""
    start = time.monotonic()
    deadline = start + seconds
    with httpx.Client(headers=PROMETHEUS_HEADERS, trust_env=False, timeout=2) as client:
        for i in range(int(seconds / SCRAPE_PERIOD)):
            delay = start + i * SCRAPE_PERIOD - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() >= deadline:
                break
            try:
                ok = client.get(url).status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                tally["ok" if ok else "failed"] += 1


def count_during_scrapes(prosody_url: str, url: str, k: int, seconds: float) -> dict[str, Any]:
    tally, lock = {"ok": 0, "failed": 0}, threading.Lock()
    threads = [
        threading.Thread(target=scrape_periodically, args=(url, seconds, tally, lock))
        for _ in range(k)
    ]
    # The window runs from the first count to the last: a loaded Prosody may take a while to
    # answer either, and the sidecar's collections go on meanwhile.
    started = time.monotonic()
    before = collection_count(prosody_url)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10)
    after = collection_count(prosody_url)
    window = time.monotonic() - started
    # `after` counts its own read's collection; `before` already counted its own.
    return {
        "scrapers": k,
        "window_s": window,
        "collections": after - before - 1,
        "scrapes_ok": tally["ok"],
        "scrapes_failed": tally["failed"],
    }


def bench_collections(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = WORKDIR / "collections"
    results = []
    print("  collections: Prosody in manual mode", flush=True)
    with prosody(workdir / "prosody", "manual") as server:
        for k in SCRAPERS:  # direct first, with no sidecar collecting
            row = count_during_scrapes(server.metrics_url, server.metrics_url, k, args.window)
            row["expected"] = [row["scrapes_ok"], row["scrapes_ok"]]  # one per scrape
            results.append({"target": "direct", **row})
        with sidecar(workdir, server.metrics_url, args.interval) as exporter:
            for k in SCRAPERS:
                url = exporter.base_url + "/metrics"
                row = count_during_scrapes(server.metrics_url, url, k, args.window)
                ticks = row["window_s"] / args.interval
                row["expected"] = [math.floor(ticks), math.floor(ticks) + 1]
                results.append({"target": "sidecar", **row})
    for row in results:
        row["per_interval"] = row["collections"] / (row["window_s"] / args.interval)
    return results


# --- part 4: memory --------------------------------------------------------------------------

# What serving imports, in the order the exporter imports it: each step's RSS share.
IMPORTS = (
    ("asyncio (with ssl)", "import asyncio"),
    ("uvloop", "import uvloop"),
    ("prometheus_client", "import prometheus_client"),
    ("fastapi (starlette, pydantic)", "import fastapi"),
    ("pydantic_settings", "import pydantic_settings"),
    ("uvicorn + httptools protocol", "import uvicorn.protocols.http.httptools_impl"),
    ("httpx", "import httpx"),
    ("prosody_exporter", "import prosody_exporter.main"),
    (
        "the app, created",
        "from prosody_exporter.app import create_app;"
        " from prosody_exporter.settings import load_settings;"
        " app = create_app(load_settings([]))",
    ),
)
RSS_PROBE = (
    "import sys\n"
    "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
    "print(rss())\n"
    "for step in sys.argv[1:]:\n"
    "    exec(step)\n"
    "    print(rss())\n"
)


def import_shares() -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, *(code for _, code in IMPORTS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = [int(line) for line in out.stdout.split()]
    rows = [{"module": "python itself", "rss_kib": figures[0], "added_kib": figures[0]}]
    for (name, _), before, after in zip(IMPORTS, figures[:-1], figures[1:], strict=True):
        rows.append({"module": name, "rss_kib": after, "added_kib": after - before})
    return rows


def idle_memory(args: argparse.Namespace) -> dict[str, int]:
    """RSS after start and a few scrapes, then a few idle seconds (3 KB payload)."""
    workdir = WORKDIR / "idle"
    with (
        prosody(workdir / "prosody", 60) as server,
        nginx(workdir / "nginx", server.metrics_url) as proxy,
        sidecar(workdir, server.metrics_url, args.interval) as exporter,
    ):
        with httpx.Client(headers=PROMETHEUS_HEADERS, trust_env=False, timeout=10) as client:
            for _ in range(10):
                client.get(proxy.metrics_url).raise_for_status()
                client.get(exporter.base_url + "/metrics").raise_for_status()
        time.sleep(3)
        return {
            "sidecar": memory_kib(pid_of(exporter))["VmRSS"],
            "nginx": sum(memory_kib(pid)["VmRSS"] for pid in proxy.pids()),
        }


# --- part 5: attacks -------------------------------------------------------------------------

DENIED = {"allow_cidrs": "198.18.0.0/15"}  # loopback, where the attackers are, is not allowed


@dataclass
class Attack:
    name: str
    detail: str
    connections: int
    client: Callable[[str, int], hostile.Outcome] | None = None  # None: nothing but the upstream
    upstream: Answer | None = None  # None: a real Prosody
    hosts: int = 0  # VirtualHosts of the real Prosody (~100 KB with LARGE_HOSTS)
    settings: dict[str, str] = field(default_factory=dict)
    seconds: float = 3.0  # to let collections run (upstream attacks, at rest)


def attacks() -> list[Attack]:
    max_body = ExporterSettings.model_fields["max_body_bytes"].default
    huge = max_body + (1 << 20)
    return [
        Attack("at rest, 3 KB", "start, 20 scrapes, idle", 0),
        Attack("at rest, 100 KB", "start, 20 scrapes, idle", 0, hosts=LARGE_HOSTS),
        Attack(
            "huge header, denied client",
            "one 8 MiB header line each, from an address outside the allowlist",
            3,
            lambda h, p: hostile.huge_header(h, p, 8 << 20),
            settings=DENIED,
        ),
        Attack(
            "many header fields",
            "2,000 fields each",
            50,
            lambda h, p: hostile.many_headers(h, p, 2000),
        ),
        Attack(
            "pipelining",
            "1,000 requests written at once each",
            50,
            lambda h, p: hostile.pipelined(h, p, 1000),
        ),
        Attack(
            "slow heads",
            "a byte every 0.5 s each, for 8 s (limit 100 connections)",
            150,
            lambda h, p: hostile.slow_head(h, p, 0.5, 8),
        ),
        Attack(
            "idle connections",
            "connect, send nothing, hold 8 s",
            400,
            lambda h, p: hostile.idle_connection(h, p, 8),
        ),
        Attack(
            "unread responses, 100 KB",
            "request /metrics uncompressed, never read (hold 8 s)",
            100,
            lambda h, p: hostile.unread_response(h, p, 8),
            hosts=LARGE_HOSTS,
        ),
        Attack(
            "gzip bomb",
            "1 MiB of gzip inflating to 1 GiB, Content-Encoding: gzip, no Content-Length",
            0,
            upstream=Answer(
                body=gzip_bomb(1 << 30),
                headers={"Content-Encoding": "gzip"},
                content_length=False,
                pause_after_headers=0.2,
            ),
        ),
        Attack(
            "huge error body",
            "HTTP 500 with a 200 MiB body",
            0,
            upstream=Answer(status=500, body=b"e" * (1 << 20), repeat=200),
        ),
        Attack(
            "body at max_body_bytes",
            f"valid, {max_body >> 10} KiB of Prosody-like series in one family",
            0,
            upstream=Answer(body=exposition_of(max_body, PROSODY_LIKE_LINE)),
            settings={"upstream_timeout": "30"},
        ),
        Attack(
            "body at max_body_bytes, short lines",
            f"valid, {max_body >> 10} KiB of the shortest series in one family",
            0,
            upstream=Answer(body=exposition_of(max_body, SHORT_LINE)),
            settings={"upstream_timeout": "30"},
        ),
        Attack(
            "body over max_body_bytes",
            f"{huge >> 20} MiB without Content-Length (read until the limit)",
            0,
            upstream=Answer(body=b"x" * (1 << 20), repeat=huge >> 20, content_length=False),
        ),
    ]


def describe_outcomes(outcomes: list[hostile.Outcome], connections: int) -> str:
    if not connections:
        return "-"
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        key = str(outcome.status) if outcome.status else "closed" if outcome.closed else "open"
        statuses[key] = statuses.get(key, 0) + 1
    return ", ".join(f"{count}x {key}" for key, count in sorted(statuses.items()))


def upstream_errors(exporter: ExporterProcess) -> str:
    reasons = ("timeout", "connect", "status", "parse", "too_large")
    counted = {
        reason: exporter.sample_value("prosody_exporter_upstream_errors_total", reason=reason)
        for reason in reasons
    }
    found = [f"{int(n)} {reason}" for reason, n in counted.items() if n]
    return "errors: " + (", ".join(found) if found else "none")


def run_attack(attack: Attack, args: argparse.Namespace) -> dict[str, Any]:
    workdir = WORKDIR / "attacks" / re.sub(r"[^a-z0-9]+", "-", attack.name.lower())
    with contextlib.ExitStack() as stack:
        if attack.upstream is None:
            url = stack.enter_context(prosody(workdir / "prosody", 60, attack.hosts)).metrics_url
        else:
            url = stack.enter_context(StandInProsody(attack.upstream)).url
        exporter = stack.enter_context(
            sidecar(
                workdir,
                url,
                args.interval,
                settings=attack.settings,
                wait_for_ready=attack.upstream is None,
            )
        )
        with httpx.Client(headers=PROMETHEUS_HEADERS, trust_env=False, timeout=10) as client:
            for _ in range(20):
                client.get(exporter.base_url + "/metrics")
        outcomes: list[hostile.Outcome] = []
        if attack.client is not None:
            client_of = attack.client
            flood = hostile.Flood(lambda: client_of("127.0.0.1", exporter.port), attack.connections)
            outcomes = flood.run(timeout=60)
        time.sleep(attack.seconds)
        assert exporter.process is not None
        alive = exporter.process.running()
        outcome = describe_outcomes(outcomes, attack.connections)
        if attack.upstream is not None and alive:
            outcome = upstream_errors(exporter)
        memory = memory_kib(pid_of(exporter)) if alive else {"VmHWM": -1, "VmRSS": -1}
    print(f"    {attack.name}: peak {memory['VmHWM'] / 1024:.1f} MiB ({outcome})", flush=True)
    return {
        "name": attack.name,
        "detail": attack.detail,
        "connections": attack.connections,
        "outcome": outcome if alive else "EXPORTER DIED",
        "peak_kib": memory["VmHWM"],
        "rss_after_kib": memory["VmRSS"],
    }


def memory_limit(attack_results: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(result["peak_kib"] for result in attack_results)
    return {
        "worst_peak_kib": worst,
        "recommended_mi": math.ceil(worst * MEMORY_LIMIT_FACTOR / 1024),
        "default_mi": default_memory_limit_mib(),
    }


# --- machine, targets and printing -----------------------------------------------------------


def package_version(name: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "?"


def machine() -> dict[str, Any]:
    return {
        **machine_basics(),
        "prosody": package_version("prosody"),
        "nginx": package_version("nginx"),
        "wrk": package_version("wrk"),
    }


def runs_at(payloads: list[dict[str, Any]], connections: int) -> list[tuple[str, dict[str, Any]]]:
    return [(p["name"], r) for p in payloads for r in p["runs"] if r["connections"] == connections]


def throughput_target(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [(p["name"], r) for p in payloads for r in p["runs"]]
    name, worst = min(rows, key=lambda item: item[1]["rps_ratio"] or math.inf)
    passing = sum(ratio_ok(r["rps_ratio"]) for _, r in rows)
    measured = (
        f"{passing}/{len(rows)} runs; worst {show_ratio(worst['rps_ratio'])}"
        f" ({name}, c={worst['connections']})"
    )
    return target(
        "throughput", f"sidecar >= {MIN_RPS_RATIO:g}x direct req/s", measured, passing == len(rows)
    )


def nginx_throughput_target(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    rows = runs_at(payloads, 50)
    name, worst = min(rows, key=lambda item: item[1]["rps_vs_nginx"] or math.inf)
    value = worst["rps_vs_nginx"]
    passing = sum((r["rps_vs_nginx"] or 0) >= MIN_RPS_VS_NGINX for _, r in rows)
    measured = f"{passing}/{len(rows)} payloads; worst {show_ratio(value)} ({name})"
    goal = f"sidecar >= {MIN_RPS_VS_NGINX:g}x nginx req/s at 50 conns"
    return target("vs nginx: req/s", goal, measured, passing == len(rows))


def nginx_latency_target(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    rows = runs_at(payloads, 50)
    name, worst = max(rows, key=lambda item: item[1]["p99_vs_nginx"] or math.inf)
    passing = sum((r["p99_vs_nginx"] or math.inf) <= MAX_P99_VS_NGINX for _, r in rows)
    measured = f"{passing}/{len(rows)} payloads; worst {show_ratio(worst['p99_vs_nginx'])} ({name})"
    goal = f"sidecar p99 <= {MAX_P99_VS_NGINX:g}x nginx p99 at 50 conns"
    return target("vs nginx: p99", goal, measured, passing == len(rows))


def collections_target(collections: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [c for c in collections if c["target"] == "sidecar"]
    exact = all(r["expected"][0] <= r["collections"] <= r["expected"][1] for r in rows)
    measured = ", ".join(
        f"k={r['scrapers']}: {r['collections']} in {r['window_s']:.1f}s"
        f" ({r['per_interval']:.2f}/interval)"
        for r in rows
    )
    return target("collections", "1 Prosody collection per interval, any k", measured, exact)


def idle_memory_target(idle: dict[str, int]) -> dict[str, Any]:
    mib = idle["sidecar"] / 1024
    measured = f"VmRSS {mib:.1f} MiB (nginx {idle['nginx'] / 1024:.1f} MiB)"
    return target(
        "idle memory", f"sidecar RSS <= {MAX_IDLE_RSS_MIB:g} MiB", measured, mib <= MAX_IDLE_RSS_MIB
    )


def memory_limit_target(limit: dict[str, Any]) -> dict[str, Any]:
    default = limit["default_mi"]
    measured = (
        f"worst peak {limit['worst_peak_kib'] / 1024:.1f} MiB x {MEMORY_LIMIT_FACTOR:g}"
        f" = {limit['recommended_mi']}Mi; default {default}Mi"
    )
    goal = f"default limit >= worst attack peak x {MEMORY_LIMIT_FACTOR:g}"
    return target("memory limit", goal, measured, default >= limit["recommended_mi"])


def throughput_table(payloads: list[dict[str, Any]]) -> str:
    headers = [
        "payload",
        "conns",
        "direct req/s",
        "nginx req/s",
        "sidecar req/s",
        "vs direct",
        ">=2x",
        "vs nginx",
    ]
    rows = []
    for p in payloads:
        for r in p["runs"]:
            rows.append(
                [
                    p["name"],
                    r["connections"],
                    f"{r['direct']['requests_per_s']:.0f}",
                    f"{r['nginx']['requests_per_s']:.0f}",
                    f"{r['sidecar']['requests_per_s']:.0f}",
                    show_ratio(r["rps_ratio"]),
                    "PASS" if ratio_ok(r["rps_ratio"]) else "MISS",
                    show_ratio(r["rps_vs_nginx"]),
                ]
            )
    return format_table(headers, rows)


def latency_table(payloads: list[dict[str, Any]]) -> str:
    headers = [
        "payload",
        "conns",
        "direct p99",
        "nginx p50",
        "nginx p99",
        "sidecar p50",
        "sidecar p99",
        "p99 vs direct",
        "p99 vs nginx",
    ]
    rows = []
    for p in payloads:
        for r in p["runs"]:
            d, n, s = r["direct"], r["nginx"], r["sidecar"]
            rows.append(
                [
                    p["name"],
                    r["connections"],
                    f"{d['p99_ms']:.2f} ms",
                    f"{n['p50_ms']:.2f} ms",
                    f"{n['p99_ms']:.2f} ms",
                    f"{s['p50_ms']:.2f} ms",
                    f"{s['p99_ms']:.2f} ms",
                    show_ratio(r["p99_ratio"]),
                    show_ratio(r["p99_vs_nginx"]),
                ]
            )
    return format_table(headers, rows)


def payload_table(payloads: list[dict[str, Any]]) -> str:
    headers = [
        "payload",
        "source",
        "direct body",
        "nginx body",
        "sidecar body",
        "sidecar gzip",
        "sidecar VmRSS",
        "sidecar VmHWM",
        "errors",
    ]
    rows = []
    for p in payloads:
        sizes, mem = p["body_bytes"], p["sidecar_memory_kib"]
        errors = sum(r[t]["errors"] for r in p["runs"] for t in ("direct", "nginx", "sidecar"))
        rows.append(
            [
                p["name"],
                p["source"],
                f"{sizes['direct'] / 1024:.1f} KiB",
                f"{sizes['nginx'] / 1024:.1f} KiB",
                f"{sizes['sidecar_identity'] / 1024:.1f} KiB",
                f"{sizes['sidecar_gzip'] / 1024:.1f} KiB",
                f"{mem['VmRSS'] / 1024:.1f} MiB",
                f"{mem['VmHWM'] / 1024:.1f} MiB",
                errors,
            ]
        )
    return format_table(headers, rows)


def tail_table(tail: list[dict[str, Any]]) -> str:
    headers = [
        "sidecar interval",
        "collections",
        "req/s",
        "p50",
        "p99",
        "loop lag p99",
        "loop lag max",
        "GC gen0/1/2",
        "GC max pause",
    ]
    rows = []
    for t in tail:
        gcs = t["gc"]
        rows.append(
            [
                f"{t['interval_s']:g} s",
                t["collections"],
                f"{t['load']['requests_per_s']:.0f}",
                f"{t['load']['p50_ms']:.2f} ms",
                f"{t['load']['p99_ms']:.2f} ms",
                f"{t['loop_lag_ms']['p99']:.2f} ms",
                f"{t['loop_lag_ms']['max']:.2f} ms",
                "/".join(str(gcs[g]["count"]) for g in ("0", "1", "2")),
                f"{max(g['max_ms'] for g in gcs.values()):.2f} ms",
            ]
        )
    return format_table(headers, rows)


def collections_table(collections: list[dict[str, Any]], interval: float) -> str:
    headers = [
        "target",
        "k scrapers",
        "window",
        "collections",
        "expected",
        f"per {interval:g} s interval",
        "scrapes ok/failed",
    ]
    rows = [
        [
            c["target"],
            c["scrapers"],
            f"{c['window_s']:.2f} s",
            c["collections"],
            "-".join(str(n) for n in sorted(set(c["expected"]))),
            f"{c['per_interval']:.2f}",
            f"{c['scrapes_ok']}/{c['scrapes_failed']}",
        ]
        for c in collections
    ]
    return format_table(headers, rows)


def imports_table(imports: list[dict[str, Any]]) -> str:
    rows = [
        [i["module"], f"{i['added_kib'] / 1024:.1f} MiB", f"{i['rss_kib'] / 1024:.1f} MiB"]
        for i in imports
    ]
    return format_table(["import", "adds", "RSS"], rows)


def attacks_table(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            a["name"],
            a["detail"],
            a["connections"],
            a["outcome"],
            f"{a['peak_kib'] / 1024:.1f} MiB",
            f"{a['rss_after_kib'] / 1024:.1f} MiB",
        ]
        for a in results
    ]
    headers = ["attack", "what", "conns", "sidecar did", "peak RSS", "RSS after"]
    return format_table(headers, rows)


def header(info: dict[str, Any], args: argparse.Namespace) -> str:
    load = " ".join(f"{x:.2f}" for x in info["loadavg_start"])
    return (
        f"prosody-exporter benchmark: {info['cpus']} cores, {info['cpu_model']},"
        f" Python {info['python']}, Prosody {info['prosody']}, nginx {info['nginx']},"
        f" wrk {info['wrk']}\n"
        f"load average at start {load} (other work on the machine makes figures noisy;"
        " ratios come from back-to-back runs)\n"
        f"wrk: 1 thread, {args.duration:g} s per run (max {MAX_REQUESTS} requests),"
        f" Prometheus' Accept and Accept-Encoding: gzip; sidecar interval {args.interval:g} s;"
        " nginx: 1 worker, proxy_cache_valid 200 5s, proxy_cache_lock on; latencies are wrk's"
    )


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.exporter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per target")
    parser.add_argument("--interval", type=float, default=1.0, help="sidecar interval, seconds")
    parser.add_argument("--window", type=float, default=6.0, help="seconds of scraping (part 3)")
    return parser.parse_args(argv)


def check_prerequisites() -> None:
    try:
        for program in ("wrk", "prosody", "nginx"):
            require_program(program, "make bench-exporter")
    except MissingPrerequisite as error:
        raise SystemExit(f"bench.exporter: {error}") from None


def report(document: dict[str, Any], args: argparse.Namespace) -> None:
    info, payloads = document["machine"], document["payloads"]
    print()
    print(header(info, args))
    print(f"\nPayloads (all served by a real Prosody {info['prosody']}):")
    print(payload_table(payloads))
    print("\nThroughput, direct vs nginx vs sidecar (same run, back to back):")
    print(throughput_table(payloads))
    print("\nLatency (wrk's p50/p99), same runs:")
    print(latency_table(payloads))
    print(
        "\nCollections and the tail (100 KB, manual, 50 connections; sidecar under"
        " bench/stallprobe.py, loop lag = lateness of a 5 ms timer):"
    )
    print(tail_table(document["tail"]))
    print(
        f"\nProsody collections (manual mode; k scrapers each every {SCRAPE_PERIOD:g} s,"
        f" sidecar interval {args.interval:g} s):"
    )
    print(collections_table(document["collections"], args.interval))
    memory = document["memory"]
    print(
        f"\nIdle memory (3 KB payload, after 10 scrapes and 3 s): sidecar VmRSS"
        f" {memory['idle_kib']['sidecar'] / 1024:.1f} MiB, nginx (master + workers)"
        f" {memory['idle_kib']['nginx'] / 1024:.1f} MiB"
    )
    print("\nEach import's share of the sidecar's RSS (a fresh interpreter, in serving order):")
    print(imports_table(memory["imports"]))
    print("\nAttacks (a fresh sidecar each; peak RSS = VmHWM, start-up included):")
    print(attacks_table(document["attacks"]))
    limit = document["memory_limit"]
    print(
        f"worst peak {limit['worst_peak_kib'] / 1024:.1f} MiB x {MEMORY_LIMIT_FACTOR:g}:"
        f" memory limit {limit['recommended_mi']}Mi"
        f" (the operator's default: {limit['default_mi']}Mi)"
    )
    print("\nTargets:")
    print(targets_table(document["targets"]))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_prerequisites()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    args.script = write_wrk_script(WORKDIR)
    info = machine()
    print(header(info, args), flush=True)
    payloads = [bench_payload(payload, args) for payload in PAYLOADS]
    tail = bench_tail(args)
    collections = bench_collections(args)
    print("  memory", flush=True)
    memory = {"idle_kib": idle_memory(args), "imports": import_shares()}
    print("  attacks", flush=True)
    attack_results = [run_attack(attack, args) for attack in attacks()]
    limit = memory_limit(attack_results)
    info["loadavg_end"] = list(os.getloadavg())
    document = {
        "machine": info,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "max_requests": MAX_REQUESTS,
            "connections": list(CONNECTIONS),
            "sidecar_interval_s": args.interval,
            "window_s": args.window,
            "scrape_period_s": SCRAPE_PERIOD,
            "scrapers": list(SCRAPERS),
            "accept": ACCEPT,
            "accept_encoding": "gzip",
        },
        "payloads": payloads,
        "tail": tail,
        "collections": collections,
        "memory": memory,
        "attacks": attack_results,
        "memory_limit": limit,
        "targets": [
            throughput_target(payloads),
            nginx_throughput_target(payloads),
            nginx_latency_target(payloads),
            collections_target(collections),
            idle_memory_target(memory["idle_kib"]),
            memory_limit_target(limit),
        ],
    }
    report(document, args)
    write_results("bench-exporter", document)


if __name__ == "__main__":
    main()
