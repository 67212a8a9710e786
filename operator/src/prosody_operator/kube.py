"""The only module that talks to the Kubernetes API (besides kopf's own watching).

Writes are server-side applies with one field manager; objects carry a hash of their inputs, and
an unchanged hash means no write at all.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import annotations as ann

log = logging.getLogger("prosody_operator")

FIELD_MANAGER = "prosody-operator"
APPLY = "application/apply-patch+yaml"
SM_GROUP, SM_VERSION, SM_PLURAL = "monitoring.coreos.com", "v1", "servicemonitors"
T = TypeVar("T")


class NoCredentials(RuntimeError):
    """Neither a pod's service account nor a kubeconfig to reach the API server with."""


def load_config() -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()
        except kubernetes.config.ConfigException as error:
            raise NoCredentials(
                f"not in a pod with a service account token, and no kubeconfig ({error})"
            ) from error


@dataclass(frozen=True)
class Applied:
    previous: dict[str, Any] | None  # the object as it was; None when it was created

    @property
    def created(self) -> bool:
        return self.previous is None


def _or_none(read: Callable[[], T]) -> T | None:
    """The object, or None when it does not exist."""
    try:
        return read()
    except ApiException as error:
        if error.status == 404:
            return None
        raise


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self.client = api_client or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.admission = kubernetes.client.AdmissionregistrationV1Api(self.client)

    # --- reads ---------------------------------------------------------------------------

    def configmap_data(self, namespace: str, names: set[str]) -> dict[str, dict[str, str]]:
        """The data of each named ConfigMap that exists (a missing one is simply absent)."""
        found = {}
        for name in sorted(names):
            configmap = _or_none(partial(self.core.read_namespaced_config_map, name, namespace))
            if configmap is not None:
                found[name] = dict(configmap.data or {})
        return found

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        deployment = _or_none(lambda: self.apps.read_namespaced_deployment(name, namespace))
        found: dict[str, Any] | None = self.client.sanitize_for_serialization(deployment)
        return found

    def replicaset_owner(self, namespace: str, name: str) -> str | None:
        """The Deployment owning a ReplicaSet, if any."""
        replicaset = _or_none(lambda: self.apps.read_namespaced_replica_set(name, namespace))
        metadata = replicaset.metadata if replicaset else None
        for owner in (metadata and metadata.owner_references) or []:
            if owner.kind == "Deployment":
                return str(owner.name)
        return None

    def namespace_labels(self, name: str) -> dict[str, str]:
        namespace = self.core.read_namespace(name)
        return dict((namespace.metadata and namespace.metadata.labels) or {})

    def node_pod_cidrs(self) -> list[str]:
        """Every Node's spec.podCIDRs, read directly (the index may still be filling)."""
        cidrs = []
        for node in self.core.list_node().items:
            spec = node.spec
            if spec is not None:
                cidrs += spec.pod_cidrs or ([spec.pod_cidr] if spec.pod_cidr else [])
        return cidrs

    def pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        pods = self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        return [self.client.sanitize_for_serialization(pod) for pod in pods.items]

    # --- writes --------------------------------------------------------------------------

    def _current(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        if obj["kind"] == "Service":
            service = _or_none(lambda: self.core.read_namespaced_service(name, namespace))
            found: dict[str, Any] | None = self.client.sanitize_for_serialization(service)
            return found
        monitor: Any = _or_none(
            lambda: self.custom.get_namespaced_custom_object(
                SM_GROUP, SM_VERSION, namespace, SM_PLURAL, name
            )
        )
        return dict(monitor) if monitor else None

    def ensure(self, obj: dict[str, Any]) -> Applied | None:
        """Make the object look like `obj`; None when it already did (then nothing is written)."""
        current = self._current(obj)
        annotations = ((current or {}).get("metadata") or {}).get("annotations") or {}
        if annotations.get(ann.INPUTS_HASH) == obj["metadata"]["annotations"][ann.INPUTS_HASH]:
            return None
        try:
            self._apply(obj)
        except ApiException as error:
            if error.status == 403 and "being terminated" in str(error.body):
                return None  # the namespace is going away, and the object with it
            raise
        return Applied(previous=current)

    def _apply(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if obj["kind"] == "Service":
            self.core.patch_namespaced_service(
                meta["name"],
                meta["namespace"],
                obj,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY,
            )
        else:
            self.custom.patch_namespaced_custom_object(
                SM_GROUP,
                SM_VERSION,
                meta["namespace"],
                SM_PLURAL,
                meta["name"],
                obj,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY,
            )

    def delete_metrics_objects(self, namespace: str, name: str) -> bool:
        """Delete the Service and ServiceMonitor named `name`; False when neither existed."""
        deleted = False
        for delete in (
            lambda: self.core.delete_namespaced_service(name, namespace),
            lambda: self.custom.delete_namespaced_custom_object(
                SM_GROUP, SM_VERSION, namespace, SM_PLURAL, name
            ),
        ):
            try:
                delete()
                deleted = True
            except ApiException as error:
                if error.status != 404:
                    raise
        return deleted

    def restart_rollout(self, namespace: str, name: str) -> None:
        """What `kubectl rollout restart` does."""
        now = datetime.datetime.now(datetime.UTC).isoformat()
        patch = {
            "spec": {
                "template": {
                    "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}
                }
            }
        }
        self.apps.patch_namespaced_deployment(name, namespace, patch)

    def apply_webhook_configuration(self, configuration: dict[str, Any]) -> None:
        self.admission.patch_mutating_webhook_configuration(
            configuration["metadata"]["name"],
            configuration,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )

    def post_event(
        self, involved: Mapping[str, Any], event_type: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event on the object, as `kubectl describe` shows them."""
        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=meta["namespace"]
            ),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=involved.get("apiVersion", "apps/v1"),
                kind=involved.get("kind", "Deployment"),
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            type=event_type,
            reason=reason,
            message=message[:1024],
            source=kubernetes.client.V1EventSource(component=FIELD_MANAGER),
            reporting_component=FIELD_MANAGER,
            reporting_instance=FIELD_MANAGER,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as error:  # an Event is never worth failing the work it reports on
            log.warning("could not post event %s on %s: %s", reason, meta["name"], error.reason)
