"""Which scrape interval a Prosody gets, and why (pure).

Order: the pod's interval annotation; Prosody's real config (from its ConfigMap); the official
image's PROSODY_STATISTICS_INTERVAL env; Prosody's own default of 60 s. "manual" means Prosody
collects on every request, so the sidecar becomes its single scraper at `manual_interval`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .prosody_config import MANUAL, Interval, parse_interval_value

PROSODY_DEFAULT_INTERVAL = 60.0


def parse_duration(value: object) -> float:
    """A positive duration: 10, "10", "10s", "1m30s", "500ms" (not "manual")."""
    try:
        seconds = parse_interval_value(value)
    except ValueError:
        seconds = MANUAL
    if seconds == MANUAL:
        raise ValueError(f"{value!r} is not a duration (examples: 10s, 1m, 500ms)")
    return seconds


def format_duration(seconds: float) -> str:
    """A Prometheus duration: whole seconds as "30s", anything finer in milliseconds."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class EffectiveInterval:
    prosody: Interval  # Prosody's statistics_interval as found
    scrape_seconds: float  # the ServiceMonitor's interval and the sidecar's collection interval
    source: str  # where it came from, for Events

    @property
    def scrape_interval(self) -> str:
        return format_duration(self.scrape_seconds)

    @property
    def scrape_timeout(self) -> str:
        # The sidecar answers from memory; a timeout well below the interval is plenty.
        return format_duration(min(10.0, self.scrape_seconds * 0.8))


def effective_interval(
    *,
    annotation: Interval | None,
    config_interval: Interval | None,
    config_source: str | None,
    env: Mapping[str, str],
    manual_interval: float,
) -> EffectiveInterval:
    """Decide; `config_interval` is what Prosody's config says (None: not found or not set)."""
    from_env = _env_interval(env)
    found: Interval
    if annotation is not None:
        found, source = annotation, "annotation"
    elif config_interval is not None:
        found, source = config_interval, config_source or "Prosody config"
    elif from_env is not None:
        found, source = from_env, "env PROSODY_STATISTICS_INTERVAL"
    else:
        found, source = PROSODY_DEFAULT_INTERVAL, "Prosody's default"
    scrape = manual_interval if found == MANUAL else float(found)
    return EffectiveInterval(found, scrape, source)


def _env_interval(env: Mapping[str, str]) -> Interval | None:
    try:
        return parse_interval_value(env["PROSODY_STATISTICS_INTERVAL"])
    except (KeyError, ValueError):
        return None
