"""Prosody's statistics settings, learnt by evaluating its real config the way Prosody does (pure).

Prosody's config is a Lua program. `evaluate_prosody_config` runs it in an embedded Lua 5.4
(lupa) inside a port of Prosody 0.12.3's own config environment (core/configmanager.lua):
settings before any `VirtualHost`/`Component` are global, later ones belong to that host;
`Include` (globs too) loads another file, which starts in the global section; `ENV_FOO` reads
the environment variable FOO. It then applies core/statsmanager.lua's rules to the global
`statistics` / `statistics_interval`, and reports what `prosodyctl check config` or Prosody's
startup would warn about (and what stops /metrics from working) as `Finding`s. Config errors
become Findings too, never exceptions.

Files are a virtual filesystem: `files` maps a path to the file's contents. A relative path is
relative to `config_dir` (Prosody's config directory, /etc/prosody in Debian's package and the
official image); an absolute path is taken as is. So with `config_dir="/etc/prosody"` the keys
"conf.d/stats.cfg.lua" and "/etc/prosody/conf.d/stats.cfg.lua" name the same file. An
`Include` is resolved exactly like Prosody does (relative to the directory of the including
file) and then looked up by that absolute path; a glob (`*`, `?`) applies to the last path
component only and matches the files given for that directory, in sorted order (Prosody uses
directory order, which is unsorted); a glob that matches none of them is fine (Prosody 0.12 fails
if the directory itself is missing, which the operator cannot see). A missing file named without
a glob is a config error, as in Prosody. A ConfigMap's keys cannot contain "/":
prosody.ConfigMount turns a ConfigMap mounted at e.g. /etc/prosody/conf.d into such paths.
Findings name files by their path relative to `config_dir` (absolute when outside it).

The sandbox: the config sees Lua's base functions, string/table/math/utf8/coroutine, os.time/
clock/date/difftime/getenv (getenv reads `env`), the globals Prosody defines before reading its
config (CFG_*, prosody.paths, log) and a stub of util.pposix (uname, used by the official image's
config). io, debug, package, dofile, loadfile, require (other than util.pposix), os.execute and
the rest of os raise an error naming the sandbox; RunScript is not run, only reported. Evaluation
stops after `max_instructions` Lua VM instructions and `max_memory` bytes. Not bounded: time
spent inside a single C function, e.g. a pathological `string.find` pattern.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from lupa import lua54

DEFAULT_CONFIG_DIR: Final = "/etc/prosody"
DEFAULT_MAIN: Final = "prosody.cfg.lua"
DEFAULT_STATISTICS_INTERVAL: Final = 60.0  # core/statsmanager.lua, when only `statistics` is set
MANUAL: Final = "manual"
INTERNAL_PROVIDER: Final = "internal"
OPENMETRICS_MODULE: Final = "http_openmetrics"

# Prosody configs are small: the official image's runs a few thousand instructions.
MAX_INSTRUCTIONS: Final = 10_000_000
MAX_MEMORY: Final = 64 * 1024 * 1024

Interval = float | Literal["manual"]

# Options Prosody reads only from the global section (prosodyctl check config's
# known_global_options, restricted to those that decide whether /metrics works and who may read it).
GLOBAL_ONLY_OPTIONS: Final = (
    "statistics",
    "statistics_interval",
    "statistics_config",
    "openmetrics_allow_ips",
    "openmetrics_allow_cidr",
    "trusted_proxies",
    "http_ports",
    "http_interfaces",
    "https_ports",
    "https_interfaces",
)
_TRACKED_OPTIONS: Final = (*GLOBAL_ONLY_OPTIONS, "modules_enabled", "modules_disabled")

_NO_ENV: Final[Mapping[str, str]] = MappingProxyType({})

# Markers the Lua side puts in error messages (see _DRIVER).
_SANDBOX_MARKER: Final = "not available in the operator's sandbox"
_LIMIT_MARKER: Final = "instruction limit reached"


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
class StatisticsConfig:
    provider: str | None  # value of `statistics` in the global section, or None
    # Effective statistics_interval: seconds, "manual", or None when statistics are off (or the
    # config could not be evaluated: then the findings say why).
    interval: Interval | None
    interval_source: str  # "prosody.cfg.lua:12", "default (60s once statistics are on)", ...
    modules_enabled: frozenset[str]  # global modules_enabled
    findings: tuple[Finding, ...]


def evaluate_prosody_config(
    files: Mapping[str, str],
    main: str = DEFAULT_MAIN,
    env: Mapping[str, str] = _NO_ENV,
    config_dir: str = DEFAULT_CONFIG_DIR,
    *,
    max_instructions: int = MAX_INSTRUCTIONS,
    max_memory: int = MAX_MEMORY,
) -> StatisticsConfig:
    """Evaluate Prosody 0.12's config `main` among `files`, with `env` as the container's env."""
    if not config_dir.startswith("/"):
        raise ValueError(f"config_dir must be an absolute path, not {config_dir!r}")
    config_dir = _normalize(config_dir)
    by_path = {_absolute(path, config_dir): text for path, text in files.items()}
    main_path = _absolute(main, config_dir)
    main_name = _display(main_path, config_dir)
    if main_path not in by_path:
        return _not_evaluated(
            Finding(main_name, None, "no such config file: Prosody cannot start without it"),
        )
    try:
        result = _run_driver(by_path, main_path, env, config_dir, max_instructions, max_memory)
    except (lua54.LuaError, MemoryError) as error:  # e.g. no memory left for the result
        return _not_evaluated(
            Finding(main_name, None, f"the operator could not evaluate the config: {error}")
        )
    return _interpret(result, main_name, max_instructions, max_memory)


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


def _run_driver(
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
    load = lua.globals()[b"load"]
    chunk = load(_DRIVER.encode(), b"=prosody_operator", b"t")
    if isinstance(chunk, tuple):  # (nil, message): cannot happen, the driver is fixed code
        raise RuntimeError(f"the config driver does not compile: {_text(chunk[1])}")
    evaluate = chunk()
    result = evaluate(
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


def _not_evaluated(*findings: Finding) -> StatisticsConfig:
    return StatisticsConfig(
        provider=None,
        interval=None,
        interval_source="config not evaluated (see findings)",
        modules_enabled=frozenset(),
        findings=tuple(findings),
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
    result: dict[str, Any], main_name: str, max_instructions: int, max_memory: int
) -> StatisticsConfig:
    findings = _findings(result.get("findings"))
    error = result.get("error")
    if error is not None:
        message = error["message"]
        if result.get("exhausted") or _LIMIT_MARKER in message:
            message = (
                f"the operator stopped evaluating the config after {max_instructions} Lua "
                "instructions: is there an endless loop? (Prosody would hang at startup)"
            )
        elif _SANDBOX_MARKER in message:
            message = f"the operator cannot evaluate the config: {message}"
        elif "not enough memory" in message:
            message = (
                "the operator stopped evaluating the config: it needed more than "
                f"{max_memory // (1024 * 1024)} MiB of memory"
            )
        else:
            message = f"config error, Prosody refuses to start: {message}"
        line = error.get("line")
        findings.append(Finding(error["file"], int(line) if line is not None else None, message))
        return _not_evaluated(*findings)

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
    provider, interval, source, stats_findings = _statistics(
        global_options, global_locations, where
    )
    findings.extend(stats_findings)
    modules, module_findings = _openmetrics_module(global_options, hosts, where)
    findings.extend(module_findings)
    return StatisticsConfig(
        provider=provider,
        interval=interval,
        interval_source=source,
        modules_enabled=modules,
        findings=tuple(findings),
    )


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
) -> tuple[frozenset[str], list[Finding]]:
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
    return modules, found


# --- the Lua side ------------------------------------------------------------------------------

# Prosody 0.12.3's core/configmanager.lua parser (with util/paths.lua's helpers), ported to run
# on a virtual filesystem inside a sandbox. Deliberate differences are marked "Operator:".
_DRIVER: Final = r"""
local real_G = _G
local type, pairs, ipairs, next, select, tostring, tonumber, error, pcall, xpcall =
      type, pairs, ipairs, next, select, tostring, tonumber, error, pcall, xpcall
