"""The chart's Grafana dashboard, built with Grafana's own Foundation SDK:

    python -m tools.dashboard   # writes charts/prosody-operator/dashboards/prosody.json

Made for a Prosody admin: Prosody's own families first (the ones Prosody 0.12 and 13 emit with
the modules of its example config, plus BOSH, WebSocket, MUC and HTTP upload), the sidecar's
health, then the operator's own (scraped through the chart's `metrics.serviceMonitor`).
tests/chart fails when the file is out of date, and checks every metric name its queries use
against what a real Prosody serves through the real exporter, and a real operator. A row whose
title ends in PROSODY_13_ONLY uses families only Prosody 13 emits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphDrawStyle, StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

from testinfra.layout import REPO_ROOT

DASHBOARD = REPO_ROOT / "charts" / "prosody-operator" / "dashboards" / "prosody.json"
UID = "prosody-operator"
PROSODY_13_ONLY = "(Prosody 13)"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# The targets of the operator's ServiceMonitors: namespace, service (<workload>-prosody-metrics)
# and pod labels. Families of global modules carry no host label, so only per-host ones use HOST.
PODS = 'namespace=~"$namespace", service=~"($workload)-prosody-metrics", pod=~"$pod"'
HOST = PODS + ', host=~"$host"'
RATE = "[$__rate_interval]"
# The operator's own targets: every replica, in the namespace it is installed in.
OPERATOR = 'namespace=~"$operator_namespace"'


def query(expr: str, legend: str = "__auto", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def graph(
    title: str,
    description: str,
    unit: str,
    *queries: tuple[str, str],
    stacked: bool = False,
    width: int = 8,
) -> timeseries.Panel:
    """A time series of (expression, legend) pairs."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .draw_style(GraphDrawStyle.LINE)
        .fill_opacity(10)
        .span(width)
        .height(8)
    )
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(query(expr, legend, ref))
    return panel


def single(title: str, description: str, expr: str, unit: str = "short") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .with_target(query(expr, title))
        .span(4)
        .height(4)
    )


def variable(name: str, label: str, definition: str, all_value: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(definition)
        .multi(True)
        .include_all(True)
        .all_value(all_value)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )


def _quantile(q: float, family: str, selector: str, by: str = "") -> str:
    by_labels = f"le, {by}" if by else "le"
    return (
        f"histogram_quantile({q}, sum by ({by_labels}) (rate({family}_bucket{{{selector}}}{RATE})))"
    )


def _p50_p99(title: str, description: str, family: str) -> timeseries.Panel:
    return graph(
        title,
        f"{description} Lines: the median and the 99th percentile.",
        "s",
        (_quantile(0.5, family, PODS), "p50"),
        (_quantile(0.99, family, PODS), "p99"),
    )


