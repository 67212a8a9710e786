"""Prosody's statistics settings and where its /metrics is, learnt by evaluating its real config
the way Prosody does (pure).

Prosody's config is a Lua program. `evaluate_prosody_config` runs it in an embedded Lua 5.4
(lupa) inside a port of the config environment of the Prosody version the pod runs (its
`dialect`): Prosody 0.12.3's or 13.0.1's core/configmanager.lua, in lua/configmanager-0.12.lua
and lua/configmanager-13.lua, run by lua/driver.lua. In both, settings before any
`VirtualHost`/`Component` are global, later ones belong to that host; `Include` (globs too) loads
another file, which starts in the global section; `ENV_FOO` reads the environment variable FOO.
13.0 adds the `Lua` global (bare globals still work, with a deprecation warning), options that
read back as set earlier in the same section (lists as proxies with `:append{}` and call-append),
`FileContents`/`FileLine`/`FileLines` (relative to the file using them) and `Credential(name)`
(from $CREDENTIALS_DIRECTORY). It then applies core/statsmanager.lua's rules to the global
`statistics` / `statistics_interval`, works out where mod_http_openmetrics serves /metrics for a
sidecar in the pod (core/portmanager.lua's and mod_http.lua's rules), and reports what
`prosodyctl check config` or Prosody's startup would warn about (and what stops /metrics from
working) as `Finding`s. Config errors become Findings too, never exceptions.

Files are a virtual filesystem: `files` maps a path to the file's contents. A relative path is
relative to `config_dir` (Prosody's config directory, /etc/prosody in Debian's package and the
official images); an absolute path is taken as is. So with `config_dir="/etc/prosody"` the keys
"conf.d/stats.cfg.lua" and "/etc/prosody/conf.d/stats.cfg.lua" name the same file. An
`Include` is resolved exactly like Prosody does (relative to the directory of the including
file) and then looked up by that absolute path; a glob (`*`, `?`) applies to the last path
component only and matches the files given for that directory, in sorted order (Prosody uses
directory order, which is unsorted); a glob that matches none of them is fine (Prosody fails if
the directory itself is missing, which the operator cannot see). A missing file named without
a glob is a config error, as in Prosody. A ConfigMap's keys cannot contain "/":
prosody.ConfigMount turns a ConfigMap mounted at e.g. /etc/prosody/conf.d into such paths.
Findings name files by their path relative to `config_dir` (absolute when outside it).

What 13.0 reads with `File*` or `Credential` from a file not among `files` (a Secret, say) is
*unknown* to the operator: arithmetic, concatenation and string functions on it give unknowns,
and a list it is added to has unknown items. An unknown matters only where it decides the
interval or where /metrics is; then the result says so (`unknown_options`, a Finding), and the
interval or the metrics location is None. An unknown used as a condition is not tracked.

The sandbox: the config sees Lua's base functions, string/table/math/utf8/coroutine, os.time/
clock/date/difftime/getenv (getenv reads `env`), the globals Prosody defines before reading its
config (CFG_*, prosody, hosts, log) and a stub of util.pposix (uname, used by the official
images' configs). io, debug, package, dofile, loadfile, require (other than util.pposix),
os.execute and the rest of os raise an error naming the sandbox; RunScript is not run, only
reported. Evaluation stops after `max_instructions` Lua VM instructions and `max_memory` bytes.
Not bounded here: time spent inside a single C function, e.g. a pathological `string.find`
pattern. So the operator never calls this in its own process: evaluation.py runs it in worker
processes with a wall-clock budget and an address-space limit. A result reports at most
MAX_FINDINGS findings (and how many more there were), each at most MAX_TEXT characters long.

The evaluation is a pure function of (files, main, env, config_dir, dialect) and its result is
plain, picklable data.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from types import MappingProxyType
from typing import Any, Final, Literal

from lupa import lua54

DEFAULT_CONFIG_DIR: Final = "/etc/prosody"
DEFAULT_MAIN: Final = "prosody.cfg.lua"
DEFAULT_STATISTICS_INTERVAL: Final = 60.0  # core/statsmanager.lua, when only `statistics` is set
MANUAL: Final = "manual"
INTERNAL_PROVIDER: Final = "internal"
OPENMETRICS_MODULE: Final = "http_openmetrics"
NOT_EVALUATED: Final = "config not evaluated (see findings)"
OUT_OF_MEMORY: Final = (
    "the operator stopped evaluating the config: it needed more memory than an evaluation may use"
)

Dialect = Literal["0.12", "13"]
DIALECTS: Final[tuple[Dialect, ...]] = ("0.12", "13")
DIALECT_NAMES: Final[Mapping[str, str]] = MappingProxyType({"0.12": "0.12", "13": "13.0"})

# Prosody configs are small: the official image's runs a few thousand instructions.
MAX_INSTRUCTIONS: Final = 10_000_000
MAX_MEMORY: Final = 64 * 1024 * 1024
# What one evaluation reports at most: each finding becomes an Event, and a config can produce
# any number of them (one per VirtualHost of a generated config, say). The findings that decide
# the interval or where /metrics is are always kept; a last one says how many were left out.
MAX_FINDINGS: Final = 20
MAX_TEXT: Final = 512  # characters of a finding's message, or of a source, that are kept

Interval = float | Literal["manual"]

# Options Prosody reads only from the global section (prosodyctl check config's
# known_global_options and its *_ports / *_interfaces rule, restricted to those that decide
# whether /metrics works, where it is and who may read it).
GLOBAL_ONLY_OPTIONS: Final = (
    "statistics",
    "statistics_interval",
    "statistics_config",
    "openmetrics_allow_ips",
    "openmetrics_allow_cidr",
    "trusted_proxies",
    "http_ports",
    "http_interfaces",
    "http_interface",
    "https_ports",
    "https_interfaces",
    "https_interface",
    "local_interfaces",
    "interfaces",
    "interface",
    "use_ipv4",
    "use_ipv6",
)
_TRACKED_OPTIONS: Final = (
    *GLOBAL_ONLY_OPTIONS,
    "modules_enabled",
    "modules_disabled",
    "http_paths",
)

_NO_ENV: Final[Mapping[str, str]] = MappingProxyType({})

# Markers the Lua side puts in error messages (see lua/driver.lua).
_SANDBOX_MARKER: Final = "not available in the operator's sandbox"
_LIMIT_MARKER: Final = "instruction limit reached"
_UNREADABLE_MARKER: Final = "the operator cannot read"


@dataclass(frozen=True)
class Finding:
    """A problem worth a Warning Event, like a warning of `prosodyctl check config`."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class MetricsLocation:
    """Where Prosody serves /metrics for a sidecar in its pod: plain HTTP on a loopback address
    that mod_http_openmetrics lets in (the sidecar connects from that same address)."""

    address: str  # "127.0.0.1" or "::1"
    port: int
    path: str  # "/metrics" unless http_paths.openmetrics says otherwise
    source: str  # where the deciding settings were set, or "Prosody's defaults"


