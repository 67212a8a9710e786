"""evaluate_prosody_config: table-driven cases, cross-checked against Prosody's own code.

Every case runs in each dialect it applies to (Prosody 0.12 and 13; `on_13` holds what 13.0
makes differently of it) through evaluate_prosody_config and, unless it is about the operator's
sandbox or limits, through that version's real core/configmanager.lua and core/statsmanager.lua
(data/prosody/oracle.lua, run by lua5.4 on the same files, written to disk, and the same
environment; Debian's 0.12.3 and 13.0.1 from `make prosody-13`): both must agree on whether the
config loads, on the error's file, line and message, on `statistics`, the effective interval
and the file and line it was set at, modules_enabled and Prosody's config warnings (duplicate
options; 13.0's direct use of the Lua API). A few cases also go through each version's
`prosodyctl check config` and through running Prosodies, which also serve /metrics where
the evaluation says a sidecar finds it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prosody_operator.prosody import ConfigMount
from prosody_operator.prosody_config import (
    DIALECTS,
    Dialect,
    Finding,
    Interval,
    MetricsLocation,
    StatisticsConfig,
    evaluate_prosody_config,
    parse_interval_value,
)
from prosody_operator.prosody_versions import sidecar_upstream_url
from testinfra.procs import Process, free_port, require_program
from testinfra.prosody import VERSIONS, installation

DATA = Path(__file__).parent / "data" / "prosody"
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
# Where the 0.12 image's config uses Lua's globals directly, which Prosody 13 warns about.
OFFICIAL_BARE_GLOBALS = (
    ("for _, module_name in ipairs", "ipairs"),
    ("statistics_interval = tonumber", "tonumber"),
    ("local pp = require", "require"),
    ("for _, vhost in ipairs", "ipairs"),
    ("for _, component_def in ipairs", "ipairs"),
)


def deprecated(name: str) -> str:
    """Prosody 13's warning about a Lua global used without `Lua.`."""
    return f"direct usage of the Lua API is deprecated - replace `{name}` with `Lua.{name}`"


OFFICIAL_INTERVAL_LINE = line_of(OFFICIAL, "statistics_interval =")

