"""The pod annotations and the interval decision, table-driven (pure; no cluster)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from prosody_operator import annotations as ann
from prosody_operator.intervals import effective_interval, format_duration


@pytest.mark.parametrize(
    ("seconds", "text"), [(30, "30s"), (90, "90s"), (0.5, "500ms"), (1.25, "1250ms")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("annotation", "config", "env", "expected", "source"),
    [
        (15.0, 60.0, {"PROSODY_STATISTICS_INTERVAL": "20"}, 15.0, "annotation"),
        (None, 45.0, {"PROSODY_STATISTICS_INTERVAL": "20"}, 45.0, "prosody.cfg.lua:3"),
        (
            None,
            None,
            {"PROSODY_STATISTICS_INTERVAL": "20"},
            20.0,
            "env PROSODY_STATISTICS_INTERVAL",
        ),
        (None, None, {"PROSODY_STATISTICS_INTERVAL": "bogus"}, 60.0, "Prosody's default"),
        (None, None, {}, 60.0, "Prosody's default"),
        (None, "manual", {}, 30.0, "prosody.cfg.lua:3"),  # manual: the operator's setting
        ("manual", 60.0, {}, 30.0, "annotation"),
    ],
)
def test_effective_interval_order(annotation, config, env, expected, source):
    decided = effective_interval(
        annotation=annotation,
        config_interval=config,
        config_source="prosody.cfg.lua:3",
        env=env,
        manual_interval=30.0,
    )
    assert decided.scrape_seconds == expected
    assert decided.source == source
    assert decided.scrape_timeout == format_duration(min(10.0, expected * 0.8))


@pytest.mark.parametrize(
    ("annotations", "overrides", "problem_keys"),
    [
        ({}, ann.Overrides(), []),
        ({ann.INJECT: "false", ann.PORT: "9000"}, ann.Overrides(port=9000), []),
        (
            {
                ann.INJECT: "true",
                ann.PORT: "9000",
                ann.INTERVAL: "15s",
                ann.ALLOW_CIDRS: "198.18.0.0/15, 2001:db8::/32",
                ann.IMAGE: "registry.test/exp:1",
                ann.RESOURCES: '{"requests": {"cpu": "5m"}}',
                ann.CONTAINER: "xmpp",
            },
            ann.Overrides(
                port=9000,
                interval=15.0,
                allow_cidrs=("198.18.0.0/15", "2001:db8::/32"),
                image="registry.test/exp:1",
                resources={"requests": {"cpu": "5m"}},
                container="xmpp",
            ),
            [],
        ),
        (
            {
                ann.INJECT: "true",
                ann.PORT: "99999",
                ann.INTERVAL: "often",
                ann.ALLOW_CIDRS: "198.18.0.1/15",
                ann.IMAGE: "Not An Image",
                ann.RESOURCES: '{"requests": {"gpu": "1"}}',
            },
            ann.Overrides(),  # every invalid value falls back to the default
            [ann.PORT, ann.INTERVAL, ann.ALLOW_CIDRS, ann.IMAGE, ann.RESOURCES],
        ),
        ({ann.INJECT: "true", ann.RESOURCES: "{not json"}, ann.Overrides(), [ann.RESOURCES]),
        (
            {ann.SCRAPE_TIMEOUT: "1m30s", ann.SAMPLE_LIMIT: "20000"},
            ann.Overrides(scrape_timeout=90.0, sample_limit=20000),
            [],
        ),
        (
            {ann.SCRAPE_TIMEOUT: "500ms", ann.SAMPLE_LIMIT: "0"},
            ann.Overrides(scrape_timeout=0.5, sample_limit=0),
            [],
        ),
        (
            {ann.SCRAPE_TIMEOUT: "manual", ann.SAMPLE_LIMIT: "-1"},
            ann.Overrides(),
            [ann.SCRAPE_TIMEOUT, ann.SAMPLE_LIMIT],
        ),
        (
            {ann.SCRAPE_TIMEOUT: "0s", ann.SAMPLE_LIMIT: "lots"},
            ann.Overrides(),
            [ann.SCRAPE_TIMEOUT, ann.SAMPLE_LIMIT],
        ),
    ],
)
def test_parse_annotations(annotations, overrides, problem_keys):
    parsed = ann.parse_annotations(annotations)
    assert parsed.overrides == overrides
    assert sorted(p.split("=", 1)[0] for p in parsed.problems) == sorted(problem_keys)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100m", "0.1"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("5.", "5"),
        ("+1", "1"),
        ("64Mi", str(64 * 2**20)),
        ("1Gi", str(2**30)),
        ("1G", "1000000000"),
        ("1k", "1000"),
        ("1e3", "1000"),
        ("1E-3", "0.001"),
        ("250u", "0.00025"),
        ("2n", "0.000000002"),
    ],
)
def test_quantities_as_kubernetes_reads_them(value, expected):
    assert ann.quantity(value) == Decimal(expected)


@pytest.mark.parametrize(
    "value",
    ["", "1K", "1ki", "1 ", " 1", "1_000", "NaN", "Infinity", "1e", "0x10", "1.2.3", "-1", "10Ei"],
)
def test_quantities_kubernetes_rejects(value):
    with pytest.raises(ValueError):
        ann.quantity(value)


@pytest.mark.parametrize(
    ("resources", "problem"),
    [
        ({"requests": {"memory": "200Mi"}, "limits": {"memory": "128Mi"}}, "above its limit"),
        ({"requests": {"cpu": "501m"}, "limits": {"cpu": "0.5"}}, "above its limit"),
        ({"requests": {"memory": "1Gi"}, "limits": {"memory": "1G"}}, "above its limit"),
        ({"requests": {"cpu": 1}}, "is not a quantity"),
        ({"requests": {"cpu": "-10m"}}, "negative"),
        ({"limits": {"ephemeral-storage": "1Gi"}}, "only cpu and memory"),
        ({"requests": {"cpu": "1K"}}, "is not a quantity"),
    ],
)
def test_resources_the_api_server_would_reject_are_reported(resources, problem):
    parsed = ann.parse_annotations({ann.RESOURCES: json.dumps(resources)})
    assert parsed.overrides.resources is None  # the defaults instead: the pod is admitted
    assert len(parsed.problems) == 1 and problem in parsed.problems[0], parsed.problems


@pytest.mark.parametrize(
    "resources",
    [
        {"requests": {"cpu": "500m"}, "limits": {"cpu": "0.5"}},  # equal, in other units
        {"requests": {"memory": "1G"}, "limits": {"memory": "1Gi"}},
        {"requests": {"memory": "64Mi"}},  # no limit: nothing to exceed
        {"limits": {"cpu": "1"}},  # the API server sets the request to the limit
    ],
)
def test_resources_the_api_server_accepts(resources):
    parsed = ann.parse_annotations({ann.RESOURCES: json.dumps(resources)})
    assert parsed.problems == () and parsed.overrides.resources == resources
