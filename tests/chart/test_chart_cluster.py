"""The chart against the real kube-apiserver of the local control plane (testinfra/README.md).

No kubelet runs here: the operator's pod is created (and admitted under Pod Security
"restricted") but stays Pending. Where the operator's own start-up matters — filling in the
webhook configuration's caBundle — the real `prosody-operator` runs as a local process with the
env the API server stored on the chart's Deployment and the token of the chart's ServiceAccount.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils
from kubernetes.dynamic import DynamicClient

from testinfra.operator import helm, operator_command, service_account_kubeconfig
from testinfra.procs import Process, free_port, http_ok, wait_until
from tools import chart

pytestmark = pytest.mark.cluster

CERT_MANAGER_GROUP = "cert-manager.io"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}
FIELD_MANAGER = "chart-test"
APPLY = "application/apply-patch+yaml"


def restrict(api: client.ApiClient, namespace: str) -> None:
    """Pod Security "restricted": enforced on pods, warned about on Deployments."""
    client.CoreV1Api(api).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})


def dry_run_apply(api: client.ApiClient, dynamic: DynamicClient, obj: dict[str, Any]) -> str:
    """Server-side apply with dryRun=All and strict field validation: admission, defaulting
    and the (CRD) schema all run, nothing is stored. Returns the API server's warnings."""
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    meta = obj["metadata"]
    path = resource.path(name=meta["name"], namespace=meta.get("namespace"))
    request = api.param_serialize(
        "PATCH",
        path,
        query_params=[
            ("dryRun", "All"),
            ("fieldManager", FIELD_MANAGER),
            ("fieldValidation", "Strict"),
            ("force", "true"),
        ],
        header_params={"Content-Type": APPLY, "Accept": "application/json"},
        body=obj,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*request)
    body = response.read()
    assert response.status in (200, 201), f"{obj['kind']} {meta['name']}: {body.decode()}"
    return str(response.headers.get("Warning", ""))


@pytest.fixture(scope="module")
def dynamic(k8s_client: client.ApiClient) -> DynamicClient:
    return DynamicClient(k8s_client)


@pytest.mark.parametrize(
    "values_file", chart.CI_VALUES, ids=lambda path: path.name.removesuffix("-values.yaml")
)
def test_every_object_passes_a_server_side_dry_run(
    values_file: Path, namespace: str, k8s_client: client.ApiClient, dynamic: DynamicClient
) -> None:
    """Every rendered object is validated by the real API server: built-in types, the
    PrometheusRule against the Prometheus Operator's CRD schema, the operator's pod template
    against Pod Security "restricted" (a violation would come back as a warning).

    The cert-manager CRDs are not installed in the local control plane, so for the cert-manager
    scenarios the Issuer and Certificate are left out here; test_chart.py checks that they
    render with the expected fields (the Secret they make is the one the Deployment mounts).
    Namespaces a scenario names must exist: the test's own namespace stands in for them. The
    ServiceAccounts are created for real (in the test's namespace, deleted with it): the API
    server admits a pod, the `helm test` pod here, only with an existing ServiceAccount."""
    restrict(k8s_client, namespace)
    release = f"dry-{uuid.uuid4().hex[:6]}"
    values: dict[str, Any] = {"webhook.configurationName": release}
    scenario = yaml.safe_load(values_file.read_text()) or {}
    if "watchNamespaces" in scenario:
        values["watchNamespaces"] = [namespace]
    if "namespace" in scenario.get("grafanaDashboard", {}):
        values["grafanaDashboard.namespace"] = namespace
    objects = chart.render_objects(release, namespace, [values_file], values)
    validated = []
    for obj in objects:
        if obj["apiVersion"].startswith(f"{CERT_MANAGER_GROUP}/"):
            continue
        if obj["kind"] == "ServiceAccount":
            utils.create_from_dict(k8s_client, obj, namespace=namespace)
        warnings = dry_run_apply(k8s_client, dynamic, obj)
        assert warnings == "", f"{obj['kind']} {obj['metadata']['name']}: {warnings}"
        validated.append(obj["kind"])
    assert {"Deployment", "MutatingWebhookConfiguration", "ClusterRole"} <= set(validated)
    cert_manager = {o["kind"] for o in objects if o["apiVersion"].startswith(CERT_MANAGER_GROUP)}
    assert bool(cert_manager) == values_file.name.startswith("cert-manager")


