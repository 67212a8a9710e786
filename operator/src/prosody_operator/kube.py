"""The only module that talks to the Kubernetes API (besides kopf's own watching).

Writes are server-side applies with one field manager, and deletes with the uid of the object
that was observed, so an object replaced in the meantime is left alone.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from .events import Event
from .workloads import KINDS, ObjectRef

log = logging.getLogger("prosody_operator")

FIELD_MANAGER = "prosody-operator"
APPLY = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
MONITORING_GROUP, MONITORING_VERSION = "monitoring.coreos.com", "v1"
MONITOR_PLURALS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors"}
T = TypeVar("T")


class NoCredentials(RuntimeError):
    """Neither a pod's service account nor a kubeconfig to reach the API server with."""


class NameTaken(Exception):
    """An apply meant to create an object met one of that name (or could not be made)."""


class NamespaceTerminating(Exception):
    """The namespace is being deleted, and everything in it with it."""


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


def retryable(error: BaseException) -> bool:
    """A failure that passes: the API server unreachable or restarting, overloaded (429), a
    conflict (409), a server error (5xx)."""
    if isinstance(error, ApiException):
        status = error.status or 0
        return status in (0, 409, 429) or status >= 500
    return isinstance(error, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _or_none(read: Callable[[], T]) -> T | None:
    """The object, or None when it does not exist."""
    try:
        return read()
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _model(model: Any, body: dict[str, Any]) -> Any:
    """The client's model of a plain object (its typed write methods take no dict)."""
    found = model.from_dict(body)
    if found is None:
        raise ValueError(f"not a {model.__name__}: {body!r}")
    return found


def _unless_conflict(write: Callable[[], object]) -> bool:
    """The write, or False when the API server answers 409 (it raced another writer)."""
    try:
        write()
    except ApiException as error:
        if error.status == 409:
            return False
        raise
    return True


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self.client = api_client or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.admission = kubernetes.client.AdmissionregistrationV1Api(self.client)
        self.coordination = kubernetes.client.CoordinationV1Api(self.client)
        self.discovery = kubernetes.client.DiscoveryV1Api(self.client)

    def _plain(self, obj: Any) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.client.sanitize_for_serialization(obj)
        return found

    # --- reads ---------------------------------------------------------------------------

    def workload(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Deployment, StatefulSet or DaemonSet, as plain JSON."""
        spec = KINDS[kind]
        found: Any = _or_none(
            lambda: self.custom.get_namespaced_custom_object(
                spec.group, spec.version, namespace, spec.plural, name
            )
        )
        return dict(found) if found else None

    def metrics_objects(
        self, namespace: str, name: str, kinds: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """The objects named `name` of these kinds (Service, ServiceMonitor, PodMonitor) that
        exist, by kind."""
        found: dict[str, Any] = {}
        for kind in sorted(set(kinds)):
            if kind == "Service":
                service = _or_none(partial(self.core.read_namespaced_service, name, namespace))
                found[kind] = self._plain(service)
            else:
                plural = MONITOR_PLURALS[kind]
                read: Callable[[], Any] = partial(
                    self.custom.get_namespaced_custom_object,
                    MONITORING_GROUP, MONITORING_VERSION, namespace, plural, name,
                )  # fmt: skip
                found[kind] = dict(_or_none(read) or {})
        return {kind: obj for kind, obj in found.items() if obj}

    def configmap_data(self, namespace: str, names: set[str]) -> dict[str, dict[str, str]]:
        """The data of each named ConfigMap that exists (a missing one is simply absent)."""
        found = {}
        for name in sorted(names):
            configmap = _or_none(partial(self.core.read_namespaced_config_map, name, namespace))
            if configmap is not None:
                found[name] = dict(configmap.data or {})
        return found

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

    def pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        return [self.client.sanitize_for_serialization(pod) for pod in pods.items]

    def has_ready_endpoint(self, namespace: str, service: str) -> bool | None:
        """Whether one of the Service's EndpointSlices has a ready endpoint, one the API server
        would call (an unset `ready` counts as ready, as it counts it). None when the operator
        may not list them (RBAC older than the operator): not known."""
        try:
            slices = self.discovery.list_namespaced_endpoint_slice(
                namespace, label_selector=f"kubernetes.io/service-name={service}"
            )
        except ApiException as error:
            if error.status != 403:
                raise
            log.warning("may not list EndpointSlices in %s: %s", namespace, error.reason)
            return None
        return any(
            endpoint.conditions is None or endpoint.conditions.ready is not False
            for found in slices.items
            for endpoint in found.endpoints or ()
        )

    # --- writes --------------------------------------------------------------------------

    def apply(self, obj: dict[str, Any], force: bool = True) -> dict[str, Any]:
        """Server-side apply a Service, ServiceMonitor or PodMonitor (creating it if need be);
        returns the object written. Without `force`, NameTaken when another manager holds a
        field we set (someone else's object of that name: its selector, endpoints, ClusterIP
        differ) instead of taking it over."""
        meta = obj["metadata"]
        apply: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": force}
        written: Any
        try:
            if obj["kind"] == "Service":
                written = self._plain(
                    self.core.patch_namespaced_service(
                        meta["name"], meta["namespace"], obj, _content_type=APPLY, **apply
                    )
                )
            else:
                # Read raw: the client answers None for a custom object applied.
                response: Any = self.custom.patch_namespaced_custom_object(
                    MONITORING_GROUP, MONITORING_VERSION, meta["namespace"],
                    MONITOR_PLURALS[obj["kind"]], meta["name"], obj,
                    _content_type=APPLY, _preload_content=False, **apply,
                )  # fmt: skip
                written = json.loads(response.data)
            return dict(written or {})
        except ApiException as error:
            if error.status == 403 and "being terminated" in str(error.body):
                raise NamespaceTerminating(meta["namespace"]) from None
            if not force and error.status in (409, 422):
                raise NameTaken(f"{obj['kind']} {meta['namespace']}/{meta['name']}") from error
            raise

    def delete(self, obj: Mapping[str, Any]) -> bool:
        """Delete the object observed (not one made since with the same name). False when
        another object holds its name by now."""
        meta = obj["metadata"]
        options = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=meta["uid"])
        )
        try:
            if obj["kind"] == "Service":
                self.core.delete_namespaced_service(meta["name"], meta["namespace"], body=options)
            else:
                self.custom.delete_namespaced_custom_object(
                    MONITORING_GROUP, MONITORING_VERSION, meta["namespace"],
                    MONITOR_PLURALS[obj["kind"]], meta["name"], body=options,
                )  # fmt: skip
        except ApiException as error:
            if error.status == 409:  # replaced: not ours to delete any more
                return False
            if error.status != 404:  # 404: gone already
                raise
        return True

    def restart_rollout(self, workload: ObjectRef) -> None:
        """What `kubectl rollout restart` does."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        patch = {
            "spec": {
                "template": {
                    "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}
                }
            }
        }
        spec = KINDS[workload.kind]
        self.custom.patch_namespaced_custom_object(
            spec.group, spec.version, workload.namespace, spec.plural, workload.name, patch,
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    def webhook_configuration(self, name: str) -> dict[str, Any] | None:
        read = self.admission.read_mutating_webhook_configuration
        return self._plain(_or_none(lambda: read(name)))

    def apply_webhook_configuration(self, configuration: dict[str, Any]) -> None:
        self.admission.patch_mutating_webhook_configuration(
            configuration["metadata"]["name"],
            configuration,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )

    def post_event(self, involved: ObjectRef, event: Event) -> bool:
        """A core/v1 Event on the object, as `kubectl describe` shows them."""
        now = datetime.datetime.now(datetime.UTC)
        body = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(
                generate_name=f"{involved.name}.", namespace=involved.namespace
            ),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=involved.api_version,
                kind=involved.kind,
                name=involved.name,
                namespace=involved.namespace,
                uid=involved.uid,
            ),
            type=event.type,
            reason=event.reason,
            message=event.message[:1024],
            source=kubernetes.client.V1EventSource(component=FIELD_MANAGER),
            reporting_component=FIELD_MANAGER,
            reporting_instance=FIELD_MANAGER,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event(involved.namespace, body)
        except ApiException as error:  # an Event is never worth failing the work it reports on
            log.warning("could not post event %s on %s: %s", event.reason, involved, error.reason)
            return False
        return True

    def posted_events(self, namespaces: list[str]) -> list[tuple[str, str, str]]:
        """(involved object's uid, reason, message) of the Events the operator posted that the
        API server still keeps (in `namespaces`, or all): so that a restart posts none again."""
        found = []
        selector = f"source={FIELD_MANAGER}"
        everywhere: list[str | None] = [None]
        for namespace in namespaces or everywhere:
            token = None
            while True:
                if namespace is None:
                    page = self.core.list_event_for_all_namespaces(
                        field_selector=selector, limit=500, _continue=token
                    )
                else:
                    page = self.core.list_namespaced_event(
                        namespace, field_selector=selector, limit=500, _continue=token
                    )
                for event in page.items:
                    uid = event.involved_object.uid if event.involved_object else None
                    if uid:
                        found.append((uid, event.reason or "", event.message or ""))
                token = page.metadata._continue if page.metadata else None
                if not token:
                    break
        return found

    # --- leader election and the shared webhook certificate ---------------------------------

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._plain(
            _or_none(lambda: self.coordination.read_namespaced_lease(name, namespace))
        )

    def create_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        """False when another replica created it first."""
        return _unless_conflict(
            lambda: self.coordination.create_namespaced_lease(
                namespace, _model(kubernetes.client.V1Lease, body)
            )
        )

    def replace_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        """False when the Lease changed since it was read (its resourceVersion)."""
        return _unless_conflict(
            lambda: self.coordination.replace_namespaced_lease(
                body["metadata"]["name"], namespace, _model(kubernetes.client.V1Lease, body)
            )
        )

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._plain(_or_none(lambda: self.core.read_namespaced_secret(name, namespace)))

    def replace_secret(self, namespace: str, body: dict[str, Any]) -> bool:
        """False when the Secret changed since it was read (its resourceVersion)."""
        return _unless_conflict(
            lambda: self.core.replace_namespaced_secret(
                body["metadata"]["name"], namespace, _model(kubernetes.client.V1Secret, body)
            )
        )
