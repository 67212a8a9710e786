"""A renewed webhook certificate (cert-manager renewing the Secret the chart mounts) is served and
its CA put into the caBundle by the running operator: no restart, and no pod admitted without
its sidecar because the API server no longer trusts the webhook.

The real operator runs against the real control plane; the Secret volume is a folder laid out as
the kubelet lays one out (files linked through `..data`, swapped atomically on update). That is
the one stand-in: no kubelet runs here to mount a real Secret.
"""

from __future__ import annotations

import base64
import os
import ssl
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from kubernetes import client

from prosody_operator.builders import SIDECAR_NAME
from testinfra.operator import OperatorProcess
from testinfra.pki import CertificateAuthority
from testinfra.procs import wait_until
from testinfra.workloads import prosody_pod

pytestmark = pytest.mark.cluster


class SecretVolume:
    """A Secret volume's folder, written like the kubelet's AtomicWriter: the data in a
    timestamped folder, `..data` linking to it, each key linking through `..data`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True)

    def write(self, files: dict[str, bytes]) -> None:
        version = self.path / f"..{uuid.uuid4().hex}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staged = self.path / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.path / "..data")
        for name in files:
            if not (self.path / name).is_symlink():
                (self.path / name).symlink_to(f"..data/{name}")


def webhook_certificate(ca: CertificateAuthority) -> dict[str, bytes]:
    leaf = ca.issue_server("prosody-operator webhook", ("127.0.0.1",))
    return {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca.key_pair.cert_pem}


def same_certificate(a: bytes, b: bytes) -> bool:
    return x509.load_pem_x509_certificate(a) == x509.load_pem_x509_certificate(b)


def test_a_renewed_certificate_is_served_and_trusted_without_a_restart(
    k8s_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(k8s_client)
    admission = client.AdmissionregistrationV1Api(k8s_client)
    secret = SecretVolume(tmp_path / "webhook-tls")
    first = webhook_certificate(CertificateAuthority.create("webhook CA 1"))
    secret.write(first)
    operator = OperatorProcess(
        k8s_client, tmp_path / "operator", settings={"webhook_cert_dir": str(secret.path)}
    )

    def ca_bundle() -> bytes:
        configuration = admission.read_mutating_webhook_configuration(
            operator.webhook_configuration
        )
        return base64.b64decode(configuration.webhooks[0].client_config.ca_bundle)

    def served() -> bytes:
        return ssl.get_server_certificate(("127.0.0.1", operator.webhook_port)).encode()

    def injected(name: str) -> bool:
        created = core.create_namespaced_pod(namespace, prosody_pod(name, None))
        return SIDECAR_NAME in [c.name for c in created.spec.containers]

    operator.install_identity()
    try:
        operator.start()
        assert operator.process is not None
        pid = operator.process.popen.pid
        assert ca_bundle() == first["ca.crt"]
        assert same_certificate(served(), first["tls.crt"])
        assert injected("before")

        second = webhook_certificate(CertificateAuthority.create("webhook CA 2"))
        secret.write(second)
        wait_until(lambda: ca_bundle() == second["ca.crt"], 40, "the renewed CA in the caBundle")
        wait_until(lambda: same_certificate(served(), second["tls.crt"]), 10, "the new cert")
        assert injected("after"), "the API server did not trust the renewed certificate"
        assert operator.process.running() and operator.process.popen.pid == pid
    finally:
        operator.uninstall()