local rawget, rawset, setmetatable, getmetatable = rawget, rawset, setmetatable, getmetatable
local s_format, s_match, s_gsub, s_sub, s_find, s_lower, s_gmatch =
      string.format, string.match, string.gsub, string.sub, string.find, string.lower, string.gmatch
local t_concat, t_sort = table.concat, table.sort
local m_max = math.max
local d_getinfo, d_sethook = debug.getinfo, debug.sethook
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local real_load = load

local SANDBOX = "is not available in the operator's sandbox"
local LIMIT = "instruction limit reached"
local HOOK_EVERY = 1000

-- State of one evaluation (the operator uses a fresh Lua state for each).
local files, display, env_vars, main_file
local G -- the globals the config sees
local budget_left, exhausted, in_handler = 0, false, false
local limit_message = LIMIT -- located where the budget ran out
local source_to_file, short_to_file = {}, {}
local findings, locations, env_at, tracked, assigned_in = {}, {}, {}, {}, {}
local include_stack = {}
local config_table

local function short_src(name) -- what Lua shows for a chunk named "@"..name (LUA_IDSIZE 60)
	if #name <= 59 then return name end
	return "..." .. s_sub(name, -56)
end

local config_location

-- Instruction budget, shared by the main thread and every coroutine the config creates.
local function count_hook()
	if in_handler then return end
	budget_left = budget_left - HOOK_EVERY
	if budget_left < 0 then
		if not exhausted then
			exhausted = true
			local file, line = config_location(3) -- (hooks do not run inside hooks)
			if file then limit_message = s_format("%s:%d: %s", short_src(display[file]), line, LIMIT) end
		end
		error(limit_message, 0)
	end