@dataclass(frozen=True)
class StatisticsConfig:
    provider: str | None  # value of `statistics` in the global section, or None
    # Effective statistics_interval: seconds, "manual", or None when statistics are off (or the
    # config could not be evaluated, or the interval is unknown: then the findings say why).
    interval: Interval | None
    interval_source: str  # "prosody.cfg.lua:12", "default (60s once statistics are on)", ...
    modules_enabled: frozenset[str]  # global modules_enabled
    findings: tuple[Finding, ...]
    # Where the sidecar collects /metrics; None when it cannot (the findings say why).
    metrics: MetricsLocation | None = None
    dialect: Dialect = "0.12"  # the Prosody version whose config environment evaluated it
    # Options deciding the interval or the metrics location whose values the operator cannot
    # read (13.0's File*/Credential of files it is not given).
    unknown_options: tuple[str, ...] = ()


def evaluate_prosody_config(
    files: Mapping[str, str],
    main: str = DEFAULT_MAIN,
    env: Mapping[str, str] = _NO_ENV,
    config_dir: str = DEFAULT_CONFIG_DIR,
    *,
    dialect: Dialect = "0.12",
    version_known: bool = True,
    max_instructions: int = MAX_INSTRUCTIONS,
    max_memory: int = MAX_MEMORY,
) -> StatisticsConfig:
    """Evaluate the config `main` among `files` as Prosody `dialect` ("0.12" or "13") does,
    with `env` as the container's env. `version_known`: whether the pod is known to run that
    version (else a config error is only how that version would read it, not a sure failure)."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, not {dialect!r}")
    if not config_dir.startswith("/"):
        raise ValueError(f"config_dir must be an absolute path, not {config_dir!r}")
    config_dir = _normalize(config_dir)
    by_path = {_absolute(path, config_dir): text for path, text in files.items()}
    main_path = _absolute(main, config_dir)
    main_name = _display(main_path, config_dir)
    if main_path not in by_path:
        return _not_evaluated(
            dialect,
            Finding(main_name, None, "no such config file: Prosody cannot start without it"),
        )
    try:
        result = _run_driver(
            dialect, by_path, main_path, env, config_dir, max_instructions, max_memory
        )
        return _interpret(result, dialect, version_known, main_name, max_instructions, max_memory)
    except MemoryError:  # what Python makes of a big value, past the process' limit
        return _not_evaluated(dialect, Finding(main_name, None, OUT_OF_MEMORY))
    except lua54.LuaError as error:
        return _not_evaluated(
            dialect,
            Finding(main_name, None, f"the operator could not evaluate the config: {error}"),
        )


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_interval_value(value: object) -> Interval:
    """An interval from an annotation or setting: 30, "30", "30s", "1m30s", "500ms" or "manual".

    Raises ValueError for anything else, and for intervals that are not positive and finite.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an interval")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() == MANUAL:
            return MANUAL
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(number + unit for number, unit in parts) != text:
                raise ValueError(
                    f"{value!r} is not an interval (examples: 30, 30s, 1m30s, manual)"
                ) from None
            seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:
        raise ValueError(f"{value!r} is not an interval")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a positive interval")
    return seconds


