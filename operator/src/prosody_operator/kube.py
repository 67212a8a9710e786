"""The only module that talks to the Kubernetes API (besides kopf's own watching).

Writes are server-side applies with one field manager, and deletes with the uid of the object
that was observed, so an object replaced in the meantime is left alone.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from .events import Event
from .workloads import KINDS, Kind, ObjectRef

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
    """Plain REST requests through the client library's ApiClient (its configuration, auth and
    connection pool) with JSON in and out: its typed API classes cost 30 MiB of memory to
    import (CoreV1Api alone 21), a fifth of the operator's."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self.client = api_client or kubernetes.client.ApiClient()

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str | None] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """The JSON the API server answered (None for an empty answer); ApiException for a
        status other than 2xx."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        method, url, headers, serialized, _ = self.client.param_serialize(
            method, path, query_params=params, header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )  # fmt: skip
        response = self.client.call_api(method, url, headers, serialized)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else None

    def _get(self, path: str, query: Mapping[str, str | None] | None = None) -> Any:
        return self._request("GET", path, query)

    def _read(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        found: dict[str, Any] | None = _or_none(lambda: self._get(path))
        return found

    # --- reads ---------------------------------------------------------------------------

    def workload(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Deployment, StatefulSet or DaemonSet, as plain JSON."""
        return self._read(_path(KINDS[kind], namespace, name))

    def metrics_objects(
        self, namespace: str, name: str, kinds: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """The objects named `name` of these kinds (Service, ServiceMonitor, PodMonitor) that
        exist, by kind."""
        found = {
            kind: self._read(_owned_path(kind, namespace, name)) for kind in sorted(set(kinds))
        }
        return {kind: obj for kind, obj in found.items() if obj}

    def configmap_data(self, namespace: str, names: set[str]) -> dict[str, dict[str, str]]:
        """The data of each named ConfigMap that exists (a missing one is simply absent)."""
        found = {}
        for name in sorted(names):
            path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
            configmap = self._read(path)
            if configmap is not None:
                found[name] = dict(configmap.get("data") or {})
        return found

    def namespace_labels(self, name: str) -> dict[str, str]:
        namespace = self._get(f"/api/v1/namespaces/{name}")
        return dict((namespace.get("metadata") or {}).get("labels") or {})

    def node_pod_cidrs(self) -> list[str]:
        """Every Node's spec.podCIDRs, read directly (the index may still be filling)."""
        cidrs: list[str] = []
        for node in self._get("/api/v1/nodes").get("items") or []:
            spec = node.get("spec") or {}
            cidrs += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        return cidrs

    def pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = self._get(f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": label_selector})
        return list(found.get("items") or [])

    def has_ready_endpoint(self, namespace: str, service: str) -> bool | None:
        """Whether one of the Service's EndpointSlices has a ready endpoint, one the API server
        would call (an unset `ready` counts as ready, as it counts it). None when the operator
        may not list them (RBAC older than the operator): not known."""
        try:
            slices = self._get(
                f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                {"labelSelector": f"kubernetes.io/service-name={service}"},
            )
        except ApiException as error:
            if error.status != 403:
                raise
            log.warning("may not list EndpointSlices in %s: %s", namespace, error.reason)
            return None
        return any(
            (endpoint.get("conditions") or {}).get("ready") is not False
            for found in slices.get("items") or ()
            for endpoint in found.get("endpoints") or ()
        )

    # --- writes --------------------------------------------------------------------------

    def apply(self, obj: dict[str, Any], force: bool = True) -> dict[str, Any]:
        """Server-side apply a Service, ServiceMonitor or PodMonitor (creating it if need be);
        returns the object written. Without `force`, NameTaken when another manager holds a
        field we set (someone else's object of that name: its selector, endpoints, ClusterIP
        differ) instead of taking it over."""
        meta = obj["metadata"]
        query = {"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"}
        path = _owned_path(obj["kind"], meta["namespace"], meta["name"])
        try:
            written = self._request("PATCH", path, query, obj, APPLY)
        except ApiException as error:
            if error.status == 403 and "being terminated" in str(error.body):
                raise NamespaceTerminating(meta["namespace"]) from None
            if not force and error.status in (409, 422):
                raise NameTaken(f"{obj['kind']} {meta['namespace']}/{meta['name']}") from error
            raise
        return dict(written or {})

    def delete(self, obj: Mapping[str, Any]) -> bool:
        """Delete the object observed (not one made since with the same name). False when
        another object holds its name by now."""
        meta = obj["metadata"]
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self._request(
                "DELETE", _owned_path(obj["kind"], meta["namespace"], meta["name"]), body=options
            )
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
        path = _path(KINDS[workload.kind], workload.namespace, workload.name)
        self._request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    def webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return self._read(f"{WEBHOOK_CONFIGURATIONS}/{name}")

    def apply_webhook_configuration(self, configuration: dict[str, Any]) -> None:
        path = f"{WEBHOOK_CONFIGURATIONS}/{configuration['metadata']['name']}"
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        self._request("PATCH", path, query, configuration, APPLY)

    def post_event(self, involved: ObjectRef, event: Event) -> bool:
        """A core/v1 Event on the object, as `kubectl describe` shows them."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved.name}.", "namespace": involved.namespace},
            "involvedObject": {
                "apiVersion": involved.api_version,
                "kind": involved.kind,
                "name": involved.name,
                "namespace": involved.namespace,
                "uid": involved.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._request("POST", f"/api/v1/namespaces/{involved.namespace}/events", body=body)
        except ApiException as error:  # an Event is never worth failing the work it reports on
            log.warning("could not post event %s on %s: %s", event.reason, involved, error.reason)
            return False
        return True

    def posted_events(self, namespaces: list[str]) -> list[tuple[str, str, str]]:
        """(involved object's uid, reason, message) of the Events the operator posted that the
        API server still keeps (in `namespaces`, or all): so that a restart posts none again."""
        found = []
        everywhere: list[str | None] = [None]
        for namespace in namespaces or everywhere:
            path = (
                "/api/v1/events" if namespace is None else f"/api/v1/namespaces/{namespace}/events"
            )
            token = None
            while True:
                query = {
                    "fieldSelector": f"source={FIELD_MANAGER}",
                    "limit": "500",
                    "continue": token,
                }
                page = self._get(path, query)
                for event in page.get("items") or []:
                    uid = (event.get("involvedObject") or {}).get("uid")
                    if uid:
                        found.append((uid, event.get("reason") or "", event.get("message") or ""))
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    break
        return found

    # --- leader election and the shared webhook certificate ---------------------------------

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(f"{_leases(namespace)}/{name}")

    def create_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        """False when another replica created it first."""
        return _unless_conflict(lambda: self._request("POST", _leases(namespace), body=body))

    def replace_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        """False when the Lease changed since it was read (its resourceVersion)."""
        path = f"{_leases(namespace)}/{body['metadata']['name']}"
        return _unless_conflict(lambda: self._request("PUT", path, body=body))

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def replace_secret(self, namespace: str, body: dict[str, Any]) -> bool:
        """False when the Secret changed since it was read (its resourceVersion)."""
        path = f"/api/v1/namespaces/{namespace}/secrets/{body['metadata']['name']}"
        return _unless_conflict(lambda: self._request("PUT", path, body=body))


WEBHOOK_CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def _path(kind: Kind, namespace: str, name: str) -> str:
    return f"/apis/{kind.group}/{kind.version}/namespaces/{namespace}/{kind.plural}/{name}"


def _owned_path(kind: str, namespace: str, name: str) -> str:
    """Where a Service, ServiceMonitor or PodMonitor of that name is."""
    if kind == "Service":
        return f"/api/v1/namespaces/{namespace}/services/{name}"
    group = f"/apis/{MONITORING_GROUP}/{MONITORING_VERSION}"
    return f"{group}/namespaces/{namespace}/{MONITOR_PLURALS[kind]}/{name}"


def _leases(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