end

-- Re-raise once the budget is spent, so that a pcall in the config cannot swallow the limit.
local function guard(...)
	if exhausted then error(limit_message, 0) end
	return ...
end

-- The innermost frame running config code: its file and line. `prefer` picks that file's
-- innermost frame if it has one (Prosody's get_line_number looks for the current file).
function config_location(level, prefer)
	local fallback_file, fallback_line
	while true do
		local info = d_getinfo(level, "Sl")
		if not info then break end
		local file = source_to_file[info.source]
		if file and info.currentline and info.currentline > 0 then
			if prefer == nil or file == prefer then return file, info.currentline end
			if not fallback_file then fallback_file, fallback_line = file, info.currentline end
		end
		level = level + 1
	end
	return fallback_file, fallback_line
end

local function add_finding(file, line, message)
	findings[#findings + 1] = { file = display[file] or file, line = line, message = message }
end

local function position_of(message) -- the config file a "file:line: " prefix names, if any
	local src, line = s_match(message, "^(.-):(%d+): ")
	if src and short_to_file[src] then return short_to_file[src], tonumber(line) end
end

-- Message handler: make sure an error names the config file and line it happened at.
local function locate_error(err)
	in_handler = true
	if type(err) == "number" then
		err = tostring(err)
	elseif type(err) ~= "string" then
		err = s_format("(error object is a %s value)", type(err))
	end
	if not position_of(err) then
		err = (s_gsub(err, "^prosody_operator:%d+: ", ""))
		local file, line = config_location(3)
		if file then err = s_format("%s:%d: %s", short_src(display[file]), line, err) end
	end
	in_handler = false
	return err
end

local function normalize(path) -- absolute path without ".", ".." or repeated slashes
	local parts = {}
	for part in s_gmatch(path, "[^/]+") do
		if part == ".." then
			if #parts > 0 then parts[#parts] = nil end
		elseif part ~= "." then
			parts[#parts + 1] = part
		end
	end
	return "/" .. t_concat(parts, "/")
end

-- util/paths.lua
local function resolve_relative_path(parent_path, path)
	if path then
		parent_path = (s_gsub(parent_path, "%/+$", ""))
		path = (s_gsub(path, "^%.%/+", ""))
		if s_sub(path, 1, 1) ~= "/" then
			return parent_path .. "/" .. path
		end
	end
	return path
end

local function glob_to_pattern(glob)
	return "^" .. (s_gsub(glob, "[%p*?]", function(c)
		if c == "*" then
			return ".*"
		elseif c == "?" then
			return "."
		else
			return "%" .. c
		end
	end)) .. "$"
end

-- Operator: nameprep without util.encodings is what configmanager falls back to (lowercase).
local function nameprep(host) return s_lower(host) end

local config_mt = { __index = function(t, _) return rawget(t, "*") end }
local host_mt = { __index = function(_, k) return config_table["*"][k] end }

local function set(config_table, host, key, value)
	if host and key then
		local hostconfig = rawget(config_table, host)
		if not hostconfig then
			hostconfig = rawset(config_table, host, setmetatable({}, host_mt))[host]
		end
		hostconfig[key] = value
		return true
	end
	return false
end

local function record_location(host, key, file, line)
	if not tracked[key] then return end
	local by_host = locations[host]
	if not by_host then
		by_host = {}
		locations[host] = by_host
	end
	by_host[key] = {
		file = file and display[file], line = line,
		env = file and line and env_at[file .. ":" .. line],
	}
	if host == "*" and file then
		local keys = assigned_in[file] or {}
		assigned_in[file] = keys
		keys[key] = true
	end
end

local parser = {}

-- Operator: `config_file` is the path as Prosody would spell it (it resolves Includes against it
-- and its length matters, see __newindex); `key` is that path normalized, naming the file here.
function parser.load(data, config_file, config_table, key)
	local set_options = {} -- set_options[host.."/"..option_name] = true (when the option has been set already in this file)
	local env
	-- The ' = true' are needed so as not to set off __newindex when we assign the functions below
	env = setmetatable({
		Host = true, host = true, VirtualHost = true,
		Component = true, component = true,
		Include = true, include = true, RunScript = true }, {
			__index = function (_, k)
				if type(k) == "string" and s_match(k, "^ENV_") then
					local value = env_vars[s_sub(k, 5)]
					if value ~= nil then
						local file, line = config_location(3, key)
						if file then env_at[file .. ":" .. line] = k end
					end
					return value
				end
				return rawget(G, k)
			end,
			__newindex = function (_, k, v)
				local host = env.__currenthost or "*"
				local option_path = host.."/"..k
				local file, line = config_location(3, key)
				if set_options[option_path] then
					-- Prosody 0.12.3 finds the line by comparing frames' short_src with config_file,
					-- which Lua shortens beyond 59 characters: then the warning's format() fails,
					-- and so does loading the config.
					if #config_file > 59 then
						error("bad argument #2 to 'format' (number expected, got nil) (Prosody 0.12.3 "
							.. "fails on a duplicate option in a config file whose path is longer than "
							.. "59 characters)", 2)
					end
					add_finding(file or key, line, s_format("Duplicate option '%s'", tostring(k)))
				end
				set_options[option_path] = true
				record_location(host, k, file, line)
				set(config_table, env.__currenthost or "*", k, v)
			end
	})

	rawset(env, "__currenthost", "*") -- Default is global
	function env.VirtualHost(name)
		if not name then
			error("Host must have a name", 2)
		end
		local prepped_name = nameprep(name)
		if not prepped_name then
			error(s_format("Name of Host %q contains forbidden characters", name), 0)
		end
		name = prepped_name
		if rawget(config_table, name) and rawget(config_table[name], "component_module") then
			error(s_format("Host %q clashes with previously defined %s Component %q, for services use a sub-domain like conference.%s",
				name, (s_gsub(config_table[name].component_module, "^%a+$", { component = "external", muc = "MUC"})), name, name), 0)
		end
		rawset(env, "__currenthost", name)
		-- Needs at least one setting to logically exist :)
		set(config_table, name or "*", "defined", true)
		return function (config_options)
			rawset(env, "__currenthost", "*") -- Return to global scope
			if type(config_options) == "string" then
				error(s_format("VirtualHost entries do not accept a module name (module '%s' provided for host '%s')", config_options, name), 2)
			elseif type(config_options) ~= "table" then
				error("Invalid syntax following VirtualHost, expected options but received a "..type(config_options), 2)
			end
			local file, line = config_location(2, key)
			for option_name, option_value in pairs(config_options) do
				record_location(name, option_name, file, line)
				set(config_table, name or "*", option_name, option_value)
			end
		end
	end
	env.Host, env.host = env.VirtualHost, env.VirtualHost

	function env.Component(name)
		if not name then
			error("Component must have a name", 2)
		end
		local prepped_name = nameprep(name)
		if not prepped_name then
			error(s_format("Name of Component %q contains forbidden characters", name), 0)
		end
		name = prepped_name
		if rawget(config_table, name) and rawget(config_table[name], "defined")
			and not rawget(config_table[name], "component_module") then
			error(s_format("Component %q clashes with previously defined VirtualHost %q, for services use a sub-domain like conference.%s",
				name, name, name), 0)
		end
		set(config_table, name, "component_module", "component")
		-- Don't load the global modules by default
		set(config_table, name, "load_global_modules", false)
		rawset(env, "__currenthost", name)
		local function handle_config_options(config_options)
			rawset(env, "__currenthost", "*") -- Return to global scope
			local file, line = config_location(3, key)
			for option_name, option_value in pairs(config_options) do
				record_location(name, option_name, file, line)
				set(config_table, name or "*", option_name, option_value)
			end
		end

		return function (module)
				if type(module) == "string" then
					set(config_table, name, "component_module", module)
					return handle_config_options
				end
				return handle_config_options(module)
			end
	end
	env.component = env.Component

	function env.Include(file)
		-- Operator: a clear message instead of "attempt to index a nil value (local 'file')".
		if type(file) ~= "string" then
			error(s_format("Include needs a file name, got %s", type(file)), 2)
		end
		-- Check whether this is a wildcard Include
		if s_find(file, "[*?]") then
			local path_pos, glob = s_match(file, "()([^/]+)$")
			if not path_pos then
				error(s_format("Include %q has no file name pattern after its last '/'", file), 2)
			end
			local path = s_sub(file, 1, m_max(path_pos-2,0))
			local config_path = (s_gsub(config_file, "[^/]+$", ""))
			if #path > 0 then
				path = resolve_relative_path(config_path, path)
			else
				path = config_path
			end
			local patt = glob_to_pattern(glob)
			-- Operator: the files given for that directory, sorted, instead of lfs.dir (unsorted;
			-- and Prosody fails if the directory does not exist).
			local dir = normalize(path)
			local matches = {}
			for f in next, files do
				local f_dir, base = s_match(f, "^(.*)/([^/]*)$")
				if f_dir == "" then f_dir = "/" end
				if f_dir == dir and s_sub(base, 1, 1) ~= "." and s_match(base, patt) then
					matches[#matches + 1] = base
				end
			end
			t_sort(matches)
			for _, f in ipairs(matches) do
				env.Include(path.."/"..f)
			end
			-- Operator: warn when the unsorted directory order decides a tracked global option.
			local setters = {}
			for _, f in ipairs(matches) do
				local included = normalize(path.."/"..f)
				for option in next, assigned_in[included] or {} do
					local list = setters[option] or {}
					setters[option] = list
					list[#list + 1] = display[included]
				end
			end
			for option, list in next, setters do
				if #list > 1 then
					local where, line = config_location(3, key)
					add_finding(where or key, line, s_format(
						"%s is set in several files that Include %q matches (%s): Prosody includes "
						.. "them in directory order, which is not sorted, so which value wins is "
						.. "not defined (the operator assumed sorted order)", option, file, t_concat(list, ", ")))
				end
			end
			return
		end
		-- Not a wildcard, so resolve (potentially) relative path and run through config parser
		file = resolve_relative_path((s_gsub(config_file, "[^/]+$", "")), file)
		local resolved = normalize(file)
		local data = files[resolved]
		if not data then
			-- Operator: the error names the Include's file and line (Prosody's does not).
			error(s_format("Error loading included %s: No such file among the config files", file), 2)
		end
		for i = 1, #include_stack do
			if include_stack[i] == resolved then
				local chain = {}
				for j = i, #include_stack do chain[#chain + 1] = display[include_stack[j]] end
				chain[#chain + 1] = display[resolved]
				error("Include loop: " .. t_concat(chain, " -> "), 2)
			end
		end
		local ret, err = parser.load(data, file, config_table, resolved)
		if not ret then error(err, 0) end
		return true
	end
	env.include = env.Include

	function env.RunScript(file)
		-- Operator: not run (Prosody runs it with dofile, outside the config's environment).
		local where, line = config_location(3, key)
		add_finding(where or key, line, s_format(
			"RunScript %s was not run: the operator does not run scripts, so what it changes is "
			.. "unknown", type(file) == "string" and s_format("%q", file) or type(file)))
	end

	local chunk, err = real_load(data, "@" .. display[key], "t", env)

	if not chunk then
		return nil, err
	end

	include_stack[#include_stack + 1] = key
	local ok, err = xpcall(chunk, locate_error)
	include_stack[#include_stack] = nil
	in_handler = false -- in case the handler itself failed (out of memory)

	if not ok then
		return nil, err
	end

	return true
end

local function deny_table(name)
	return setmetatable({}, {
		__index = function(_, k) error(s_format("%s.%s %s", name, tostring(k), SANDBOX), 2) end,
		__newindex = function(_, k) error(s_format("%s.%s %s", name, tostring(k), SANDBOX), 2) end,
		__metatable = false,
	})
end

local function deny_function(name)
	return function() error(s_format("%s %s", name, SANDBOX), 2) end
end

local function copy(t)
	local c = {}
	for k, v in next, t do c[k] = v end
	return c
end

local function build_sandbox()
	local G = {}
	for _, name in ipairs({ "assert", "collectgarbage", "error", "getmetatable", "ipairs", "next",
			"pairs", "rawequal", "rawget", "rawlen", "rawset", "select", "tonumber", "tostring",
			"type", "_VERSION" }) do
		G[name] = real_G[name]
	end
	G._G = G
	G.setmetatable = function(t, mt)
		-- A finaliser could run after the instruction budget is switched off.
		if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
			error("__gc metamethods are not available in the operator's sandbox", 2)
		end
		return setmetatable(t, mt)
	end
	G.pcall = function(...) return guard(pcall(...)) end
	G.xpcall = function(...) return guard(xpcall(...)) end
	G.load = function(chunk, name, _, ...)
		if type(chunk) == "string" and s_sub(chunk, 1, 1) == "\27" then
			error("binary chunks are not available in the operator's sandbox", 2)
		end
		local env = G
		if select("#", ...) > 0 then env = ... end
		return guard(real_load(chunk, name, "t", env)) -- never binary chunks
	end
	G.print = function() end
	G.log = function() end
	G.string, G.table, G.math, G.utf8 = copy(string), copy(table), copy(math), copy(utf8)
	local function create(f)
		local co = co_create(f)
		d_sethook(co, count_hook, "", HOOK_EVERY)
		return co
	end
	local function unwrap(ok, ...)
		if exhausted then error(limit_message, 0) end
		if not ok then error((...), 0) end
		return ...
	end
	G.coroutine = {
		create = create,
		resume = function(co, ...) return guard(co_resume(co, ...)) end,
		wrap = function(f)
			local co = create(f)
			return function(...) return unwrap(co_resume(co, ...)) end
		end,
		close = function(co) return guard(co_close(co)) end,
		yield = coroutine.yield, status = coroutine.status, running = coroutine.running,
		isyieldable = coroutine.isyieldable,
	}
	G.os = setmetatable({
		time = os.time, clock = os.clock, date = os.date, difftime = os.difftime,
		getenv = function(name) return env_vars[name] end,
	}, { __index = function(_, k) error(s_format("os.%s %s", tostring(k), SANDBOX), 2) end })
	G.io, G.debug, G.package = deny_table("io"), deny_table("debug"), deny_table("package")
	G.dofile, G.loadfile = deny_function("dofile"), deny_function("loadfile")
	-- The official image's config reads the host name from util.pposix.
	local pposix = setmetatable({
		uname = function()
			return { sysname = "Linux", nodename = env_vars.HOSTNAME or "localhost",
				release = "", version = "", machine = "" }
		end,
	}, { __index = function(_, k) error(s_format("util.pposix.%s %s", tostring(k), SANDBOX), 2) end })
	G.require = function(name)
		if name == "util.pposix" then return pposix end
		error(s_format("require %s %s", type(name) == "string" and s_format("%q", name) or type(name), SANDBOX), 2)
	end
	-- What /usr/bin/prosody and util/startup.lua define before reading the config.
	local main_dir = s_match(main_file, "^(.*)/[^/]*$")
	if main_dir == "" then main_dir = "/" end
	G.CFG_SOURCEDIR = "/usr/lib/prosody"
	G.CFG_CONFIGDIR = main_dir
	G.CFG_PLUGINDIR = "/usr/lib/prosody/modules/"
	G.CFG_DATADIR = "/var/lib/prosody"
	G.prosody = {
		platform = "posix", config_file = main_file, opts = {},
		paths = { source = "/usr/lib/prosody", config = main_dir,
			plugins = "/usr/lib/prosody/modules/", data = "data" },
	}
	return G
end

-- Plain data about an option's value, read without running any of the config's metamethods.
local function describe(v)
	local t = type(v)
	local d = { type = t }
	if t == "string" then
		d.string = v
		d.number = tonumber(v) -- what statsmanager does with statistics_interval
	elseif t == "number" then
		d.number = v
	elseif t == "boolean" then
		d.boolean = v
	elseif t == "table" then
		local list, i = {}, 1
		while rawget(v, i) ~= nil do
			local item = rawget(v, i)
			if type(item) == "string" then list[#list + 1] = item end
			i = i + 1
		end
		d.list = list
		local server = rawget(v, "statsd_server")
		d.statsd_server = server ~= nil and server ~= false
	end
	return d
end

local function describe_options(options)
	local described = {}
	for key in next, tracked do
		local v = rawget(options, key)
		if v ~= nil then described[key] = describe(v) end
	end
	return described
end

return function(files_in, display_in, main, env_in, max_instructions, tracked_list)
	files, display, env_vars, main_file = files_in, display_in, env_in, main
	for _, key in ipairs(tracked_list) do tracked[key] = true end
	for file, name in next, display do
		source_to_file["@" .. name] = file
		short_to_file[short_src(name)] = file
	end
	G = build_sandbox()
	-- Keep the config away from the string metatable this code relies on.
	getmetatable("").__metatable = { __index = G.string }
	config_table = setmetatable({ ["*"] = { } }, config_mt)

	budget_left = max_instructions
	d_sethook(count_hook, "", HOOK_EVERY)
	local ok, loaded, err = xpcall(parser.load, locate_error, files[main], main, config_table, main)
	d_sethook()
	if not ok then
		err = loaded
	elseif loaded then
		err = nil
	end

	local result = { findings = findings }
	if err ~= nil or exhausted then
		if exhausted then err = limit_message end
		local file, line = position_of(err)
		if file then
			result.error = { file = display[file], line = line,
				message = (s_gsub(err, "^.-:%d+: ", "", 1)) }
		else
			result.error = { file = display[main], message = err }
		end
		result.exhausted = exhausted
		return result
	end

	result.global = describe_options(rawget(config_table, "*"))
	local hosts = {}
	for host, options in next, config_table do
		if host ~= "*" then
			hosts[host] = {
				component = rawget(options, "component_module") ~= nil,
				options = describe_options(options),
			}
		end
	end
	result.hosts = hosts
	result.locations = locations
	return result
end
"""  # noqa: E501 - lines ported from Prosody stay as upstream wrote them
