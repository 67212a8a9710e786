"""evaluate_prosody_config: table-driven cases, cross-checked against Prosody's own code.

Every case runs through evaluate_prosody_config and, unless it is about the operator's sandbox or
limits, through Prosody 0.12's real core/configmanager.lua and core/statsmanager.lua
(data/prosody/oracle.lua, run by lua5.4 on the same files, written to disk, and the same
environment): both must agree on whether the config loads, on the error's file, line and
message, on `statistics`, the effective interval, modules_enabled and duplicate-option warnings.
A few cases also go through `prosodyctl check config` and through a running Prosody.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prosody_operator.prosody import ConfigMount
from prosody_operator.prosody_config import (
    Finding,
    Interval,
    StatisticsConfig,
    evaluate_prosody_config,
    parse_interval_value,
)
from testinfra.procs import Process, free_port, require_program

DATA = Path(__file__).parent / "data" / "prosody"
PROSODY_SOURCE = Path("/usr/lib/prosody")
MAIN = "prosody.cfg.lua"
DEFAULT = "default (60s once statistics are on)"
OFF = "statistics are off"
NOT_EVALUATED = "config not evaluated (see findings)"

LONG_NAME = "conf.d/metrics-settings-for-the-prosody-exporter-sidecar-container.cfg.lua"
OPENMETRICS = 'modules_enabled = { "http_openmetrics" }'
NO_OPENMETRICS = '"http_openmetrics" is not in the global modules_enabled'
STATS_OFF = "statistics are off: neither statistics nor statistics_interval is set"
CONFIG_ERROR = "config error, Prosody refuses to start: "
LOOP = "stopped evaluating the config after"
SANDBOX = "is not available in the operator's sandbox"


def cfg(*lines: str) -> str:
    """A config file whose line numbers are the argument positions (1-based)."""
    return "\n".join(lines) + "\n"


def data_files(folder: str) -> dict[str, str]:
    root = DATA / folder
    return {
        str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*.cfg.lua"))
    }


OFFICIAL = data_files("official")[MAIN]
OFFICIAL_ON = {
    "PROSODY_STATISTICS": "internal",
    "PROSODY_STATISTICS_INTERVAL": "30",
    "PROSODY_ENABLE_MODULES": "http_openmetrics,mam",
    "PROSODY_VIRTUAL_HOSTS": "example.org",
}


def line_of(text: str, start: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(start))


OFFICIAL_MODULES_LINE = line_of(OFFICIAL, "modules_enabled =")
OFFICIAL_INTERVAL_LINE = line_of(OFFICIAL, "statistics_interval =")


@dataclass(frozen=True)
class Case:
    id: str
    files: Mapping[str, str]
    provider: str | None = None
    interval: Interval | None = None
    source: str | None = None  # the exact interval_source
    findings: tuple[tuple[str, int | None, str], ...] = ()  # (file, line, part of the message)
    env: Mapping[str, str] = field(default_factory=dict)
    modules: frozenset[str] | None = None
    # "same": Prosody's own code must agree; "both-fail": it must fail to load the config too;
    # "skip": about the operator's sandbox or limits, where Prosody would do something else.
    prosody: Literal["same", "both-fail", "skip"] = "same"


CASES = [
    # --- the interval ---------------------------------------------------------------------------
    Case(
        "numeric interval",
        {MAIN: cfg(OPENMETRICS, 'statistics = "internal"', "statistics_interval = 30")},
        provider="internal",
        interval=30.0,
        source="prosody.cfg.lua:3",
        modules=frozenset({"http_openmetrics"}),
    ),
    Case(
        "numeric interval alone implies the internal provider",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 15")},
        interval=15.0,
        source="prosody.cfg.lua:2",
    ),
    Case(
        "interval as a string is read with Lua's tonumber",
        {MAIN: cfg(OPENMETRICS, 'statistics = "internal"', 'statistics_interval = " 0x1E "')},
        provider="internal",
        interval=30.0,
        source="prosody.cfg.lua:3",
    ),
    Case(
        "manual",
        {MAIN: cfg(OPENMETRICS, 'statistics = "internal"', 'statistics_interval = "manual"')},
        provider="internal",
        interval="manual",
        source="prosody.cfg.lua:3",
    ),
    Case(
        "manual without statistics = internal leaves statistics off",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = "manual"')},
        source=OFF,
        findings=((MAIN, 2, 'statistics_interval = "manual" without statistics = "internal"'),),
    ),
    Case(
        "statistics without interval: 60 s",
        {MAIN: cfg(OPENMETRICS, 'statistics = "internal"')},
        provider="internal",
        interval=60.0,
        source=DEFAULT,
    ),
    Case(
        "invalid interval with a provider: Prosody falls back to 60 s",
        {MAIN: cfg(OPENMETRICS, 'statistics = "internal"', 'statistics_interval = "30s"')},
        provider="internal",
        interval=60.0,
        source=DEFAULT,
        findings=((MAIN, 3, 'statistics_interval = "30s" is neither a number'),),
    ),
    Case(
        "invalid interval without a provider: statistics stay off",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = { 30 }")},
        source=OFF,
        findings=((MAIN, 2, "statistics_interval = a table is neither a number"),),
    ),
    Case(
        "zero interval",
        {MAIN: cfg(OPENMETRICS, 'statistics = "internal"', "statistics_interval = 0")},
        provider="internal",
        interval=0.0,
        source="prosody.cfg.lua:3",
        findings=((MAIN, 3, "statistics_interval = 0 is not a positive number"),),
    ),
    Case(
        "the last assignment wins, with a duplicate warning",
        {
            MAIN: cfg(
                OPENMETRICS,
                'statistics = "internal"',
                "statistics_interval = 30",
                "statistics_interval = 10",
            )
        },
        provider="internal",
        interval=10.0,
        source="prosody.cfg.lua:4",
        findings=((MAIN, 4, "Duplicate option 'statistics_interval'"),),
    ),
    # --- sections ------------------------------------------------------------------------------
    Case(
        "interval under a VirtualHost does not take effect",
        {
            MAIN: cfg(
                OPENMETRICS,
                'statistics = "internal"',
                'VirtualHost "Example.com"',
                "    statistics_interval = 5",
            )
        },
        provider="internal",
        interval=60.0,
        source=DEFAULT,
        findings=((MAIN, 4, "statistics_interval is set under VirtualHost 'example.com'"),),
    ),
    Case(
        "options table after a VirtualHost name",
        {
            MAIN: cfg(
                OPENMETRICS,
                "statistics_interval = 20",
                'VirtualHost "example.com" {',
                '    statistics = "statsd";',
                "}",
            )
        },
        interval=20.0,
        source="prosody.cfg.lua:2",
        findings=((MAIN, 3, "statistics is set under VirtualHost 'example.com'"),),
    ),
    Case(
        "statistics under a Component: statistics off",
        {
            MAIN: cfg(
                OPENMETRICS,
                'Component "rooms.example.com" "muc"',
                '    statistics = "internal"',
                "    statistics_interval = 30",
            )
        },
        source=OFF,
        findings=(
            (MAIN, 3, "statistics is set under Component 'rooms.example.com'"),
            (MAIN, 4, "statistics_interval is set under Component 'rooms.example.com'"),
            (MAIN, None, STATS_OFF),
        ),
    ),
    Case(
        "same option in two hosts is no duplicate",
        {
            MAIN: cfg(
                OPENMETRICS,
                "statistics_interval = 30",
                'VirtualHost "a.example"',
                "    http_ports = { 5280 }",
                'VirtualHost "b.example"',
                "    http_ports = { 5280 }",
            )
        },
        interval=30.0,
        source="prosody.cfg.lua:2",
        findings=(
            (MAIN, 4, "http_ports is set under VirtualHost 'a.example'"),
            (MAIN, 6, "http_ports is set under VirtualHost 'b.example'"),
        ),
    ),
    # --- Include ------------------------------------------------------------------------------
    Case(
        "Include of conf.d after the hosts sets the interval globally (Debian's layout)",
        data_files("debian"),
        provider="internal",
        interval=15.0,
        source="conf.d/metrics.cfg.lua:4",
    ),
    Case(
        "Include of one file, relative to the including file",
        {
            MAIN: cfg(OPENMETRICS, 'VirtualHost "localhost"', 'Include "stats.lua"'),
            "stats.lua": cfg('statistics = "internal"', 'statistics_interval = "manual"'),
        },
        provider="internal",
        interval="manual",
        source="stats.lua:2",
    ),
    Case(
        "Include by absolute path under the config directory",
        {
            MAIN: cfg(OPENMETRICS, 'Include "/etc/prosody/extra/stats.cfg.lua"'),
            "extra/stats.cfg.lua": cfg("statistics_interval = 45"),
        },
        interval=45.0,
        source="extra/stats.cfg.lua:1",
    ),
    Case(
        "an Included file's own VirtualHost section",
        {
            MAIN: cfg(OPENMETRICS, 'statistics = "internal"', 'Include "conf.d/*.cfg.lua"'),
            "conf.d/host.cfg.lua": cfg('VirtualHost "example.net"', "statistics_interval = 10"),
        },
        provider="internal",
        interval=60.0,
        source=DEFAULT,
        findings=(("conf.d/host.cfg.lua", 2, "statistics_interval is set under VirtualHost"),),
    ),
    Case(
        "a glob that matches nothing is fine",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 30", 'Include "conf.d/*.cfg.lua"')},
        interval=30.0,
        source="prosody.cfg.lua:2",
        prosody="skip",  # Prosody 0.12 fails when the directory itself is missing
    ),
    Case(
        "two files of one glob set the interval: order not defined",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            "conf.d/a.cfg.lua": cfg("statistics_interval = 10"),
            "conf.d/b.cfg.lua": cfg("statistics_interval = 20"),
            "conf.d/.hidden.cfg.lua": cfg("statistics_interval = 30"),
            "conf.d/c.txt": cfg("statistics_interval = 40"),
        },
        interval=20.0,
        source="conf.d/b.cfg.lua:1",
        findings=((MAIN, 2, "statistics_interval is set in several files"),),
        prosody="skip",  # the winner depends on the directory order
    ),
    Case(
        "Include of a missing file",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 30", 'Include "missing.cfg.lua"')},
        source=NOT_EVALUATED,
        findings=((MAIN, 3, "Error loading included /etc/prosody/missing.cfg.lua"),),
        prosody="both-fail",  # Prosody's message has no line
    ),
    Case(
        "Include of nothing (an unset ENV_ variable)",
        {MAIN: cfg(OPENMETRICS, "Include (ENV_PROSODY_EXTRA_CONFIG)")},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "Include needs a file name, got nil"),),
        prosody="both-fail",  # Prosody: "attempt to index a nil value (local 'file')"
    ),
    Case(
        "Include loop",
        {
            MAIN: cfg(OPENMETRICS, 'Include "a.cfg.lua"'),
            "a.cfg.lua": cfg("", 'Include "prosody.cfg.lua"'),
        },
        source=NOT_EVALUATED,
        findings=(
            ("a.cfg.lua", 2, "Include loop: prosody.cfg.lua -> a.cfg.lua -> prosody.cfg.lua"),
        ),
        prosody="skip",  # Prosody recurses until the C stack overflows
    ),
    # --- ENV_ and the official image --------------------------------------------------------
    Case(
        "ENV_: official image config with statistics from the environment",
        {MAIN: OFFICIAL},
        env=OFFICIAL_ON,
        provider="internal",
        interval=30.0,
        source=f"prosody.cfg.lua:{OFFICIAL_INTERVAL_LINE} (via ENV_PROSODY_STATISTICS_INTERVAL)",
    ),
    Case(
        "ENV_: official image config, manual",
        {MAIN: OFFICIAL},
        env={**OFFICIAL_ON, "PROSODY_STATISTICS_INTERVAL": "manual"},
        provider="internal",
        interval="manual",
        source=f"prosody.cfg.lua:{OFFICIAL_INTERVAL_LINE} (via ENV_PROSODY_STATISTICS_INTERVAL)",
    ),
    Case(
        "ENV_: official image config without statistics variables",
        {MAIN: OFFICIAL},
        source=OFF,
        findings=(
            (MAIN, None, STATS_OFF),
            (MAIN, OFFICIAL_MODULES_LINE, NO_OPENMETRICS),
        ),
    ),
    Case(
        "ENV_: official image config, interval from a conf.d file of a ConfigMap",
        {
            MAIN: OFFICIAL,
            **ConfigMount("metrics", "/etc/prosody/conf.d").files(
                {"metrics.cfg.lua": cfg('statistics = "internal"', "statistics_interval = 20")}
            ),
        },
        env={"PROSODY_ENABLE_MODULES": "http_openmetrics"},
        provider="internal",
        interval=20.0,
        source="conf.d/metrics.cfg.lua:2",
    ),
    Case(
        "ENV_: official image config, PROSODY_EXTRA_CONFIG",
        {MAIN: OFFICIAL, "extra.lua": cfg("statistics_interval = 25")},
        env={"PROSODY_EXTRA_CONFIG": "extra.lua", "PROSODY_ENABLE_MODULES": "http_openmetrics"},
        interval=25.0,
        source="extra.lua:1",
    ),
    Case(
        "os.getenv reads the same environment",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = os.getenv("INTERVAL")')},
        env={"INTERVAL": "12"},
        interval=12.0,
        source="prosody.cfg.lua:2",
        prosody="skip",  # Prosody's os.getenv is the real one; same value, no ENV_ read to name
    ),
    # --- providers and the module -------------------------------------------------------------
    Case(
        "statistics off",
        {MAIN: cfg(OPENMETRICS)},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
    ),
    Case(
        "unknown provider",
        {MAIN: cfg(OPENMETRICS, 'statistics = "prometheus"', "statistics_interval = 30")},
        provider="prometheus",
        source=OFF,
        findings=((MAIN, 2, 'statistics = "prometheus" is not a provider Prosody knows'),),
    ),
    Case(
        "statistics = true is no provider name",
        {MAIN: cfg(OPENMETRICS, "statistics = true", "statistics_interval = 30")},
        source="statistics setting is invalid",
        findings=((MAIN, 2, "statistics = true is not a provider name: Prosody 0.12 fails"),),
    ),
    Case(
        "statistics = false and a numeric interval: internal",
        {MAIN: cfg(OPENMETRICS, "statistics = false", "statistics_interval = 30")},
        interval=30.0,
        source="prosody.cfg.lua:3",
    ),
    Case(
        "statsd without a server",
        {MAIN: cfg(OPENMETRICS, 'statistics = "statsd"')},
        provider="statsd",
        source=OFF,
        findings=((MAIN, 2, "without statistics_config.statsd_server"),),
    ),
    Case(
        "statsd with a server",
        {
            MAIN: cfg(
                OPENMETRICS,
                'statistics = "statsd"',
                'statistics_config = { statsd_server = "127.0.0.1" }',
            )
        },
        provider="statsd",
        interval=60.0,
        source=DEFAULT,
        findings=((MAIN, 2, 'statistics = "statsd" sends the metrics to a statsd server'),),
    ),
    Case(
        "http_openmetrics missing",
        {MAIN: cfg('modules_enabled = { "ping" }', 'statistics = "internal"')},
        provider="internal",
        interval=60.0,
        source=DEFAULT,
        modules=frozenset({"ping"}),
        findings=((MAIN, 1, NO_OPENMETRICS),),
    ),
    Case(
        "http_openmetrics with a mod_ prefix",
        {MAIN: cfg('modules_enabled = { "mod_http_openmetrics" }', "statistics_interval = 30")},
        interval=30.0,
        source="prosody.cfg.lua:2",
        findings=((MAIN, 1, 'it lists "mod_http_openmetrics"'),),
    ),
    Case(
        "http_openmetrics only under a VirtualHost",
        {
            MAIN: cfg(
                "statistics_interval = 30",
                'VirtualHost "example.com"',
                '    modules_enabled = { "http_openmetrics" }',
            )
        },
        interval=30.0,
        source="prosody.cfg.lua:1",
        findings=((MAIN, None, "it is listed under 'example.com' only"),),
    ),
    Case(
        "http_openmetrics in modules_disabled",
        {
            MAIN: cfg(
                OPENMETRICS, "statistics_interval = 30", 'modules_disabled = { "http_openmetrics" }'
            )
        },
        interval=30.0,
        source="prosody.cfg.lua:2",
        findings=((MAIN, 3, "is in the global modules_disabled"),),
    ),
    # --- errors -----------------------------------------------------------------------------
    Case(
        "syntax error",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 30", "statistics = = 1")},
        source=NOT_EVALUATED,
        findings=((MAIN, 3, CONFIG_ERROR + "unexpected symbol near '='"),),
    ),
    Case(
        "syntax error at the end of an Included file",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            "conf.d/stats.cfg.lua": cfg("if ENV_X then", "  statistics_interval = 30"),
        },
        source=NOT_EVALUATED,
        findings=(("conf.d/stats.cfg.lua", 3, "'end' expected (to close 'if' at line 1)"),),
    ),
    Case(
        "runtime error",
        {MAIN: cfg(OPENMETRICS, "local limits = nil", "limits.c2s = {}")},
        source=NOT_EVALUATED,
        findings=((MAIN, 3, CONFIG_ERROR + "attempt to index a nil value (local 'limits')"),),
    ),
    Case(
        "runtime error in an Included file, inside a function",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            "conf.d/x.cfg.lua": cfg(
                "local function interval()",
                '  return 10 + "ten"',
                "end",
                "statistics_interval = interval()",
            ),
        },
        source=NOT_EVALUATED,
        findings=(("conf.d/x.cfg.lua", 2, "attempt to add a 'number' with a 'string'"),),
    ),
    Case(
        "error() with a message",
        {MAIN: cfg(OPENMETRICS, 'error("set PROSODY_DOMAIN")')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, CONFIG_ERROR + "set PROSODY_DOMAIN"),),
    ),
    Case(
        "a Prosody 13 config (Lua escape) on Prosody 0.12",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = Lua.tonumber("30")')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "attempt to index a nil value (global 'Lua')"),),
    ),
    Case(
        "FileContents does not exist in 0.12",
        {MAIN: cfg(OPENMETRICS, 'statistics = FileContents("stats.txt")')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "attempt to call a nil value (global 'FileContents')"),),
    ),
    Case(
        "Component name clashes with a VirtualHost",
        {MAIN: cfg(OPENMETRICS, 'VirtualHost "example.com"', 'Component "example.com" "muc"')},
        source=NOT_EVALUATED,
        findings=(
            (MAIN, 3, 'Component "example.com" clashes with previously defined VirtualHost'),
        ),
    ),
    Case(
        "a long file name keeps its line numbers",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            "conf.d/" + "x" * 70 + ".cfg.lua": cfg("", "statistics_interval = = 5"),
        },
        source=NOT_EVALUATED,
        findings=(("conf.d/" + "x" * 70 + ".cfg.lua", 2, "unexpected symbol near '='"),),
    ),
    Case(
        "a duplicate option in a file with a long path stops Prosody 0.12.3",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            LONG_NAME: cfg("statistics_interval = 5", "statistics_interval = 6"),
        },
        source=NOT_EVALUATED,
        findings=((LONG_NAME, 2, "bad argument #2 to 'format' (number expected, got nil)"),),
    ),
    Case(
        "no main config file",
        {"other.cfg.lua": cfg(OPENMETRICS)},
        source=NOT_EVALUATED,
        findings=((MAIN, None, "no such config file"),),
        prosody="skip",
    ),
    # --- limits and sandbox -----------------------------------------------------------------
    Case(
        "endless loop",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 30", "while true do end")},
        source=NOT_EVALUATED,
        findings=((MAIN, 3, LOOP),),
        prosody="skip",
    ),
    Case(
        "endless loop that pcall would swallow",
        {
            MAIN: cfg(
                OPENMETRICS,
                "while true do",
                "  pcall(function() while true do end end)",
                "end",
            )
        },
        source=NOT_EVALUATED,
        findings=((MAIN, 3, LOOP),),
        prosody="skip",
    ),
    Case(
        "endless loop in a coroutine",
        {
            MAIN: cfg(
                OPENMETRICS,
                "local spin = coroutine.wrap(function()",
                "  while true do end",
                "end)",
                "spin()",
            )
        },
        source=NOT_EVALUATED,
        findings=((MAIN, 3, LOOP),),
        prosody="skip",
    ),
    Case(
        "endless loop in load's reader",
        {MAIN: cfg(OPENMETRICS, "while true do load(function() while true do end end) end")},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, LOOP),),
        prosody="skip",
    ),
    Case(
        "too much memory",
        {MAIN: cfg(OPENMETRICS, 'local big = ("x"):rep(2^30)')},
        source=NOT_EVALUATED,
        findings=((MAIN, None, "needed more than 64 MiB of memory"),),
        prosody="skip",
    ),
    Case(
        "RunScript is reported, not run",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 30", 'RunScript "setup.lua"')},
        interval=30.0,
        source="prosody.cfg.lua:2",
        findings=((MAIN, 3, 'RunScript "setup.lua" was not run'),),
        prosody="skip",  # Prosody would run it (and fail: it does not exist)
    ),
    Case(
        "require of util.pposix works (the official config uses it)",
        {MAIN: cfg(OPENMETRICS, 'VirtualHost (require "util.pposix".uname().nodename)')},
        env={"HOSTNAME": "prosody-0"},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
    ),
    Case(
        "python is not reachable",
        {MAIN: cfg(OPENMETRICS, 'statistics = (python == nil) and "internal" or "python"')},
        provider="internal",
        interval=60.0,
        source=DEFAULT,
    ),
    Case(
        "the string metatable is off limits",
        {
            MAIN: cfg(
                OPENMETRICS,
                'getmetatable("").__index = function() error("x") end',
                'VirtualHost "Example.com"',
                "statistics_interval = 5",
            )
        },
        source=OFF,
        findings=(
            (MAIN, 4, "statistics_interval is set under VirtualHost 'example.com'"),
            (MAIN, None, STATS_OFF),
        ),
        prosody="skip",  # in Prosody this replaces the methods of every string: it breaks
    ),
]

SANDBOX_ESCAPES = [
    ('os.execute("touch {marker}")', "os.execute " + SANDBOX),
    ('io.open("{marker}", "w"):write("x")', "io.open " + SANDBOX),
    ('io.popen("touch {marker}")', "io.popen " + SANDBOX),
    ('require "os".execute("touch {marker}")', 'require "os" ' + SANDBOX),
    ('dofile("{marker}")', "dofile " + SANDBOX),
    ('loadfile("{marker}")', "loadfile " + SANDBOX),
    ('package.loadlib("libc.so.6", "system")', "package.loadlib " + SANDBOX),
    ("debug.sethook()", "debug.sethook " + SANDBOX),
    ('os.remove("{marker}")', "os.remove " + SANDBOX),
    (
        "load(string.dump(function() end))",
        "binary chunks are not available in the operator's sandbox",
    ),
    (
        "setmetatable({}, { __gc = function() while true do end end })",
        "__gc metamethods are not available in the operator's sandbox",
    ),
    ('load("return os.execute")()("touch {marker}")', "os.execute " + SANDBOX),
    ('assert(os.getenv("HOME") == nil and ENV_PATH == nil)', None),  # only the given env
]


def assert_findings(
    actual: tuple[Finding, ...], expected: tuple[tuple[str, int | None, str], ...]
) -> None:
    remaining = list(actual)
    for file, line, text in expected:
        match = next(
            (f for f in remaining if f.file == file and f.line == line and text in f.message), None
        )
        assert match is not None, (
            f"no finding {file}:{line} containing {text!r} among:\n"
            + "\n".join(str(f) for f in actual)
        )
        remaining.remove(match)
    assert not remaining, "unexpected findings:\n" + "\n".join(str(f) for f in remaining)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A scratch directory with a short path: Prosody 0.12.3 fails on a duplicate option in a
    config file whose path is longer than 59 characters, and pytest's tmp_path is that long."""
    path = Path(tempfile.mkdtemp(prefix="pc", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_evaluate(case: Case, short_dir: Path) -> None:
    result = evaluate_prosody_config(case.files, env=case.env)

    assert (result.provider, result.interval) == (case.provider, case.interval)
    if case.source is not None:
        assert result.interval_source == case.source
    if case.modules is not None:
        assert result.modules_enabled == case.modules
    assert_findings(result.findings, case.findings)

    if case.prosody != "skip":
        assert_same_as_prosody(case, short_dir)


# --- Prosody's own reading of the same config ----------------------------------------------------


@dataclass(frozen=True)
class ProsodyReading:
    error: str | None  # the config does not load
    startup_error: str | None  # it loads, but statsmanager fails (Prosody stops at startup)
    warnings: tuple[str, ...]
    statistics: str | None
    modules: frozenset[str]
    interval: Interval | None


def read_with_prosody(config_dir: Path, env: Mapping[str, str]) -> ProsodyReading:
    lua = require_program("lua5.4")
    if not (PROSODY_SOURCE / "core" / "configmanager.lua").exists():
        pytest.fail(f"Prosody's source is not in {PROSODY_SOURCE}: run `make system-packages`")
    done = subprocess.run(
        [lua, str(DATA / "oracle.lua"), str(config_dir / MAIN)],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=config_dir,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    error, startup_error, statistics, timer, stats, manual = None, None, None, None, "off", False
    warnings: list[str] = []
    modules: set[str] = set()
    for line in done.stdout.splitlines():
        kind, *fields = line.split("\t")
        if kind == "error":
            error = fields[0]
        elif kind == "startup-error":
            startup_error = fields[0]
        elif kind == "warning":
            warnings.append(fields[0])
        elif kind == "statistics" and fields[0] == "string":
            statistics = fields[1]
        elif kind == "module":
            modules.add(fields[0])
        elif kind == "timer":
            timer = float(fields[0])
        elif kind == "stats":
            stats, manual = fields[0], fields[1] == "manual"
    interval: Interval | None = None
    if stats == "on":
        interval = "manual" if manual else timer
    return ProsodyReading(
        error, startup_error, tuple(warnings), statistics, frozenset(modules), interval
    )


def write_config(files: Mapping[str, str], config_dir: Path) -> dict[str, str]:
    """The files on disk, with /etc/prosody in them pointing at `config_dir` instead."""
    moved = {}
    (config_dir / "conf.d").mkdir(parents=True)  # Debian's package and the official image have it
    for name, text in files.items():
        text = text.replace("/etc/prosody", str(config_dir))
        path = config_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        moved[name] = text
    return moved


def assert_same_as_prosody(case: Case, config_dir: Path) -> None:
    files = write_config(case.files, config_dir)
    ours = evaluate_prosody_config(files, env=case.env, config_dir=str(config_dir))
    theirs = read_with_prosody(config_dir, case.env)
    our_error = next((f for f in ours.findings if f.message.startswith(CONFIG_ERROR)), None)

    if case.prosody == "both-fail":
        assert theirs.error is not None and our_error is not None, (theirs, ours)
        return
    if theirs.error is not None:
        assert our_error is not None, f"Prosody fails with {theirs.error!r}; we: {ours}"
        position = re.match(r"(.+?):(\d+): (.*)", theirs.error, re.DOTALL)
        if position is None:  # an error without a position: we add one
            assert our_error.message == CONFIG_ERROR + theirs.error
            return
        source, line, message = position.groups()
        if source.startswith(f"{PROSODY_SOURCE}/"):  # failed inside Prosody: we explain more
            assert our_error.message.startswith(CONFIG_ERROR + message), our_error
            return
        # Lua shortens long file names to "...<end of the name>"
        our_path = f"{config_dir}/{our_error.file}"
        assert our_path == source or (source.startswith("...") and our_path.endswith(source[3:]))
        assert (our_error.line, our_error.message) == (int(line), CONFIG_ERROR + message)
        return
    assert our_error is None, our_error
    if theirs.startup_error is not None:
        assert ours.interval is None
        assert any("fails to start" in f.message for f in ours.findings), theirs.startup_error
        return
    assert ours.provider == theirs.statistics
    assert ours.interval == theirs.interval
    assert ours.modules_enabled == theirs.modules
    duplicates = {
        f"{config_dir}/{f.file}:{f.line}: {f.message}"
        for f in ours.findings
        if f.message.startswith("Duplicate option")
    }
    assert duplicates == set(theirs.warnings)


# --- sandbox ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snippet", "message"), SANDBOX_ESCAPES, ids=[s for s, _ in SANDBOX_ESCAPES]
)
def test_sandbox(snippet: str, message: str | None, tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    config = cfg(OPENMETRICS, "statistics_interval = 30", snippet.replace("{marker}", str(marker)))

    result = evaluate_prosody_config({MAIN: config})

    assert not marker.exists()
    if message is None:
        assert result.interval == 30.0
        assert result.findings == ()
    else:
        assert result.interval is None
        assert [(f.file, f.line) for f in result.findings] == [(MAIN, 3)]
        assert message in result.findings[0].message


LUA_FRAGMENTS = [
    "statistics", "statistics_interval", "=", '"internal"', '"manual"', "30", "nil", "{", "}",
    "(", ")", "VirtualHost", "Component", '"example.com"', "Include", '"conf.d/*.cfg.lua"',
    '"x.cfg.lua"', "ENV_X", "local", "function", "end", "return", "if", "then", "..", "\n",
    "modules_enabled", "error", "pcall", "RunScript", "os.execute", "#", ",", ";", "[[",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
        st.lists(st.sampled_from(LUA_FRAGMENTS), max_size=40).map(" ".join),
    )
)
def test_never_raises(text: str) -> None:
    result = evaluate_prosody_config({MAIN: text, "conf.d/x.cfg.lua": text})
    assert isinstance(result, StatisticsConfig)
    assert all(isinstance(f, Finding) for f in result.findings)


def test_files_are_given_by_relative_or_absolute_path() -> None:
    main = cfg(OPENMETRICS, 'Include "/srv/prosody/stats.cfg.lua"', 'Include "conf.d/*.cfg.lua"')
    files = {
        "/etc/prosody/prosody.cfg.lua": main,
        "/srv/prosody/stats.cfg.lua": cfg('statistics = "internal"'),
        "/etc/prosody/conf.d/interval.cfg.lua": cfg("statistics_interval = 5"),
    }

    result = evaluate_prosody_config(files)

    assert (result.provider, result.interval) == ("internal", 5.0)
    assert result.interval_source == "conf.d/interval.cfg.lua:1"
    assert result.findings == ()


def test_config_dir_elsewhere() -> None:
    files = {
        "prosody.cfg.lua": cfg(OPENMETRICS, 'Include "/opt/prosody/etc/conf.d/*.cfg.lua"'),
        "conf.d/stats.cfg.lua": cfg("statistics_interval = 7"),
    }

    result = evaluate_prosody_config(files, config_dir="/opt/prosody/etc/")

    assert (result.interval, result.interval_source) == (7.0, "conf.d/stats.cfg.lua:1")


def test_relative_config_dir_is_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        evaluate_prosody_config({MAIN: ""}, config_dir="etc/prosody")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        (" 30s ", 30.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("manual", "manual"),
        ("Manual", "manual"),
    ],
)
def test_parse_interval_value(value: object, expected: Interval) -> None:
    assert parse_interval_value(value) == expected


@pytest.mark.parametrize(
    "value", ["", "0", "-5", "30x", "s", "nan", "inf", True, None, [30], "1m 30s"]
)
def test_parse_interval_value_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_interval_value(value)


# --- prosodyctl check config and a running Prosody --------------------------------------------


def prosodyctl_check(config: Path) -> str:
    prosodyctl = require_program("prosodyctl")
    done = subprocess.run(
        [prosodyctl, "--config", str(config), "check", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        check=False,
    )
    return done.stdout + done.stderr


def prosody_settings(workdir: Path) -> str:
    """Settings that let Prosody or prosodyctl run as root in a scratch directory."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    return cfg(
        f'pidfile = "{workdir}/prosody.pid"',
        f'data_path = "{workdir}/data"',
        "daemonize = false",
        "run_as_root = true",
        'log = { info = "*console" }',
        "plugin_paths = {}",
        'modules_enabled = { "http_openmetrics", "tls" }',
        "c2s_ports = {}",
        "s2s_ports = {}",
        "component_ports = {}",
        "https_ports = {}",
        'http_interfaces = { "127.0.0.1" }',
    )


def test_prosodyctl_agrees_about_options_under_a_virtualhost(short_dir: Path) -> None:
    settings_ = prosody_settings(short_dir)
    config = settings_ + cfg(
        'statistics = "internal"',
        'VirtualHost "example.com"',
        "statistics_interval = 30",
        "statistics_interval = 10",
    )
    (short_dir / MAIN).write_text(config)
    first = len(settings_.splitlines()) + 3

    ours = evaluate_prosody_config({MAIN: config}, config_dir=str(short_dir))
    output = prosodyctl_check(short_dir / MAIN)

    assert "You need to move the following option: statistics_interval" in output, output
    assert f"{short_dir}/{MAIN}:{first + 1}: Duplicate option 'statistics_interval'" in output
    assert_findings(
        ours.findings,
        (
            (MAIN, first + 1, "Duplicate option 'statistics_interval'"),
            (MAIN, first + 1, "statistics_interval is set under VirtualHost 'example.com'"),
        ),
    )
    assert (ours.interval, ours.interval_source) == (60.0, DEFAULT)


def test_prosodyctl_agrees_about_a_syntax_error(short_dir: Path) -> None:
    config = prosody_settings(short_dir) + cfg("statistics = ", 'VirtualHost "example.com"', "}")
    (short_dir / MAIN).write_text(config)
    bad_line = len(config.splitlines())

    ours = evaluate_prosody_config({MAIN: config}, config_dir=str(short_dir))
    output = prosodyctl_check(short_dir / MAIN)

    assert f"Error: {short_dir}/{MAIN}:{bad_line}: unexpected symbol near '}}'" in output, output
    assert_findings(ours.findings, ((MAIN, bad_line, "unexpected symbol near '}'"),))


def answers(url: str) -> bool:
    return metrics_status(url) is not None


def metrics_status(url: str) -> tuple[int, str] | None:
    try:
        response = httpx.get(url, timeout=1.0)
    except httpx.HTTPError:
        return None
    return response.status_code, response.text


@pytest.fixture
def running_prosodies(tmp_path: Path) -> Iterator[dict[str, tuple[StatisticsConfig, str]]]:
    """One real Prosody per statistics setting, started together: our reading and its /metrics."""
    binary = require_program("prosody")
    settings_by_name = {
        "numeric alone": cfg("statistics_interval = 30"),
        "manual alone": cfg('statistics_interval = "manual"'),
        "internal and manual": cfg('statistics = "internal"', 'statistics_interval = "manual"'),
        "nothing": "",
    }
    started: dict[str, tuple[StatisticsConfig, str, Process]] = {}
    try:
        for name, statistics in settings_by_name.items():
            workdir = tmp_path / name.replace(" ", "-")
            port = free_port()
            config = (
                prosody_settings(workdir)
                + cfg(f"http_ports = {{ {port} }}", statistics)
                + cfg('VirtualHost "localhost"')
            )
            (workdir / MAIN).write_text(config)
            ours = evaluate_prosody_config({MAIN: config}, config_dir=str(workdir))
            process = Process(
                f"prosody ({name})",
                [binary, "--config", str(workdir / MAIN)],
                workdir / "prosody.log",
            )
            started[name] = (ours, f"http://127.0.0.1:{port}/metrics", process)
        for _, url, process in started.values():
            process.wait_ready(functools.partial(answers, url), timeout=30)
        yield {name: (ours, url) for name, (ours, url, _) in started.items()}
    finally:
        for _, _, process in started.values():
            process.stop()


def test_a_running_prosody_agrees(
    running_prosodies: dict[str, tuple[StatisticsConfig, str]],
) -> None:
    for name, (ours, url) in running_prosodies.items():
        status = metrics_status(url)
        assert status is not None
        code, body = status
        if ours.interval is None:
            assert (code, body) == (404, "No statistics provider configured\n"), name
            assert any("/metrics answers 404" in f.message for f in ours.findings), name
        else:
            assert code == 200, (name, code, body)
            assert body.endswith("# EOF\n"), name
    readings = {name: ours.interval for name, (ours, _) in running_prosodies.items()}
    assert readings == {
        "numeric alone": 30.0,
        "manual alone": None,
        "internal and manual": "manual",
        "nothing": None,
    }
