"""The local control plane is a real one: controllers, admission, RBAC, CRD schemas, webhooks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from testinfra import controlplane
from testinfra.kubeapi import or_none
from testinfra.webhook import LabellingWebhook, ca_bundle

pytestmark = pytest.mark.cluster

T = TypeVar("T")
TIMEOUT = 30.0


def eventually(probe: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    """Poll until `probe` returns something truthy (controllers act asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def container(**fields: object) -> client.V1Container:
    return client.V1Container(name="main", image="registry.invalid/app:1", **fields)


def pod(name: str, **container_fields: object) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(containers=[container(**container_fields)]),
    )


def owned_by(items: list, owner_uid: str) -> list:
    return [i for i in items if any(r.uid == owner_uid for r in i.metadata.owner_references or [])]


def test_version_reports_the_built_release(k8s_client: client.ApiClient) -> None:
    info = client.VersionApi(k8s_client).get_code()
    assert info.git_version.startswith("v1.")
    assert (info.major, info.minor) == ("1", info.git_version.split(".")[1])


def test_deployment_becomes_replicaset_and_pods(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    apps, core = client.AppsV1Api(k8s_client), client.CoreV1Api(k8s_client)
    labels = {"app": "web"}
    deployment = apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(containers=[container()]),
                ),
            ),
        ),
    )

    replica_sets = eventually(
        lambda: owned_by(
            apps.list_namespaced_replica_set(namespace).items, deployment.metadata.uid
        ),
        "the deployment controller to create a ReplicaSet",
    )
    assert len(replica_sets) == 1

    def two_pods() -> list[client.V1Pod] | None:
        pods = owned_by(core.list_namespaced_pod(namespace).items, replica_sets[0].metadata.uid)
        return pods if len(pods) == 2 else None

    pods = eventually(two_pods, "the replicaset controller to create 2 pods")
    # No node is up while these run (the node tests run last): the pods are never scheduled.
    assert {p.status.phase for p in pods} == {"Pending"}
    assert all(p.metadata.labels["app"] == "web" for p in pods)


def config_map(name: str, owner: client.V1ConfigMap | None = None) -> client.V1ConfigMap:
    references = None
    if owner is not None:
        references = [
            client.V1OwnerReference(
                api_version="v1", kind="ConfigMap", name=owner.metadata.name, uid=owner.metadata.uid
            )
        ]
    return client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=name, owner_references=references), data={"k": "v"}
    )


def config_map_exists(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    return or_none(lambda: core.read_namespaced_config_map(name, namespace)) is not None


def test_deleting_an_owner_garbage_collects_what_it_owns(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_client)
    owner = core.create_namespaced_config_map(namespace, config_map("owner"))
    core.create_namespaced_config_map(namespace, config_map("dependent", owner))

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    eventually(
        lambda: not config_map_exists(core, namespace, "dependent"),
        "the garbage collector to delete the dependent",
    )


def test_orphan_deletion_keeps_the_dependent_and_drops_its_owner_reference(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_client)
    owner = core.create_namespaced_config_map(namespace, config_map("owner"))
    core.create_namespaced_config_map(namespace, config_map("dependent", owner))

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Orphan")

    # The garbage collector handles the orphan finalizer: it strips the reference, then the
    # owner goes away.
    eventually(
        lambda: not config_map_exists(core, namespace, "owner"),
        "the garbage collector to finish orphaning",
    )
    dependent = core.read_namespaced_config_map("dependent", namespace)
    assert not dependent.metadata.owner_references


def service_monitor(interval: str) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": f"sm-{interval}"},
        "spec": {
            "selector": {"matchLabels": {"app": "prosody"}},
            "endpoints": [{"port": "metrics", "interval": interval}],
        },
    }