# --- paths -------------------------------------------------------------------------------------


def _normalize(path: str) -> str:
    """An absolute path without ".", ".." or repeated slashes (the Lua side does the same)."""
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/" + "/".join(parts)


def _absolute(path: str, config_dir: str) -> str:
    return _normalize(path if path.startswith("/") else f"{config_dir}/{path}")


def _display(path: str, config_dir: str) -> str:
    prefix = config_dir.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


# --- running the config ------------------------------------------------------------------------


def _deny_attribute(obj: object, name: object, is_setting: bool) -> object:
    # The config never gets Python objects; deny attribute access should one ever leak to Lua.
    raise AttributeError("not available")


@functools.cache
def _lua_source(name: str) -> bytes:
    """One of the Lua files shipped in the package (lua/*.lua)."""
    return (resources.files(__package__) / "lua" / name).read_bytes()


def _compile(lua: Any, name: str) -> Any:
    chunk = lua.globals()[b"load"](_lua_source(name), f"=(operator {name[:-4]})".encode(), b"t")
    if isinstance(chunk, tuple):  # (nil, message): cannot happen, the Lua files are fixed code
        raise RuntimeError(f"lua/{name} does not compile: {_text(chunk[1])}")
    return chunk


def _run_driver(
    dialect: Dialect,
    files: Mapping[str, str],
    main_path: str,
    env: Mapping[str, str],
    config_dir: str,
    max_instructions: int,
    max_memory: int,
) -> dict[str, Any]:
    lua = lua54.LuaRuntime(
        encoding=None,  # Lua strings are bytes; decode them ourselves, leniently
        register_eval=False,
        register_builtins=False,
        attribute_filter=_deny_attribute,
        max_memory=max_memory,
    )
    evaluate = _compile(lua, "driver.lua")()
    port = _compile(lua, f"configmanager-{dialect}.lua")()
    result = evaluate(
        port,
        lua.table_from({_bytes(path): _bytes(text) for path, text in files.items()}),
        lua.table_from({_bytes(path): _bytes(_display(path, config_dir)) for path in files}),
        _bytes(main_path),
        lua.table_from({_bytes(name): _bytes(value) for name, value in env.items()}),
        max_instructions,
        lua.table_from([_bytes(name) for name in _TRACKED_OPTIONS]),
    )
    converted = _from_lua(result)
    assert isinstance(converted, dict)
    return converted


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # Lua strings are any bytes


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _from_lua(value: object) -> object:
    """Plain Python data from the driver's result (tables of strings, numbers and booleans)."""
    if isinstance(value, bytes):
        return _text(value)
    if lua54.lua_type(value) == "table":
        return {
            _text(key) if isinstance(key, bytes) else key: _from_lua(item)
            for key, item in value.items()  # type: ignore[attr-defined]
        }
    return value


def _list(table: object) -> list[Any]:
    """The items 1..n of a converted Lua sequence."""
    if not isinstance(table, dict):
        return []
    items = []
    index = 1
    while index in table:
        items.append(table[index])
        index += 1
    return items


# --- what Prosody makes of it ------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    file: str
    line: int | None
    env: str | None  # an ENV_ variable read on the same line

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} (via {self.env})" if self.env else where