def rows() -> list[tuple[str, list[stat.Panel | timeseries.Panel]]]:
    c2s = f"prosody_mod_c2s__connections{{{HOST}}}"
    s2s_in = f"prosody_mod_s2s__connections_inbound{{{HOST}}}"
    s2s_out = f"prosody_mod_s2s__connections_outbound{{{HOST}}}"
    return [
        (
            "Overview",
            [
                single("Client connections", "Established c2s connections.", f"sum({c2s})"),
                single("Server connections in", "Established incoming s2s.", f"sum({s2s_in})"),
                single("Server connections out", "Established outgoing s2s.", f"sum({s2s_out})"),
                single(
                    "MUC rooms in memory",
                    "Rooms mod_muc holds in memory (live rooms).",
                    f"sum(prosody_mod_muc__live_room{{{HOST}}})",
                ),
                single(
                    "BOSH sessions",
                    "Active BOSH (XMPP over HTTP) sessions.",
                    f"sum(prosody_mod_bosh__active_sessions{{{PODS}}})",
                ),
                single(
                    "Upload storage",
                    "Bytes stored by mod_http_file_share.",
                    f"sum(prosody_mod_http_file_share__total_storage_bytes{{{HOST}}})",
                    "bytes",
                ),
            ],
        ),
        (
            "Client connections (c2s)",
            [
                graph(
                    "c2s connections by type",
                    "Established client connections; c2s_unauthed have not logged in yet. "
                    "WebSocket and BOSH clients are counted here too once authenticated.",
                    "short",
                    (f"sum by (type) ({c2s})", "{{type}}"),
                    stacked=True,
                ),
                graph(
                    "c2s connections by host",
                    "Established client connections per VirtualHost.",
                    "short",
                    (f"sum by (host) ({c2s})", "{{host}}"),
                    stacked=True,
                ),
                graph(
                    "c2s connections by IP family",
                    "Established client connections over IPv4 and IPv6.",
                    "short",
                    (f"sum by (ip_family) ({c2s})", "{{ip_family}}"),
                    stacked=True,
                ),
                graph(
                    "New encrypted c2s connections",
                    "Client connections that negotiated TLS, per second, by protocol and cipher: "
                    "old TLS versions show up here.",
                    "cps",
                    (
                        "sum by (protocol, cipher) "
                        f"(rate(prosody_mod_c2s__encrypted_total{{{PODS}}}{RATE}))",
                        "{{protocol}} {{cipher}}",
                    ),
                    width=24,
                ),
            ],
        ),
        (
            "Server-to-server (s2s)",
            [
                graph(
                    "s2s connections by type",
                    "Established server-to-server connections, incoming and outgoing.",
                    "short",
                    (f"sum by (type) ({s2s_in})", "in {{type}}"),
                    (f"sum by (type) ({s2s_out})", "out {{type}}"),
                ),
                graph(
                    "s2s connections by host",
                    "Established server-to-server connections per local host.",
                    "short",
                    (f"sum by (host) ({s2s_in})", "in {{host}}"),
                    (f"sum by (host) ({s2s_out})", "out {{host}}"),
                ),
                graph(
                    "s2s connections by IP family",
                    "Established server-to-server connections over IPv4 and IPv6.",
                    "short",
                    (f"sum by (ip_family) ({s2s_in})", "in {{ip_family}}"),
                    (f"sum by (ip_family) ({s2s_out})", "out {{ip_family}}"),
                ),
                graph(
                    "s2s connections opened and closed",
                    "Incoming TCP connections accepted, outgoing connections initiated, and "
                    "connections closed by direction and error, per second.",
                    "cps",
                    (f"sum(rate(prosody_mod_s2s__accepted_tcp_total{{{PODS}}}{RATE}))", "accepted"),
                    (f"sum(rate(prosody_mod_s2s__initiated_total{{{HOST}}}{RATE}))", "initiated"),
                    (
                        "sum by (direction, error) "
                        f"(rate(prosody_mod_s2s__closed_total{{{HOST}}}{RATE}))",
                        "closed {{direction}} {{error}}",
                    ),
                    width=12,
                ),
                graph(
                    "New encrypted s2s connections",
                    "Server connections that negotiated TLS, per second, by protocol and cipher.",
                    "cps",
                    (
                        "sum by (protocol, cipher) "
                        f"(rate(prosody_mod_s2s__encrypted_total{{{PODS}}}{RATE}))",
                        "{{protocol}} {{cipher}}",
                    ),
                    width=12,
                ),
            ],
        ),
        (
            "Authentication",
            [
                graph(
                    "s2s authentication by mechanism",
                    "Authenticated server connections per second, by direction and mechanism "
                    "(dialback, or EXTERNAL with certificates). Prosody 0.12 and 13 emit no "
                    "metric for client (c2s) logins.",
                    "cps",
                    (
                        "sum by (direction, mechanism) "
                        f"(rate(prosody_mod_s2s__authenticated_total{{{HOST}}}{RATE}))",
                        "{{direction}} {{mechanism}}",
                    ),
                    width=12,
                ),
                graph(
                    "s2s certificate checks",
                    "Remote servers' certificates checked per second (mod_s2s_auth_certs): "
                    "whether the chain and the identity were valid.",
                    "cps",
                    (
                        "sum by (chain, identity) "
                        f"(rate(prosody_mod_s2s_auth_certs__checked_total{{{PODS}}}{RATE}))",
                        "chain {{chain}}, identity {{identity}}",
                    ),
                    width=12,
                ),
            ],
        ),
        (
            "Mobile clients (stream management, CSI)",
            [
                graph(
                    "Stream management sessions",
                    "mod_smacks sessions started, hibernated sessions that expired, and "
                    "resumptions that came too late, per second.",
                    "ops",
                    (
                        f"sum(rate(prosody_mod_smacks__sessions_started_total{{{HOST}}}{RATE}))",
                        "started",
                    ),
                    (
                        f"sum(rate(prosody_mod_smacks__sessions_expired_total{{{HOST}}}{RATE}))",
                        "expired",
                    ),
                    (
                        "sum(rate(prosody_mod_smacks__session_resumption_expired_total"
                        f"{{{HOST}}}{RATE}))",
                        "resumption too late",
                    ),
                    width=12,
                ),
                graph(
                    "CSI queue flushes",
                    "mod_csi_simple: queued stanzas for inactive (mobile) clients flushed, per "
                    "second, by reason.",
                    "ops",
                    (
                        "sum by (reason) "
                        f"(rate(prosody_mod_csi_simple__flushes_total{{{HOST}}}{RATE}))",
                        "{{reason}}",
                    ),
                    width=12,
                ),
            ],
        ),
        (
            "HTTP: BOSH",
            [
                graph(
                    "BOSH sessions",
                    "BOSH (XMPP over HTTP) sessions: active ones have a request waiting.",
                    "short",
                    (f"sum(prosody_mod_bosh__active_sessions{{{PODS}}})", "active"),
                    (f"sum(prosody_mod_bosh__inactive_sessions{{{PODS}}})", "inactive"),
                    width=12,
                ),
                graph(
                    "BOSH session events",
                    "New BOSH sessions, timeouts, and requests for an unknown session or host, "
                    "per second.",
                    "ops",
                    (f"sum(rate(prosody_mod_bosh__new_sid_total{{{PODS}}}{RATE}))", "new"),
                    (f"sum(rate(prosody_mod_bosh__timeout_total{{{PODS}}}{RATE}))", "timeout"),
                    (f"sum(rate(prosody_mod_bosh__bad_sid_total{{{PODS}}}{RATE}))", "bad sid"),
                    (f"sum(rate(prosody_mod_bosh__bad_host_total{{{PODS}}}{RATE}))", "bad host"),
                    width=12,
                ),
            ],
        ),
        (
            "MUC and HTTP upload",
            [
                graph(
                    "MUC rooms in memory",
                    "Rooms held in memory per MUC component.",
                    "short",
                    (f"sum by (host) (prosody_mod_muc__live_room{{{HOST}}})", "{{host}}"),
                    width=6,
                ),
                graph(
                    "MUC room lookups",
                    "Rooms found in memory (hit), loaded from storage (miss), and evicted from "
                    "memory, per second.",
                    "ops",
                    (f"sum(rate(prosody_mod_muc__room_hit_total{{{HOST}}}{RATE}))", "hit"),
                    (f"sum(rate(prosody_mod_muc__room_miss_total{{{HOST}}}{RATE}))", "miss"),
                    (
                        f"sum(rate(prosody_mod_muc__room_eviction_total{{{HOST}}}{RATE}))",
                        "evicted",
                    ),
                    width=6,
                ),
                graph(
                    "Uploads",
                    "Files uploaded through mod_http_file_share per second, and their bytes.",
                    "ops",
                    (
                        "sum(rate(prosody_mod_http_file_share__upload_bytes_count"
                        f"{{{HOST}}}{RATE}))",
                        "uploads/s",
                    ),
                    (
                        f"sum(rate(prosody_mod_http_file_share__upload_bytes_sum{{{HOST}}}{RATE}))",
                        "bytes/s",
                    ),
                    width=6,
                ),
                graph(
                    "Upload storage",
                    "Bytes stored per upload component.",
                    "bytes",
                    (
                        "sum by (host) "
                        f"(prosody_mod_http_file_share__total_storage_bytes{{{HOST}}})",
                        "{{host}}",
                    ),
                    width=6,
                ),
            ],
        ),
        (
            "Statistics collection",
            [
                _p50_p99(
                    "Collection time",
                    "How long Prosody takes to collect its statistics. With "
                    'statistics_interval = "manual" each collection blocks its event loop.',
                    "prosody_stats_collection_seconds",
                ),
                _p50_p99(
                    "Processing time",
                    "How long Prosody takes to process the collected statistics.",
                    "prosody_stats_processing_seconds",
                ),
                graph(
                    "Collections",
                    "Collections per second and pod: one per interval is expected behind the "
                    "sidecar, whatever the number of scrapers.",
                    "ops",
                    (
                        "sum by (pod) "
                        f"(rate(prosody_stats_collection_seconds_count{{{PODS}}}{RATE}))",
                        "{{pod}}",
                    ),
                ),
            ],
        ),
        (
            f"Version and DNS {PROSODY_13_ONLY}",
            [
                graph(
                    "Prosody versions",
                    "Pods per Prosody version (prosody_info, emitted since Prosody 13).",
                    "short",
                    (f"count by (version) (prosody_info{{{PODS}}})", "{{version}}"),
                ),
                graph(
                    "DNS lookups",
                    "DNS lookups per second by query type (s2s and HTTP clients resolve names).",
                    "ops",
                    (
                        f"sum by (qtype) (rate(prosody_dns_seconds_count{{{PODS}}}{RATE}))",
                        "{{qtype}}",
                    ),
                ),
                graph(
                    "DNS lookup time (p99)",
                    "How long DNS lookups take, by query type.",
                    "s",
                    (_quantile(0.99, "prosody_dns_seconds", PODS, "qtype"), "{{qtype}}"),
                ),
            ],
        ),
        (
            "prosody-exporter (the sidecar)",
            [
                single(
                    "Sidecars collecting",
                    "Sidecars whose last collection from Prosody succeeded.",
                    f"sum(prosody_exporter_up{{{PODS}}})",
                ),
                single(
                    "Sidecars failing",
                    "Sidecars whose last collection from Prosody failed.",
                    f"count(prosody_exporter_up{{{PODS}}} == 0) or vector(0)",
                ),
                single(
                    "Stale snapshots",
                    "Sidecars no longer serving Prosody's metrics: no collection has succeeded "
                    "for several intervals.",
                    f"sum(prosody_exporter_snapshot_stale{{{PODS}}})",
                ),
                single(
                    "Scrapes refused",
                    "Requests the sidecars' CIDR allowlists refused in the last hour.",
                    f"sum(increase(prosody_exporter_denied_requests_total{{{PODS}}}[1h]))",
                ),
                single(
                    "Targets down",
                    "Sidecars Prometheus cannot scrape.",
                    f"count(up{{{PODS}}} == 0) or vector(0)",
                ),
                single(
                    "Sidecar versions",
                    "Distinct prosody-exporter versions running.",
                    f"count(count by (version) (prosody_exporter_build_info{{{PODS}}}))",
                ),
                graph(
                    "Snapshot age",
                    "Seconds since the snapshot each sidecar serves was collected.",
                    "s",
                    (f"prosody_exporter_snapshot_age_seconds{{{PODS}}}", "{{pod}}"),
                ),
                graph(
                    "Upstream errors",
                    "Failed collections from Prosody per second, by reason.",
                    "ops",
                    (
                        "sum by (pod, reason) "
                        f"(rate(prosody_exporter_upstream_errors_total{{{PODS}}}{RATE}))",
                        "{{pod}} {{reason}}",
                    ),
                ),
                graph(
                    "Collection duration (p99)",
                    "Time one collection from Prosody takes the sidecar, parsing included.",
                    "s",
                    (
                        _quantile(0.99, "prosody_exporter_collect_duration_seconds", PODS, "pod"),
                        "{{pod}}",
                    ),
                ),
                graph(
                    "Scrapes served and refused",
                    "Metrics responses per second by format, and requests refused by reason.",
                    "reqps",
                    (
                        f"sum by (format) (rate(prosody_exporter_scrapes_total{{{PODS}}}{RATE}))",
                        "served {{format}}",
                    ),
                    (
                        "sum by (reason) "
                        f"(rate(prosody_exporter_denied_requests_total{{{PODS}}}{RATE}))",
                        "refused {{reason}}",
                    ),
                    width=16,
                ),
            ],
        ),
    ]