# --- helm install, upgrade, uninstall ---------------------------------------------------------

INSTALL_VALUES = [
    chart.CHART / "ci" / "monitor-labels-values.yaml",
    chart.CHART / "ci" / "prometheus-rule-dashboard-values.yaml",
]


@dataclass
class Release:
    name: str
    namespace: str
    values: dict[str, Any]
    notes: str
    installed: bool = True

    @property
    def fullname(self) -> str:
        return f"{self.name}-prosody-operator"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name}"

    def args(self, **more_values: Any) -> list[str]:
        values = {**self.values, **more_values}
        return chart.template_args(self.name, self.namespace, INSTALL_VALUES, values)


@pytest.fixture(scope="module")
def release(k8s_client: client.ApiClient) -> Iterator[Release]:
    """The chart installed with the monitor-labels and prometheus-rule+dashboard scenarios, in
    a namespace that enforces Pod Security "restricted". test_uninstall_leaves_nothing_behind
    uninstalls it; otherwise it is uninstalled at the end."""
    name = f"chart-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    restrict(k8s_client, name)
    installed = Release(name, name, {"webhook.configurationName": name}, notes="")
    try:
        result = helm("install", *installed.args())
        installed.notes = result.stdout
        yield installed
    finally:
        if installed.installed:
            helm("uninstall", name, "--namespace", name, "--wait", check=False)
        core.delete_namespace(name)


def read(dynamic: DynamicClient, obj: dict[str, Any]) -> Any:
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    return resource.get(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))


def manifest(release: Release) -> list[dict[str, Any]]:
    text = helm("get", "manifest", release.name, "--namespace", release.namespace).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def deployment_env(api: client.ApiClient, release: Release) -> dict[str, str]:
    deployment = client.AppsV1Api(api).read_namespaced_deployment(
        release.fullname, release.namespace
    )
    (container,) = deployment.spec.template.spec.containers
    return {item.name: item.value or "" for item in container.env}


def webhook_configuration(
    api: client.ApiClient, name: str
) -> client.V1MutatingWebhookConfiguration:
    return client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(name)


def test_install_creates_every_object(release: Release, dynamic: DynamicClient) -> None:
    objects = manifest(release)
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        [
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
            "PrometheusRule",
            "ServiceMonitor",
            "ConfigMap",
            # what `helm test` runs with (its pod is a hook: not in the manifest)
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
        ]
    )
    for obj in objects:
        stored = read(dynamic, obj)
        assert stored.metadata.labels["app.kubernetes.io/instance"] == release.name


def test_install_notes_say_how_to_annotate_and_check(release: Release) -> None:
    notes = release.notes
    assert 'labels:\n          prosody-operator.io/inject: "true"' in notes
    assert 'annotations:\n          prosody-operator.io/inject: "true"' in notes
    assert "get servicemonitor <prosody>-prosody-metrics" in notes
    assert "{.spec.endpoints[0].interval}" in notes
    assert "involvedObject.kind=Deployment,involvedObject.name=<prosody>" in notes
    assert f"rollout status deployment/{release.fullname}" in notes
    assert "serviceMonitor.labels is empty" not in notes  # the scenario sets them


def test_operator_pod_is_admitted_under_pod_security_restricted(
    release: Release, k8s_client: client.ApiClient
) -> None:
    """The controller-manager creates the pod only if Pod Security "restricted" admits it."""
    core = client.CoreV1Api(k8s_client)

    def pods() -> list[client.V1Pod]:
        return list(
            core.list_namespaced_pod(release.namespace, label_selector=release.selector).items
        )

    def created() -> bool:
        return bool(pods())

    wait_until(lambda: len(pods()) == 2, 30, "the operator's two pods")
    for pod in pods():
        assert pod.status.phase == "Pending"  # no kubelet here
        assert pod.spec.service_account_name == release.fullname