_Where = Callable[[str], tuple[str, int | None]]  # where a global option was set


def _not_evaluated(dialect: Dialect, *findings: Finding) -> StatisticsConfig:
    return StatisticsConfig(
        provider=None,
        interval=None,
        interval_source=NOT_EVALUATED,
        modules_enabled=frozenset(),
        findings=tuple(findings),
        dialect=dialect,
    )


def _findings(raw: object) -> list[Finding]:
    found = []
    for item in _list(raw):
        line = item.get("line")
        found.append(
            Finding(item["file"], int(line) if line is not None else None, item["message"])
        )
    return found


def _interpret(
    result: dict[str, Any],
    dialect: Dialect,
    version_known: bool,
    main_name: str,
    max_instructions: int,
    max_memory: int,
) -> StatisticsConfig:
    findings = _findings(result.get("findings"))  # line by line: there may be any number
    error = result.get("error")
    if error is not None:
        message = error["message"]
        if result.get("exhausted") or _LIMIT_MARKER in message:
            message = (
                f"the operator stopped evaluating the config after {max_instructions} Lua "
                "instructions: is there an endless loop? (Prosody would hang at startup)"
            )
        elif _SANDBOX_MARKER in message or _UNREADABLE_MARKER in message:
            message = f"the operator cannot evaluate the config: {message}"
        elif "not enough memory" in message:
            message = (
                "the operator stopped evaluating the config: it needed more than "
                f"{max_memory // (1024 * 1024)} MiB of memory"
            )
        elif version_known:
            message = f"config error, Prosody refuses to start: {message}"
        else:
            message = (
                f"config error as Prosody {DIALECT_NAMES[dialect]} reads it (which Prosody runs "
                f"here is not known): {message}"
            )
        line = error.get("line")
        failed = Finding(error["file"], int(line) if line is not None else None, message)
        return _not_evaluated(dialect, *capped_findings(findings, [failed], main_name))

    locations: dict[str, dict[str, _Location]] = {}
    for host, by_key in (result.get("locations") or {}).items():
        locations[host] = {
            key: _Location(loc.get("file") or main_name, loc.get("line"), loc.get("env"))
            for key, loc in by_key.items()
        }
    global_locations = locations.get("*", {})

    def where(key: str) -> tuple[str, int | None]:
        location = global_locations.get(key)
        return (location.file, location.line) if location else (main_name, None)

    global_options: dict[str, dict[str, Any]] = result.get("global") or {}
    hosts: dict[str, dict[str, Any]] = result.get("hosts") or {}

    findings.extend(_misplaced_options(hosts, locations, main_name))
    deciding: list[Finding] = []  # what decides the interval and where /metrics is: a few
    unknown: list[str] = []  # options deciding something whose values are unknown
    stats_unknown = _unknown_findings(
        ("statistics", "statistics_interval"), global_options, where, "the interval", unknown
    )
    if stats_unknown:
        provider, interval, source = None, None, "unknown (see findings)"
        deciding.extend(stats_unknown)
    else:
        provider, interval, source, stats_findings = _statistics(
            global_options, global_locations, where
        )
        deciding.extend(stats_findings)
    modules, enabled, module_findings = _openmetrics_module(global_options, hosts, where, unknown)
    deciding.extend(module_findings)
    metrics = None
    if enabled:
        metrics, metrics_findings = _metrics_location(
            global_options, global_locations, where, unknown
        )
        deciding.extend(metrics_findings)
    if metrics is not None:
        metrics = replace(metrics, source=_bounded(metrics.source))
    return StatisticsConfig(
        provider=None if provider is None else _bounded(provider),
        interval=interval,
        interval_source=_bounded(source),
        modules_enabled=modules,
        findings=capped_findings(findings, deciding, main_name),
        metrics=metrics,
        dialect=dialect,
        unknown_options=tuple(unknown),
    )


