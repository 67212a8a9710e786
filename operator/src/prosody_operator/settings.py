"""Operator settings: environment variables `PROSODY_OPERATOR_*` (the chart sets them)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

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

    _lists = field_validator("pod_cidrs", "extra_cidrs", "watch_namespaces", mode="before")(
        _split_list
    )
    _names = field_validator("watch_namespaces")(_namespaces)
    _labels = field_validator("service_monitor_labels", mode="before")(_parse_labels)
