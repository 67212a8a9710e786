"""Operator settings: environment variables `PROSODY_OPERATOR_*` (the chart sets them)."""

from __future__ import annotations

import copy
import json
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, IPvAnyNetwork, ValidationInfo, field_validator, with_config
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import TypedDict

from . import __version__
from .annotations import quantity
from .intervals import parse_duration

ENV_PREFIX = "PROSODY_OPERATOR_"

Networks = Annotated[list[IPvAnyNetwork], NoDecode]
Labels = Annotated[dict[str, str], NoDecode]
Names = Annotated[list[str], NoDecode]
# A namespace name: an RFC 1123 label.
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item for item in re.split(r"[,\s]+", value) if item]
    return value


def _namespaces(value: list[str]) -> list[str]:
    for name in value:
        if not NAMESPACE.match(name):
            raise ValueError(f"{name!r} is not a namespace name")
    return sorted(set(value))


def _quantity(value: str) -> str:
    """A resource quantity, or empty for none."""
    if value:
        quantity(value)
    return value


def _not_below_request(value: str, info: ValidationInfo) -> str:
    """The API server rejects a pod whose request is above its limit: so would every pod be."""
    resource = (info.field_name or "").removeprefix("sidecar_").removesuffix("_limit")
    request = info.data.get(f"sidecar_{resource}_request")
    if value and request and quantity(request) > quantity(value):
        raise ValueError(f"{value} is below the {resource} request {request}")
    return value


def _reference(value: str) -> str:
    """`namespace/name`, or empty."""
    namespace, slash, name = value.partition("/")
    if value and not (slash and NAMESPACE.match(namespace) and name):
        raise ValueError(f"{value!r}: expected namespace/name")
    return value


def _parse_labels(value: Any) -> Any:
    """`a=b,c=d` or a JSON object."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    pairs = [item.split("=", 1) for item in re.split(r"[,\s]+", text) if item]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{value!r}: expected key=value pairs separated by commas")
    return dict(pairs)


# --- The monitors' and the sidecar's settings, JSON in the environment (the chart renders them
# from its values), checked as strictly as the Prometheus Operator's and Kubernetes' schemas do,
# so a typo exits the operator instead of being dropped by the API server.

MonitorKind = Literal["ServiceMonitor", "PodMonitor"]
STRICT = ConfigDict(extra="forbid", strict=True)
LabelName = Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]
UnixId = Annotated[int, Field(ge=0)]


@with_config(STRICT)
class RelabelConfig(TypedDict, total=False):
    """prometheus-operator's RelabelConfig (monitoring.coreos.com/v1)."""

    sourceLabels: list[LabelName]
    separator: str
    targetLabel: str
    regex: str
    modulus: Annotated[int, Field(ge=0)]
    replacement: str
    action: Literal[
        "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
        "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
        "dropequal", "DropEqual",
    ]  # fmt: skip


@with_config(STRICT)
class Capabilities(TypedDict, total=False):
    add: list[str]
    drop: list[str]


@with_config(STRICT)
class Profile(TypedDict, total=False):
    type: Literal["RuntimeDefault", "Unconfined", "Localhost"]
    localhostProfile: str


@with_config(STRICT)
class SELinuxOptions(TypedDict, total=False):
    user: str
    role: str
    type: str
    level: str


@with_config(STRICT)
class SecurityContext(TypedDict, total=False):
    """A container's securityContext (core/v1 SecurityContext, Linux fields)."""

    runAsNonRoot: bool
    runAsUser: UnixId
    runAsGroup: UnixId
    readOnlyRootFilesystem: bool
    allowPrivilegeEscalation: bool
    privileged: bool
    capabilities: Capabilities
    procMount: Literal["Default", "Unmasked"]
    seccompProfile: Profile
    appArmorProfile: Profile
    seLinuxOptions: SELinuxOptions
    windowsOptions: dict[str, Any]


