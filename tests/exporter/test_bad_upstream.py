"""A broken or missing Prosody: the right error reason, never a 500, never a crash.

Prosody going away and coming back is tested with the real Prosody. Bodies a real Prosody never
sends (malformed, oversized, a hang, old mod_prometheus output) come from a loopback stand-in.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import httpx
import pytest

from prosody_exporter.upstream import ErrorReason, Upstream, UpstreamError
from testinfra.pki import CertificateAuthority
from testinfra.procs import wait_until
from testinfra.prosody import ProsodyServer
from testinfra.standin import Answer, StandInProsody

DATA = Path(__file__).parent / "data"


def scrape(exporter, **headers: str) -> httpx.Response:
    response = httpx.get(exporter.base_url + "/metrics", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return response


def value(exporter, name: str, **labels: str) -> float | None:
    return exporter.sample_value(name, **labels)


def errors(exporter, reason: str) -> float:
    return value(exporter, "prosody_exporter_upstream_errors_total", reason=reason) or 0.0


def ready(exporter) -> int:
    return httpx.get(exporter.base_url + "/readyz", timeout=5).status_code


@pytest.mark.parametrize(
    ("answer", "settings", "reason"),
    [
        (Answer(body=b"# TYPE x counter\nx_total oops\n# EOF\n"), {}, "parse"),
        (Answer(body=b"\xff\xfe not utf-8"), {}, "parse"),
        (Answer(body=b"# EOF\n" * 40_000), {"max_body_bytes": "100000"}, "too_large"),
        (Answer(body=b"# EOF\n", delay=3), {"upstream_timeout": "0.3"}, "timeout"),
        (Answer(status=403, body=b"Forbidden", content_type="text/plain"), {}, "status"),
        (
            Answer(
                status=404, body=b"No statistics provider configured", content_type="text/plain"
            ),
            {},
            "status",
        ),
    ],
    ids=["malformed", "not-utf8", "oversized", "slow", "403", "404-no-statistics"],
)
def test_broken_upstream_is_reported_with_its_reason(start_exporter, answer, settings, reason):
    with StandInProsody(answer) as standin:
        exporter = start_exporter(
            standin.url, wait_for_ready=False, interval=0.2, settings=settings
        )
        wait_until(lambda: errors(exporter, reason) >= 2, 15, f"{reason} errors to be counted")
        assert value(exporter, "prosody_exporter_up") == 0
        assert ready(exporter) == 503
        others = {"timeout", "connect", "status", "parse", "too_large"} - {reason}
        assert all(errors(exporter, other) == 0 for other in others)
        assert exporter.process.running()


def test_exporter_never_forwards_client_headers(start_exporter):
    with StandInProsody(Answer(body=(DATA / "prosody-0.12.txt").read_bytes())) as standin:
        exporter = start_exporter(
            standin.url, interval=0.2, settings={"upstream_host": "xmpp.test"}
        )
        scrape(exporter, **{"X-Forwarded-For": "198.18.0.9", "Forwarded": "for=198.18.0.9"})
        wait_until(lambda: standin.requests >= 3, 10, "a few collections")
        for headers in standin.forwarded_headers:
            names = {name.lower() for name in headers}
            assert not names & {"x-forwarded-for", "forwarded", "x-real-ip"}, headers
            assert headers["Host"] == "xmpp.test"


def test_old_mod_prometheus_payload_is_served_converted(start_exporter):
    body = (DATA / "mod_prometheus.txt").read_bytes()
    with StandInProsody(Answer(body=body, content_type="text/plain; version=0.4.4")) as standin:
        exporter = start_exporter(standin.url, interval=0.5)
        text = scrape(exporter).text
        openmetrics = scrape(exporter, Accept="application/openmetrics-text; version=1.0.0").text
    assert 'prosody_stanzas_total{type="message_in"} 1274.0 1543512345123' in text
    assert 'prosody_stanzas_total{type="message_in"} 1274.0 1543512345.123' in openmetrics
    assert openmetrics.endswith("# EOF\n")


def test_prosody_stopped_mid_run_then_back(tmp_path, start_exporter, prosody_version):
    prosody = ProsodyServer(
        tmp_path / "prosody", statistics_interval="manual", version=prosody_version
    ).start()
    try:
        # Stale after 6 s: room for stopping Prosody and seeing it gone on a busy machine.
        exporter = start_exporter(
            prosody.metrics_url, interval=0.3, settings={"stale_after_intervals": "20"}
        )
        collection = "prosody_stats_collection_seconds_count"
        assert value(exporter, collection) is not None
        prosody.stop()
        wait_until(lambda: errors(exporter, "connect") >= 1, 10, "connect errors")
        assert value(exporter, "prosody_exporter_up") == 0
        # Until the snapshot is stale, the last good Prosody series are still served ...
        assert value(exporter, collection) is not None
        wait_until(lambda: ready(exporter) == 503, 30, "the snapshot to go stale")
        # ... then only the exporter's own metrics, so Prometheus marks Prosody's series stale.
        assert value(exporter, collection) is None
        assert value(exporter, "prosody_exporter_snapshot_stale") == 1
        prosody.start()
        wait_until(lambda: ready(exporter) == 200, 15, "recovery")
        assert value(exporter, "prosody_exporter_up") == 1
        assert value(exporter, collection) is not None
        assert value(exporter, "prosody_exporter_snapshot_stale") == 0
        # One log line per state change, however many collections failed in between.
        log = exporter.process.log_path.read_text()
        assert log.count("upstream down") == 1, log
        assert log.count("upstream up") == 2, log
        assert log.count("snapshot stale") == 1, log
        assert log.count("snapshot fresh again") == 1, log
    finally:
        prosody.stop()


def test_own_metrics_in_responses_are_at_most_a_second_old(start_exporter):
    with StandInProsody(Answer(body=(DATA / "prosody-0.12.txt").read_bytes())) as standin:
        exporter = start_exporter(standin.url, interval=60)
        first = value(exporter, "prosody_exporter_scrapes_total", format="prometheus_text")
        wait_until(
            lambda: (
                value(exporter, "prosody_exporter_scrapes_total", format="prometheus_text") > first
            ),
            3,
            "the scrape counter to move",
        )


def test_json_logs(start_exporter):
    with StandInProsody(Answer(status=500, body=b"boom", content_type="text/plain")) as standin:
        exporter = start_exporter(
            standin.url, wait_for_ready=False, interval=0.2, settings={"log_format": "json"}
        )
        wait_until(lambda: errors(exporter, "status") >= 1, 10, "a status error")
        exporter.stop()
    lines = exporter.process.log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is JSON
    down = [e for e in entries if e["message"].startswith("upstream down")]
    assert len(down) == 1 and down[0]["level"] == "warning" and "HTTP 500" in down[0]["message"]


def test_metrics_answers_head_and_refuses_other_methods(start_exporter):
    """GET /metrics is answered in front of FastAPI; HEAD and the rest still go through it."""
    with StandInProsody(Answer(body=(DATA / "prosody-0.12.txt").read_bytes())) as standin:
        exporter = start_exporter(standin.url)
        get = httpx.get(exporter.base_url + "/metrics", headers={"Accept-Encoding": "identity"})
        head = httpx.head(exporter.base_url + "/metrics", headers={"Accept-Encoding": "identity"})
        post = httpx.post(exporter.base_url + "/metrics")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert abs(int(head.headers["content-length"]) - len(get.content)) < 100  # own metrics move
    assert post.status_code == 405


def test_an_https_upstream_is_verified(tmp_path):
    """An http upstream gets a TLS context that trusts nothing (it never uses TLS, and httpx's CA
    bundle costs 2 MiB); an https one keeps httpx's verification: an unknown CA is refused."""
    pair = CertificateAuthority.create("unknown CA").issue_server("127.0.0.1", ("127.0.0.1",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pair.write(tmp_path, "upstream"))
    standin = StandInProsody(Answer(body=(DATA / "prosody-0.12.txt").read_bytes()))
    standin.server.socket = context.wrap_socket(standin.server.socket, server_side=True)

    async def fetch() -> bytearray:
        upstream = Upstream(url, host=None, timeout=5, max_body_bytes=1 << 20)
        try:
            return await upstream.fetch()
        finally:
            await upstream.aclose()

    with standin:
        url = standin.url.replace("http:", "https:")
        with pytest.raises(UpstreamError) as refused:
            asyncio.run(fetch())
    assert refused.value.reason is ErrorReason.CONNECT
    assert "CERTIFICATE_VERIFY_FAILED" in refused.value.detail, refused.value.detail