@contextmanager
def local_operator(api: client.ApiClient, release: Release, workdir: Path) -> Iterator[None]:
    """The real operator, outside the cluster, configured as the chart's Deployment says and
    authenticated as the chart's ServiceAccount."""
    kubeconfig = workdir / "operator.kubeconfig"
    service_account_kubeconfig(api, release.namespace, release.fullname, kubeconfig)
    health_port = free_port()
    env = {
        **deployment_env(api, release),
        "KUBECONFIG": str(kubeconfig),
        # Free ports on loopback instead of the pod's; everything else as deployed,
        # WEBHOOK_SERVICE and WEBHOOK_CONFIGURATION included.
        "PROSODY_OPERATOR_WEBHOOK_HOST": "127.0.0.1",
        "PROSODY_OPERATOR_WEBHOOK_PORT": str(free_port()),
        "PROSODY_OPERATOR_HEALTH_PORT": str(health_port),
    }
    process = Process("prosody-operator", [operator_command()], workdir / "operator.log", env=env)
    try:
        process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{health_port}/healthz"), 60)
        yield
    finally:
        process.stop()


def test_operator_fills_the_ca_bundle_and_upgrade_keeps_it(
    release: Release, k8s_client: client.ApiClient, tmp_path: Path
) -> None:
    """The combination the chart relies on: helm creates the webhook configuration without a
    caBundle, the operator server-side-applies it with its own, and `helm upgrade` (a three-way
    merge by helm) changes the Deployment but leaves the caBundle and the operator's fields."""
    name = release.values["webhook.configurationName"]
    assert webhook_configuration(k8s_client, name).webhooks[0].client_config.ca_bundle is None

    def has_ca_bundle() -> bool:
        return bool(webhook_configuration(k8s_client, name).webhooks[0].client_config.ca_bundle)

    with local_operator(k8s_client, release, tmp_path):
        wait_until(has_ca_bundle, 30, "the operator to fill in the caBundle")
    filled = webhook_configuration(k8s_client, name)
    bundle = filled.webhooks[0].client_config.ca_bundle
    assert b"BEGIN CERTIFICATE" in base64.b64decode(bundle)
    managers = {field.manager for field in filled.metadata.managed_fields}
    assert {"helm", "prosody-operator"} <= managers
    service = filled.webhooks[0].client_config.service
    assert (service.namespace, service.name, service.path, service.port) == (
        release.namespace,
        f"{release.fullname}-webhook",
        "/inject-exporter",
        443,
    )

    helm("upgrade", *release.args(**{"sidecar.manualInterval": 45}))
    env = deployment_env(k8s_client, release)
    assert env["PROSODY_OPERATOR_MANUAL_INTERVAL"] == "45"
    upgraded = webhook_configuration(k8s_client, name)
    assert upgraded.webhooks[0].client_config.ca_bundle == bundle
    assert k8s_client.sanitize_for_serialization(upgraded.webhooks) == (
        k8s_client.sanitize_for_serialization(filled.webhooks)
    )

    helm("rollback", release.name, "1", "--namespace", release.namespace)
    assert deployment_env(k8s_client, release)["PROSODY_OPERATOR_MANUAL_INTERVAL"] == "15"
    rolled_back = webhook_configuration(k8s_client, name)
    assert rolled_back.webhooks[0].client_config.ca_bundle == bundle


