"""Which scrape interval a Prosody gets, and why (pure).

Order: the pod's interval annotation; Prosody's real config (from its ConfigMap); the official
image's PROSODY_STATISTICS_INTERVAL env; Prosody's own default of 60 s. "manual" means Prosody
collects on every request, so the sidecar becomes its single scraper at `manual_interval`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

PROSODY_DEFAULT_INTERVAL = 60.0
MANUAL: Literal["manual"] = "manual"

Interval = float | Literal["manual"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class IntervalError(ValueError):
    pass


def parse_interval(value: object) -> Interval:
    """Seconds from a number, "30", "30s", "1m30s"; or "manual"."""
    if isinstance(value, bool):
        raise IntervalError(f"{value!r} is not an interval")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().strip('"').lower()
        if text == MANUAL:
            return MANUAL
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise IntervalError(
                    f"{value!r} is not an interval (examples: 30, 30s, 1m30s, manual)"
                ) from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise IntervalError(f"{value!r} is not a positive interval")
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
        return parse_interval(env["PROSODY_STATISTICS_INTERVAL"])
    except (KeyError, IntervalError):
        return None