def _bounded(text: str, limit: int = MAX_TEXT) -> str:
    """At most `limit` characters of `text` (a config can make names and values of any size)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def capped_findings(
    many: list[Finding], deciding: list[Finding], main_name: str
) -> tuple[Finding, ...]:
    """At most MAX_FINDINGS findings, then one saying how many more there were: all of
    `deciding` (a few), the first of `many` (one per line or host: any number); messages
    bounded too."""
    room = max(0, MAX_FINDINGS - len(deciding))
    kept = [*many[:room], *deciding[:MAX_FINDINGS]]
    found = [replace(f, file=_bounded(f.file), message=_bounded(f.message)) for f in kept]
    left_out = len(many) + len(deciding) - len(kept)
    if left_out:
        found.append(
            Finding(
                main_name,
                None,
                f"and {left_out} more finding(s) like these: the operator reports the first "
                f"{MAX_FINDINGS}",
            )
        )
    return tuple(found)


def _unknown_findings(
    names: tuple[str, ...],
    options: Mapping[str, Mapping[str, Any]],
    where: _Where,
    decides: str,
    unknown: list[str],
) -> list[Finding]:
    """A Finding for each of the options `names` whose value the operator cannot read."""
    found = []
    for name in names:
        option = options.get(name) or {}
        origin = option.get("origin") if option.get("type") == "unknown" else option.get("unknown")
        if origin is None:
            continue
        unknown.append(name)
        found.append(
            Finding(
                *where(name),
                f"{name} comes from a value the operator cannot read ({origin}), so {decides} "
                "is unknown: set it in a file the operator is given (a ConfigMap), or override "
                "it with an annotation",
            )
        )
    return found


def _misplaced_options(
    hosts: Mapping[str, Mapping[str, Any]],
    locations: Mapping[str, Mapping[str, _Location]],
    main_name: str,
) -> list[Finding]:
    found = []
    for host in sorted(hosts):
        kind = "Component" if hosts[host].get("component") else "VirtualHost"
        options = hosts[host].get("options") or {}
        for key in GLOBAL_ONLY_OPTIONS:
            if key not in options:
                continue
            location = locations.get(host, {}).get(key)
            found.append(
                Finding(
                    location.file if location else main_name,
                    location.line if location else None,
                    f"{key} is set under {kind} {host!r}, where Prosody ignores it: it is only "
                    "read from the global section, above any VirtualHost or Component "
                    f'(prosodyctl check config: "You need to move the following option: {key}")',
                )
            )
    return found


def _lua_repr(option: Mapping[str, Any]) -> str:
    kind = option.get("type")
    if kind == "string":
        return '"' + str(option.get("string", "")).replace('"', '\\"') + '"'
    if kind == "number":
        return _number_text(option["number"])
    if kind == "boolean":
        return "true" if option.get("boolean") else "false"
    return f"a {kind}"


def _number_text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _truthy(option: Mapping[str, Any] | None) -> bool:
    """Lua truthiness of an option's value (unset is nil)."""
    if option is None:
        return False
    return not (option.get("type") == "boolean" and not option.get("boolean"))


