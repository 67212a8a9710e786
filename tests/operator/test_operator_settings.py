"""Operator settings through the real console script: a bad value exits 2 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prosody_operator import annotations as ann
from prosody_operator.settings import OperatorSettings

COMMAND = str(Path(sys.executable).parent / "prosody-operator")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PROSODY_OPERATOR_MANUAL_INTERVAL": "0"}, "PROSODY_OPERATOR_MANUAL_INTERVAL"),
        ({"PROSODY_OPERATOR_EXTRA_CIDRS": "198.18.0.0/15,nope"}, "PROSODY_OPERATOR_EXTRA_CIDRS"),
        ({"PROSODY_OPERATOR_SERVICE_MONITOR_LABELS": "release"}, "SERVICE_MONITOR_LABELS"),
        ({"PROSODY_OPERATOR_WEBHOOK_PORT": "http"}, "PROSODY_OPERATOR_WEBHOOK_PORT"),
        ({"PROSODY_OPERATOR_WATCH_NAMESPACES": "team-a,Team_B"}, "WATCH_NAMESPACES"),
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
        ann.STATUS,
        ann.OBJECT_HASH,
    ):
        assert f"`{key}`" in readme, key
