"""Prosody -> prosody-exporter -> Prometheus, on loopback, printing what a user wants to see.

Prosody runs with statistics_interval = "manual", the setting that is only safe with a single
scraper: the exporter is that scraper, and Prometheus (any number of them) reads the exporter.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack

from testinfra.exporter import ExporterProcess
from testinfra.layout import CACHE_DIR
from testinfra.prometheus import PrometheusServer, build_prometheus_config
from testinfra.prosody import ProsodyServer
from testinfra.xmpp import XmppSession, register_account

WORKDIR = CACHE_DIR / "demo"
QUERIES = {
    "Prosody collections (manual mode, one per exporter interval)": (
        "prosody_stats_collection_seconds_count"
    ),
    "c2s connections (one demo XMPP client is logged in)": "sum(prosody_mod_c2s__connections)",
    "exporter: upstream up": "prosody_exporter_up",
    "exporter: snapshot age (s)": "prosody_exporter_snapshot_age_seconds",
    "exporter: scrapes served": "sum(prosody_exporter_scrapes_total)",
}


def lines(prometheus: PrometheusServer) -> Iterator[str]:
    for target in prometheus.active_targets():
        error = target["lastError"] or "-"
        yield f"  target {target['scrapeUrl']}: health={target['health']} last error={error}"
    for title, promql in QUERIES.items():
        results = prometheus.query(promql)
        values = ", ".join(r["value"][1] for r in results) or "(no data yet)"
        yield f"  {title:<62} {promql} = {values}"


def run(once: bool, interval: float) -> None:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    with ExitStack() as stack:
        print('starting Prosody 0.12 (Debian) with statistics_interval = "manual" ...')
        prosody = stack.enter_context(ProsodyServer(WORKDIR / "prosody"))
        register_account(prosody, "demo", "demo-password")
        session = XmppSession(prosody, "demo", "demo-password").open()
        stack.callback(session.close)
        print(f"starting prosody-exporter (collects every {interval:g}s) ...")
        exporter = stack.enter_context(
            ExporterProcess(WORKDIR, prosody.metrics_url, interval=interval)
        )
        print("starting Prometheus (Debian), scraping the exporter ...")
        target = exporter.base_url.removeprefix("http://")
        prometheus = stack.enter_context(
            PrometheusServer(WORKDIR / "prometheus", build_prometheus_config([target], "2s"))
        )
        prometheus.wait_for_series("prosody_mod_c2s__connections > 0", timeout=60)
        print("\nWhat Prometheus sees:")
        print("\n".join(lines(prometheus)))
        print(f"\nProsody metrics (direct, loopback only): {prosody.metrics_url}")
        print(f"Through the sidecar:                     {exporter.base_url}/metrics")
        print(f"Prometheus:                              {prometheus.url}/targets")
        if once:
            return
        print("\nRunning until Ctrl-C; refreshing every 10s.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                time.sleep(10)
                print("\n".join(lines(prometheus)), flush=True)
        except KeyboardInterrupt:
            print("\nstopping ...")


def main() -> None:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--once", action="store_true", help="print once and exit (for CI)")
    parser.add_argument("--interval", type=float, default=2.0, help="exporter interval, seconds")
    args = parser.parse_args()
    run(args.once, args.interval)


if __name__ == "__main__":
    main()