def operator_row() -> tuple[str, list[stat.Panel | timeseries.Panel]]:
    def by(label: str, family: str) -> str:
        return f"sum by ({label}) (rate({family}{{{OPERATOR}}}{RATE}))"

    def p99(family: str) -> str:
        return _quantile(0.99, family, OPERATOR)

    return (
        "prosody-operator",
        [
            single(
                "Replicas up",
                "Replicas of the operator Prometheus scrapes; each serves the webhook.",
                f"count(prosody_operator_build_info{{{OPERATOR}}})",
            ),
            single(
                "Reconciling",
                "Replicas holding the Lease: 1 when all is well (0: nobody reconciles).",
                f"sum(prosody_operator_leader{{{OPERATOR}}})",
            ),
            single(
                "Pods without sidecar (failed admissions, 1h)",
                "Pods the webhook let start without the sidecar after an error.",
                f'sum(increase(prosody_operator_admissions_total{{{OPERATOR}, result="failed"}}'
                "[1h]))",
            ),
            graph(
                "Workloads by state",
                "Monitored workloads as the reconciling replica last saw them: injected, "
                "sidecar_missing, not_selected (by any Prometheus), config_problem.",
                "short",
                (f"max by (state) (prosody_operator_workloads{{{OPERATOR}}})", "{{state}}"),
            ),
            graph(
                "Admissions",
                "Pods the webhook decided, per second, by result.",
                "reqps",
                (by("result", "prosody_operator_admissions_total"), "{{result}}"),
            ),
            graph(
                "Time per admission",
                "How long the operator takes to decide a pod (the API server waits for it).",
                "s",
                (_quantile(0.5, "prosody_operator_admission_duration_seconds", OPERATOR), "p50"),
                (p99("prosody_operator_admission_duration_seconds"), "p99"),
            ),
            graph(
                "Reconciles",
                "Workload reconciles per second, by result.",
                "ops",
                (by("result", "prosody_operator_reconciles_total"), "{{result}}"),
            ),
            graph(
                "Reconcile and config evaluation time (p99)",
                "One reconcile (observe, plan, apply) and one evaluation of a Prosody config.",
                "s",
                (p99("prosody_operator_reconcile_duration_seconds"), "reconcile"),
                (p99("prosody_operator_config_evaluation_duration_seconds"), "evaluation"),
            ),
            graph(
                "Events posted",
                "Kubernetes Events the operator posted, per second, by reason.",
                "ops",
                (by("reason", "prosody_operator_events_posted_total"), "{{reason}}"),
            ),
            graph(
                "Caches",
                "Entries in the reconciling replica's indexes, Event log memory and queue.",
                "short",
                (f"max by (cache) (prosody_operator_cache_entries{{{OPERATOR}}})", "{{cache}}"),
                width=16,
            ),
            graph(
                "Memory",
                "Resident memory of each replica.",
                "bytes",
                (f"process_resident_memory_bytes{{{OPERATOR}}}", "{{pod}}"),
            ),
        ],
    )