# The maintained image's (prosodyim/prosody) 13.0 config; see the file's header.
MAINTAINED = data_files("maintained-13.0")[MAIN]
MAINTAINED_ON = {
    "PROSODY_STATISTICS": "internal",
    "PROSODY_STATISTICS_INTERVAL": "30",
    "PROSODY_ENABLE_MODULES": "http_openmetrics,mam",
    "PROSODY_VIRTUAL_HOSTS": "example.org",
}
MAINTAINED_INTERVAL_LINE = line_of(MAINTAINED, "statistics_interval =")
# Lua puts a table constructor's assignment on the constructor's last line.
MAINTAINED_MODULES_LINE = line_of(MAINTAINED, "modules_enabled = {") + (
    MAINTAINED.split("modules_enabled = {", 1)[1].split("\n}", 1)[0].count("\n") + 1
)
MAINTAINED_MODULES = frozenset({
    "disco", "roster", "saslauth", "tls", "blocklist", "bookmarks", "carbons", "dialback",
    "limits", "pep", "private", "smacks", "vcard4", "vcard_legacy", "csi_simple", "invites",
    "invites_adhoc", "invites_register", "ping", "register", "time", "uptime", "version",
    "admin_adhoc", "admin_shell",
})  # fmt: skip
LOCALHOST_METRICS = MetricsLocation("127.0.0.1", 5280, "/metrics", "Prosody's defaults")
UNKNOWN = "unknown (see findings)"
CANNOT_READ = "comes from a value the operator cannot read"


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
    dialects: tuple[Dialect, ...] = DIALECTS
    on_13: Mapping[str, Any] = field(default_factory=dict)  # fields 13.0 makes differently
    # Files Prosody reads that the operator is not given (a Secret, say): unknown to it.
    hidden: Mapping[str, str] = field(default_factory=dict)
    metrics: MetricsLocation | Literal["any"] | None = "any"
    unknown: tuple[str, ...] = ()

    def expected(self, dialect: Dialect) -> Case:
        return dataclasses.replace(self, **self.on_13) if dialect == "13" else self


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
        on_13={  # Prosody 13 warns about the bare Lua globals of a 0.12 config
            "findings": tuple(
                (MAIN, line_of(OFFICIAL, start), deprecated(name))
                for start, name in OFFICIAL_BARE_GLOBALS
            )
        },
    ),
    Case(
        "ENV_: official image config, manual",
        {MAIN: OFFICIAL},
        env={**OFFICIAL_ON, "PROSODY_STATISTICS_INTERVAL": "manual"},
        provider="internal",
        interval="manual",
        source=f"prosody.cfg.lua:{OFFICIAL_INTERVAL_LINE} (via ENV_PROSODY_STATISTICS_INTERVAL)",
        dialects=("0.12",),
    ),
    Case(
        "ENV_: official image config without statistics variables",
        {MAIN: OFFICIAL},
        source=OFF,
        findings=(
            (MAIN, None, STATS_OFF),
            (MAIN, OFFICIAL_MODULES_LINE, NO_OPENMETRICS),
        ),
        dialects=("0.12",),
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
        dialects=("0.12",),
    ),
    Case(
        "ENV_: official image config, PROSODY_EXTRA_CONFIG",
        {MAIN: OFFICIAL, "extra.lua": cfg("statistics_interval = 25")},
        env={"PROSODY_EXTRA_CONFIG": "extra.lua", "PROSODY_ENABLE_MODULES": "http_openmetrics"},
        interval=25.0,
        source="extra.lua:1",
        dialects=("0.12",),
    ),
    Case(
        "os.getenv reads the same environment",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = os.getenv("INTERVAL")')},
        env={"INTERVAL": "12"},
        interval=12.0,
        source="prosody.cfg.lua:2",
        prosody="skip",  # Prosody's os.getenv is the real one; same value, no ENV_ read to name
        on_13={"findings": ((MAIN, 2, deprecated("os")),)},
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
        metrics=None,
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
        on_13={
            "findings": (
                (MAIN, 2, deprecated("error")),
                (MAIN, 2, CONFIG_ERROR + "set PROSODY_DOMAIN"),
            )
        },
    ),
    Case(
        "the Lua global: an error in 0.12, Lua's globals in 13",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = Lua.tonumber("30")')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "attempt to index a nil value (global 'Lua')"),),
        on_13={"interval": 30.0, "source": "prosody.cfg.lua:2", "findings": ()},
    ),
    Case(
        "FileContents does not exist in 0.12",
        {MAIN: cfg(OPENMETRICS, 'statistics = FileContents("stats.txt")')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "attempt to call a nil value (global 'FileContents')"),),
        dialects=("0.12",),
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
    # --- Prosody 13.0: the maintained image and each new config feature ---------------------
    Case(
        "maintained image's 13.0 config, statistics from the environment",
        {MAIN: MAINTAINED},
        env=MAINTAINED_ON,
        source=NOT_EVALUATED,
        findings=((MAIN, line_of(MAINTAINED, "local _unpack"), "(global 'Lua')"),),
        on_13={
            "provider": "internal",
            "interval": 30.0,
            "source": f"prosody.cfg.lua:{MAINTAINED_INTERVAL_LINE} "
            "(via ENV_PROSODY_STATISTICS_INTERVAL)",
            "modules": MAINTAINED_MODULES | {"http_openmetrics", "mam"},
            "metrics": LOCALHOST_METRICS,
            "findings": (),
        },
    ),
    Case(
        "maintained image's 13.0 config, manual",
        {MAIN: MAINTAINED},
        env={**MAINTAINED_ON, "PROSODY_STATISTICS_INTERVAL": "manual"},
        provider="internal",
        interval="manual",
        source=f"prosody.cfg.lua:{MAINTAINED_INTERVAL_LINE} (via ENV_PROSODY_STATISTICS_INTERVAL)",
        dialects=("13",),
    ),
    Case(
        "maintained image's 13.0 config without statistics variables",
        {MAIN: MAINTAINED},
        source=OFF,
        modules=MAINTAINED_MODULES,
        findings=((MAIN, None, STATS_OFF), (MAIN, MAINTAINED_MODULES_LINE, NO_OPENMETRICS)),
        metrics=None,
        dialects=("13",),
    ),
    Case(
        "maintained image's 13.0 config, components, interval and module from conf.d",
        {
            MAIN: MAINTAINED,
            **ConfigMount("metrics", "/etc/prosody/conf.d").files(
                {
                    "metrics.cfg.lua": cfg(
                        'statistics = "internal"',
                        "statistics_interval = 20",
                        'modules_enabled:append{ "http_openmetrics" }',
                    )
                }
            ),
        },
        env={
            "PROSODY_VIRTUAL_HOSTS": "example.org",
            "PROSODY_COMPONENTS": "rooms.example.org:muc,upload.example.org:http_file_share",
        },
        provider="internal",
        interval=20.0,
        source="conf.d/metrics.cfg.lua:2",
        modules=MAINTAINED_MODULES | {"http_openmetrics"},
        metrics=LOCALHOST_METRICS,
        findings=(
            # the image's own config, under its http_file_share Component
            (MAIN, line_of(MAINTAINED, "\t\thttp_file_share_expire_after"), deprecated("tonumber")),
        ),
        dialects=("13",),
    ),
    Case(
        "a bare Lua global: 13 warns",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = tonumber("30")')},
        interval=30.0,
        source="prosody.cfg.lua:2",
        on_13={"findings": ((MAIN, 2, deprecated("tonumber")),)},
    ),
    Case(
        "an option read back in its section: nil in 0.12, its value in 13",
        {
            MAIN: cfg(
                OPENMETRICS,
                'statistics = "internal"',
                "statistics_interval = 30",
                "statistics_interval = statistics_interval or 10",
            )
        },
        provider="internal",
        interval=10.0,
        source="prosody.cfg.lua:4",
        findings=((MAIN, 4, "Duplicate option 'statistics_interval'"),),
        on_13={"interval": 30.0},
    ),
    Case(
        "arithmetic on an option read back",
        {
            MAIN: cfg(
                OPENMETRICS,
                "statistics_interval = 15",
                "statistics_interval = statistics_interval * 2",
            )
        },
        source=NOT_EVALUATED,
        findings=(
            (
                MAIN,
                3,
                "attempt to perform arithmetic on a nil value (global 'statistics_interval')",
            ),
        ),
        on_13={
            "interval": 30.0,
            "source": "prosody.cfg.lua:3",
            "findings": ((MAIN, 3, "Duplicate option 'statistics_interval'"),),
        },
    ),
    Case(
        "a global option read back under a VirtualHost is nil",
        {
            MAIN: cfg(
                'modules_enabled = { "ping" }',
                'VirtualHost "example.com"',
                'modules_enabled:append{ "http_openmetrics" }',
            )
        },
        source=NOT_EVALUATED,
        findings=((MAIN, 3, "attempt to index a nil value (global 'modules_enabled')"),),
    ),
    Case(
        ":append adds to a list option",
        {
            MAIN: cfg(
                'modules_enabled = { "ping" }',
                'modules_enabled:append{ "http_openmetrics" }',
                "statistics_interval = 30",
            )
        },
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "attempt to index a nil value (global 'modules_enabled')"),),
        on_13={
            "interval": 30.0,
            "source": "prosody.cfg.lua:3",
            "modules": frozenset({"ping", "http_openmetrics"}),
            "metrics": LOCALHOST_METRICS,
            "findings": (),
        },
    ),
    Case(
        "call-append adds to a list option",
        {
            MAIN: cfg(
                'modules_enabled = { "ping" }',
                'modules_enabled { "http_openmetrics" }',
                "statistics_interval = 30",
            )
        },
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "attempt to call a nil value (global 'modules_enabled')"),),
        on_13={
            "interval": 30.0,
            "source": "prosody.cfg.lua:3",
            "modules": frozenset({"ping", "http_openmetrics"}),
            "findings": (),
        },
    ),
    Case(
        ":append of keys merges them into a table option",
        {
            MAIN: cfg(
                OPENMETRICS,
                'statistics = "statsd"',
                'statistics_config = { statsd_prefix = "prosody" }',
                'statistics_config:append{ statsd_server = "127.0.0.1" }',
            )
        },
        provider="statsd",
        interval=60.0,
        source=DEFAULT,
        findings=((MAIN, 2, 'statistics = "statsd" sends the metrics to a statsd server'),),
        dialects=("13",),
    ),
    Case(
        ":values() iterates a list option",
        {
            MAIN: cfg(
                'modules_enabled = { "http_openmetrics", "ping" }',
                "local count = 0",
                "for _ in modules_enabled:values() do count = count + 1 end",
                "statistics_interval = count * 10",
            )
        },
        interval=20.0,
        source="prosody.cfg.lua:4",
        dialects=("13",),
    ),
    Case(
        "other operations on a list option are errors",
        {MAIN: cfg(OPENMETRICS, 'modules_enabled:remove{ "http_openmetrics" }')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "Unknown config option operation: 'remove'"),),
        dialects=("13",),
    ),
    Case(
        "a list option read back is not a list",
        {MAIN: cfg(OPENMETRICS, "for _, name in Lua.ipairs(modules_enabled) do end")},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "Unknown config option operation: '1'"),),
        dialects=("13",),
    ),
    Case(
        "FileContents reads a file beside the config",
        {
            MAIN: cfg(OPENMETRICS, 'statistics_interval = Lua.tonumber(FileContents("interval"))'),
            "interval": "30\n",
        },
        interval=30.0,
        source="prosody.cfg.lua:2",
        dialects=("13",),
    ),
    Case(
        "FileLine is relative to the file that uses it",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            "conf.d/stats.cfg.lua": cfg(
                'statistics = FileLine("provider")', 'statistics_interval = "manual"'
            ),
            "conf.d/provider": "internal\nthe first line only\n",
        },
        provider="internal",
        interval="manual",
        source="conf.d/stats.cfg.lua:2",
        dialects=("13",),
    ),
    Case(
        "FileLines gives a list",
        {
            MAIN: cfg('modules_enabled = FileLines("modules")', "statistics_interval = 30"),
            "modules": "http_openmetrics\nping",
        },
        interval=30.0,
        source="prosody.cfg.lua:2",
        modules=frozenset({"http_openmetrics", "ping"}),
        dialects=("13",),
    ),
    Case(
        "FileLine of a file the operator is not given decides the interval: unknown",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = Lua.tonumber(FileLine("secret/interval"))')},
        hidden={"secret/interval": "45\n"},
        source=UNKNOWN,
        unknown=("statistics_interval",),
        findings=((MAIN, 2, CANNOT_READ),),
        metrics=LOCALHOST_METRICS,
        dialects=("13",),
    ),
    Case(
        "string functions on an unknown value give an unknown value",
        {
            MAIN: cfg(
                OPENMETRICS,
                'statistics = FileLine("secret/provider"):lower():gsub("%s", "")',
                'statistics_interval = "manual"',
            )
        },
        hidden={"secret/provider": " Internal\n"},
        source=UNKNOWN,
        unknown=("statistics",),
        findings=((MAIN, 2, CANNOT_READ),),
        dialects=("13",),
    ),
    Case(
        "a path concatenated with an unknown value: where /metrics is is unknown",
        {
            MAIN: cfg(
                OPENMETRICS,
                'http_paths = { openmetrics = "/" .. Lua.tostring(FileLine("secret/path")) }',
                "statistics_interval = 30",
            )
        },
        hidden={"secret/path": "prom"},
        interval=30.0,
        source="prosody.cfg.lua:3",
        unknown=("http_paths",),
        findings=((MAIN, 2, CANNOT_READ),),
        metrics=None,
        dialects=("13",),
    ),
    Case(
        "FileContents of a file the operator is not given, not deciding anything",
        {
            MAIN: cfg(
                OPENMETRICS,
                'sql = { driver = "PostgreSQL", password = FileContents("secret/db") }',
                "statistics_interval = 30",
            )
        },
        hidden={"secret/db": "hunter2"},
        interval=30.0,
        source="prosody.cfg.lua:3",
        dialects=("13",),
    ),
    Case(
        "Credential from $CREDENTIALS_DIRECTORY decides the interval: unknown",
        {MAIN: cfg(OPENMETRICS, 'statistics_interval = Lua.tonumber(Credential("interval"))')},
        env={"CREDENTIALS_DIRECTORY": "/etc/prosody/credentials"},
        hidden={"credentials/interval": "20"},
        source=UNKNOWN,
        unknown=("statistics_interval",),
        findings=((MAIN, 2, CANNOT_READ),),
        dialects=("13",),
    ),
    Case(
        "Credential of a file the operator is given",
        {
            MAIN: cfg(OPENMETRICS, 'statistics_interval = Lua.tonumber(Credential("interval"))'),
            "credentials/interval": "25",
        },
        env={"CREDENTIALS_DIRECTORY": "/etc/prosody/credentials"},
        interval=25.0,
        source="prosody.cfg.lua:2",
        dialects=("13",),
    ),
    Case(
        "Credential for a password: unknown, but it decides nothing",
        {
            MAIN: cfg(
                OPENMETRICS,
                'sql = { driver = "PostgreSQL", password = Credential("db") }',
                "statistics_interval = 30",
            )
        },
        env={"CREDENTIALS_DIRECTORY": "/etc/prosody/credentials"},
        hidden={"credentials/db": "hunter2"},
        interval=30.0,
        source="prosody.cfg.lua:3",
        dialects=("13",),
    ),
    Case(
        "Credential without $CREDENTIALS_DIRECTORY stops Prosody",
        {MAIN: cfg(OPENMETRICS, 'sql = { password = Credential("db") }')},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, CONFIG_ERROR + "Credential() requires the $CREDENTIALS_DIRECTORY"),),
        dialects=("13",),
    ),
    Case(
        "an unknown HTTP port: where /metrics is is unknown",
        {
            MAIN: cfg(
                OPENMETRICS,
                'http_ports = { Lua.tonumber(FileLine("secret/port")) }',
                "statistics_interval = 30",
            )
        },
        hidden={"secret/port": "5290"},
        interval=30.0,
        source="prosody.cfg.lua:3",
        unknown=("http_ports",),
        findings=((MAIN, 2, CANNOT_READ),),
        metrics=None,
        dialects=("13",),
    ),
    Case(
        "modules appended from a file the operator is not given",
        {
            MAIN: cfg(
                'modules_enabled = { "ping" }',
                'modules_enabled:append(FileLines("secret/modules"))',
                "statistics_interval = 30",
            )
        },
        hidden={"secret/modules": "http_openmetrics\n"},
        interval=30.0,
        source="prosody.cfg.lua:3",
        modules=frozenset({"ping"}),
        unknown=("modules_enabled",),
        findings=((MAIN, 2, CANNOT_READ),),
        metrics=None,
        dialects=("13",),
    ),
    Case(
        "an Include of a file name the operator cannot read",
        {MAIN: cfg(OPENMETRICS, 'Include(FileLine("secret/include"))')},
        hidden={"secret/include": "extra.cfg.lua"},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, "the operator cannot evaluate the config: Include of a file name"),),
        dialects=("13",),
        prosody="skip",  # Prosody includes it
    ),
    Case(
        "a warning in a file with a long path stops Prosody 13",
        {
            MAIN: cfg(OPENMETRICS, 'Include "conf.d/*.cfg.lua"'),
            LONG_NAME: cfg('statistics_interval = tonumber("5")'),
        },
        interval=5.0,
        source=f"{LONG_NAME}:1",
        on_13={
            "interval": None,
            "source": NOT_EVALUATED,
            "findings": ((LONG_NAME, 1, "bad argument #2 to 'format' (number expected, got nil)"),),
        },
    ),
    # --- where /metrics is ------------------------------------------------------------------
    Case(
        "metrics: Prosody's defaults",
        {MAIN: cfg(OPENMETRICS, "statistics_interval = 30")},
        interval=30.0,
        source="prosody.cfg.lua:2",
        metrics=LOCALHOST_METRICS,
    ),
    Case(
        "metrics: http_ports and http_interfaces",
        {MAIN: cfg(OPENMETRICS, "http_ports = { 5285 }", 'http_interfaces = { "::1" }')},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=MetricsLocation(
            "::1",
            5285,
            "/metrics",
            "prosody.cfg.lua:2 (http_ports), prosody.cfg.lua:3 (http_interfaces)",
        ),
    ),
    Case(
        "metrics: local_interfaces when http_interfaces is not set; a port as a string",
        {MAIN: cfg(OPENMETRICS, 'http_ports = "5286"', 'local_interfaces = { "::1" }')},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=MetricsLocation(
            "::1",
            5286,
            "/metrics",
            "prosody.cfg.lua:2 (http_ports), prosody.cfg.lua:3 (local_interfaces)",
        ),
    ),
    Case(
        "metrics: use_ipv4 = false leaves ::1",
        {MAIN: cfg(OPENMETRICS, "use_ipv4 = false")},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=MetricsLocation("::1", 5280, "/metrics", "Prosody's defaults"),
    ),
    Case(
        "metrics: all interfaces (*) include 127.0.0.1",
        {MAIN: cfg(OPENMETRICS, 'http_interfaces = { "*" }')},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=MetricsLocation(
            "127.0.0.1", 5280, "/metrics", "prosody.cfg.lua:2 (http_interfaces)"
        ),
    ),
    Case(
        "metrics: no HTTP port, HTTPS only",
        {MAIN: cfg(OPENMETRICS, "http_ports = {}", "https_ports = { 5281 }")},
        source=OFF,
        findings=(
            (MAIN, None, STATS_OFF),
            (
                MAIN,
                2,
                "http_ports opens no HTTP port, so the sidecar cannot collect /metrics (Prosody "
                "serves it over HTTPS",
            ),
        ),
        metrics=None,
    ),
    Case(
        "metrics: HTTP on a pod address only",
        {MAIN: cfg(OPENMETRICS, 'http_interfaces = { "198.18.0.10" }')},
        source=OFF,
        findings=(
            (MAIN, None, STATS_OFF),
            (MAIN, 2, "198.18.0.10 (http_interfaces), not on loopback"),
        ),
        metrics=None,
    ),
    Case(
        "metrics: the allowlist lets in ::1 only",
        {
            MAIN: cfg(
                OPENMETRICS,
                'http_interfaces = { "127.0.0.1", "::1" }',
                'openmetrics_allow_ips = { "::1" }',
            )
        },
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=MetricsLocation("::1", 5280, "/metrics", "prosody.cfg.lua:2 (http_interfaces)"),
    ),
    Case(
        "metrics: the allowlist lets no loopback address in",
        {MAIN: cfg(OPENMETRICS, 'openmetrics_allow_ips = { "198.18.0.1" }')},
        source=OFF,
        findings=((MAIN, None, STATS_OFF), (MAIN, 2, "Prosody answers it 403")),
        metrics=None,
    ),
    Case(
        "metrics: openmetrics_allow_cidr lets loopback in",
        {
            MAIN: cfg(
                OPENMETRICS, "openmetrics_allow_ips = {}", 'openmetrics_allow_cidr = "127.0.0.0/8"'
            )
        },
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=LOCALHOST_METRICS,
    ),
    Case(
        "metrics: http_paths.openmetrics",
        {MAIN: cfg(OPENMETRICS, 'http_paths = { openmetrics = "prom/" }')},
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=MetricsLocation("127.0.0.1", 5280, "/prom", "prosody.cfg.lua:2 (http_paths)"),
    ),
    Case(
        "metrics: http_host and http_default_host do not move a global module's /metrics",
        {
            MAIN: cfg(
                OPENMETRICS,
                'http_host = "xmpp.example.com"',
                'http_default_host = "xmpp.example.com"',
                'VirtualHost "example.com"',
                '    http_paths = { openmetrics = "/elsewhere" }',
            )
        },
        source=OFF,
        findings=((MAIN, None, STATS_OFF),),
        metrics=LOCALHOST_METRICS,
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
        on_13={"findings": ((MAIN, 3, deprecated("pcall")), (MAIN, 3, LOOP))},
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
        on_13={"findings": ((MAIN, 2, deprecated("coroutine")), (MAIN, 3, LOOP))},
    ),
    Case(
        "endless loop in load's reader",
        {MAIN: cfg(OPENMETRICS, "while true do load(function() while true do end end) end")},
        source=NOT_EVALUATED,
        findings=((MAIN, 2, LOOP),),
        prosody="skip",
        on_13={"findings": ((MAIN, 2, deprecated("load")), (MAIN, 2, LOOP))},
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
        on_13={"findings": ((MAIN, None, STATS_OFF), (MAIN, 2, deprecated("require")))},
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
        on_13={
            "findings": (
                (MAIN, 2, deprecated("getmetatable")),
                (MAIN, 4, "statistics_interval is set under VirtualHost 'example.com'"),
                (MAIN, None, STATS_OFF),
            )
        },
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


CASES_BY_DIALECT = [
    pytest.param(case.expected(dialect), dialect, id=f"{case.id} [{dialect}]")
    for case in CASES
    for dialect in case.dialects
]


@pytest.mark.parametrize(("case", "dialect"), CASES_BY_DIALECT)
def test_evaluate(case: Case, dialect: Dialect, short_dir: Path) -> None:
    result = evaluate_prosody_config(case.files, env=case.env, dialect=dialect)

    assert result.dialect == dialect
    assert (result.provider, result.interval) == (case.provider, case.interval)
    if case.source is not None:
        assert result.interval_source == case.source
    if case.modules is not None:
        assert result.modules_enabled == case.modules
    if case.metrics != "any":
        assert result.metrics == case.metrics
    assert result.unknown_options == case.unknown
    assert_findings(result.findings, case.findings)

    if case.prosody != "skip":
        assert_same_as_prosody(case, dialect, short_dir)


# --- Prosody's own reading of the same config ----------------------------------------------------


@dataclass(frozen=True)
class ProsodyReading:
    error: str | None  # the config does not load
    startup_error: str | None  # it loads, but statsmanager fails (Prosody stops at startup)
    warnings: tuple[str, ...]
    statistics: str | None
    modules: frozenset[str]
    interval: Interval | None
    set_at: Mapping[str, str]  # global option -> "file:line" it was last stored from


def read_with_prosody(config_dir: Path, env: Mapping[str, str], version: str) -> ProsodyReading:
    lua = require_program("lua5.4")
    source_dir = installation(version).source_dir
    done = subprocess.run(
        [lua, str(DATA / "oracle.lua"), str(source_dir), str(config_dir / MAIN)],
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
    set_at: dict[str, str] = {}
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
        elif kind == "set" and fields[0] == "*":
            set_at[fields[1]] = fields[2]
    interval: Interval | None = None
    if stats == "on":
        interval = "manual" if manual else timer
    return ProsodyReading(
        error, startup_error, tuple(warnings), statistics, frozenset(modules), interval, set_at
    )


def write_config(
    files: Mapping[str, str], config_dir: Path, env: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The files and env, with /etc/prosody in them pointing at `config_dir` instead, and the
    files on disk."""
    moved = {}
    (config_dir / "conf.d").mkdir(parents=True)  # Debian's package and the official images have it
    for name, text in files.items():
        text = text.replace("/etc/prosody", str(config_dir))
        path = config_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        moved[name] = text
    return moved, {
        name: value.replace("/etc/prosody", str(config_dir)) for name, value in env.items()
    }


def in_prosody_source(short_src: str, source_dir: Path) -> bool:
    """Whether Lua's name for a chunk (shortened to "...<end>" when long) is Prosody's code."""
    if short_src.startswith("..."):
        return any(str(path).endswith(short_src[3:]) for path in source_dir.rglob("*.lua"))
    return short_src.startswith(f"{source_dir}/")


WARNINGS = ("Duplicate option", "direct usage of the Lua API is deprecated")


def assert_same_as_prosody(case: Case, dialect: Dialect, config_dir: Path) -> None:
    files, env = write_config({**case.files, **case.hidden}, config_dir, case.env)
    given = {name: text for name, text in files.items() if name not in case.hidden}
    ours = evaluate_prosody_config(given, env=env, config_dir=str(config_dir), dialect=dialect)
    theirs = read_with_prosody(config_dir, env, dialect)
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
        if in_prosody_source(source, installation(dialect).source_dir):  # failed in Prosody's
            assert our_error.message.startswith(CONFIG_ERROR + message), our_error  # code: we
            return  # say more
        # Lua shortens long file names to "...<end of the name>"
        our_path = f"{config_dir}/{our_error.file}"
        assert our_path == source or (source.startswith("...") and our_path.endswith(source[3:]))
        assert (our_error.line, our_error.message) == (int(line), CONFIG_ERROR + message)
        return
    assert our_error is None, our_error
    warnings = {
        f"{config_dir}/{f.file}:{f.line}: {f.message}"
        for f in ours.findings
        if f.message.startswith(WARNINGS)
    }
    assert warnings == set(theirs.warnings)
    if theirs.startup_error is not None:
        assert ours.interval is None
        assert any("fails to start" in f.message for f in ours.findings), theirs.startup_error
        return
    if "modules_enabled" not in ours.unknown_options:
        assert ours.modules_enabled == theirs.modules
    if ours.unknown_options:
        assert case.hidden, "only what the operator is not given is unknown to it"
    if {"statistics", "statistics_interval"} & set(ours.unknown_options):
        return
    assert ours.provider == theirs.statistics
    assert ours.interval == theirs.interval
    # The interval comes from the file and line Prosody stored statistics_interval from.
    if set_at := re.match(r"(\S+:\d+)", ours.interval_source):
        assert f"{config_dir}/{set_at[1]}" == theirs.set_at["statistics_interval"]


# --- sandbox ----------------------------------------------------------------------------------


# Prosody 13's `Lua` global is the sandbox's globals, nothing more.
SANDBOX_ESCAPES_13 = [
    ('Lua.os.execute("touch {marker}")', "os.execute " + SANDBOX),
    ('Lua.io.open("{marker}", "w")', "io.open " + SANDBOX),
    ('Lua.require "os".execute("touch {marker}")', 'require "os" ' + SANDBOX),
    ('Lua.require "prosody.util.pposix".setuid(0)', "util.pposix.setuid " + SANDBOX),
    ("Lua.debug.getregistry()", "debug.getregistry " + SANDBOX),
    ('Lua.load("return os.execute")()("touch {marker}")', "os.execute " + SANDBOX),
]
ESCAPES_BY_DIALECT = [
    *(pytest.param(dialect, *escape, id=f"{escape[0]} [{dialect}]")
      for escape in SANDBOX_ESCAPES for dialect in DIALECTS),
    *(pytest.param("13", *escape, id=f"{escape[0]} [13]") for escape in SANDBOX_ESCAPES_13),
]  # fmt: skip


@pytest.mark.parametrize(("dialect", "snippet", "message"), ESCAPES_BY_DIALECT)
def test_sandbox(dialect: Dialect, snippet: str, message: str | None, tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    config = cfg(OPENMETRICS, "statistics_interval = 30", snippet.replace("{marker}", str(marker)))

    result = evaluate_prosody_config({MAIN: config}, dialect=dialect)

    assert not marker.exists()
    findings = [f for f in result.findings if not f.message.startswith(WARNINGS)]
    if message is None:
        assert result.interval == 30.0
        assert findings == []
    else:
        assert result.interval is None
        assert [(f.file, f.line) for f in findings] == [(MAIN, 3)]
        assert message in findings[0].message


DEEP = """
local deep = {load}([[
  local function deep(n)
    if n == 0 then statistics_interval = 5 return end
    deep(n - 1)
  end
  return deep
]], "=deep", "t", _ENV)()
for _ = 1, {repeat} do deep({depth}) end
"""


def deep_config(dialect: Dialect, depth: int, repeat: int) -> str:
    """Sets statistics_interval from code that is not a config file, `depth` calls down."""
    load = "Lua.load" if dialect == "13" else "load"
    return OPENMETRICS + DEEP.format(load=load, depth=depth, repeat=repeat)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_where_an_option_is_set_is_looked_for_a_bounded_number_of_frames(dialect: Dialect) -> None:
    """Each look at a frame walks the stack from the top (debug.getinfo), so an unbounded search
    for the config line costs O(depth²): beyond 200 frames the line is not named."""
    result = evaluate_prosody_config({MAIN: deep_config(dialect, 1000, 1)}, dialect=dialect)

    assert (result.interval, result.interval_source) == (5.0, MAIN)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_looking_for_config_lines_is_charged_to_the_instruction_budget(dialect: Dialect) -> None:
    """Deep searches cost instructions: 2,000 of them 150 frames down exhaust the budget that
    the same code without them (~3 million instructions) stays within."""
    result = evaluate_prosody_config({MAIN: deep_config(dialect, 150, 2_000)}, dialect=dialect)

    assert result.interval is None
    assert any(LOOP in f.message for f in result.findings), result.findings


LUA_FRAGMENTS = [
    "statistics", "statistics_interval", "=", '"internal"', '"manual"', "30", "nil", "{", "}",
    "(", ")", "VirtualHost", "Component", '"example.com"', "Include", '"conf.d/*.cfg.lua"',
    '"x.cfg.lua"', "ENV_X", "local", "function", "end", "return", "if", "then", "..", "\n",
    "modules_enabled", "error", "pcall", "RunScript", "os.execute", "#", ",", ";", "[[",
    "Lua", "Lua.tonumber", ":append", ":value()", "modules_enabled {", "FileLine", "FileLines",
    "FileContents", "Credential", '"x"', "Lua.ipairs",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
        st.lists(st.sampled_from(LUA_FRAGMENTS), max_size=40).map(" ".join),
    )
)
def test_never_raises(text: str) -> None:
    for dialect in DIALECTS:
        result = evaluate_prosody_config({MAIN: text, "conf.d/x.cfg.lua": text}, dialect=dialect)
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


VERSION = pytest.mark.parametrize("version", VERSIONS)


def prosodyctl_check(config: Path, version: str, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        [installation(version).prosodyctl, "--config", str(config), "check", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return done.stdout + done.stderr


def prosody_settings(workdir: Path, c2s_port: int | None = None) -> str:
    """Settings that let Prosody or prosodyctl run as root in a scratch directory."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    return cfg(
        f'pidfile = "{workdir}/prosody.pid"',
        f'data_path = "{workdir}/data"',
        "run_as_root = true",
        'log = { info = "*console" }',
        "plugin_paths = {}",
        'modules_enabled = { "http_openmetrics", "tls" }',
        f"c2s_ports = {{ {c2s_port or ''} }}",
        'c2s_interfaces = { "127.0.0.1" }',
        "s2s_ports = {}",
        "component_ports = {}",
        "https_ports = {}",
    )


@VERSION
def test_prosodyctl_agrees_about_options_under_a_virtualhost(
    version: Dialect, short_dir: Path
) -> None:
    settings_ = prosody_settings(short_dir)
    config = settings_ + cfg(
        'statistics = "internal"',
        'VirtualHost "example.com"',
        "statistics_interval = 30",
        "statistics_interval = 10",
    )
    (short_dir / MAIN).write_text(config)
    first = len(settings_.splitlines()) + 3

    ours = evaluate_prosody_config({MAIN: config}, config_dir=str(short_dir), dialect=version)
    output = prosodyctl_check(short_dir / MAIN, version)

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


@VERSION
def test_prosodyctl_agrees_about_a_syntax_error(version: Dialect, short_dir: Path) -> None:
    config = prosody_settings(short_dir) + cfg("statistics = ", 'VirtualHost "example.com"', "}")
    (short_dir / MAIN).write_text(config)
    bad_line = len(config.splitlines())

    ours = evaluate_prosody_config({MAIN: config}, config_dir=str(short_dir), dialect=version)
    output = prosodyctl_check(short_dir / MAIN, version)

    assert f"Error: {short_dir}/{MAIN}:{bad_line}: unexpected symbol near '}}'" in output, output
    assert_findings(ours.findings, ((MAIN, bad_line, "unexpected symbol near '}'"),))


@VERSION
def test_prosodyctl_agrees_about_the_maintained_image_config(
    version: Dialect, short_dir: Path
) -> None:
    """The maintained image's own 13.0 config, as it lays it out: /etc/prosody/prosody.cfg.lua,
    an Include of conf.d, everything else from PROSODY_* env. 13.0 warns about the Lua globals it
    still uses bare (under an http_file_share Component); 0.12 cannot read it at all."""
    env = {**MAINTAINED_ON, "PROSODY_COMPONENTS": "upload.example.org:http_file_share"}
    files, env = write_config(
        {MAIN: MAINTAINED, "conf.d/paths.cfg.lua": prosody_settings(short_dir)}, short_dir, env
    )

    ours = evaluate_prosody_config(files, env=env, config_dir=str(short_dir), dialect=version)
    output = prosodyctl_check(short_dir / MAIN, version, env)

    if version == "0.12":
        line = line_of(MAINTAINED, "local _unpack")
        assert f"{short_dir}/{MAIN}:{line}: attempt to index a nil value (global 'Lua')" in output
        assert_findings(ours.findings, ((MAIN, line, CONFIG_ERROR + "attempt to index"),))
        return
    line = line_of(MAINTAINED, "\t\thttp_file_share_expire_after")
    warning = f"{short_dir}/{MAIN}:{line}: {deprecated('tonumber')}"
    assert f"Configuration warning: {warning}" in output, output
    assert "All checks passed" in output, output
    assert_findings(ours.findings, ((MAIN, line, deprecated("tonumber")),))
    assert (ours.interval, ours.interval_source) == (
        30.0,
        f"{MAIN}:{MAINTAINED_INTERVAL_LINE} (via ENV_PROSODY_STATISTICS_INTERVAL)",
    )


def metrics_status(url: str, **headers: str) -> tuple[int, str] | None:
    try:
        response = httpx.get(url, headers=headers, timeout=1.0)
    except httpx.HTTPError:
        return None
    return response.status_code, response.text


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Running:
    ours: StatisticsConfig  # our reading of its config
    http_port: int  # `{port}` in its config


@pytest.fixture
def start_prosodies(
    tmp_path: Path,
) -> Iterator[Callable[[str, Mapping[str, str]], dict[str, Running]]]:
    """Starts one real Prosody per named config (each with its own free ports; `{port}` in a
    config is its HTTP port), all at once, and gives our reading of each."""
    started: list[Process] = []

    def start(version: str, configs: Mapping[str, str]) -> dict[str, Running]:
        binary = installation(version).prosody
        readings, waiting = {}, []
        for name, extra in configs.items():
            workdir = tmp_path / version / name.replace(" ", "-")
            c2s_port, http_port = free_port(), free_port()
            config = (
                prosody_settings(workdir, c2s_port)
                + extra.replace("{port}", str(http_port))
                + cfg('VirtualHost "localhost"')
            )
            (workdir / MAIN).write_text(config)
            ours = evaluate_prosody_config(
                {MAIN: config}, config_dir=str(workdir), dialect=cast(Dialect, version)
            )
            readings[name] = Running(ours, http_port)
            process = Process(
                f"prosody {version} ({name})",
                [binary, "--config", str(workdir / MAIN)],
                workdir / "prosody.log",
            )
            started.append(process)
            waiting.append((process, c2s_port))
        for process, c2s_port in waiting:  # c2s is up once Prosody has started its services
            process.wait_ready(functools.partial(accepts_connections, c2s_port), timeout=30)
        return readings

    yield start
    for process in started:
        process.stop()


STATISTICS_SETTINGS = {
    "numeric alone": cfg("http_ports = { {port} }", "statistics_interval = 30"),
    "manual alone": cfg("http_ports = { {port} }", 'statistics_interval = "manual"'),
    "internal and manual": cfg(
        "http_ports = { {port} }", 'statistics = "internal"', 'statistics_interval = "manual"'
    ),
    "nothing": cfg("http_ports = { {port} }"),
}


@VERSION
def test_a_running_prosody_agrees(version: str, start_prosodies) -> None:
    readings = {
        name: running.ours
        for name, running in start_prosodies(version, STATISTICS_SETTINGS).items()
    }

    for name, ours in readings.items():
        assert ours.metrics is not None, name
        status = metrics_status(sidecar_upstream_url(ours.metrics))
        assert status is not None
        code, body = status
        if ours.interval is None:
            assert (code, body) == (404, "No statistics provider configured\n"), name
            assert any("/metrics answers 404" in f.message for f in ours.findings), name
        else:
            assert code == 200, (name, code, body)
            assert body.endswith("# EOF\n"), name
    assert {name: ours.interval for name, ours in readings.items()} == {
        "numeric alone": 30.0,
        "manual alone": None,
        "internal and manual": "manual",
        "nothing": None,
    }


STATS = cfg('statistics = "internal"', 'statistics_interval = "manual"')
LOOPBACK_URLS = ("http://127.0.0.1:{port}/metrics", "http://[::1]:{port}/metrics")
# Where the sidecar finds /metrics (address, path), or None where it cannot.
METRICS_SETTINGS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "::1 only": (
        cfg("http_ports = { {port} }", 'http_interfaces = { "::1" }'),
        ("::1", "/metrics"),
    ),
    "local_interfaces": (
        cfg("http_ports = { {port} }", 'local_interfaces = { "::1" }'),
        ("::1", "/metrics"),
    ),
    "all interfaces": (
        cfg("http_ports = { {port} }", 'http_interfaces = { "*" }'),
        ("127.0.0.1", "/metrics"),
    ),
    "a path of its own": (
        cfg("http_ports = { {port} }", 'http_paths = { openmetrics = "/prom/" }'),
        ("127.0.0.1", "/prom"),
    ),
    "allowlist lets in ::1": (
        cfg(
            "http_ports = { {port} }",
            'http_interfaces = { "127.0.0.1", "::1" }',
            'openmetrics_allow_ips = { "::1" }',
        ),
        ("::1", "/metrics"),
    ),
    "allowlist by CIDR": (
        cfg(
            "http_ports = { {port} }",
            "openmetrics_allow_ips = {}",
            'openmetrics_allow_cidr = "127.0.0.0/8"',
        ),
        ("127.0.0.1", "/metrics"),
    ),
    "http_host": (
        cfg(
            "http_ports = { {port} }",
            'http_host = "xmpp.example.com"',
            'http_default_host = "xmpp.example.com"',
        ),
        ("127.0.0.1", "/metrics"),
    ),
    "allowlist without loopback": (
        cfg("http_ports = { {port} }", 'openmetrics_allow_ips = { "198.18.0.1" }'),
        None,
    ),
    "no HTTP port": (cfg("http_ports = {} -- not {port}"), None),
}


@VERSION
def test_running_prosodies_serve_metrics_where_the_evaluation_says(
    version: str, start_prosodies
) -> None:
    """Each real Prosody answers 200 at the URL the sidecar would get; where we say the sidecar
    cannot collect, no loopback URL answers 200 (refused, 403 or 404)."""
    configs = {name: STATS + settings for name, (settings, _) in METRICS_SETTINGS.items()}
    started = start_prosodies(version, configs)

    for name, (_, expected) in METRICS_SETTINGS.items():
        ours = started[name].ours
        assert ours.interval == "manual", name
        if expected is None:
            assert ours.metrics is None, (name, ours.metrics)
            assert ours.findings, name
            for url in LOOPBACK_URLS:
                status = metrics_status(url.format(port=started[name].http_port))
                assert status is None or status[0] != 200, (name, url, status)
            continue
        assert ours.metrics is not None, (name, ours.findings)
        assert (ours.metrics.address, ours.metrics.path) == expected, name
        status = metrics_status(sidecar_upstream_url(ours.metrics))
        assert status is not None and status[0] == 200, (name, status)
        assert status[1].endswith("# EOF\n"), name


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_result_is_plain_picklable_data(dialect: Dialect) -> None:
    """So that the evaluation can run in another process and its results be cached."""
    result = evaluate_prosody_config({MAIN: MAINTAINED}, env=MAINTAINED_ON, dialect=dialect)

    assert pickle.loads(pickle.dumps(result)) == result
