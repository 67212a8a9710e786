"""The README's complete example (Prosody 13.0 from the maintained image, its config in a
ConfigMap) does what the README says: planned as admission and reconcile, with the config
evaluated for real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prosody_operator import builders
from prosody_operator.observation import Admission, Workload
from prosody_operator.planner import plan_admission, plan_reconcile
from prosody_operator.settings import OperatorSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def example() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap and the Deployment of the README's complete example."""
    section = README[README.index("**A complete example**") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    configmap, deployment = yaml.safe_load_all(block.group(1))
    assert (configmap["kind"], deployment["kind"]) == ("ConfigMap", "Deployment")
    return configmap, deployment


def test_the_complete_example_collects_every_30_seconds_from_prosodys_default():
    configmap, deployment = example()
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "prosodyim/prosody:13.0"
    )
    deployment["metadata"].update(namespace="chat", uid="uid-xmpp")
    configmaps = {configmap["metadata"]["name"]: configmap["data"]}
    settings = OperatorSettings()

    plan = plan_reconcile(settings, Workload(deployment, {}, configmaps=configmaps))
    [monitor] = [obj for obj in plan.apply if obj["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    assert not [e for e in plan.events if e.reason in ("ProsodyConfig", "ProsodyVersionUnknown")]
    [configured] = [e.message for e in plan.events if e.reason == "MetricsConfigured"]
    assert "the sidecar collects http://127.0.0.1:5280/metrics" in configured

    template = deployment["spec"]["template"]
    pod = {"metadata": {**template["metadata"], "namespace": "chat"}, "spec": template["spec"]}
    admitted = plan_admission(
        settings, Admission(pod, {}, None, {}, configmaps, ("198.18.0.0/16",))
    )
    assert admitted.patch is not None and not admitted.warnings
    sidecar = admitted.patch["spec"]["containers"][-1]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["PROSODY_EXPORTER_INTERVAL"] == "30s"
    assert env[builders.UPSTREAM_ENV] == "http://127.0.0.1:5280/metrics"


def test_the_example_needs_13_0s_dialect():
    """Read as 0.12 reads it (the annotation says so), `:append` fails: the image's tag is what
    makes the example work."""
    configmap, deployment = example()
    deployment["metadata"].update(namespace="chat", uid="uid-xmpp")
    deployment["spec"]["template"]["metadata"]["annotations"] = {
        "prosody-operator.io/prosody-version": "0.12"
    }
    plan = plan_reconcile(
        OperatorSettings(),
        Workload(deployment, {}, configmaps={configmap["metadata"]["name"]: configmap["data"]}),
    )
    assert any(
        e.reason == "ProsodyConfig" and "Prosody refuses to start" in e.message for e in plan.events
    )