def test_uninstall_leaves_nothing_behind(release: Release, k8s_client: client.ApiClient) -> None:
    """Runs last in this module: it uninstalls the module's release. The webhook configuration
    goes too, though the operator applied to it (test above) — helm owns its lifecycle."""
    rbac = client.RbacAuthorizationV1Api(k8s_client)
    admission = client.AdmissionregistrationV1Api(k8s_client)
    selector = release.selector
    cluster_scoped = (
        rbac.list_cluster_role,
        rbac.list_cluster_role_binding,
        admission.list_mutating_webhook_configuration,
    )
    # Found by the release's label while installed, so "none left" below means something.
    assert [len(list_(label_selector=selector).items) for list_ in cluster_scoped] == [3, 3, 1]

    helm("uninstall", release.name, "--namespace", release.namespace, "--wait")
    release.installed = False
    core = client.CoreV1Api(k8s_client)
    apps = client.AppsV1Api(k8s_client)
    policy = client.PolicyV1Api(k8s_client)
    custom = client.CustomObjectsApi(k8s_client)
    for list_ in cluster_scoped:
        assert list_(label_selector=selector).items == [], list_.__name__
    ns = release.namespace
    assert apps.list_namespaced_deployment(ns, label_selector=selector).items == []
    assert core.list_namespaced_service(ns, label_selector=selector).items == []
    assert core.list_namespaced_service_account(ns, label_selector=selector).items == []
    assert core.list_namespaced_config_map(ns, label_selector=selector).items == []
    assert policy.list_namespaced_pod_disruption_budget(ns, label_selector=selector).items == []
    assert rbac.list_namespaced_role(ns, label_selector=selector).items == []
    assert rbac.list_namespaced_role_binding(ns, label_selector=selector).items == []
    rules = custom.list_namespaced_custom_object(
        "monitoring.coreos.com", "v1", ns, "prometheusrules", label_selector=selector
    )
    assert rules["items"] == []
    # The garbage collector removes the ReplicaSet and its pod after the Deployment.
    wait_until(
        lambda: (
            not core.list_namespaced_pod(ns, label_selector=selector).items
            and not apps.list_namespaced_replica_set(ns, label_selector=selector).items
        ),
        30,
        "the operator's ReplicaSet and pod to be garbage-collected",
    )
    assert helm("status", release.name, "--namespace", ns, check=False).returncode != 0


# --- What the new values do, on the real API server -------------------------------------------

CI = chart.CHART / "ci"


def can(api: client.ApiClient, user: str, verb: str, resource: str, **attributes: str) -> bool:
    """The API server's own authorization decision (SubjectAccessReview)."""
    group, _, plural = resource.rpartition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=plural, **attributes
            ),
        )
    )
    decision = client.AuthorizationV1Api(api).create_subject_access_review(review)
    return bool(decision.status.allowed)


def service_account(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@contextmanager
def installed(
    api: client.ApiClient, values_files: list[Path], before: Any = None
) -> Iterator[tuple[str, client.V1Pod]]:
    """The chart installed in a fresh namespace under Pod Security "restricted", and the
    operator pod the controller-manager created for it (admitted, so Pending: no kubelet)."""
    name = f"chart-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    restrict(api, name)
    try:
        if before:
            before(name)
        argv = chart.template_args(name, name, values_files, {"webhook.configurationName": name})
        helm("install", *argv)
        selector = f"app.kubernetes.io/instance={name}"
        pods: list[client.V1Pod] = []

        def created() -> bool:
            pods[:] = core.list_namespaced_pod(name, label_selector=selector).items
            return len(pods) == 2  # the default replicas

        wait_until(created, 30, "the operator's pods")
        yield name, pods[0]
    finally:
        helm("uninstall", name, "--namespace", name, "--wait", check=False)
        core.delete_namespace(name)


def test_name_override_and_an_existing_service_account(k8s_client: client.ApiClient) -> None:
    """nameOverride names the objects and the pod's labels, and the Service selects that pod;
    with serviceAccount.create=false the pod runs as the admin's ServiceAccount, which the
    API server then authorizes for what the operator does, and uninstall leaves it alone."""
    scenario = yaml.safe_load((CI / "names-values.yaml").read_text())
    account = scenario["serviceAccount"]["name"]
    core = client.CoreV1Api(k8s_client)

    def make_account(namespace: str) -> None:
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=account))
        )

    with installed(k8s_client, [CI / "names-values.yaml"], make_account) as (name, pod):
        fullname = f"{name}-xmpp-metrics"
        assert pod.metadata.labels["app.kubernetes.io/name"] == "xmpp-metrics"
        assert pod.spec.service_account_name == account
        service = core.read_namespaced_service(f"{fullname}-webhook", name)
        selected = core.list_namespaced_pod(
            name, label_selector=",".join(f"{k}={v}" for k, v in service.spec.selector.items())
        ).items
        assert pod.metadata.name in [p.metadata.name for p in selected]  # one of the replicas
        assert {p.metadata.labels["app.kubernetes.io/name"] for p in selected} == {"xmpp-metrics"}
        user = service_account(name, account)
        assert can(k8s_client, user, "list", "nodes")
        assert can(
            k8s_client,
            user,
            "patch",
            "admissionregistration.k8s.io/mutatingwebhookconfigurations",
            name=name,
        )
        assert can(k8s_client, user, "create", "services", namespace="anywhere")
        assert not can(k8s_client, user, "list", "secrets", namespace=name)
        # Leader election and the shared webhook certificate: the chart's Lease and Secret,
        # and nothing else of their kinds.
        leases = "coordination.k8s.io/leases"
        secret = f"{fullname}-webhook-tls"
        assert can(k8s_client, user, "update", leases, name=fullname, namespace=name)
        assert can(k8s_client, user, "update", "secrets", name=secret, namespace=name)
        assert not can(k8s_client, user, "update", "secrets", name="other", namespace=name)
        assert not can(k8s_client, user, "update", leases, name="other", namespace=name)
        helm("uninstall", name, "--namespace", name, "--wait")
        assert core.read_namespaced_service_account(account, name).metadata.name == account


