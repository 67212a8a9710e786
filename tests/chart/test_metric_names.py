"""Every metric name the dashboard and the PrometheusRule query is one a real Prosody serves
through the real exporter, with the modules deployments commonly enable: on each Prosody version
testinfra runs (0.12.3 and 13.0.1); or one the real operator serves (its own metrics, read from
a prosody-operator running against the local control plane with the chart's identity, Lease and
certificate Secret).

Prosody runs with the modules of its own example config (prosody.cfg.lua.dist) plus those the
example lists for HTTP (BOSH, WebSocket, mod_http_openmetrics) and message archives, a MUC
component with mod_muc_mam and an HTTP upload component. The exporter in front of it serves
what Prometheus would scrape; its OpenMetrics families give the series names (a family with no
samples yet, like s2s connections on a server without peers, is still declared with its type,
which fixes its series' names). PromQL is read with a real parser (tools/promql.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from prosody_operator import metrics
from testinfra.exporter import ExporterProcess
from testinfra.operator import OperatorProcess
from testinfra.prosody import VERSIONS, ProsodyServer
from tools import chart, dashboard, promql

MODULES = (
    # prosody.cfg.lua.dist, enabled
    "disco", "roster", "saslauth", "tls", "blocklist", "bookmarks", "carbons", "dialback",
    "limits", "pep", "private", "smacks", "vcard4", "vcard_legacy", "csi_simple", "invites",
    "invites_adhoc", "invites_register", "ping", "register", "time", "uptime", "version",
    "admin_adhoc", "admin_shell", "posix",
    # listed there for HTTP clients, metrics and archives
    "bosh", "websocket", "http_openmetrics", "mam",
)  # fmt: skip
# Components after the global section (ProsodyServer puts its VirtualHost last).
COMPONENTS = """
Component "conference.localhost" "muc"
    modules_enabled = { "muc_mam" }
Component "upload.localhost" "http_file_share"
"""

# Series Prometheus adds to every target it scrapes.
PROMETHEUS_SERIES = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
}
# The series names of each OpenMetrics family type (the family name plus these suffixes).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def series_names(families: list[Metric]) -> set[str]:
    names = {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}
    samples = {sample.name for family in families for sample in family.samples}
    assert samples <= names, samples - names  # the suffix table is right where samples exist
    return names


@pytest.fixture(scope="module", params=VERSIONS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Series names a Prosody of this version serves through the exporter, and Prometheus'."""
    workdir = tmp_path_factory.mktemp(f"prosody-{request.param}")
    with (
        ProsodyServer(
            workdir / "prosody", extra_global=COMPONENTS, modules=MODULES, version=request.param
        ) as prosody,
        ExporterProcess(workdir, prosody.metrics_url) as exporter,
    ):
        response = httpx.get(f"{exporter.base_url}/metrics", headers={"Accept": OPENMETRICS})
    response.raise_for_status()
    families = list(text_string_to_metric_families(response.text))
    return series_names(families) | PROMETHEUS_SERIES


@pytest.fixture(scope="module")
def operator_families(k8s_client: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Metric]:
    """What the real operator serves on its metrics port, run as the chart runs each replica
    (the Lease, the shared certificate Secret)."""
    operator = OperatorProcess(k8s_client, tmp_path_factory.mktemp("operator"))
    operator.install_identity()
    operator.settings.update(operator.replica_settings())
    try:
        operator.start()
        response = httpx.get(operator.metrics_url, headers={"Accept": OPENMETRICS})
    finally:
        operator.uninstall()
    response.raise_for_status()
    return list(text_string_to_metric_families(response.text))


@pytest.fixture(scope="module")
def operator_served(operator_families: list[Metric]) -> set[str]:
    """Series names the real operator serves."""
    return series_names(operator_families)


@pytest.fixture
def known(served: set[str], operator_served: set[str]) -> set[str]:
    return served | operator_served