def _statistics(
    options: Mapping[str, Mapping[str, Any]],
    locations: Mapping[str, _Location],
    where: _Where,
) -> tuple[str | None, Interval | None, str, list[Finding]]:
    """core/statsmanager.lua's reading of the global statistics settings."""
    found: list[Finding] = []
    provider_option = options.get("statistics")
    interval_option = options.get("statistics_interval")
    provider_value = provider_option.get("string") if provider_option else None

    # stats_interval = tonumber(statistics_interval) -- Lua's tonumber, computed on the Lua side
    number = interval_option.get("number") if interval_option else None
    manual = bool(
        interval_option
        and interval_option.get("type") == "string"
        and interval_option.get("string") == MANUAL
    )
    if _truthy(interval_option) and number is None and not manual:
        assert interval_option is not None
        consequence = (
            f"it falls back to {_number_text(DEFAULT_STATISTICS_INTERVAL)} s"
            if _truthy(provider_option)
            else "statistics stay off"
        )
        found.append(
            Finding(
                *where("statistics_interval"),
                f"statistics_interval = {_lua_repr(interval_option)} is neither a number of "
                f'seconds nor "manual": Prosody logs "Invalid \'statistics_interval\' setting" '
                f"and {consequence}",
            )
        )

    interval_location = locations.get("statistics_interval")
    source = str(interval_location) if interval_location else ""
    implied = False
    if not _truthy(provider_option) and number is not None:
        implied = True  # a numeric interval alone turns on the internal provider
    elif _truthy(provider_option) and number is None:
        number = DEFAULT_STATISTICS_INTERVAL
        if not manual:
            source = (
                f"default ({_number_text(DEFAULT_STATISTICS_INTERVAL)}s once statistics are on)"
            )

    provider_where = where("statistics")
    off = "statistics are off"
    if not _truthy(provider_option) and not implied:
        if manual:
            found.append(
                Finding(
                    *where("statistics_interval"),
                    'statistics_interval = "manual" without statistics = "internal" in the global '
                    "section leaves statistics off: Prosody's /metrics answers 404 \"No "
                    'statistics provider configured"; add statistics = "internal"',
                )
            )
        elif not _truthy(interval_option):  # an invalid one is reported above
            found.append(
                Finding(
                    provider_where[0],
                    None,
                    "statistics are off: neither statistics nor statistics_interval is set in the "
                    "global section, so Prosody's /metrics answers 404 \"No statistics provider "
                    'configured"; set statistics = "internal"',
                )
            )
        return None, None, off, found
    if provider_option is not None and _truthy(provider_option) and provider_value is None:
        found.append(
            Finding(
                *provider_where,
                f"statistics = {_lua_repr(provider_option)} is not a provider name: Prosody 0.12 "
                'fails to start; use statistics = "internal"',
            )
        )
        return None, None, "statistics setting is invalid", found
    if provider_value is not None and provider_value.startswith(":"):
        found.append(
            Finding(
                *provider_where,
                f'statistics = "{provider_value}" loads the external provider module '
                f"{provider_value[1:]!r}; the operator cannot tell whether it serves Prosody's "
                '/metrics: use statistics = "internal"',
            )
        )
    elif provider_value == "statsd":
        has_server = bool((options.get("statistics_config") or {}).get("statsd_server"))
        if not has_server:
            found.append(
                Finding(
                    *provider_where,
                    'statistics = "statsd" without statistics_config.statsd_server: Prosody logs '
                    '"No statsd server specified" and statistics stay off; use statistics = '
                    '"internal" for /metrics',
                )
            )
            return provider_value, None, off, found
        found.append(
            Finding(
                *provider_where,
                'statistics = "statsd" sends the metrics to a statsd server; Prosody\'s /metrics '
                'does not serve them: use statistics = "internal"',
            )
        )
    elif provider_value not in (None, INTERNAL_PROVIDER):
        found.append(
            Finding(
                *provider_where,
                f'statistics = "{provider_value}" is not a provider Prosody knows (it knows '
                '"internal" and "statsd"): it logs "Unrecognized statistics provider" and '
                'statistics stay off; use statistics = "internal"',
            )
        )
        return provider_value, None, off, found

    interval: Interval
    if manual:
        interval = MANUAL
    else:
        assert number is not None
        interval = float(number)
        if not math.isfinite(interval) or interval <= 0:
            found.append(
                Finding(
                    *where("statistics_interval"),
                    f"statistics_interval = {_number_text(interval)} is not a positive number of "
                    "seconds: Prosody's collection timer misbehaves with it",
                )
            )
    return provider_value, interval, source, found


def _openmetrics_module(
    options: Mapping[str, Mapping[str, Any]],
    hosts: Mapping[str, Mapping[str, Any]],
    where: _Where,
    unknown: list[str],
) -> tuple[frozenset[str], bool, list[Finding]]:
    """The global modules_enabled, whether http_openmetrics is on, and what is wrong."""
    found: list[Finding] = []
    enabled_option = options.get("modules_enabled")
    modules = frozenset(
        item for item in _list((enabled_option or {}).get("list")) if isinstance(item, str)
    )
    disabled = frozenset(
        item
        for item in _list((options.get("modules_disabled") or {}).get("list"))
        if isinstance(item, str)
    )
    decides = "whether Prosody serves /metrics"
    if OPENMETRICS_MODULE not in modules:
        found = _unknown_findings(("modules_enabled",), options, where, decides, unknown)
    elif OPENMETRICS_MODULE not in disabled:
        found = _unknown_findings(("modules_disabled",), options, where, decides, unknown)
    if found:
        return modules, False, found
    location = where("modules_enabled")
    if enabled_option is not None and enabled_option.get("type") != "table":
        found.append(
            Finding(
                *location,
                f"the global modules_enabled = {_lua_repr(enabled_option)} is not a list of "
                "module names",
            )
        )
    if OPENMETRICS_MODULE in modules and OPENMETRICS_MODULE in disabled:
        found.append(
            Finding(
                *where("modules_disabled"),
                f'"{OPENMETRICS_MODULE}" is in the global modules_disabled, so Prosody serves no '
                "/metrics",
            )
        )
    elif OPENMETRICS_MODULE not in modules:
        hint = ""
        if f"mod_{OPENMETRICS_MODULE}" in modules:
            hint = f' (it lists "mod_{OPENMETRICS_MODULE}": leave out the mod_ prefix)'
        else:
            under = sorted(
                host
                for host, info in hosts.items()
                if OPENMETRICS_MODULE
                in _list(((info.get("options") or {}).get("modules_enabled") or {}).get("list"))
            )
            if under:
                hint = f" (it is listed under {', '.join(repr(h) for h in under)} only)"
        found.append(
            Finding(
                location[0],
                location[1],
                f'"{OPENMETRICS_MODULE}" is not in the global modules_enabled{hint}, so Prosody '
                f'serves no /metrics: add "{OPENMETRICS_MODULE}" to the global modules_enabled',
            )
        )
    enabled = OPENMETRICS_MODULE in modules and OPENMETRICS_MODULE not in disabled
    return modules, enabled, found


