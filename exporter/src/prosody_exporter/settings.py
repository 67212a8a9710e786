"""Settings: environment variables `PROSODY_EXPORTER_*`, overridden by command-line flags."""

from __future__ import annotations

import re
from ipaddress import ip_network
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, IPvAnyNetwork, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

ENV_PREFIX = "PROSODY_EXPORTER_"

# Prometheus-style durations ("30s", "1m30s", "500ms") as well as plain seconds ("30", "2.5"),
# because the operator copies ServiceMonitor intervals into these settings.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a Prometheus duration; anything else is left for pydantic to
    reject with its own message."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration (examples: 30, 30s, 1m30s, 500ms)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _split_list(value: Any) -> Any:
    """Lists come as comma- or space-separated text from the environment and flags."""
    if isinstance(value, str):
        return [item for item in re.split(r"[,\s]+", value) if item]
    return value


Networks = Annotated[list[IPvAnyNetwork], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_prog_name="prosody-exporter",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,
        cli_hide_none_type=True,
    )

    upstream_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:5280/metrics"),
        description="Prosody's metrics endpoint (mod_http_openmetrics or mod_prometheus).",
    )
    upstream_host: str | None = Field(
        None, description="Host header sent upstream, when Prosody's HTTP host must match."
    )
    upstream_timeout: float = Field(5.0, gt=0, description="Seconds one collection may take.")
    max_body_bytes: int = Field(
        512 * 1024,
        gt=0,
        description="Largest upstream body accepted, in bytes (after decoding); the sidecar's "
        "default memory limit is measured with a body this large.",
    )
    interval: float = Field(
        30.0, gt=0, description="Seconds between collections (Prosody's statistics_interval)."
    )
    stale_after_intervals: float = Field(
        3.0, ge=1, description="A snapshot older than this many intervals is stale."
    )
    listen_host: str = Field("::", description="Address to listen on ('::' is dual-stack).")
    listen_port: int = Field(9755, ge=1, le=65535, description="Port to listen on.")
    allow_cidrs: Networks = Field(
        default_factory=lambda: [ip_network("127.0.0.0/8"), ip_network("::1/128")],
        description="CIDRs allowed to read /metrics (comma-separated).",
    )
    trusted_proxy_cidrs: Networks = Field(
        default_factory=list,
        description="Peers whose X-Forwarded-For is believed (comma-separated; none by default).",
    )
    max_connections: int = Field(
        100, ge=1, description="Open connections at most; more are answered 503 and closed."
    )
    header_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds a client has to send a request's headers, from connecting or "
        "from its previous response.",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    _durations = field_validator("interval", "upstream_timeout", "header_timeout", mode="before")(
        parse_duration
    )
    _lists = field_validator("allow_cidrs", "trusted_proxy_cidrs", mode="before")(_split_list)

    @property
    def stale_after_seconds(self) -> float:
        return self.interval * self.stale_after_intervals


def describe_setting(field: str) -> str:
    return f"{field} ({ENV_PREFIX}{field.upper()} / --{field.replace('_', '-')})"


def settings_errors(error: ValidationError | SettingsError) -> list[str]:
    """One line per invalid setting, naming it the way a user can set it."""
    if isinstance(error, SettingsError):
        return [str(error).splitlines()[0]]
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        value = item.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"invalid setting {describe_setting(field)}: {message}{shown}")
    return lines


def load_settings(argv: list[str] | None = None, **overrides: Any) -> Settings:
    """Environment first, then flags from argv (None: no flags); raises ValidationError or
    SettingsError."""
    return Settings(_cli_parse_args=argv if argv is not None else False, **overrides)