def test_mirror_registry_pull_secret_and_openshift_mode(k8s_client: client.ApiClient) -> None:
    """The pod the controller-manager makes pulls from the mirror with the secret, has no
    fixed UID or GID, and still runs as non-root: Pod Security "restricted" admits it."""
    files = [CI / "private-registry-values.yaml", CI / "openshift-values.yaml"]
    with installed(k8s_client, files) as (_, pod):
        (container,) = pod.spec.containers
        assert container.image.startswith("registry.example.com/mirror/prosody-operator/")
        assert [s.name for s in pod.spec.image_pull_secrets] == ["mirror-pull"]
        env = {e.name: e.value for e in container.env}
        assert env["PROSODY_OPERATOR_EXPORTER_IMAGE"].startswith(
            "registry.example.com/mirror/prosody-operator/prosody-exporter:"
        )
        for context in (pod.spec.security_context, container.security_context):
            assert context.run_as_non_root is True
            assert (context.run_as_user, context.run_as_group) == (None, None)
        assert pod.spec.security_context.fs_group is None


def test_security_contexts_reach_the_pod(k8s_client: client.ApiClient) -> None:
    scenario = yaml.safe_load((CI / "security-context-values.yaml").read_text())["operator"]
    with installed(k8s_client, [CI / "security-context-values.yaml"]) as (_, pod):
        stored = k8s_client.sanitize_for_serialization(pod.spec.security_context)
        assert stored == scenario["podSecurityContext"]
        (container,) = pod.spec.containers
        assert (
            k8s_client.sanitize_for_serialization(container.security_context)
            == (scenario["securityContext"])
        )


def test_helm_test_account_may_read_only_its_release(k8s_client: client.ApiClient) -> None:
    """The API server's authorization of the `helm test` pod's ServiceAccount: its operator's
    Deployment and webhook configuration, nothing else."""
    with installed(k8s_client, [CI / "default-values.yaml"]) as (name, _):
        user = service_account(name, f"{name}-prosody-operator-test")
        webhooks = "admissionregistration.k8s.io/mutatingwebhookconfigurations"
        deployments = "apps/deployments"
        assert can(
            k8s_client, user, "get", deployments, namespace=name, name=f"{name}-prosody-operator"
        )
        assert can(k8s_client, user, "get", webhooks, name=name)
        assert not can(k8s_client, user, "get", deployments, namespace=name, name="other")
        assert not can(k8s_client, user, "list", deployments, namespace=name)
        assert not can(k8s_client, user, "get", webhooks, name="other")
        assert not can(k8s_client, user, "patch", webhooks, name=name)
        assert not can(k8s_client, user, "get", "secrets", namespace=name)
