"""Operator settings through the real console script: a bad value exits 2 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prosody_operator import annotations as ann
from prosody_operator import main
from prosody_operator.settings import RESTRICTED_SIDECAR, OperatorSettings

COMMAND = str(Path(sys.executable).parent / "prosody-operator")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PROSODY_OPERATOR_MANUAL_INTERVAL": "0"}, "PROSODY_OPERATOR_MANUAL_INTERVAL"),
        ({"PROSODY_OPERATOR_EXTRA_CIDRS": "198.18.0.0/15,nope"}, "PROSODY_OPERATOR_EXTRA_CIDRS"),
        ({"PROSODY_OPERATOR_SERVICE_MONITOR_LABELS": "release"}, "SERVICE_MONITOR_LABELS"),
        ({"PROSODY_OPERATOR_WEBHOOK_PORT": "http"}, "PROSODY_OPERATOR_WEBHOOK_PORT"),
        ({"PROSODY_OPERATOR_WATCH_NAMESPACES": "team-a,Team_B"}, "WATCH_NAMESPACES"),
        (
            {"PROSODY_OPERATOR_SERVICE_MONITOR_RELABELINGS": '[{"action": "dorp"}]'},
            "SERVICE_MONITOR_RELABELINGS: [0].action: Input should be 'replace'",
        ),
        (
            {"PROSODY_OPERATOR_SIDECAR_SECURITY_CONTEXT": '{"runAsUser": -1, "runAsUsr": 1}'},
            "SIDECAR_SECURITY_CONTEXT: runAsUser: Input should be greater than or equal to 0",
        ),
        ({"PROSODY_OPERATOR_SIDECAR_CPU_LIMIT": "1 core"}, "PROSODY_OPERATOR_SIDECAR_CPU_LIMIT"),
        (
            {"PROSODY_OPERATOR_SIDECAR_MEMORY_LIMIT": "16Mi"},  # below the 32Mi request
            "PROSODY_OPERATOR_SIDECAR_MEMORY_LIMIT",
        ),
    ],
)
def test_invalid_setting_exits_2_with_one_line(env, named):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROSODY_OPERATOR_")}
    result = subprocess.run(
        [COMMAND], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


# Each setting's own problems, one line naming the setting (and where inside a JSON value).
BAD_MONITOR_AND_SIDECAR_SETTINGS = [
    ({"PROSODY_OPERATOR_MONITOR_KIND": "PodMonitors"}, "MONITOR_KIND: Input should be"),
    ({"PROSODY_OPERATOR_SERVICE_MONITOR_ENABLED": "perhaps"}, "SERVICE_MONITOR_ENABLED"),
    ({"PROSODY_OPERATOR_SERVICE_MONITOR_SAMPLE_LIMIT": "-1"}, "SAMPLE_LIMIT"),
    ({"PROSODY_OPERATOR_SERVICE_MONITOR_HONOR_LABELS": "yes please"}, "HONOR_LABELS"),
    ({"PROSODY_OPERATOR_SERVICE_MONITOR_SCRAPE_TIMEOUT": "soon"}, "SCRAPE_TIMEOUT: 'soon'"),
    ({"PROSODY_OPERATOR_SERVICE_MONITOR_SCRAPE_TIMEOUT": "0s"}, "SCRAPE_TIMEOUT"),
    ({"PROSODY_OPERATOR_PROMETHEUS_SCRAPE_ANNOTATIONS": "2"}, "PROMETHEUS_SCRAPE_ANNOTATIONS"),
    (
        {"PROSODY_OPERATOR_SERVICE_MONITOR_METRIC_RELABELINGS": '[{"sourceLabels": ["a-b"]}]'},
        "METRIC_RELABELINGS: [0].sourceLabels[0]: String should match pattern",
    ),
    (
        {"PROSODY_OPERATOR_SERVICE_MONITOR_RELABELINGS": '{"action": "drop"}'},
        "SERVICE_MONITOR_RELABELINGS: Input should be a valid list",
    ),
    (
        {"PROSODY_OPERATOR_SIDECAR_SECURITY_CONTEXT": '{"runAsNonRoot": "true"}'},
        "SIDECAR_SECURITY_CONTEXT: runAsNonRoot: Input should be a valid boolean",
    ),
    ({"PROSODY_OPERATOR_SIDECAR_SECURITY_CONTEXT": "{runAsNonRoot: true}"}, "not JSON"),
]


@pytest.mark.parametrize(("env", "named"), BAD_MONITOR_AND_SIDECAR_SETTINGS)
def test_invalid_monitor_and_sidecar_settings(env, named, monkeypatch, capsys):
    """The same start-up check as above, in process (it is the same code path, and a process
    per row costs seconds)."""
    for name in list(os.environ):
        if name.startswith("PROSODY_OPERATOR_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main.main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_without_kubernetes_credentials_exits_1_with_one_line(tmp_path):
    """Neither a pod's service account nor a kubeconfig: kopf would retry forever."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROSODY_OPERATOR_", "KUBERNETES_"))
    }
    env = {**clean, "KUBECONFIG": str(tmp_path / "absent"), "HOME": str(tmp_path)}
    result = subprocess.run([COMMAND], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Kubernetes API" in lines[0], result.stderr


def test_labels_and_cidrs_parse():
    settings = OperatorSettings(
        service_monitor_labels="release=kube-prometheus-stack, team=chat",
        extra_cidrs="198.18.0.0/15 2001:db8::/32",
    )
    assert settings.service_monitor_labels == {"release": "kube-prometheus-stack", "team": "chat"}
    assert [str(n) for n in settings.extra_cidrs] == ["198.18.0.0/15", "2001:db8::/32"]
    assert OperatorSettings(service_monitor_labels='{"a": "b"}').service_monitor_labels == {
        "a": "b"
    }
    # Sorted and deduplicated, as the chart renders them into the webhook's namespaceSelector.
    namespaces = OperatorSettings(watch_namespaces="team-b, team-a team-b").watch_namespaces
    assert namespaces == ["team-a", "team-b"]


def test_monitor_and_sidecar_settings_parse():
    """As the chart renders them: JSON for lists and objects, durations as Prometheus writes
    them, empty for "not set"."""
    settings = OperatorSettings(
        monitor_kind="PodMonitor",
        service_monitor_relabelings='[{"targetLabel": "cluster", "replacement": "eu-1"}]',
        service_monitor_metric_relabelings="",
        service_monitor_scrape_timeout="1m30s",
        sidecar_security_context='{"runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}',
    )
    assert settings.monitor_kind == "PodMonitor"
    assert settings.service_monitor_relabelings == [
        {"targetLabel": "cluster", "replacement": "eu-1"}
    ]
    assert settings.service_monitor_metric_relabelings == []
    assert settings.service_monitor_scrape_timeout == 90.0
    assert (
        OperatorSettings(service_monitor_scrape_timeout="").service_monitor_scrape_timeout is None
    )
    assert settings.sidecar_security_context == {
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert OperatorSettings().sidecar_security_context == RESTRICTED_SIDECAR


def test_readme_documents_every_setting_and_annotation():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in OperatorSettings.model_fields:
        assert f"`PROSODY_OPERATOR_{name.upper()}`" in readme, name
    for key in (
        ann.INJECT,
        ann.PORT,
        ann.ALLOW_CIDRS,
        ann.INTERVAL,
        ann.IMAGE,
        ann.RESOURCES,
        ann.CONTAINER,
        ann.PROSODY_VERSION,
        ann.METRICS_URL,
        ann.STATUS,
        ann.OBJECT_HASH,
        ann.SCRAPE_TIMEOUT,
        ann.SAMPLE_LIMIT,
    ):
        assert f"`{key}`" in readme, key
