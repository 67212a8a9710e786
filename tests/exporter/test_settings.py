"""Settings through the real console script: bad values exit 2 with one line naming the setting."""

from __future__ import annotations

import os
import subprocess

import pytest

from prosody_exporter.settings import load_settings
from testinfra.exporter import exporter_command


def run_exporter(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROSODY_EXPORTER_")}
    return subprocess.run(
        [exporter_command(), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), {"PROSODY_EXPORTER_INTERVAL": "soon"}, "PROSODY_EXPORTER_INTERVAL"),
        (("--interval", "0"), {}, "--interval"),
        ((), {"PROSODY_EXPORTER_ALLOW_CIDRS": "198.18.0.0/15,not-a-cidr"}, "ALLOW_CIDRS"),
        ((), {"PROSODY_EXPORTER_ALLOW_CIDRS": "198.18.0.1/15"}, "ALLOW_CIDRS"),  # host bits set
        ((), {"PROSODY_EXPORTER_LISTEN_PORT": "70000"}, "LISTEN_PORT"),
        ((), {"PROSODY_EXPORTER_UPSTREAM_URL": "ftp://prosody/metrics"}, "UPSTREAM_URL"),
        ((), {"PROSODY_EXPORTER_LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        (("--no-such-flag",), {}, "--no-such-flag"),
    ],
)
def test_invalid_setting_exits_2_with_one_line(args, env, named):
    result = run_exporter(*args, **env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prosody-exporter: ")
    assert named in lines[0]


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PROSODY_EXPORTER_INTERVAL", "10")
    monkeypatch.setenv("PROSODY_EXPORTER_ALLOW_CIDRS", "198.18.0.0/15 2001:db8::/32")
    settings = load_settings(["--interval", "1m30s"])
    assert settings.interval == 90
    assert [str(n) for n in settings.allow_cidrs] == ["198.18.0.0/15", "2001:db8::/32"]
    assert load_settings([]).interval == 10


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("2.5", 2.5), ("500ms", 0.5), ("1h", 3600)]
)
def test_durations(text, seconds):
    assert load_settings([], interval=text).interval == seconds


def test_help_lists_the_flags():
    result = run_exporter("--help")
    assert result.returncode == 0
    assert "--allow-cidrs" in result.stdout and "--upstream-url" in result.stdout