# --- where /metrics is --------------------------------------------------------------------------

HTTP_DEFAULT_PORT: Final = 5280  # mod_http's "http" service
METRICS_DEFAULT_PATH: Final = "/metrics"  # mod_http_openmetrics' default_path
DEFAULT_ALLOW_IPS: Final = ("::1", "127.0.0.1")  # openmetrics_allow_ips' default
# The loopback address a sidecar connects to for an interface Prosody binds: Prosody then sees
# the connection come from that same address.
_LOOPBACK_FOR_INTERFACE: Final = {
    "127.0.0.1": "127.0.0.1",
    "0.0.0.0": "127.0.0.1",
    "*": "127.0.0.1",
    "::1": "::1",
    "::": "::1",
}


def _items(option: Mapping[str, Any] | None) -> list[Any]:
    """What Prosody iterates for an option: a list's items, or a single value as a list."""
    if option is None:
        return []
    if option.get("type") == "table":
        return _list(option.get("list"))
    return [option.get(option.get("type", ""))]


def _first_set(options: Mapping[str, Mapping[str, Any]], names: tuple[str, ...]) -> str | None:
    """core/portmanager.lua's `config.get(a) or config.get(b) or ...`: the first set option."""
    return next((name for name in names if _truthy(options.get(name))), None)


def _metrics_location(
    options: Mapping[str, Mapping[str, Any]],
    locations: Mapping[str, _Location],
    where: _Where,
    unknown: list[str],
) -> tuple[MetricsLocation | None, list[Finding]]:
    """Where mod_http_openmetrics (enabled) serves /metrics for a sidecar in the pod: on the
    "http" service's ports (core/portmanager.lua; a private service, so on local interfaces
    unless told otherwise), at the global http_paths.openmetrics or /metrics (mod_http.lua; a
    global module's routes match any Host, so http_host and http_default_host do not matter),
    for a loopback client its allowlist lets in."""
    ports_option = _first_set(options, ("http_ports",))
    interfaces_option = _first_set(
        options, ("http_interfaces", "http_interface", "local_interfaces")
    )
    deciding = [
        name
        for name in (
            ports_option,
            interfaces_option,
            "http_paths",
            "openmetrics_allow_ips",
            "openmetrics_allow_cidr",
        )
        if name is not None and name in options
    ]
    if interfaces_option is None:  # default_local_interfaces
        deciding += [name for name in ("use_ipv4", "use_ipv6") if name in options]
    found = _unknown_findings(
        tuple(deciding), options, where, "where the sidecar finds /metrics", unknown
    )
    if found:
        return None, found

    ports = [HTTP_DEFAULT_PORT]
    if ports_option is not None:
        ports = [int(n) for n in _numbers(options[ports_option]) if _is_port(n)]
    if not ports:
        return None, [
            Finding(
                *where("http_ports"),
                "http_ports opens no HTTP port, so the sidecar cannot collect /metrics"
                + _https_hint(options)
                + ": open one on loopback, e.g. http_ports = { 5280 } and http_interfaces = "
                '{ "127.0.0.1" }',
            )
        ]

    if interfaces_option is not None:
        interfaces = [str(item) for item in _items(options[interfaces_option])]
    else:
        interfaces = [
            address
            for address, switch in (("127.0.0.1", "use_ipv4"), ("::1", "use_ipv6"))
            if not _is_false(options.get(switch))
        ]
    candidates = sorted(
        {_LOOPBACK_FOR_INTERFACE[i] for i in interfaces if i in _LOOPBACK_FOR_INTERFACE},
        key=lambda address: ":" in address,  # IPv4 first
    )
    if not candidates:
        name = interfaces_option or "use_ipv4"
        return None, [
            Finding(
                *where(name),
                f"Prosody's HTTP server listens on {', '.join(interfaces) or 'no interface'} "
                f"({name}), not on loopback, where the sidecar in the pod collects /metrics"
                + _https_hint(options)
                + ': add "127.0.0.1" to http_interfaces',
            )
        ]

    allowed = [address for address in candidates if _openmetrics_permits(options, address)]
    if not allowed:
        name = "openmetrics_allow_ips"
        if "openmetrics_allow_cidr" in options and name not in options:
            name = "openmetrics_allow_cidr"
        return None, [
            Finding(
                *where(name),
                f"mod_http_openmetrics lets in neither of {', '.join(candidates)} "
                "(openmetrics_allow_ips, openmetrics_allow_cidr), the addresses the sidecar "
                f'connects from: Prosody answers it 403; add "{candidates[0]}" to '
                "openmetrics_allow_ips",
            )
        ]

    path, path_findings = _metrics_path(options.get("http_paths"), where)
    if path is None:
        return None, path_findings
    set_here = [
        f"{locations[name]} ({name})"
        for name in (ports_option, interfaces_option, "http_paths")
        if name is not None and name in locations
    ]
    source = ", ".join(set_here) or "Prosody's defaults"
    return MetricsLocation(allowed[0], ports[0], path, source), path_findings


