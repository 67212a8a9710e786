"""Operator settings: environment variables `PROSODY_OPERATOR_*` (the chart sets them)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field, IPvAnyNetwork, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import __version__

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
    _references = field_validator("leader_election_lease", "webhook_cert_secret")(_reference)
