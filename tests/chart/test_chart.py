"""The chart rendered by the real helm, no cluster: lint, schema, what the objects say, and that
the generated files (README values table, manifests/) are up to date.

The checks that matter most tie the chart to the operator's own code: the Deployment's env must
be settings the operator accepts, and the MutatingWebhookConfiguration must equal what the
operator server-side-applies at start-up (minus the caBundle), or the two would fight over it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from prosody_operator import __version__, builders
from prosody_operator import annotations as ann
from prosody_operator.intervals import EffectiveInterval, format_duration
from prosody_operator.prosody_versions import DEFAULT_UPSTREAM_URL
from prosody_operator.settings import (
    ENV_PREFIX,
    RESTRICTED_SIDECAR,
    OperatorSettings,
    RelabelConfig,
    SecurityContext,
)
from testinfra.procs import require_program
from tools import chart, dashboard, promql

RELEASE, NAMESPACE = "test", "prosody"
CERT_MANAGER_GROUP = "cert-manager.io"
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def render(
    *values_files: Path,
    chart_dir: Path | None = None,
    api_versions: tuple[str, ...] = (),
    **set_values: Any,
) -> list[dict]:
    return chart.render_objects(
        RELEASE, NAMESPACE, values_files, set_values, chart_dir, api_versions
    )


def only(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[dict]) -> dict:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def env_of(objects: list[dict]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(objects)["env"]}


def webhook_service(objects: list[dict]) -> dict:
    """The Service the API server calls the webhook through (the other is the metrics')."""
    (found,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith(
        "-webhook"
    )]  # fmt: skip
    return found


def operator_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """What the operator makes of this environment (it exits with status 2 if invalid)."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return OperatorSettings()


@pytest.fixture(params=chart.CI_VALUES, ids=lambda path: path.name.removesuffix("-values.yaml"))
def ci_values(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


# --- helm lint and the schema ----------------------------------------------------------------


def test_ci_scenarios_exist() -> None:
    names = {path.name for path in chart.CI_VALUES}
    assert {
        "default-values.yaml",
        "cert-manager-values.yaml",
        "monitor-labels-values.yaml",
        "prometheus-rule-dashboard-values.yaml",
        "names-values.yaml",
        "private-registry-values.yaml",
        "openshift-values.yaml",
        "security-context-values.yaml",
    } <= names


def test_every_value_changes_the_objects_in_some_scenario(tmp_path: Path) -> None:
    """Each documented value is set in a ci/ scenario, and that scenario renders other objects
    without it: lint, the server-side dry-run and the install tests all see the value at work."""
    scenarios = {path: yaml.safe_load(path.read_text()) or {} for path in chart.CI_VALUES}
    rendered = {path: render(path) for path in scenarios}

    def changes_objects(key: str) -> bool:
        for path, values in scenarios.items():
            if not _has(values, key):
                continue
            without = tmp_path / f"without-{key}.yaml"
            without.write_text(yaml.safe_dump(_without(values, key)))
            argv = chart.template_args(RELEASE, NAMESPACE, [without])
            result = chart.helm("template", *argv, check=False)
            # A failure means another value of the scenario needs this one: look further.
            if result.returncode == 0 and rendered[path] != [
                doc for doc in yaml.safe_load_all(result.stdout) if doc
            ]:
                return True
        return False

    assert [v.key for v in chart.chart_values() if not changes_objects(v.key)] == []


def _has(values: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def _without(values: dict[str, Any], dotted: str) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    copy = dict(values)
    if rest:
        copy[head] = _without(copy[head], rest)
    else:
        del copy[head]
    return copy


def test_helm_lint(ci_values: Path) -> None:
    result = chart.helm("lint", "--strict", str(chart.CHART), "--values", str(ci_values))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


PORTS_DIFFER = "operator.healthPort, operator.metricsPort and webhook.port must differ"
BAD_VALUES = [
    # (value, what helm's message names)
    ({"sidecar.manualInterval": "30s"}, "at '/sidecar/manualInterval': got string, want number"),
    ({"sidecar.manualInterval": 0}, "at '/sidecar/manualInterval'"),
    ({"webhook.port": 70000}, "at '/webhook/port': maximum"),
    ({"operator.healthPort": 0}, "at '/operator/healthPort': minimum"),
    ({"sidecar.port": "9755"}, "at '/sidecar/port': got string, want integer"),
    ({"sidecar.extraCIDRs": ["10.0.0.0"]}, "at '/sidecar/extraCIDRs/0'"),
    ({"sidecar.podCIDRs": ["10.0.0.0/33"]}, "at '/sidecar/podCIDRs/0'"),
    ({"sidecar.extraCIDRs": "10.0.0.0/8"}, "at '/sidecar/extraCIDRs': got string, want array"),
    ({"sidecar.restartOnDrift": "yes"}, "at '/sidecar/restartOnDrift': got string, want boolean"),
    ({"sidecar.resources.limits.memory": "lots"}, "at '/sidecar/resources/limits/memory'"),
    ({"sidecar.resources.limits.gpu": "1"}, "additional properties 'gpu' not allowed"),
    ({"sidecar.manualIntervall": 30}, "additional properties 'manualIntervall' not allowed"),
    ({"serviceMonitor.labels": {"release": "a b"}}, "at '/serviceMonitor/labels/release'"),
    ({"serviceMonitor.labels": {"bad key!": "x"}}, "additional properties 'bad key!'"),
    ({"serviceMonitor.labels": {"release": 1}}, "got number, want string"),
    ({"image.pullPolicy": "Sometimes"}, "at '/image/pullPolicy': value must be one of"),
    ({"webhook.configurationName": "Prosody_Operator"}, "at '/webhook/configurationName'"),
    ({"webhook.certManager.issuerRef": {"kind": "ClusterIssuer"}}, "issuerRef"),
    ({"webhook.certManager.duration": "1y"}, "at '/webhook/certManager/duration'"),
    ({"podDisruptionBudget.maxUnavailable": 0}, "at '/podDisruptionBudget/maxUnavailable'"),
    ({"prometheusRule.for": "five minutes"}, "at '/prometheusRule/for'"),
    ({"prometheusRule.connectionsDrop.ratio": 1.5}, "at '/prometheusRule/connectionsDrop/ratio'"),
    ({"grafanaDashboard.namespace": "Monitoring"}, "at '/grafanaDashboard/namespace'"),
    ({"fullnameOverride": "a" * 64}, "at '/fullnameOverride': maxLength"),
    ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
    ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
    ({"nameOverride": "Prosody"}, "at '/nameOverride'"),
    ({"serviceAccount.create": "no"}, "at '/serviceAccount/create': got string, want boolean"),
    ({"global.imageRegistry": "https://registry.example.com"}, "at '/global/imageRegistry'"),
    (
        {"global.compatibility.openshift.adaptSecurityContext": "yes"},
        "at '/global/compatibility/openshift/adaptSecurityContext': value must be one of",
    ),
    (
        {"operator.podSecurityContext": {"runAsNonroot": True}},
        "additional properties 'runAsNonroot' not allowed",
    ),
    ({"operator.podSecurityContext.runAsUser": -1}, "at '/operator/podSecurityContext/runAsUser'"),
    (
        {"operator.securityContext.capabilities": {"drop": "ALL"}},
        "at '/operator/securityContext/capabilities/drop': got string, want array",
    ),
    (
        {"operator.securityContext.seccompProfile": {"type": "runtime/default"}},
        "at '/operator/securityContext/seccompProfile/type'",
    ),
    ({"test.enabled": "true"}, "at '/test/enabled': got string, want boolean"),
    ({"serviceMonitor.enabled": "no"}, "at '/serviceMonitor/enabled': got string, want boolean"),
    ({"serviceMonitor.kind": "PodMonitors"}, "at '/serviceMonitor/kind': value must be one of"),
    ({"serviceMonitor.sampleLimit": -1}, "at '/serviceMonitor/sampleLimit': minimum"),
    ({"serviceMonitor.sampleLimit": "1000"}, "at '/serviceMonitor/sampleLimit': got string"),
    ({"serviceMonitor.honorLabels": "true"}, "at '/serviceMonitor/honorLabels': got string"),
    ({"serviceMonitor.scrapeTimeout": "15"}, "at '/serviceMonitor/scrapeTimeout'"),
    ({"serviceMonitor.scrapeTimeout": "0s"}, "at '/serviceMonitor/scrapeTimeout'"),
    ({"serviceMonitor.scrapeTimeout": "1d"}, "at '/serviceMonitor/scrapeTimeout'"),
    (
        {"serviceMonitor.relabelings": [{"action": "dorp"}]},
        "at '/serviceMonitor/relabelings/0/action': value must be one of",
    ),
    (
        {"serviceMonitor.metricRelabelings": [{"source_labels": ["__name__"]}]},
        "additional properties 'source_labels' not allowed",
    ),
    (
        {"serviceMonitor.metricRelabelings": [{"sourceLabels": ["a-b"]}]},
        "at '/serviceMonitor/metricRelabelings/0/sourceLabels/0'",
    ),
    ({"serviceMonitor.relabelings": {"action": "drop"}}, "got object, want array"),
    (
        {"sidecar.prometheusScrapeAnnotations": "on"},
        "at '/sidecar/prometheusScrapeAnnotations': got string, want boolean",
    ),
    (
        {"sidecar.securityContext": {"runAsUsr": 1}},
        "additional properties 'runAsUsr' not allowed",
    ),
    ({"sidecar.securityContext.runAsUser": -1}, "at '/sidecar/securityContext/runAsUser'"),
    (
        {"networkPolicy.webhookFrom": [{"cidr": "198.19.0.10/32"}]},
        "additional properties 'cidr' not allowed",
    ),
    (
        {"serviceAccount.create": False},
        "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is",
    ),
    # Not expressible in the schema: a `fail` in the template (`helm lint` only logs those).
    ({"operator.healthPort": 9443}, PORTS_DIFFER),
    ({"operator.metricsPort": 8080}, PORTS_DIFFER),
    ({"operator.replicas": 0}, "at '/operator/replicas': minimum"),
    ({"operator.logFormat": "logfmt"}, "at '/operator/logFormat': value must be one of"),
    ({"podDisruptionBudget.minAvailable": 0}, "at '/podDisruptionBudget/minAvailable'"),
    ({"metrics.serviceMonitor.interval": "30 s"}, "at '/metrics/serviceMonitor/interval'"),
]
TEMPLATE_CHECKS = {
    PORTS_DIFFER,
    "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is",
}


@pytest.mark.parametrize(
    ("values", "message"), BAD_VALUES, ids=[json.dumps(v) for v, _ in BAD_VALUES]
)
def test_bad_values_are_rejected(values: dict[str, Any], message: str) -> None:
    argv = ["template", *chart.template_args(RELEASE, NAMESPACE, (), values)]
    result = chart.helm(*argv, check=False)
    assert result.returncode != 0, f"helm accepted {values}"
    assert message in result.stderr, result.stderr
    if message not in TEMPLATE_CHECKS:
        lint = chart.helm("lint", "--strict", str(chart.CHART), *_set_json(values), check=False)
        assert lint.returncode != 0 and message in lint.stdout, lint.stdout


def _set_json(values: dict[str, Any]) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set-json", f"{k}={json.dumps(v)}")]


# --- The operator's Deployment -----------------------------------------------------------------


def test_env_is_what_the_operator_accepts(ci_values: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(ci_values)
    env = env_of(objects)
    assert all(name.startswith(ENV_PREFIX) for name in env)
    settings = operator_settings(env, monkeypatch)
    values = yaml.safe_load(ci_values.read_text()) or {}
    sidecar = values.get("sidecar", {})
    assert settings.manual_interval == sidecar.get("manualInterval", 30)
    assert [str(n) for n in settings.extra_cidrs] == sidecar.get("extraCIDRs", [])
    assert [str(n) for n in settings.pod_cidrs] == sidecar.get("podCIDRs", [])
    assert settings.restart_on_drift is sidecar.get("restartOnDrift", False)
    assert settings.exporter_port == sidecar.get("port", 9755)
    monitors = values.get("serviceMonitor", {})
    assert settings.service_monitor_labels == monitors.get("labels", {})
    assert settings.service_monitor_enabled is monitors.get("enabled", True)
    assert settings.monitor_kind == monitors.get("kind", "ServiceMonitor")
    assert settings.service_monitor_relabelings == monitors.get("relabelings", [])
    assert settings.service_monitor_metric_relabelings == monitors.get("metricRelabelings", [])
    assert settings.service_monitor_sample_limit == monitors.get("sampleLimit", 0)
    assert settings.service_monitor_honor_labels is monitors.get("honorLabels", False)
    timeout = settings.service_monitor_scrape_timeout
    assert (format_duration(timeout) if timeout else "") == monitors.get("scrapeTimeout", "")
    assert settings.prometheus_scrape_annotations is sidecar.get(
        "prometheusScrapeAnnotations", False
    )
    assert settings.webhook_service == f"{NAMESPACE}/{webhook_service(objects)['metadata']['name']}"
    assert (
        settings.webhook_configuration
        == only(objects, "MutatingWebhookConfiguration")["metadata"]["name"]
    )
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert ports == {
        "webhook": settings.webhook_port,
        "health": settings.health_port,
        "metrics": settings.metrics_port,
    }
    operator = values.get("operator", {})
    assert settings.log_format == operator.get("logFormat", "text")
    assert settings.log_level == operator.get("logLevel", "info")
    assert settings.shutdown_delay == operator.get("shutdownDelay", 5)
    # In a pod: listen on every address, reach the API server through the Service.
    assert settings.webhook_host == "0.0.0.0"
    assert settings.webhook_url == ""


def test_env_sets_every_setting_the_chart_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(render())
    fields = {ENV_PREFIX + name.upper() for name in OperatorSettings.model_fields}
    assert set(env) <= fields
    # Left to the operator's defaults on purpose: the listen address, the URL for runs outside
    # the cluster, and the certificate directory (set only with cert-manager).
    assert fields - set(env) == {
        f"{ENV_PREFIX}WEBHOOK_HOST",
        f"{ENV_PREFIX}WEBHOOK_URL",
        f"{ENV_PREFIX}WEBHOOK_CERT_DIR",
    }
    settings = operator_settings(env, monkeypatch)
    assert settings.exporter_image == "ghcr.io/prosody-operator/prosody-exporter:0.1.0"
    assert (settings.sidecar_cpu_request, settings.sidecar_memory_request) == ("10m", "32Mi")
    assert (settings.sidecar_cpu_limit, settings.sidecar_memory_limit) == ("", "104Mi")


def test_sidecar_resources_reach_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = {"requests": {"cpu": "", "memory": "40Mi"}, "limits": {"cpu": 1, "memory": ""}}
    settings = operator_settings(env_of(render(**{"sidecar.resources": resources})), monkeypatch)
    assert builders.sidecar_resources(settings, None) == {
        "requests": {"memory": "40Mi"},
        "limits": {"cpu": "1"},
    }


def test_image_tags_default_to_the_app_version() -> None:
    app_version = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())["appVersion"]
    assert app_version == __version__
    objects = render()
    assert container(objects)["image"] == f"ghcr.io/prosody-operator/prosody-operator:{__version__}"
    assert env_of(objects)[f"{ENV_PREFIX}EXPORTER_IMAGE"].endswith(f":{__version__}")


def test_deployment_is_replicated_restricted_with_tmp_and_probes(ci_values: Path) -> None:
    objects = render(ci_values)
    deployment = only(objects, "Deployment")
    values = yaml.safe_load(ci_values.read_text()) or {}
    replicas = (values.get("operator") or {}).get("replicas", 2)
    assert deployment["spec"]["replicas"] == replicas
    # A new replica is up before an old one goes: one always serves the webhook.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    operator = container(objects)
    assert RESTRICTED_CONTAINER.items() <= operator["securityContext"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in operator["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    accounts = [o for o in objects if o["kind"] == "ServiceAccount" and not _is_test(o)]
    if accounts:  # none with serviceAccount.create=false
        assert pod["serviceAccountName"] == only(accounts, "ServiceAccount")["metadata"]["name"]


def test_replicas_spread_across_nodes_and_one_of_them_reconciles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render()
    pod = only(objects, "Deployment")["spec"]["template"]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster runs both
    assert spread["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    settings = operator_settings(env_of(objects), monkeypatch)
    fullname = f"{RELEASE}-prosody-operator"
    assert settings.leader_election_lease == f"{NAMESPACE}/{fullname}"
    assert settings.webhook_cert_secret == f"{NAMESPACE}/{fullname}-webhook-tls"
    # The Lease and the Secret are the chart's (helm uninstall removes them); the operator may
    # read and update those two, and no other.
    lease = only(objects, "Lease")
    assert (lease["metadata"]["name"], "spec" in lease) == (fullname, False)
    secret = only([o for o in objects if not _is_test(o)], "Secret")
    assert (secret["metadata"]["name"], "data" in secret) == (f"{fullname}-webhook-tls", False)
    role = only([o for o in objects if not _is_test(o)], "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [fullname],
            "verbs": ["get", "update"],
        },
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [f"{fullname}-webhook-tls"],
            "verbs": ["get", "update"],
        },
    ]
    # With restartOnDrift, the webhook Service's EndpointSlices too: listed, here only.
    drift = only([o for o in render(**{"sidecar.restartOnDrift": True}) if not _is_test(o)], "Role")
    assert drift["rules"] == [
        *role["rules"],
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
    ]
    custom = render(chart.CHART / "ci" / "high-availability-values.yaml")
    spread = only(custom, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone"]


def test_the_operators_metrics_service_and_service_monitor() -> None:
    objects = render(chart.CHART / "ci" / "prometheus-rule-dashboard-values.yaml")
    metrics = [o for o in objects if o["kind"] == "Service" and o is not webhook_service(objects)]
    (service,) = metrics
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    monitor = only(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert not selector.items() <= webhook_service(objects)["metadata"]["labels"].items()
    assert "ServiceMonitor" not in {o["kind"] for o in render()}


def test_webhook_service_targets_the_webhook_port(ci_values: Path) -> None:
    objects = render(ci_values)
    service = webhook_service(objects)
    assert service["spec"]["ports"] == [
        {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_pod_template_carries_no_chart_version(tmp_path: Path) -> None:
    """A chart bump alone does not restart the operator."""
    template = only(render(), "Deployment")["spec"]["template"]
    assert "helm.sh/chart" not in template["metadata"]["labels"]
    assert "app.kubernetes.io/version" not in template["metadata"]["labels"]
    bumped = tmp_path / "prosody-operator"
    shutil.copytree(chart.CHART, bumped)
    chart_yaml = bumped / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace("version: 0.1.0", "version: 0.2.0"))
    bumped_objects = render(chart_dir=bumped)
    assert only(bumped_objects, "Deployment")["metadata"]["labels"]["helm.sh/chart"] == (
        "prosody-operator-0.2.0"
    )
    assert only(bumped_objects, "Deployment")["spec"]["template"] == template


def test_pod_disruption_budget_keeps_one_replica_and_never_blocks_a_lone_one() -> None:
    pdb = only(render(), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]
    pod_labels = only(render(), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # One replica: minAvailable 1 would block every drain.
    lone = only(render(**{"operator.replicas": 1}), "PodDisruptionBudget")
    assert lone["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    percent = only(render(chart.CHART / "ci" / "pdb-percent-values.yaml"), "PodDisruptionBudget")
    assert (percent["spec"]["maxUnavailable"], "minAvailable" in percent["spec"]) == ("100%", False)
    disabled = render(**{"podDisruptionBudget.enabled": False})
    assert "PodDisruptionBudget" not in {obj["kind"] for obj in disabled}


# --- The webhook configuration --------------------------------------------------------------


def test_webhook_configuration_is_what_the_operator_applies(
    ci_values: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Field for field, minus the caBundle (the operator's) and metadata.labels (each side
    labels it its own way; helm sets managed-by=Helm on whatever it writes)."""
    objects = render(ci_values)
    rendered = only(objects, "MutatingWebhookConfiguration")
    settings = operator_settings(env_of(objects), monkeypatch)
    # The operator's own start-up code, so a change there that the chart misses fails here.
    client_config = builders.build_webhook_client_config(  # base64, as kopf gives it
        "YW55IENB", url=settings.webhook_url, service=settings.webhook_service
    )
    assert client_config is not None
    del client_config["caBundle"]
    applied = builders.build_webhook_configuration(
        settings.webhook_configuration, client_config, settings.watch_namespaces
    )
    for obj in (rendered, applied):
        del obj["metadata"]["labels"]
    assert rendered == applied
    assert all("caBundle" not in webhook["clientConfig"] for webhook in rendered["webhooks"])


# --- cert-manager ---------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["cert-manager", "cert-manager-issuer"])
def test_cert_manager_certificate_is_mounted_for_the_operator(
    scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values_file = chart.CHART / "ci" / f"{scenario}-values.yaml"
    objects = render(values_file)
    certificate = only(objects, "Certificate")
    assert certificate["apiVersion"] == f"{CERT_MANAGER_GROUP}/v1"
    service = webhook_service(objects)["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert "server auth" in certificate["spec"]["usages"]
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert list(secret_volumes.values()) == [certificate["spec"]["secretName"]]
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    (volume,) = secret_volumes
    assert mounts[volume]["readOnly"] is True
    settings = operator_settings(env_of(objects), monkeypatch)
    assert settings.webhook_cert_dir == mounts[volume]["mountPath"]
    issuers = [o for o in objects if o["kind"] == "Issuer"]
    if scenario == "cert-manager":
        (issuer,) = issuers
        assert issuer["spec"] == {"selfSigned": {}}
        assert certificate["spec"]["issuerRef"] == {
            "kind": "Issuer",
            "name": issuer["metadata"]["name"],
        }
    else:
        assert issuers == []
        values = yaml.safe_load(values_file.read_text())["webhook"]["certManager"]
        assert certificate["spec"]["issuerRef"] == values["issuerRef"]
        assert certificate["spec"]["duration"] == values["duration"]


def test_without_cert_manager_the_operator_makes_its_own_certificate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render()
    assert not [o for o in objects if o["apiVersion"].startswith(CERT_MANAGER_GROUP)]
    assert operator_settings(env_of(objects), monkeypatch).webhook_cert_dir == ""


# --- PrometheusRule and the Grafana dashboard ----------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_program("promtool")


def _promtool(promtool: str, *args: str, cwd: Path) -> None:
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_is_off_by_default() -> None:
    kinds = {obj["kind"] for obj in render()}
    assert "PrometheusRule" not in kinds
    assert "ConfigMap" not in kinds


ALERT_TESTS = Path(__file__).parent / "data" / "alerts-test.yaml"


def test_prometheus_rule_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    """`promtool check rules` (PromQL and annotation templates), then `promtool test rules`
    (data/alerts-test.yaml) on series that must and must not fire each alert."""
    values_file = chart.CHART / "ci" / "prometheus-rule-dashboard-values.yaml"
    rule = only(render(values_file), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (tmp_path / "checked.yaml").write_text(yaml.safe_dump(rule["spec"]))
    _promtool(promtool, "check", "rules", "checked.yaml", cwd=tmp_path)
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "ProsodyMetricsDown",
        "ProsodyExporterUpstreamDown",
        "ProsodyMetricsStale",
        "ProsodyExporterUpstreamErrors",
        "ProsodyConnectionsDropped",
        # The operator's, with metrics.serviceMonitor.enabled:
        "ProsodyOperatorDown",
        "ProsodyOperatorNotReconciling",
        "ProsodyOperatorReconcileErrors",
        "ProsodyOperatorAdmissionFailures",
        "ProsodyOperatorWebhookSlow",
        "ProsodySidecarMissing",
        "ProsodyServiceMonitorNotSelected",
        "ProsodyConfigProblem",
    }
    without_operator = render(values_file, **{"metrics.serviceMonitor.enabled": False})
    groups = only(without_operator, "PrometheusRule")["spec"]["groups"]
    assert [g["name"] for g in groups] == ["prosody"]  # nothing scrapes the operator
    for group in rule["spec"]["groups"]:  # the unit test compares labels, not the prose
        for item in group["rules"]:
            item.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(ALERT_TESTS, tmp_path / "tests.yaml")
    _promtool(promtool, "test", "rules", "tests.yaml", cwd=tmp_path)


def _dashboard_exprs(dashboard: dict) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def test_grafana_dashboard_configmap(promtool: str, tmp_path: Path) -> None:
    """Grafana's sidecar finds it by label; every panel's query is valid PromQL."""
    values_file = chart.CHART / "ci" / "prometheus-rule-dashboard-values.yaml"
    configmap = only(render(values_file), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Prosody"}
    assert configmap["metadata"]["namespace"] == NAMESPACE
    (name, text) = next(iter(configmap["data"].items()))
    assert name.endswith(".json")
    dashboard = json.loads(text)
    assert dashboard["uid"] == "prosody-operator"
    exprs = list(_dashboard_exprs(dashboard))
    assert len(exprs) >= 5
    for metric in (
        "prosody_exporter_up",
        "prosody_exporter_snapshot_stale",
        "prosody_exporter_upstream_errors_total",
        "prosody_mod_c2s__connections",
    ):
        assert any(metric in expr for expr in exprs), metric
    # Grafana's variables replaced by what they expand to, then checked as recording rules.
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(exprs)
    ]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    _promtool(promtool, "check", "rules", "dashboard.yaml", cwd=tmp_path)
    moved = only(render(values_file, **{"grafanaDashboard.namespace": "monitoring"}), "ConfigMap")
    assert moved["metadata"]["namespace"] == "monitoring"


# --- Labels ---------------------------------------------------------------------------------


def test_watch_namespaces_bind_the_workload_rules_only_there() -> None:
    """Cluster-scoped rules (Nodes, the webhook configuration...) stay cluster-wide; the rules
    for what the operator does in namespaces are bound in each watched namespace only."""
    workloads = f"{RELEASE}-prosody-operator-workloads"

    def bindings(objects: list[dict]) -> list[tuple[str, str | None]]:
        return sorted(
            (obj["kind"], obj["metadata"].get("namespace"))
            for obj in objects
            if obj["kind"] in ("RoleBinding", "ClusterRoleBinding")
            and obj["roleRef"]
            == {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": workloads,
            }
        )

    assert bindings(render()) == [("ClusterRoleBinding", None)]
    scoped = render(chart.CHART / "ci" / "watch-namespaces-values.yaml")
    assert bindings(scoped) == [("RoleBinding", "team-a"), ("RoleBinding", "team-b")]
    (cluster_role,) = [
        o
        for o in scoped
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] != workloads and not _is_test(o)
    ]
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {
        "customresourcedefinitions",
        "namespaces",
        "nodes",
        "mutatingwebhookconfigurations",
    }


def test_rights_are_least_privilege() -> None:
    """The operator may patch workloads only to restart them (restartOnDrift), and of webhook
    configurations only get and patch its own, which the chart creates."""

    def verbs(objects: list[dict], resource: str) -> list[tuple[str, ...]]:
        return sorted(
            (*rule["verbs"], *rule.get("resourceNames", []))
            for obj in objects
            if obj["kind"] == "ClusterRole" and not _is_test(obj)
            for rule in obj["rules"]
            if resource in rule["resources"]
        )

    default = render()
    assert verbs(default, "deployments") == [("get", "list", "watch")]
    assert verbs(render(**{"sidecar.restartOnDrift": True}), "deployments") == [
        ("get", "list", "watch", "patch")
    ]
    configuration = only(default, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert verbs(default, "mutatingwebhookconfigurations") == [("get", "patch", configuration)]
    # EndpointSlices (is the webhook ready for a restart's pods?): in no ClusterRole at all.
    assert verbs(render(**{"sidecar.restartOnDrift": True}), "endpointslices") == []


def test_network_policy_opens_only_the_webhook_port_to_its_callers() -> None:
    assert not [o for o in render() if o["kind"] == "NetworkPolicy"]  # off by default
    objects = render(chart.CHART / "ci" / "network-policy-values.yaml", **{"webhook.port": 8443})
    policy = only(objects, "NetworkPolicy")["spec"]
    pods = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pods.items()
    assert policy["policyTypes"] == ["Ingress"]
    webhook, extra = policy["ingress"]
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert (
        webhook["ports"] == [{"port": ports["webhook"], "protocol": "TCP"}]
        and ports["webhook"] == 8443
    )
    assert webhook["from"] == [{"ipBlock": {"cidr": "198.19.0.10/32"}}]
    assert extra["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_every_object_has_the_release_labels(ci_values: Path) -> None:
    """What `helm uninstall`'s leftovers are looked up by (tests/chart/test_chart_cluster.py).
    The `helm test` pod names the chart with part-of instead: the operator's selector labels
    would put it behind the webhook Service."""
    name = (yaml.safe_load(ci_values.read_text()) or {}).get("nameOverride", "prosody-operator")
    for obj in render(ci_values):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, obj["kind"]
        key = "app.kubernetes.io/part-of" if obj["kind"] == "Pod" else "app.kubernetes.io/name"
        assert labels[key] == name, obj["kind"]


def test_common_labels_reach_every_object_but_not_pods() -> None:
    objects = render(**{"commonLabels": {"team": "chat"}})
    assert all(obj["metadata"]["labels"]["team"] == "chat" for obj in objects)
    assert "team" not in only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]


# --- Generated files ------------------------------------------------------------------------


def test_every_value_is_documented() -> None:
    assert chart.undocumented() == [], "add a `# --` comment in values.yaml"


def test_readme_values_table_is_up_to_date() -> None:
    readme = chart.README.read_text()
    expected = chart.readme_with_table(readme, chart.values_table(chart.chart_values()))
    assert readme == expected, "run `python -m tools.chart readme` and commit the README"


def test_values_table_lists_nested_defaults() -> None:
    rows = {v.key: v for v in chart.chart_values()}
    assert rows["sidecar.manualInterval"].default == 30
    assert rows["operator.resources"].default["requests"]["cpu"] == "50m"
    assert rows["webhook.certManager.enabled"].default is False
    table = chart.values_table(list(rows.values()))
    assert "| `sidecar.manualInterval` | int | `30` |" in table


def test_manifests_are_up_to_date() -> None:
    assert chart.MANIFESTS.read_text() == chart.manifests(), "run `make manifests` and commit"


def test_manifests_are_the_default_chart_in_one_namespace() -> None:
    objects = [doc for doc in yaml.safe_load_all(chart.MANIFESTS.read_text()) if doc]
    namespace = objects[0]
    assert namespace["kind"] == "Namespace"
    assert namespace["metadata"]["name"] == chart.MANIFESTS_NAMESPACE
    for obj in objects[1:]:
        assert obj["metadata"].get("namespace", chart.MANIFESTS_NAMESPACE) == (
            chart.MANIFESTS_NAMESPACE
        )
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Lease",
            "Secret",
            "Service",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
        ]
    )


# --- Names and the ServiceAccount --------------------------------------------------------------


def test_name_override_names_every_object_and_the_selector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render(chart.CHART / "ci" / "names-values.yaml")
    deployment = only(objects, "Deployment")
    assert deployment["metadata"]["name"] == f"{RELEASE}-xmpp-metrics"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/name"] == "xmpp-metrics"
    service = webhook_service(objects)
    assert service["metadata"]["name"] == f"{RELEASE}-xmpp-metrics-webhook"
    assert service["spec"]["selector"] == selector
    webhook = only(objects, "MutatingWebhookConfiguration")["webhooks"][0]
    assert webhook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
    settings = operator_settings(env_of(objects), monkeypatch)
    assert settings.webhook_service == f"{NAMESPACE}/{service['metadata']['name']}"
    # fullnameOverride wins over nameOverride for names, not for the name label.
    both = render(chart.CHART / "ci" / "names-values.yaml", fullnameOverride="prosody-op")
    assert only(both, "Deployment")["metadata"]["name"] == "prosody-op"
    assert only(both, "Deployment")["metadata"]["labels"]["app.kubernetes.io/name"] == (
        "xmpp-metrics"
    )


def _is_test(obj: dict) -> bool:
    """One of the objects `helm test` needs."""
    return bool(obj["metadata"]["labels"].get("app.kubernetes.io/component") == "test")


def _operator_bindings(objects: list[dict]) -> list[dict]:
    return [
        o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding") and not _is_test(o)
    ]


def test_existing_service_account_gets_the_rbac_and_none_is_created() -> None:
    objects = render(chart.CHART / "ci" / "names-values.yaml")
    accounts = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    assert accounts == [f"{RELEASE}-xmpp-metrics-test"]  # only the helm test's own
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "xmpp-metrics-operator"
    bindings = _operator_bindings(objects)
    assert len(bindings) == 3  # cluster-wide, workloads, and in its own namespace
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "xmpp-metrics-operator", "namespace": NAMESPACE}
        ]
    created = render(**{"serviceAccount.name": "mine"})
    assert [o["metadata"]["name"] for o in created if o["kind"] == "ServiceAccount"] == [
        "mine",
        f"{RELEASE}-prosody-operator-test",
    ]


