"""What the planner decides from: everything one decision needs, read beforehand (plain,
immutable values; the controller reads them, the planner never reads anything)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .quotas import Requirement
from .selection import PrometheusSelectors
from .workloads import ObjectRef

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Workload:
    """A Deployment, StatefulSet or DaemonSet as last seen, and what surrounds it."""

    body: Obj  # the workload object (its pod template is spec.template)
    namespace_labels: Mapping[str, str]
    # The data of the ConfigMaps its Prosody container mounts, by name (missing ones absent).
    configmaps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # The live objects named as ours for it, by kind ("Service", "ServiceMonitor"); absent: none.
    owned: Mapping[str, Obj] = field(default_factory=dict)
    prometheuses: tuple[PrometheusSelectors, ...] = ()
    pods: tuple[Obj, ...] = ()  # its pods, for the sidecar check
    now: float = 0.0  # seconds since the epoch
    # Whether the webhook Service has a ready endpoint (so that pods created now get the
    # sidecar); None: not known (no webhook Service set, or not read: it is read only when a
    # rollout restart is planned).
    webhook_ready: bool | None = None


@dataclass(frozen=True)
class Admission:
    """A pod being created, and what surrounds it."""

    pod: Obj
    namespace_labels: Mapping[str, str]
    workload: ObjectRef | None  # the workload the pod belongs to, if any
    # The workload's own annotations (empty for a bare pod, or one whose workload is unknown).
    workload_annotations: Mapping[str, str]
    configmaps: Mapping[str, Mapping[str, str]]
    node_cidrs: tuple[str, ...]
    # What the ResourceQuotas of its namespace require of every container.
    quotas: tuple[Requirement, ...] = ()