def variables() -> Iterable[dashboard.QueryVariable | dashboard.DatasourceVariable]:
    yield dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    yield variable("namespace", "Namespace", "label_values(prosody_exporter_up, namespace)", ".+")
    workload = variable(
        "workload",
        "Workload",
        'label_values(prosody_exporter_up{namespace=~"$namespace", '
        'service=~".+-prosody-metrics"}, service)',
        ".+",
    )
    yield workload.regex("/^(.+)-prosody-metrics$/")
    yield variable(
        "pod",
        "Pod",
        'label_values(prosody_exporter_up{namespace=~"$namespace", '
        'service=~"($workload)-prosody-metrics"}, pod)',
        ".+",
    )
    # Any per-host family names the hosts: VirtualHosts and Components alike.
    yield variable(
        "host",
        "Host",
        f'label_values({{__name__=~"prosody_mod_.+", {PODS}}}, host)',
        ".*",
    )
    yield variable(
        "operator_namespace",
        "Operator namespace",
        "label_values(prosody_operator_build_info, namespace)",
        ".+",
    )


def build() -> dict[str, object]:
    board = (
        dashboard.Dashboard("Prosody")
        .uid(UID)
        .description(
            "Prosody's own metrics through the prosody-exporter sidecars the operator injects, "
            "the sidecars' health, and the operator's own."
        )
        .tags(["prosody", "xmpp"])
        .editable()
        .refresh("1m")
        .time("now-6h", "now")
        .timezone("")
    )
    for item in variables():
        board = board.with_variable(item)
    panel_id = 0
    for title, panels in [*rows(), operator_row()]:
        panel_id += 1
        board = board.with_row(dashboard.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    encoded: dict[str, object] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return encoded


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    DASHBOARD.write_text(render())
    print(f"wrote {DASHBOARD.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
