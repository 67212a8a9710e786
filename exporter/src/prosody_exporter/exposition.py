"""Parsing Prosody's exposition and rendering it in the format a scraper asked for.

Pure functions only: no I/O, no clocks. prometheus-client does the parsing and rendering; what is
written by hand here is what it does not do (q-value negotiation, counter-name repair for old
mod_prometheus output, appending our own families to a pre-compressed body).
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import exposition as text_exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus_text

OM_EOF = b"# EOF\n"


class ExpositionError(ValueError):
    """Upstream sent something that is neither valid OpenMetrics nor Prometheus text."""


class Format(enum.Enum):
    OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

    @property
    def content_type(self) -> str:
        return self.value


def iter_exposition(body: str) -> Iterator[Metric]:
    """Parse what Prosody served into metric families, one family at a time.

    The Content-Type cannot decide the format: Prosody 0.12 claims `application/openmetrics-text;
    version=0.0.4` and old mod_prometheus `text/plain; version=0.4.4`. The body can: OpenMetrics
    must end with `# EOF`, Prometheus text never has it.
    """
    try:
        if body[-64:].rstrip().endswith("# EOF"):
            yield from parse_openmetrics(body)
        else:
            yield from map(_with_total_suffix, parse_prometheus_text(body))
    except Exception as error:  # the parsers raise ValueError, KeyError, IndexError, ...
        raise ExpositionError(f"{type(error).__name__}: {error}") from error


def parse_exposition(body: str) -> list[Metric]:
    return list(iter_exposition(body))


def _with_total_suffix(family: Metric) -> Metric:
    """Give counter samples the `_total` suffix OpenMetrics requires.

    mod_prometheus (Prosody 0.10/0.11) names counters without `_total`; the Prometheus text parser
    keeps those sample names, and the OpenMetrics renderer would then emit invalid counters.
    """
    if family.type != "counter":
        return family
    repaired = Metric(family.name, family.documentation, family.type, family.unit)
    repaired.samples = [
        sample._replace(name=family.name + "_total") if sample.name == family.name else sample
        for sample in family.samples
    ]
    return repaired


class _Families:
    """Adapts a list of families to the `collect()` interface the renderers expect."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def render(families: Iterable[Metric], fmt: Format) -> bytes:
    """Render families; OpenMetrics output is left without its `# EOF` so more can follow."""
    if fmt is Format.OPENMETRICS:
        body: bytes = om_exposition.generate_latest(_Families(families))
        return body.removesuffix(OM_EOF)
    rendered: bytes = text_exposition.generate_latest(_Families(families))
    return rendered


@dataclass(frozen=True)
class RenderedBody:
    """One format's rendering of a snapshot, raw and gzip-compressed.

    Each response is this body followed by a small per-request tail (our own metrics). Compressing
    ~100 KB per scrape would dominate the response time, so the body is compressed once and the
    compressor's state is kept: a response copies the state and compresses only the tail, which
    yields one ordinary gzip stream.
    """

    raw: bytes
    gzip_head: bytes
    gzip_state: zlib._Compress

    @classmethod
    def of(cls, raw: bytes) -> RenderedBody:
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return cls(raw=raw, gzip_head=compressor.compress(raw), gzip_state=compressor)

    def with_tail(self, tail: bytes, gzip: bool) -> bytes:
        if not gzip:
            return self.raw + tail
        compressor = self.gzip_state.copy()
        return self.gzip_head + compressor.compress(tail) + compressor.flush()


EMPTY_BODY = RenderedBody.of(b"")


def render_exposition(body: str) -> tuple[dict[Format, RenderedBody], int]:
    """Both formats' bodies and the number of families.

    Family by family: only one parsed family is alive at a time (a parsed sample costs hundreds of
    bytes, far more than its line), then the renderings, about the body's size each.
    """
    rendered: dict[Format, list[bytes]] = {fmt: [] for fmt in Format}
    families = 0
    for family in iter_exposition(body):
        families += 1
        for fmt, parts in rendered.items():
            parts.append(render((family,), fmt))
    bodies = {}
    for fmt, parts in rendered.items():
        raw = b"".join(parts)
        parts.clear()
        bodies[fmt] = RenderedBody.of(raw)
    return bodies, families


@dataclass(frozen=True)
class _MediaRange:
    type: str
    params: dict[str, str]
    q: float


def _parse_accept(header: str) -> list[_MediaRange]:
    ranges = []
    for item in header.split(","):
        media_type, *raw_params = (part.strip() for part in item.split(";"))
        params = {}
        for raw in raw_params:
            key, _, value = raw.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        if media_type:
            ranges.append(_MediaRange(media_type.lower(), params, q))
    return ranges


# OpenMetrics versions we can serve: 1.0.0, and 0.0.1 which Prometheus still asks for and which
# is the same text format.
_OPENMETRICS_VERSIONS = {None, "1.0.0", "0.0.1"}


def negotiate_format(accept: str | None) -> Format:
    """Pick the format from an Accept header, honouring q-values.

    prometheus-client's own `choose_encoder` ignores q-values and OpenMetrics 0.0.1, hence this.
    Ties go to OpenMetrics; no usable preference means Prometheus text, which every scraper reads.
    """
    best: dict[Format, float] = {}
    for media in _parse_accept(accept or ""):
        if media.type == "application/openmetrics-text":
            if media.params.get("version") in _OPENMETRICS_VERSIONS:
                best[Format.OPENMETRICS] = max(best.get(Format.OPENMETRICS, 0.0), media.q)
        elif media.type in ("text/plain", "text/*", "*/*"):
            best[Format.PROMETHEUS_TEXT] = max(best.get(Format.PROMETHEUS_TEXT, 0.0), media.q)
    om_q = best.get(Format.OPENMETRICS, 0.0)
    if om_q > 0 and om_q >= best.get(Format.PROMETHEUS_TEXT, 0.0):
        return Format.OPENMETRICS
    return Format.PROMETHEUS_TEXT


def accepts_gzip(accept_encoding: str | None) -> bool:
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip() if "q=" in params else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False