# --- Images -------------------------------------------------------------------------------------

REGISTRY_CASES = [
    # (repository, global.imageRegistry, the image)
    ("ghcr.io/prosody-operator/op", "", "ghcr.io/prosody-operator/op"),
    ("ghcr.io/prosody-operator/op", "reg.example.com", "reg.example.com/prosody-operator/op"),
    ("ghcr.io/p-o/op", "mirror.example.com:5000/ghcr/", "mirror.example.com:5000/ghcr/p-o/op"),
    ("localhost:5000/op", "reg.example.com", "reg.example.com/op"),
    ("localhost/team/op", "reg.example.com", "reg.example.com/team/op"),
    ("prosody/op", "reg.example.com", "reg.example.com/prosody/op"),  # Docker Hub
    ("op", "reg.example.com", "reg.example.com/op"),
]  # fmt: skip


@pytest.mark.parametrize(("repository", "registry", "image"), REGISTRY_CASES)
def test_global_image_registry_replaces_every_images_registry(
    repository: str, registry: str, image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(
        **{
            "global.imageRegistry": registry,
            "image.repository": repository,
            "image.tag": "1.2.3",
            "sidecar.image.repository": repository + "-exporter",
        }
    )
    assert container(objects)["image"] == f"{image}:1.2.3"
    assert only(objects, "Pod")["spec"]["containers"][0]["image"] == f"{image}:1.2.3"
    settings = operator_settings(env_of(objects), monkeypatch)
    assert settings.exporter_image == f"{image}-exporter:{__version__}"


def test_pull_secrets_are_the_operators_and_the_test_pods() -> None:
    objects = render(chart.CHART / "ci" / "private-registry-values.yaml")
    secrets = [{"name": "mirror-pull"}]
    assert only(objects, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == secrets
    assert only(objects, "Pod")["spec"]["imagePullSecrets"] == secrets
    assert container(objects)["image"].startswith("registry.example.com/mirror/prosody-operator/")


# --- Security contexts --------------------------------------------------------------------------

FIXED_IDS = {"runAsUser", "runAsGroup", "fsGroup"}
OPENSHIFT_API = "security.openshift.io/v1"


def _contexts(objects: list[dict]) -> list[dict]:
    """The pod and container securityContexts of the operator's pod and the test pod."""
    pods = [only(objects, "Deployment")["spec"]["template"]["spec"], only(objects, "Pod")["spec"]]
    return [
        c for pod in pods for c in (pod["securityContext"], pod["containers"][0]["securityContext"])
    ]


@pytest.mark.parametrize(
    ("mode", "api_versions", "fixed_ids"),
    [
        ("auto", (), True),
        ("auto", (OPENSHIFT_API,), False),
        ("force", (), False),
        ("disabled", (OPENSHIFT_API,), True),
    ],
)
def test_openshift_mode_leaves_ids_to_the_scc_and_keeps_run_as_non_root(
    mode: str, api_versions: tuple[str, ...], fixed_ids: bool
) -> None:
    """With OpenShift's API (`auto`) or `force`: no fixed UID, GID or fsGroup anywhere."""
    objects = render(
        chart.CHART / "ci" / "security-context-values.yaml",
        api_versions=api_versions,
        **{"global.compatibility.openshift.adaptSecurityContext": mode},
    )
    contexts = _contexts(objects)
    assert all(c["runAsNonRoot"] is True for c in contexts)
    pod_ids = {k for k in contexts[0] if k in FIXED_IDS}
    assert pod_ids == (FIXED_IDS if fixed_ids else set())
    if not fixed_ids:
        assert not [c for c in contexts if FIXED_IDS & c.keys()]


@pytest.mark.parametrize(
    ("mode", "api_versions", "fixed_ids"),
    [("auto", (), True), ("auto", (OPENSHIFT_API,), False), ("force", (), False)],
)
def test_openshift_mode_reaches_the_sidecars_security_context(
    mode: str, api_versions: tuple[str, ...], fixed_ids: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator builds the sidecar from its setting, which the chart renders from
    sidecar.securityContext the same way as the operator's own contexts."""
    objects = render(
        chart.CHART / "ci" / "security-context-values.yaml",
        api_versions=api_versions,
        **{"global.compatibility.openshift.adaptSecurityContext": mode},
    )
    context = operator_settings(env_of(objects), monkeypatch).sidecar_security_context
    assert context["runAsNonRoot"] is True
    assert {k for k in context if k in FIXED_IDS} == (
        {"runAsUser", "runAsGroup"} if fixed_ids else set()
    )
    interval = EffectiveInterval(60.0, 60.0, "x")
    sidecar = builders.build_sidecar_container(
        operator_settings(env_of(objects), monkeypatch),
        ann.Overrides(),
        [],
        interval,
        upstream_url=DEFAULT_UPSTREAM_URL,
    )
    assert sidecar["securityContext"] == context


def test_sidecar_security_context_defaults_to_the_operators_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chart's default and the operator's own (without the chart) are the same context."""
    settings = operator_settings(env_of(render()), monkeypatch)
    assert settings.sidecar_security_context == RESTRICTED_SIDECAR


def _schema_keys(definition: dict[str, Any]) -> dict[str, Any]:
    """A schema definition's properties, their enums where they have one."""
    return {k: v.get("enum") for k, v in definition["properties"].items()}


def test_schema_and_settings_accept_the_same_fields() -> None:
    """What the schema lets through reaches the operator, whose settings must accept it too
    (or it would exit at start-up on a value helm accepted)."""
    definitions = json.loads((chart.CHART / "values.schema.json").read_text())["definitions"]
    relabel, relabel_types = (
        _schema_keys(definitions["relabelConfig"]),
        typing.get_type_hints(RelabelConfig),
    )
    assert relabel.keys() == relabel_types.keys()
    assert relabel["action"] == list(typing.get_args(relabel_types["action"]))
    context, context_types = (
        _schema_keys(definitions["securityContext"]),
        typing.get_type_hints(SecurityContext),
    )
    assert context.keys() == context_types.keys()
    assert context["procMount"] == list(typing.get_args(context_types["procMount"]))


def test_security_contexts_are_the_values() -> None:
    values_file = chart.CHART / "ci" / "security-context-values.yaml"
    operator_values = yaml.safe_load(values_file.read_text())["operator"]
    pod, container_, test_pod, test_container = _contexts(render(values_file))
    assert pod == test_pod == operator_values["podSecurityContext"]
    assert container_ == test_container == operator_values["securityContext"]
    default_pod, default_container, _, _ = _contexts(render())
    assert default_pod["runAsUser"] == default_pod["runAsGroup"] == 65532
    assert default_container == RESTRICTED_CONTAINER


# --- helm test ------------------------------------------------------------------------------


def _arguments(pod: dict) -> dict[str, str]:
    args = pod["spec"]["containers"][0]["args"][1:]
    return dict(arg.removeprefix("--").split("=", 1) for arg in args)


def test_helm_test_pod_runs_the_check_against_this_release() -> None:
    objects = render()
    pod = only(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "hook-succeeded" in pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    (test,) = pod["spec"]["containers"]
    assert test["image"] == container(objects)["image"]  # nothing else to pull
    assert test["command"] == ["python", "-c"]
    assert test["args"][0] == (chart.CHART / "files" / "helm_test.py").read_text()
    deployment = only(objects, "Deployment")
    assert _arguments(pod) == {
        "namespace": NAMESPACE,
        "deployment": deployment["metadata"]["name"],
        "service": webhook_service(objects)["metadata"]["name"],
        "webhook-configuration": only(objects, "MutatingWebhookConfiguration")["metadata"]["name"],
    }
    assert pod["spec"]["restartPolicy"] == "Never"
    # Never behind the webhook Service or counted by the disruption budget.
    labels = pod["metadata"]["labels"].items()
    assert not webhook_service(objects)["spec"]["selector"].items() <= labels
    assert not deployment["spec"]["selector"]["matchLabels"].items() <= labels


def test_helm_test_may_read_only_the_operator_and_its_webhook_configuration() -> None:
    objects = render()
    pod = only(objects, "Pod")
    account = pod["spec"]["serviceAccountName"]
    test_objects = [o for o in objects if _is_test(o)]
    bindings = [o for o in test_objects if o["kind"].endswith("Binding")]
    rules = {o["kind"]: o["rules"] for o in test_objects if o["kind"] in ("Role", "ClusterRole")}
    assert rules == {
        "Role": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "resourceNames": [only(objects, "Deployment")["metadata"]["name"]],
                "verbs": ["get"],
            }
        ],
        "ClusterRole": [
            {
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": [_arguments(pod)["webhook-configuration"]],
                "verbs": ["get"],
            }
        ],
    }
    assert sorted(b["kind"] for b in bindings) == ["ClusterRoleBinding", "RoleBinding"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
    disabled = render(**{"test.enabled": False})
    assert [o for o in disabled if _is_test(o)] == []
    assert len(disabled) == len(objects) - len(test_objects)


# --- Versions, CHANGELOG and Artifact Hub -------------------------------------------------------

CHANGELOG = chart.REPO_ROOT / "CHANGELOG.md"
CHANGE_KINDS = {"added", "changed", "deprecated", "removed", "fixed", "security"}


def _chart_yaml() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    return loaded


def _changelog() -> dict[str, dict[str, list[str]]]:
    """{version: {section: lines}} from CHANGELOG.md's `## version` and `### section` headings."""
    versions: dict[str, dict[str, list[str]]] = {}
    section: list[str] = []
    for line in CHANGELOG.read_text().splitlines():
        if line.startswith("## "):
            sections: dict[str, list[str]] = {}
            versions[line[3:].split()[0]] = sections
        elif line.startswith("### "):
            section = sections.setdefault(line[4:].strip(), [])
        elif line.strip() and versions:
            section.append(line)
    return versions


def test_chart_and_app_versions_move_together() -> None:
    from prosody_exporter import __version__ as exporter_version

    meta = _chart_yaml()
    newest = next(iter(_changelog()))
    assert meta["version"] == meta["appVersion"] == __version__ == exporter_version == newest


def test_every_version_has_an_upgrade_note() -> None:
    for version, sections in _changelog().items():
        assert sections.get("Upgrading"), f"CHANGELOG.md {version}: no ### Upgrading note"
        assert set(sections) - {"Upgrading"} <= {kind.title() for kind in CHANGE_KINDS}, version


def test_artifact_hub_changes_are_this_versions_changelog() -> None:
    meta = _chart_yaml()
    changes = yaml.safe_load(meta["annotations"]["artifacthub.io/changes"])
    entries = [
        {"kind": section.lower(), "description": line.removeprefix("- ")}
        for section, lines in _changelog()[meta["version"]].items()
        if section != "Upgrading"
        for line in lines
    ]
    assert changes == entries
    assert {change["kind"] for change in changes} <= CHANGE_KINDS


def test_artifact_hub_images_are_what_the_defaults_run(monkeypatch: pytest.MonkeyPatch) -> None:
    annotations = _chart_yaml()["annotations"]
    images = {i["name"]: i["image"] for i in yaml.safe_load(annotations["artifacthub.io/images"])}
    objects = render()
    settings = operator_settings(env_of(objects), monkeypatch)
    assert images == {
        "prosody-operator": container(objects)["image"],
        "prosody-exporter": settings.exporter_image,
    }
    assert annotations["artifacthub.io/operator"] == "true"
    links = yaml.safe_load(annotations["artifacthub.io/links"])
    assert links and all(link["url"].startswith("https://") for link in links)
    assert annotations["artifacthub.io/license"]


# --- The Grafana dashboard ------------------------------------------------------------------


def test_dashboard_is_up_to_date() -> None:
    assert dashboard.DASHBOARD.read_text() == dashboard.render(), "run `python -m tools.dashboard`"


def test_dashboard_queries_follow_the_variables() -> None:
    """Every series a panel reads is narrowed to the chosen namespaces, workloads and pods, and
    each variable narrows the next (namespace -> workload -> pod -> host)."""
    board = json.loads(dashboard.DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == [
        "datasource", "namespace", "workload", "pod", "host", "operator_namespace"
    ]  # fmt: skip
    assert "$namespace" in variables["workload"]["query"]
    assert "$workload" in variables["pod"]["query"]
    assert "$pod" in variables["host"]["query"]
    scoped = {
        "namespace": ("=~", "$namespace"),
        "service": ("=~", "($workload)-prosody-metrics"),
        "pod": ("=~", "$pod"),
    }
    operator_scoped = {"namespace": ("=~", "$operator_namespace")}  # the operator's own row
    for panel in board["panels"]:
        if panel["type"] == "row":
            in_operator_row = panel["title"] == "prosody-operator"
            continue
        for target in panel["targets"]:
            for selector in promql.selectors(target["expr"]):
                for label, matcher in (operator_scoped if in_operator_row else scoped).items():
                    assert selector.matcher(label) == matcher, (panel["title"], label)


def test_dashboard_rows_cover_prosody_and_keep_the_exporter_as_one_row() -> None:
    board = json.loads(dashboard.DASHBOARD.read_text())
    rows: dict[str, list[str]] = {}
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            current += [t["expr"] for t in panel["targets"]]
    exporter_rows = [t for t, exprs in rows.items() if any("prosody_exporter_" in e for e in exprs)]
    assert exporter_rows == ["prosody-exporter (the sidecar)"]
    prosody = " ".join(e for t, exprs in rows.items() if t not in exporter_rows for e in exprs)
    for family in (
        "prosody_mod_c2s__connections",
        "prosody_mod_c2s__encrypted_total",
        "prosody_mod_s2s__connections_inbound",
        "prosody_mod_s2s__connections_outbound",
        "prosody_mod_s2s__encrypted_total",
        "prosody_mod_s2s__authenticated_total",
        "prosody_stats_collection_seconds_bucket",
        "prosody_stats_processing_seconds_bucket",
        "prosody_mod_bosh__active_sessions",
        "prosody_mod_muc__live_room",
        "prosody_mod_http_file_share__upload_bytes_count",
        "prosody_dns_seconds_bucket",
    ):
        assert family in prosody, family
    for label in ("type", "host", "ip_family"):
        assert f"sum by ({label}) (prosody_mod_c2s__connections" in prosody, label
