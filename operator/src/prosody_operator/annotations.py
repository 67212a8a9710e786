"""The labels and annotations users put on Prosody pod templates, workloads and namespaces, and
their validation (pure)."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

from .intervals import parse_duration
from .prosody_config import Interval, parse_interval_value
from .prosody_versions import dialect_of_version

PREFIX = "prosody-operator.io/"

# The opt-in, as an annotation (pod template, workload) or a label (pod template, namespace): see
# optin.py for the precedence. The labels also decide which pods the API server sends to the
# webhook (its objectSelector and namespaceSelector).
INJECT = PREFIX + "inject"
PORT = PREFIX + "port"
ALLOW_CIDRS = PREFIX + "allow-cidrs"
INTERVAL = PREFIX + "interval"
IMAGE = PREFIX + "image"
RESOURCES = PREFIX + "resources"
CONTAINER = PREFIX + "container"
# Per-workload monitor settings (pod template): the scrape timeout and the sample limit depend
# on the workload (how many hosts and components, hence series, its Prosody serves); the other
# monitor settings are the Prometheus installation's conventions and only global.
SCRAPE_TIMEOUT = PREFIX + "scrape-timeout"
SAMPLE_LIMIT = PREFIX + "sample-limit"
# Which Prosody runs, so that its config is read in that version's dialect (default: the
# container's image tag, for the official images), and where the sidecar collects /metrics
# (default: where Prosody's evaluated config serves it).
PROSODY_VERSION = PREFIX + "prosody-version"
METRICS_URL = PREFIX + "metrics-url"
# Written by the webhook: what it injected (version and a hash of the sidecar), as Istio does.
STATUS = PREFIX + "status"
# Written on generated objects: a hash of the object as built, to skip no-op updates and to roll
# out what a new operator version builds differently.
OBJECT_HASH = PREFIX + "object-hash"
# Labels on generated objects: the workload they are for (the ServiceMonitor selects its Service
# by them).
WORKLOAD = PREFIX + "workload"
WORKLOAD_KIND = PREFIX + "workload-kind"
# Written on ServiceMonitors: where the interval came from, and which Prometheus resources select
# the ServiceMonitor (its status belongs to prometheus-operator, so these are annotations).
INTERVAL_SOURCE = PREFIX + "interval-source"
SELECTED_BY = PREFIX + "selected-by"

_IMAGE = re.compile(r"^[a-z0-9]+([._/:@-][A-Za-z0-9_.-]+)*$")
# Kubernetes' quantity grammar (apimachinery's resource.Quantity): a signed decimal number, then a
# binary-SI suffix, a decimal-SI suffix or a decimal exponent.
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]{1,3})?"
)
_SUFFIXES = {
    **{s: Decimal(f"1e{3 * n}") for n, s in enumerate(("n", "u", "m", ""), -3)},
    **{s: Decimal(f"1e{3 * n}") for n, s in enumerate(("k", "M", "G", "T", "P", "E"), 1)},
    **{s: Decimal(2 ** (10 * n)) for n, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)},
}
# What the API server can hold (an int64 of milli-units, roughly): anything bigger is a mistake.
_LARGEST = Decimal(2**63 - 1) / 1000


@dataclass(frozen=True)
class Overrides:
    """Per-pod choices; None means "use the operator's setting"."""

    port: int | None = None
    allow_cidrs: tuple[str, ...] | None = None
    interval: Interval | None = None  # seconds or "manual"
    image: str | None = None
    resources: Mapping[str, Any] | None = None
    container: str | None = None
    scrape_timeout: float | None = None  # seconds
    sample_limit: int | None = None  # 0: none
    prosody_version: str | None = None  # a version a dialect is known for ("13.0", "0.12.3")
    metrics_url: str | None = None  # Prosody's /metrics, as the sidecar reaches it


@dataclass(frozen=True)
class Parsed:
    overrides: Overrides
    problems: tuple[str, ...] = field(default=())


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be 1-65535")
    return port


def _cidrs(value: str) -> tuple[str, ...]:
    items = [item for item in re.split(r"[,\s]+", value) if item]
    if not items:
        raise ValueError("no CIDR given")
    return tuple(str(ipaddress.ip_network(item)) for item in items)


def _image(value: str) -> str:
    if not _IMAGE.match(value):
        raise ValueError("not an image reference")
    return value


def quantity(value: str) -> Decimal:
    """A Kubernetes quantity ("100m", "64Mi", "1e3"), in base units; ValueError unless it is
    one the API server accepts for a container's resources (not negative, not absurdly big)."""
    match = _QUANTITY.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a quantity")
    suffix = match["suffix"] or ""
    scale = _SUFFIXES[suffix] if suffix in _SUFFIXES else Decimal(10) ** int(suffix[1:])
    amount = Decimal(match["number"]) * scale
    if amount < 0:
        raise ValueError(f"{value!r} is negative")
    if amount > _LARGEST:
        raise ValueError(f"{value!r} is too large")
    return amount