def test_servicemonitor_schema_from_the_upstream_crd_is_enforced(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(k8s_client)

    def create(body: dict) -> dict:
        return custom.create_namespaced_custom_object(
            "monitoring.coreos.com", "v1", namespace, "servicemonitors", body
        )

    assert create(service_monitor("30s"))["spec"]["endpoints"][0]["interval"] == "30s"
    with pytest.raises(ApiException) as rejected:
        create(service_monitor("abc"))
    assert rejected.value.status == 422
    assert "spec.endpoints[0].interval" in json.loads(rejected.value.body)["message"]


def label_namespace(core: client.CoreV1Api, namespace: str, labels: dict[str, str]) -> None:
    core.patch_namespace(namespace, {"metadata": {"labels": labels}})


def test_restricted_pod_security_rejects_a_privileged_pod(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_client)
    label_namespace(core, namespace, {"pod-security.kubernetes.io/enforce": "restricted"})
    privileged = pod("privileged", security_context=client.V1SecurityContext(privileged=True))

    with pytest.raises(ApiException) as rejected:
        core.create_namespaced_pod(namespace, privileged)

    assert rejected.value.status == 403
    message = json.loads(rejected.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest": privileged' in message
    # The same namespace takes a pod that meets the restricted profile.
    compliant = pod(
        "compliant",
        security_context=client.V1SecurityContext(
            allow_privilege_escalation=False,
            run_as_non_root=True,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    core.create_namespaced_pod(namespace, compliant)


def service_account_client(
    k8s_client: client.ApiClient, namespace: str, name: str
) -> client.ApiClient:
    """A client authenticated only by a TokenRequest token of the service account."""
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
    )
    token_request = core.create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
        ),
    )
    configuration = client.Configuration()
    configuration.host = k8s_client.configuration.host
    configuration.ssl_ca_cert = str(controlplane.ca_cert_path())
    configuration.api_key = {"authorization": f"Bearer {token_request.status.token}"}
    return client.ApiClient(configuration)


def grant_pod_reading(k8s_client: client.ApiClient, namespace: str, account: str) -> None:
    rbac = client.RbacAuthorizationV1Api(k8s_client)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name=account, namespace=namespace)
            ],
        ),
    )


def can_list_pods(api_client: client.ApiClient, namespace: str) -> bool:
    try:
        client.CoreV1Api(api_client).list_namespaced_pod(namespace)
    except ApiException as error:
        if error.status == 403:
            return False
        raise
    return True


def test_service_account_token_needs_rbac_to_list_pods(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    with service_account_client(k8s_client, namespace, "reader") as reader:
        review = client.AuthenticationV1Api(reader).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:reader"
        with pytest.raises(ApiException) as forbidden:
            client.CoreV1Api(reader).list_namespaced_pod(namespace)
        assert forbidden.value.status == 403

        grant_pod_reading(k8s_client, namespace, "reader")

        # The RBAC authorizer sees the new binding through its informer: a moment later.
        eventually(lambda: can_list_pods(reader, namespace), "the RoleBinding to take effect")
        assert not can_list_pods(reader, "default")  # a Role grants only its own namespace


def mutating_webhook_configuration(
    name: str, namespace: str, url: str
) -> client.V1MutatingWebhookConfiguration:
    return client.V1MutatingWebhookConfiguration(
        metadata=client.V1ObjectMeta(name=name),
        webhooks=[
            client.V1MutatingWebhook(
                name="label-pods.testinfra.local",
                client_config=client.AdmissionregistrationV1WebhookClientConfig(
                    url=url, ca_bundle=ca_bundle()
                ),
                rules=[
                    client.V1RuleWithOperations(
                        api_groups=[""],
                        api_versions=["v1"],
                        operations=["CREATE"],
                        resources=["pods"],
                    )
                ],
                # Only this test's namespace, so other tests never call this webhook.
                namespace_selector=client.V1LabelSelector(
                    match_labels={"kubernetes.io/metadata.name": namespace}
                ),
                admission_review_versions=["v1"],
                side_effects="None",
                failure_policy="Fail",
                timeout_seconds=5,
            )
        ],
    )


def webhook_called(core: client.CoreV1Api, namespace: str, webhook: LabellingWebhook) -> bool:
    # A dry run (the webhook declares sideEffects: None) calls the webhook, creates nothing.
    core.create_namespaced_pod(namespace, pod("probe"), dry_run="All")
    return bool(webhook.reviewed)


def test_mutating_webhook_is_called_and_its_patch_applied(
    k8s_client: client.ApiClient, namespace: str, labelling_webhook: LabellingWebhook
) -> None:
    core = client.CoreV1Api(k8s_client)
    admission = client.AdmissionregistrationV1Api(k8s_client)
    name = f"label-pods-{namespace}"
    configuration = mutating_webhook_configuration(name, namespace, labelling_webhook.url)
    admission.create_mutating_webhook_configuration(configuration)
    try:
        # The API server sees the new configuration through its informer, a moment later.
        eventually(
            lambda: webhook_called(core, namespace, labelling_webhook),
            "the API server to call the webhook",
        )
        created = core.create_namespaced_pod(namespace, pod("labelled"))
    finally:
        admission.delete_mutating_webhook_configuration(name)

    key, value = labelling_webhook.label
    assert labelling_webhook.reviewed[-1] == "labelled"
    assert created.metadata.labels == {key: value}
    assert core.read_namespaced_pod("labelled", namespace).metadata.labels == {key: value}