def test_the_modules_emit_what_the_dashboard_is_about(served: set[str]) -> None:
    """The Prosody really ran with the modules: a family of each is served."""
    for name in (
        "prosody_mod_c2s__connections",
        "prosody_mod_s2s__connections_inbound",
        "prosody_mod_s2s__authenticated_total",
        "prosody_mod_bosh__active_sessions",
        "prosody_mod_muc__live_room",
        "prosody_mod_http_file_share__total_storage_bytes",
        "prosody_mod_smacks__sessions_started_total",
        "prosody_stats_collection_seconds_bucket",
        "prosody_exporter_up",
    ):
        assert name in served, name


def dashboard_queries(board: dict[str, Any], prosody_13: bool) -> Iterator[tuple[str, str]]:
    """(where, query) for each panel target and query variable; the panels of the rows marked
    Prosody 13 only when `prosody_13`."""
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]
    in_13_row = False
    for panel in board["panels"]:
        if panel["type"] == "row":
            in_13_row = panel["title"].endswith(dashboard.PROSODY_13_ONLY)
            continue
        if in_13_row and not prosody_13:
            continue
        for target in panel["targets"]:
            yield f"panel {panel['title']!r}", target["expr"]


def rule_queries() -> Iterator[tuple[str, str]]:
    values = chart.CHART / "ci" / "prometheus-rule-dashboard-values.yaml"
    objects = chart.render_objects("names", "prosody", [values])
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            yield f"alert {item['alert']}", item["expr"]


def unknown_names(queries: Iterator[tuple[str, str]], served: set[str]) -> list[str]:
    unknown = []
    for where, query in queries:
        for selector in promql.grafana_query_selectors(query):
            names = promql.family_names(selector, served)
            if not names or not names <= served:
                unknown.append(f"{where}: {selector.name or selector.matchers}")
    return unknown


@pytest.mark.cluster
def test_the_operator_serves_what_its_row_and_alerts_are_about(operator_served: set[str]) -> None:
    for name in (
        "prosody_operator_admissions_total",
        "prosody_operator_admission_duration_seconds_bucket",
        "prosody_operator_reconciles_total",
        "prosody_operator_config_evaluations_total",
        "prosody_operator_events_posted_total",
        "prosody_operator_workloads",
        "prosody_operator_cache_entries",
        "prosody_operator_leader",
        "process_resident_memory_bytes",
    ):
        assert name in operator_served, name


@pytest.mark.cluster
def test_every_workload_state_is_served_before_any_workload(
    operator_families: list[Metric],
) -> None:
    """The alerts and the dashboard select states by label (state="sidecar_missing"): each has
    its series from the start, at 0, rather than appearing with its first workload."""
    (workloads,) = [f for f in operator_families if f.name == "prosody_operator_workloads"]
    served = {sample.labels["state"]: sample.value for sample in workloads.samples}
    assert served == dict.fromkeys(metrics.STATES, 0.0)


@pytest.mark.cluster
def test_dashboard_reads_only_served_names(known: set[str], request: pytest.FixtureRequest) -> None:
    board = json.loads(dashboard.DASHBOARD.read_text())
    # The row marked dashboard.PROSODY_13_ONLY is checked on 13 and later.
    prosody_13 = not request.node.callspec.params["served"].startswith("0.")
    assert unknown_names(dashboard_queries(board, prosody_13), known) == []


@pytest.mark.cluster
def test_alerts_read_only_served_names(known: set[str]) -> None:
    assert unknown_names(rule_queries(), known) == []


def test_a_misspelt_name_is_caught(served: set[str]) -> None:
    """The check itself: a name Prosody does not serve, and a `__name__` regex matching none."""
    queries = iter(
        [
            ("panel", 'sum(prosody_mod_c2s__connection{pod=~"$pod"})'),
            ("panel", "rate(prosody_mod_c2s__encrypted[$__rate_interval])"),
            ("variable", 'label_values({__name__=~"prosody_mod_nothing_.+"}, host)'),
        ]
    )
    assert len(unknown_names(queries, served)) == 3
