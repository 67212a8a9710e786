"""ResourceQuotas that require every container to state a resource (pure).

A quota on `limits.cpu` (or `limits.memory`, `requests.cpu`, `cpu`...) makes the API server reject
every pod with a container that does not set it: "failed quota: ...: must specify limits.cpu for:
prosody-exporter". The sidecar sets no CPU limit by default, so in such a namespace injecting it
would keep Prosody's pods from being created at all; the webhook admits them without it instead,
and says why (planner.plan_admission).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The quota's resources that each container must set (the API server's pod evaluator), and what
# of a container's resources sets each.
_SET_BY = {
    "requests.cpu": ("requests", "cpu"),
    "cpu": ("requests", "cpu"),
    "requests.memory": ("requests", "memory"),
    "memory": ("requests", "memory"),
    "limits.cpu": ("limits", "cpu"),
    "limits.memory": ("limits", "memory"),
}


@dataclass(frozen=True)
class Requirement:
    quota: str  # the ResourceQuota's name
    resources: frozenset[str]  # e.g. {"limits.cpu", "requests.memory"}


def requirement(quota: Mapping[str, Any]) -> Requirement | None:
    """What a ResourceQuota requires of every container, if anything. Its scopes are not
    considered: a Prosody pod is neither BestEffort nor Terminating, the scopes that could
    spare it."""
    hard = ((quota.get("spec") or {}).get("hard") or {}).keys()
    resources = frozenset(hard) & _SET_BY.keys()
    return Requirement(quota["metadata"]["name"], resources) if resources else None


def unmet(requirements: Iterable[Requirement], resources: Mapping[str, Any]) -> str | None:
    """Why a container with these resources would be rejected, if it would."""
    limits = resources.get("limits") or {}
    requests = {**limits, **(resources.get("requests") or {})}  # a limit alone sets the request
    has = {"requests": requests, "limits": limits}
    for found in sorted(requirements, key=lambda r: r.quota):
        missing = sorted(r for r in found.resources if _SET_BY[r][1] not in has[_SET_BY[r][0]])
        if missing:
            return (
                f"ResourceQuota {found.quota} requires {', '.join(missing)} of every container "
                "and the sidecar sets none: set the chart's sidecar.resources (or the pod's "
                "prosody-operator.io/resources annotation)"
            )
    return None
