"""Hostile clients and a hostile upstream: each bound holds, and the exporter process's peak
memory (VmHWM) stays under the sidecar's default memory limit.

Clients are real sockets (testinfra/hostile.py) against the real exporter process. The upstream
attacks come from the stand-in (testinfra/standin.py): a real Prosody cannot be made to send a
gzip bomb or a 200 MB error body. Each test here fails with its bound removed (checked by
reverting each one).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from prosody_exporter.server import MAX_HEAD_BYTES, MAX_PIPELINED
from prosody_exporter.settings import Settings as ExporterSettings
from prosody_exporter.upstream import ERROR_BODY_BYTES
from testinfra import hostile
from testinfra.exporter import default_memory_limit_mib
from testinfra.procs import wait_until
from testinfra.standin import (
    PROSODY_LIKE_LINE,
    SHORT_LINE,
    Answer,
    StandInProsody,
    exposition_of,
    gzip_bomb,
)

DATA = Path(__file__).parent / "data"
DENIED = {"allow_cidrs": "198.18.0.0/15"}  # loopback, where these clients are, is not allowed


MEMORY_LIMIT = default_memory_limit_mib() << 20


def peak_rss(exporter) -> int:
    """VmHWM of the exporter process, in bytes."""
    status = Path(f"/proc/{exporter.process.popen.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def assert_under_memory_limit(exporter) -> None:
    assert exporter.process.running(), exporter.process.log_tail()
    peak = peak_rss(exporter)
    assert peak < MEMORY_LIMIT, f"peak RSS {peak / 2**20:.1f} MiB >= limit {MEMORY_LIMIT >> 20}Mi"


def address(exporter) -> tuple[str, int]:
    return "127.0.0.1", exporter.port


@pytest.fixture
def upstream():
    with StandInProsody(Answer(body=(DATA / "prosody-0.12.txt").read_bytes())) as standin:
        yield standin


def test_huge_headers_from_a_denied_address_are_cut_off(start_exporter, upstream):
    exporter = start_exporter(upstream.url, settings=DENIED)
    size = 8 << 20
    outcomes = hostile.Flood(lambda: hostile.huge_header(*address(exporter), size), 3).run()
    for outcome in outcomes:
        assert outcome.closed and outcome.status in (431, None), outcome
        assert outcome.sent < size  # the server stopped reading long before the end
    assert_under_memory_limit(exporter)


def test_request_head_size_limit(start_exporter, upstream):
    exporter = start_exporter(upstream.url)
    outcome = hostile.huge_header(*address(exporter), MAX_HEAD_BYTES)
    assert outcome.status == 431 and outcome.closed, outcome


def test_too_many_header_fields_are_refused(start_exporter, upstream):
    exporter = start_exporter(upstream.url)
    outcome = hostile.many_headers(*address(exporter), count=150)  # 150 fields in < 2 KB
    assert outcome.status == 400 and outcome.closed, outcome
    ok = hostile.many_headers(*address(exporter), count=20)
    assert ok.status == 200, ok


def test_deep_pipelining_is_cut_off(start_exporter, upstream):
    exporter = start_exporter(upstream.url)
    outcome = hostile.pipelined(*address(exporter), count=200)  # ~7 KB, under the head limit
    assert outcome.closed, outcome
    assert outcome.responses <= MAX_PIPELINED + 2, outcome


def test_a_head_that_trickles_in_is_ended_by_the_header_timeout(start_exporter, upstream):
    exporter = start_exporter(upstream.url, settings={"header_timeout": "1"})
    outcome = hostile.slow_head(*address(exporter), every=0.2, seconds=20)
    assert outcome.closed, outcome
    assert outcome.status is None  # nothing was answered: the head never completed
    assert outcome.sent < MAX_HEAD_BYTES


def test_an_idle_connection_is_ended_by_the_header_timeout(start_exporter, upstream):
    exporter = start_exporter(upstream.url, settings={"header_timeout": "1"})
    assert hostile.idle_connection(*address(exporter), hold=20).closed


def test_connections_over_the_limit_get_503_and_are_closed(start_exporter, upstream):
    exporter = start_exporter(upstream.url, settings={"max_connections": "4"})
    held = [hostile.connect(*address(exporter)) for _ in range(4)]
    try:
        wait_until(lambda: all(s.fileno() >= 0 for s in held), 5, "4 connections")
        outcome = hostile.pipelined(*address(exporter), count=1)
        assert (outcome.status, outcome.closed, outcome.responses) == (503, True, 1), outcome
    finally:
        for sock in held:
            sock.close()
    wait_until(
        lambda: hostile.pipelined(*address(exporter), count=1, seconds=2).status == 200,
        10,
        "a slot to be free again",
    )


def test_many_slow_heads_stay_under_the_memory_limit(start_exporter, upstream):
    exporter = start_exporter(upstream.url, settings={"max_connections": "50"})
    flood = hostile.Flood(lambda: hostile.slow_head(*address(exporter), 0.05, 8), 120)
    outcomes = flood.run()
    assert sum(o.status == 503 for o in outcomes) >= 60  # the limit held
    assert_under_memory_limit(exporter)


# --- the upstream side ------------------------------------------------------------------------


def errors(exporter, reason: str) -> float:
    return exporter.sample_value("prosody_exporter_upstream_errors_total", reason=reason) or 0.0


def test_upstream_is_asked_for_identity_encoding(start_exporter, upstream):
    start_exporter(upstream.url, interval=0.2)
    wait_until(lambda: upstream.requests >= 2, 10, "two collections")
    assert {h.get("Accept-Encoding") for h in upstream.forwarded_headers} == {"identity"}


def test_a_gzip_body_sent_anyway_is_read(start_exporter):
    body = gzip.compress((DATA / "prosody-0.12.txt").read_bytes())
    answer = Answer(body=body, headers={"Content-Encoding": "gzip"})
    with StandInProsody(answer) as standin:
        exporter = start_exporter(standin.url)  # ready: the body was inflated and parsed
        assert errors(exporter, "parse") == 0


def test_a_gzip_bomb_is_inflated_only_to_max_body_bytes(start_exporter):
    # No Content-Length (1 MiB would be refused unread), and a pause so that the body arrives in
    # full 64 KiB reads: each inflates to 64 MiB when inflated whole.
    answer = Answer(
        body=gzip_bomb(1 << 30),
        headers={"Content-Encoding": "gzip"},
        content_length=False,
        pause_after_headers=0.2,
    )
    with StandInProsody(answer) as standin:
        exporter = start_exporter(standin.url, wait_for_ready=False, interval=0.5)
        wait_until(lambda: errors(exporter, "too_large") >= 2, 30, "too_large errors")
        assert_under_memory_limit(exporter)


def test_an_error_body_is_read_only_to_its_start(start_exporter):
    answer = Answer(status=500, body=b"e" * (1 << 20), repeat=200, content_type="text/plain")
    with StandInProsody(answer) as standin:
        exporter = start_exporter(standin.url, wait_for_ready=False, interval=0.5)
        wait_until(lambda: errors(exporter, "status") >= 2, 30, "status errors")
        assert standin.body_bytes_sent < 50 << 20, standin.body_bytes_sent  # of 200 MB
        assert_under_memory_limit(exporter)
    log = exporter.process.log_path.read_text()
    line = next(line for line in log.splitlines() if "upstream down" in line)
    assert "e" * ERROR_BODY_BYTES in line and "e" * (ERROR_BODY_BYTES + 1) not in line


@pytest.mark.parametrize(
    "line", [PROSODY_LIKE_LINE, SHORT_LINE], ids=["prosody-like", "short-lines"]
)
def test_the_default_max_body_fits_the_memory_limit(start_exporter, line):
    limit = ExporterSettings.model_fields["max_body_bytes"].default
    body = exposition_of(limit, line)
    assert limit - 100 < len(body) <= limit
    with StandInProsody(Answer(body=body)) as standin:
        exporter = start_exporter(standin.url, interval=1.0, settings={"upstream_timeout": "30"})
        wait_until(lambda: standin.requests >= 3, 60, "three collections")
        assert errors(exporter, "too_large") == 0
        assert_under_memory_limit(exporter)


def test_a_body_over_max_body_bytes_is_refused(start_exporter):
    limit = ExporterSettings.model_fields["max_body_bytes"].default
    # No Content-Length: the limit must hold while reading, not only when one is announced.
    answer = Answer(body=b"x" * (1 << 20), repeat=limit // (1 << 20) + 1, content_length=False)
    with StandInProsody(answer) as standin:
        exporter = start_exporter(standin.url, wait_for_ready=False, interval=0.5)
        wait_until(lambda: errors(exporter, "too_large") >= 2, 30, "too_large errors")
        assert_under_memory_limit(exporter)