def check_resources(resources: Mapping[str, Mapping[str, str]]) -> None:
    """ValueError unless each is a quantity and no request exceeds its limit (the API server
    would reject the pod)."""
    parsed = {
        kind: {name: quantity(value) for name, value in values.items()}
        for kind, values in resources.items()
    }
    limits = parsed.get("limits", {})
    for name, request in parsed.get("requests", {}).items():
        if name in limits and request > limits[name]:
            raise ValueError(
                f"the {name} request {resources['requests'][name]} is above its limit "
                f"{resources['limits'][name]}"
            )


def _resources(value: str) -> Mapping[str, Any]:
    resources = json.loads(value)
    if not isinstance(resources, dict) or set(resources) - {"requests", "limits"}:
        raise ValueError('expected JSON like {"requests": {"cpu": "10m"}, "limits": {...}}')
    for kind in resources.values():
        if not isinstance(kind, dict) or set(kind) - {"cpu", "memory"}:
            raise ValueError("only cpu and memory may be set")
        for value in kind.values():
            if not isinstance(value, str):
                raise ValueError(f'{value!r} is not a quantity (a string, like "100m")')
    check_resources(resources)
    return resources


def _sample_limit(value: str) -> int:
    limit = int(value)
    if limit < 0:
        raise ValueError("must be 0 (no limit) or more")
    return limit


def _prosody_version(value: str) -> str:
    if dialect_of_version(value) is None:
        raise ValueError('not a Prosody version the operator knows (e.g. "13.0", "0.12")')
    return value


# The exporter's own type for its upstream URL: what passes here, the sidecar accepts.
_URL = TypeAdapter(AnyHttpUrl)


def _metrics_url(value: str) -> str:
    try:
        url = _URL.validate_python(value)
    except ValidationError:
        raise ValueError("not a URL (e.g. http://127.0.0.1:5280/metrics)") from None
    if url.scheme != "http" or url.username or url.password or url.fragment:
        # Prosody's HTTPS certificate is not for a loopback address; credentials would show
        # in the pod spec.
        raise ValueError("expected a plain http:// URL without credentials or fragment")
    return str(url)


_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    PORT: ("port", _port),
    ALLOW_CIDRS: ("allow_cidrs", _cidrs),
    INTERVAL: ("interval", parse_interval_value),
    IMAGE: ("image", _image),
    RESOURCES: ("resources", _resources),
    CONTAINER: ("container", str),
    SCRAPE_TIMEOUT: ("scrape_timeout", parse_duration),
    SAMPLE_LIMIT: ("sample_limit", _sample_limit),
    PROSODY_VERSION: ("prosody_version", _prosody_version),
    METRICS_URL: ("metrics_url", _metrics_url),
}


def switch(value: str | None) -> bool | None:
    """An inject label or annotation: True, False, or None when absent or invalid."""
    return {"true": True, "false": False}.get((value or "").strip().lower())


def invalid_switch(where: str, value: str | None) -> str | None:
    """The problem with an inject value set to neither "true" nor "false", if any."""
    if value is None or switch(value) is not None:
        return None
    return f'{INJECT}={value!r} {where} ignored: use "true" or "false"'


def parse_annotations(annotations: Mapping[str, str] | None) -> Parsed:
    """Read a pod's settings; an invalid value is reported and its default used instead.

    Never raises: a pod must never be blocked by a typo in an annotation.
    """
    annotations = annotations or {}
    values: dict[str, Any] = {}
    problems = []
    for key, (name, parse) in _PARSERS.items():
        if key not in annotations:
            continue
        try:
            values[name] = parse(annotations[key].strip())
        except (ValueError, TypeError) as error:
            problems.append(f"{key}={annotations[key]!r} ignored: {error}")
    return Parsed(Overrides(**values), tuple(problems))
