"""Benchmark: Prosody's /metrics scraped directly vs through the prosody-exporter sidecar.

`make bench-exporter` runs it (`python -m bench.exporter [--duration S] [--interval S] ...`).
Everything is real and on 127.0.0.1: Debian's Prosody 0.12 (testinfra/prosody.py), the installed
`prosody-exporter` (testinfra/exporter.py) and `wrk` as the load generator (C, one thread, so the
client leaves the servers as much CPU as it can). Both targets get the headers Prometheus sends.

1. Throughput and latency (wrk, 1/10/50 connections, each run bounded by --duration and
   MAX_REQUESTS) for four payloads, all served by a real Prosody: the stock test config (~3 KB)
   and 26 VirtualHosts each with a MUC and an HTTP file share component (~100 KB, per-host series),
   each with `statistics_interval` 60 (Prosody serves a cached collection) and "manual" (every
   request to Prosody runs a collection: the mode the sidecar exists for).
2. Prosody collections per sidecar interval with k = 1 and 5 scrapers (every SCRAPE_PERIOD s),
   direct vs through the sidecar, read from `prosody_stats_collection_seconds_count`.
3. The sidecar's memory (/proc/PID/status VmRSS, VmHWM) after each payload's load runs.

Results go to stdout as tables and to .cache/results/bench-exporter.json, whose keys are:

- machine: cpus (usable cores), cpu_model, python, prosody, wrk (package versions), loadavg_start
  and loadavg_end (1/5/15 min: other work on the machine makes the numbers noisy).
- settings: duration_s, warmup_s, max_requests, connections, sidecar_interval_s, window_s,
  scrape_period_s, scrapers (the k values), accept, accept_encoding.
- payloads: one object per payload: name, source, statistics_interval (60 or "manual"),
  virtual_hosts, body_bytes {direct, sidecar_identity, sidecar_gzip} (one response each),
  sidecar_memory_kib {VmRSS, VmHWM}, and runs: one object per connection count with connections,
  direct and sidecar (each {requests_per_s, p50_ms, p99_ms, requests, errors, duration_s,
  bytes_per_response}), rps_ratio and p99_ratio (sidecar / direct).
- collections: one object per (target, k): target ("direct" or "sidecar"), scrapers (k),
  window_s, collections (Prosody's count during the window), per_interval (collections per
  sidecar interval), expected ([low, high]: sidecar, the ticks a window that long holds, i.e.
  exactly one per interval; direct, one per successful scrape), scrapes_ok, scrapes_failed.
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
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.report import (
    format_table,
    memory_kib,
    target,
    targets_table,
    write_results,
)
from bench.report import machine as machine_basics
from testinfra.exporter import ExporterProcess
from testinfra.layout import CACHE_DIR
from testinfra.procs import MissingPrerequisite, require_program
from testinfra.prosody import ProsodyServer

WORKDIR = CACHE_DIR / "bench-exporter"

# What Prometheus 2.x/3.x sends when scraping (scrape_protocols default, compression on).
ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_HEADERS = {"Accept": ACCEPT, "Accept-Encoding": "gzip"}

CONNECTIONS = (1, 10, 50)
SCRAPERS = (1, 5)
SCRAPE_PERIOD = 0.2  # seconds between one scraper's scrapes in part 2
MAX_REQUESTS = 300_000  # per wrk run, on top of its time limit
LARGE_HOSTS = 26  # VirtualHosts (each with a MUC and an upload component) for ~100 KB

# Targets the sidecar is held to.
MIN_RPS_RATIO = 2.0
MAX_RSS_MIB = 40.0
MAX_P99_MS_AT_50 = 10.0

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
def sidecar(workdir: Path, upstream_url: str, interval: float) -> Iterator[ExporterProcess]:
    exporter = ExporterProcess(workdir, upstream_url, interval=interval)
    try:
        yield exporter.start(timeout=60)
    finally:
        exporter.stop()


def body_sizes(direct_url: str, sidecar_url: str) -> dict[str, int]:
    with httpx.Client(headers=PROMETHEUS_HEADERS, trust_env=False, timeout=10) as client:
        direct = client.get(direct_url)
        gzipped = client.get(sidecar_url)
        identity = client.get(sidecar_url, headers={"Accept-Encoding": "identity"})
    for response in (direct, gzipped, identity):
        response.raise_for_status()
    return {
        "direct": len(direct.content),
        "sidecar_identity": len(identity.content),
        "sidecar_gzip": gzipped.num_bytes_downloaded,
    }


# --- part 1: throughput and latency ----------------------------------------------------------


def ratio(sidecar: float, direct: float) -> float | None:
    """sidecar / direct; None when direct has no figure (no request completed)."""
    return sidecar / direct if direct else None


def ratio_ok(value: float | None) -> bool:
    return value is None or value >= MIN_RPS_RATIO


def show_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def compare(direct: str, side: str, connections: int, args: argparse.Namespace) -> dict[str, Any]:
    """Direct then sidecar, back to back, so both see the same background load."""
    d = run_wrk(direct, connections, args.duration, args.script)
    s = run_wrk(side, connections, args.duration, args.script)
    return {
        "connections": connections,
        "direct": asdict(d),
        "sidecar": asdict(s),
        "rps_ratio": ratio(s.requests_per_s, d.requests_per_s),
        "p99_ratio": ratio(s.p99_ms, d.p99_ms),
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
    print(f"  {payload.name}: {describe_source(payload)}, and the sidecar", flush=True)
    with (
        prosody(workdir / "prosody", payload.statistics_interval, hosts) as server,
        sidecar(workdir, server.metrics_url, args.interval) as exporter,
    ):
        direct, side = server.metrics_url, exporter.base_url + "/metrics"
        sizes = body_sizes(direct, side)
        for url in (direct, side):
            run_wrk(url, 10, args.warmup, args.script)
        runs = []
        for connections in CONNECTIONS:
            runs.append(compare(direct, side, connections, args))
            row = runs[-1]
            print(
                f"    c={connections:<3} direct {row['direct']['requests_per_s']:8.0f}/s"
                f"  sidecar {row['sidecar']['requests_per_s']:8.0f}/s",
                flush=True,
            )
        assert exporter.process is not None
        memory = memory_kib(exporter.process.popen.pid)
    return {
        "name": payload.name,
        "source": describe_source(payload),
        "statistics_interval": payload.statistics_interval,
        "virtual_hosts": hosts + 1,
        "body_bytes": sizes,
        "sidecar_memory_kib": memory,
        "runs": runs,
    }


# --- part 2: Prosody collections per interval ------------------------------------------------

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
    before = collection_count(prosody_url)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10)
    window = time.monotonic() - started
    after = collection_count(prosody_url)
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
        "wrk": package_version("wrk"),
    }


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


def collections_target(collections: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [c for c in collections if c["target"] == "sidecar"]
    exact = all(r["expected"][0] <= r["collections"] <= r["expected"][1] for r in rows)
    measured = ", ".join(
        f"k={r['scrapers']}: {r['collections']} in {r['window_s']:.1f}s"
        f" ({r['per_interval']:.2f}/interval)"
        for r in rows
    )
    return target("collections", "1 Prosody collection per interval, any k", measured, exact)


def memory_target(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(payloads, key=lambda p: p["sidecar_memory_kib"]["VmRSS"])
    mib = worst["sidecar_memory_kib"]["VmRSS"] / 1024
    measured = f"max VmRSS {mib:.1f} MiB ({worst['name']})"
    return target("memory", f"sidecar RSS <= {MAX_RSS_MIB:g} MB", measured, mib <= MAX_RSS_MIB)


def latency_target(payloads: list[dict[str, Any]], cpus: int) -> dict[str, Any]:
    rows = [(p["name"], r) for p in payloads for r in p["runs"] if r["connections"] == 50]
    name, worst = max(rows, key=lambda item: item[1]["sidecar"]["p99_ms"])
    p99 = worst["sidecar"]["p99_ms"]
    measured = f"worst sidecar p99 {p99:.1f} ms ({name}), {cpus} cores"
    goal = f"sidecar p99 <= {MAX_P99_MS_AT_50:g} ms at 50 conns"
    return target("latency", goal, measured, p99 <= MAX_P99_MS_AT_50)


def throughput_table(payloads: list[dict[str, Any]]) -> str:
    headers = [
        "payload",
        "conns",
        "direct req/s",
        "sidecar req/s",
        "ratio",
        ">=2x",
        "direct p50",
        "direct p99",
        "sidecar p50",
        "sidecar p99",
        "p99 ratio",
    ]
    rows = []
    for p in payloads:
        for r in p["runs"]:
            d, s = r["direct"], r["sidecar"]
            rows.append(
                [
                    p["name"],
                    r["connections"],
                    f"{d['requests_per_s']:.0f}",
                    f"{s['requests_per_s']:.0f}",
                    show_ratio(r["rps_ratio"]),
                    "PASS" if ratio_ok(r["rps_ratio"]) else "MISS",
                    f"{d['p50_ms']:.2f} ms",
                    f"{d['p99_ms']:.2f} ms",
                    f"{s['p50_ms']:.2f} ms",
                    f"{s['p99_ms']:.2f} ms",
                    show_ratio(r["p99_ratio"]),
                ]
            )
    return format_table(headers, rows)


def payload_table(payloads: list[dict[str, Any]]) -> str:
    headers = [
        "payload",
        "source",
        "direct body",
        "sidecar body",
        "sidecar gzip",
        "sidecar VmRSS",
        "sidecar VmHWM",
        "errors",
    ]
    rows = []
    for p in payloads:
        sizes, mem = p["body_bytes"], p["sidecar_memory_kib"]
        errors = sum(r[t]["errors"] for r in p["runs"] for t in ("direct", "sidecar"))
        rows.append(
            [
                p["name"],
                p["source"],
                f"{sizes['direct'] / 1024:.1f} KiB",
                f"{sizes['sidecar_identity'] / 1024:.1f} KiB",
                f"{sizes['sidecar_gzip'] / 1024:.1f} KiB",
                f"{mem['VmRSS'] / 1024:.1f} MiB",
                f"{mem['VmHWM'] / 1024:.1f} MiB",
                errors,
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


def header(info: dict[str, Any], args: argparse.Namespace) -> str:
    load = " ".join(f"{x:.2f}" for x in info["loadavg_start"])
    return (
        f"prosody-exporter benchmark: {info['cpus']} cores, {info['cpu_model']},"
        f" Python {info['python']}, Prosody {info['prosody']}, wrk {info['wrk']}\n"
        f"load average at start {load} (other work on the machine makes figures noisy;"
        " ratios come from back-to-back runs)\n"
        f"wrk: 1 thread, {args.duration:g} s per run (max {MAX_REQUESTS} requests),"
        f" Prometheus' Accept and Accept-Encoding: gzip; sidecar interval {args.interval:g} s;"
        " latencies are wrk's p50/p99"
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
    parser.add_argument("--window", type=float, default=6.0, help="seconds of scraping (part 2)")
    return parser.parse_args(argv)


def check_prerequisites() -> None:
    try:
        require_program("wrk", "make bench-exporter")
        require_program("prosody", "make bench-exporter")
    except MissingPrerequisite as error:
        raise SystemExit(f"bench.exporter: {error}") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_prerequisites()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    args.script = write_wrk_script(WORKDIR)
    info = machine()
    print(header(info, args), flush=True)
    payloads = [bench_payload(payload, args) for payload in PAYLOADS]
    collections = bench_collections(args)
    info["loadavg_end"] = list(os.getloadavg())
    targets = [
        throughput_target(payloads),
        collections_target(collections),
        memory_target(payloads),
        latency_target(payloads, info["cpus"]),
    ]
    print()
    print(header(info, args))
    print(f"\nPayloads (all served by a real Prosody {info['prosody']}):")
    print(payload_table(payloads))
    print("\nThroughput and latency, direct vs sidecar (same run, back to back):")
    print(throughput_table(payloads))
    print(
        f"\nProsody collections (manual mode; k scrapers each every {SCRAPE_PERIOD:g} s,"
        f" sidecar interval {args.interval:g} s):"
    )
    print(collections_table(collections, args.interval))
    print("\nTargets:")
    print(targets_table(targets))
    settings = {
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
    }
    document = {
        "machine": info,
        "settings": settings,
        "payloads": payloads,
        "collections": collections,
        "targets": targets,
    }
    write_results("bench-exporter", document)


if __name__ == "__main__":
    main()
