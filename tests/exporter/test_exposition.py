"""Parsing, conversion and negotiation: pure functions, tested table-driven and with hypothesis."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from prosody_exporter.exposition import (
    ExpositionError,
    Format,
    RenderedBody,
    accepts_gzip,
    negotiate_format,
    parse_exposition,
    render,
)

DATA = Path(__file__).parent / "data"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, Format.PROMETHEUS_TEXT),
        ("", Format.PROMETHEUS_TEXT),
        ("*/*", Format.PROMETHEUS_TEXT),
        ("text/plain", Format.PROMETHEUS_TEXT),
        (PROMETHEUS_ACCEPT, Format.OPENMETRICS),
        ("application/openmetrics-text", Format.OPENMETRICS),
        ("application/openmetrics-text; version=0.0.1", Format.OPENMETRICS),
        ("application/openmetrics-text; version=2.0.0", Format.PROMETHEUS_TEXT),
        ("text/plain;q=1, application/openmetrics-text;q=0.5", Format.PROMETHEUS_TEXT),
        ("text/plain;q=0.2, application/openmetrics-text;q=0.5", Format.OPENMETRICS),
        ("application/openmetrics-text;q=0", Format.PROMETHEUS_TEXT),
        ("application/openmetrics-text;q=bogus", Format.PROMETHEUS_TEXT),
        ("application/json", Format.PROMETHEUS_TEXT),
    ],
)
def test_negotiate_format(accept, expected):
    assert negotiate_format(accept) is expected


@pytest.mark.parametrize(
    ("accept_encoding", "expected"),
    [
        (None, False),
        ("identity", False),
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("*", True),
        ("GZIP", True),
    ],
)
def test_accepts_gzip(accept_encoding, expected):
    assert accepts_gzip(accept_encoding) is expected


@given(st.text(max_size=300))
def test_negotiation_never_fails_and_picks_a_format(accept):
    assert negotiate_format(accept) in set(Format)


@given(head=st.binary(max_size=5000), tail=st.binary(max_size=500))
def test_gzip_body_with_tail_is_one_valid_stream(head, tail):
    body = RenderedBody.of(head)
    assert gzip.decompress(body.with_tail(tail, gzip=True)) == head + tail
    assert body.with_tail(tail, gzip=False) == head + tail
    # The kept compressor state is copied, never consumed: a second response is identical.
    assert gzip.decompress(body.with_tail(tail, gzip=True)) == head + tail


def test_old_mod_prometheus_output_converts_to_valid_openmetrics():
    families = parse_exposition((DATA / "mod_prometheus.txt").read_text())
    openmetrics = (render(families, Format.OPENMETRICS) + b"# EOF\n").decode()
    reparsed = {f.name: f for f in parse_om(openmetrics)}  # the strict parser accepts it
    stanzas = reparsed["prosody_stanzas"]
    assert stanzas.type == "counter"
    assert {s.name for s in stanzas.samples} == {"prosody_stanzas_total"}
    message_in = next(s for s in stanzas.samples if s.labels["type"] == "message_in")
    assert message_in.value == 1274
    assert float(message_in.timestamp) == pytest.approx(1543512345.123)  # ms became seconds
    text = render(families, Format.PROMETHEUS_TEXT).decode()
    assert 'prosody_stanzas_total{type="message_in"} 1274.0 1543512345123' in text


def test_prosody_012_output_round_trips():
    body = (DATA / "prosody-0.12.txt").read_text()
    families = parse_exposition(body)
    assert {f.name for f in families} >= {
        "prosody_stats_collection_seconds",
        "prosody_mod_c2s__connections",
    }
    text = render(families, Format.PROMETHEUS_TEXT).decode()
    assert "prosody_mod_s2s__accepted_tcp_total 0.0" in text
    assert "# TYPE prosody_mod_s2s__accepted_tcp_created gauge" in text
    openmetrics = render(families, Format.OPENMETRICS).decode()
    assert "# UNIT prosody_stats_collection_seconds seconds" in openmetrics
    assert not openmetrics.endswith("# EOF\n")  # left open for our own metrics


@pytest.mark.parametrize(
    "body",
    [
        "# TYPE x counter\nx_total not-a-number\n# EOF\n",
        "this is not an exposition",
        'metric{label="unterminated} 1\n',
        '# TYPE h histogram\nh_bucket{le="1"} 1\n# EOF\n',  # histogram without +Inf bucket
    ],
)
def test_malformed_exposition_is_an_exposition_error(body):
    with pytest.raises(ExpositionError):
        parse_exposition(body)


# Property: whatever families we hold, both formats carry the same samples with the same values.

metric_names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True).filter(
    lambda n: not n.endswith(("_total", "_created", "_count", "_sum", "_bucket", "_info"))
)
label_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10
)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
counts = st.integers(min_value=0, max_value=10**6)


@st.composite
def families(draw: st.DrawFn) -> list[Metric]:
    names = draw(st.lists(metric_names, min_size=1, max_size=5, unique=True))
    result: list[Metric] = []
    for name in names:
        kind = draw(st.sampled_from(["gauge", "counter", "histogram"]))
        label_sets = draw(st.lists(label_values, max_size=3, unique=True))
        if kind == "gauge":
            family: Metric = GaugeMetricFamily(name, "help", labels=["host"])
            for value in label_sets:
                family.add_metric([value], draw(finite))
        elif kind == "counter":
            family = CounterMetricFamily(name, "help", labels=["host"])
            for value in label_sets:
                family.add_metric([value], draw(counts), created=draw(counts))
        else:
            family = HistogramMetricFamily(name, "help", labels=["host"])
            for value in label_sets:
                low, high = sorted(draw(st.lists(counts, min_size=2, max_size=2)))
                family.add_metric([value], [("1.0", low), ("+Inf", high)], sum_value=draw(counts))
        result.append(family)
    return result


def samples_of(parsed: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parsed for s in f.samples}


@given(families())
def test_both_formats_carry_the_same_samples(held):
    openmetrics = (render(held, Format.OPENMETRICS) + b"# EOF\n").decode()
    text = render(held, Format.PROMETHEUS_TEXT).decode()
    from_om = samples_of(parse_exposition(openmetrics))
    from_text = samples_of(list(parse_text(text)))
    assert from_om.keys() == from_text.keys()
    for key, value in from_om.items():
        assert math.isclose(value, from_text[key], rel_tol=1e-6), key


@given(families())
def test_openmetrics_output_reparses_to_the_same_families(held):
    openmetrics = (render(held, Format.OPENMETRICS) + b"# EOF\n").decode()
    again = render(parse_exposition(openmetrics), Format.OPENMETRICS).decode() + "# EOF\n"
    assert again == openmetrics