# The sidecar's default: passes Pod Security "restricted". The image's user is 65532.
RESTRICTED_SIDECAR: SecurityContext = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _json(value: Any) -> Any:
    """A JSON value from the environment; an empty string is an empty list."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from None


def _duration(value: Any) -> Any:
    """A duration (10s, 1m30s, 500ms) or seconds; empty: none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return parse_duration(value)


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    watch_namespaces: Names = Field(
        default_factory=list,
        description="Namespaces the operator serves (webhook and reconciler); empty: all.",
    )
    exporter_image: str = Field(
        f"ghcr.io/prosody-operator/prosody-exporter:{__version__}",
        description="Image of the injected sidecar.",
    )
    exporter_port: int = Field(9755, ge=1, le=65535, description="Sidecar's metrics port.")
    manual_interval: float = Field(
        30.0,
        gt=0,
        description='Scrape interval, in seconds, for Prosody with statistics_interval = "manual".',
    )
    pod_cidrs: Networks = Field(
        default_factory=list,
        description="Replaces the pod-network CIDRs read from the Nodes' spec.podCIDRs.",
    )
    extra_cidrs: Networks = Field(
        default_factory=list,
        description="Added to the pod-network CIDRs in every sidecar's allowlist.",
    )
    service_monitor_labels: Labels = Field(
        default_factory=dict,
        description="Labels on every ServiceMonitor, so a Prometheus selects them "
        "(e.g. release=kube-prometheus-stack).",
    )
    service_monitor_enabled: bool = Field(
        True,
        description="Make a monitor (ServiceMonitor and Service, or PodMonitor) for each opted-in "
        "workload; false: inject the sidecar only, and delete the monitors made before.",
    )
    monitor_kind: MonitorKind = Field(
        "ServiceMonitor",
        description="ServiceMonitor (with a Service per workload) or PodMonitor (no Service); "
        "switching deletes the other kind.",
    )
    service_monitor_relabelings: Annotated[list[RelabelConfig], NoDecode] = Field(
        default_factory=list,
        description="JSON list of relabelings (prometheus-operator RelabelConfig) on every "
        "monitor's endpoint.",
    )
    service_monitor_metric_relabelings: Annotated[list[RelabelConfig], NoDecode] = Field(
        default_factory=list,
        description="JSON list of metricRelabelings on every monitor's endpoint.",
    )
    service_monitor_sample_limit: int = Field(
        0,
        ge=0,
        description="sampleLimit of every monitor (0: none); the sample-limit annotation "
        "overrides it.",
    )
    service_monitor_honor_labels: bool = Field(
        False, description="honorLabels on every monitor's endpoint."
    )
    service_monitor_scrape_timeout: Annotated[float | None, NoDecode] = Field(
        None,
        gt=0,
        description="scrapeTimeout of every monitor (e.g. 15s; empty: the smaller of 10 s and "
        "80 % of the interval; never above the interval); the scrape-timeout annotation "
        "overrides it.",
    )
    prometheus_scrape_annotations: bool = Field(
        False,
        description="Add prometheus.io/scrape, port, path and scheme annotations for the sidecar "
        "to injected pods (for a Prometheus without the Operator).",
    )
    sidecar_security_context: Annotated[SecurityContext, NoDecode] = Field(
        default_factory=lambda: copy.deepcopy(RESTRICTED_SIDECAR),
        description="JSON securityContext of the sidecar container (default: passes Pod "
        "Security restricted, user 65532).",
    )
    sidecar_cpu_request: str = Field("10m", description="Sidecar CPU request.")
    sidecar_memory_request: str = Field("32Mi", description="Sidecar memory request.")
    sidecar_cpu_limit: str = Field("", description="Sidecar CPU limit (empty: none).")
    sidecar_memory_limit: str = Field("104Mi", description="Sidecar memory limit.")
    restart_on_drift: bool = Field(
        False,
        description="Restart the rollout of a workload whose running pods lack the sidecar.",
    )
    health_port: int = Field(8080, ge=1, le=65535, description="Liveness endpoint port.")
    webhook_host: str = Field("0.0.0.0", description="Address the admission webhook listens on.")
    webhook_port: int = Field(9443, ge=1, le=65535, description="Admission webhook port.")
    webhook_url: str = Field(
        "",
        description="URL the API server calls, when not through the webhook Service "
        "(local runs and tests).",
    )
    webhook_service: str = Field(
        "", description="namespace/name of the webhook Service (in-cluster runs)."
    )
    webhook_configuration: str = Field(
        "prosody-operator",
        description="Name of the MutatingWebhookConfiguration the operator keeps up to date.",
    )
    evaluation_timeout: float = Field(
        3.0,
        gt=0,
        le=60,
        description="Seconds one evaluation of a Prosody config may take; past them its "
        "process is killed and a ProsodyConfig Event says so.",
    )
    evaluation_admission_wait: float = Field(
        0.2,
        ge=0,
        le=5,
        description="Seconds a pod's admission waits for a config not evaluated yet; then the "
        "sidecar is injected with the fallbacks and the reconciler follows up.",
    )
    evaluation_memory_mib: int = Field(
        128,
        ge=64,
        description="Address-space limit, in MiB, of each config evaluation process.",
    )
    evaluation_workers: int = Field(
        2, ge=1, le=16, description="Config evaluation processes (each evaluates one at a time)."
    )
    evaluation_cache_size: int = Field(
        1024,
        ge=1,
        description="Config evaluation results kept (per ConfigMap contents, env, version).",
    )
    webhook_cert_dir: str = Field(
        "",
        description="Directory with tls.crt/tls.key/ca.crt; empty: the operator makes its own.",
    )

    # -- Running in production: metrics, logs, several replicas (issue 14). --
    metrics_port: int = Field(
        8081,
        ge=1,
        le=65535,
        description="Port of the operator's own /metrics (and /readyz: the webhook serves).",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log line format: text, or json (one object per line)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    leader_election_lease: str = Field(
        "",
        description="namespace/name of the Lease whose holder reconciles (every replica serves "
        "the webhook); empty: this replica always reconciles.",
    )
    webhook_cert_secret: str = Field(
        "",
        description="namespace/name of a Secret the replicas share their self-made webhook "
        "certificate through (the first to start fills it); empty: each makes its own.",
    )
    shutdown_delay: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Seconds the webhook keeps serving after SIGTERM, not ready, while its "
        "endpoint is removed.",
    )

    _lists = field_validator("pod_cidrs", "extra_cidrs", "watch_namespaces", mode="before")(
        _split_list
    )
    _names = field_validator("watch_namespaces")(_namespaces)
    _labels = field_validator("service_monitor_labels", mode="before")(_parse_labels)
    _json_values = field_validator(
        "service_monitor_relabelings",
        "service_monitor_metric_relabelings",
        "sidecar_security_context",
        mode="before",
    )(_json)
    _durations = field_validator("service_monitor_scrape_timeout", mode="before")(_duration)
    _quantities = field_validator(
        "sidecar_cpu_request", "sidecar_memory_request", "sidecar_cpu_limit", "sidecar_memory_limit"
    )(_quantity)
    _limits = field_validator("sidecar_cpu_limit", "sidecar_memory_limit")(_not_below_request)
    _references = field_validator("leader_election_lease", "webhook_cert_secret")(_reference)