def _numbers(option: Mapping[str, Any] | None) -> list[float]:
    """Lua's tonumber of each item Prosody iterates (those that are numbers)."""
    if option is None:
        return []
    if option.get("type") == "table":
        return [float(n) for n in _list(option.get("numbers"))]
    return [] if option.get("number") is None else [float(option["number"])]


def _is_port(number: float) -> bool:
    return number.is_integer() and 0 < number < 65536


def _is_false(option: Mapping[str, Any] | None) -> bool:
    return option is not None and option.get("type") == "boolean" and not option.get("boolean")


def _https_hint(options: Mapping[str, Mapping[str, Any]]) -> str:
    if any(_is_port(n) for n in _numbers(options.get("https_ports"))):
        return (
            " (Prosody serves it over HTTPS on https_ports, which the sidecar does not use: "
            "Prosody's certificate is not for a loopback address)"
        )
    return ""


def _openmetrics_permits(options: Mapping[str, Mapping[str, Any]], client: str) -> bool:
    """mod_http_openmetrics' is_permitted for a request from `client`: an exact string in
    openmetrics_allow_ips, or within openmetrics_allow_cidr (util/ip.lua's match)."""
    allow_ips = options.get("openmetrics_allow_ips")
    permitted = DEFAULT_ALLOW_IPS if allow_ips is None else _items(allow_ips)
    if client in permitted:
        return True
    cidr = (options.get("openmetrics_allow_cidr") or {}).get("string")
    return cidr is not None and _cidr_contains(cidr, client)


def _cidr_contains(cidr: str, client: str) -> bool:
    """util/ip.lua's match(new_ip(client), parse_cidr(cidr)): IPv4 against IPv6 compares the
    IPv4-mapped form; no prefix length means the address itself."""
    address_text, _, bits_text = cidr.partition("/")
    try:
        address = ipaddress.ip_address(address_text)
        peer = ipaddress.ip_address(client)
        bits = int(bits_text) if bits_text else None
    except ValueError:
        return False  # Prosody cannot parse it either
    if bits is None:
        return address == peer
    if address.version != peer.version:
        if address.version == 4:
            address = ipaddress.IPv6Address(f"::ffff:{address}")
            bits += 96
        else:
            peer = ipaddress.IPv6Address(f"::ffff:{peer}")
    bits = max(0, min(bits, address.max_prefixlen))
    return peer in ipaddress.ip_network(f"{address}/{bits}", strict=False)


def _metrics_path(
    http_paths: Mapping[str, Any] | None, where: _Where
) -> tuple[str | None, list[Finding]]:
    """mod_http's get_base_path for the global "openmetrics" app: http_paths.openmetrics or
    /metrics, through util/http.lua's normalize_path, with $host as "*" (a global module)."""
    value = (http_paths or {}).get("openmetrics")
    if value is None:
        return METRICS_DEFAULT_PATH, []
    if value.get("type") != "string":
        return None, [
            Finding(
                *where("http_paths"),
                f"http_paths.openmetrics = {_lua_repr(value)} is not a path: Prosody cannot "
                "serve /metrics",
            )
        ]
    path = str(value["string"])
    if path.endswith("/"):
        path = path[:-1]
    if not path.startswith("/"):
        path = "/" + path
    return re.sub(r"\$host(?![A-Za-z0-9])", "*", path), []
