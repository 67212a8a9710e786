"""The webhook's serving certificate: from a mounted Secret (cert-manager's, renewed in place),
or, when the chart provides none, a private CA and a leaf certificate made at start-up. Either
way three files: tls.crt and tls.key, which the webhook serves, and ca.crt, which goes into the
webhook configuration's caBundle."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ServingCertificate:
    certfile: Path
    keyfile: Path
    cafile: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_serving_certificate(
    directory: Path, hosts: list[str], days: int = 3650
) -> ServingCertificate:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("prosody-operator webhook CA"))
        .issuer_name(_name("prosody-operator webhook CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "tls.crt", directory / "tls.key"
    certfile.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyfile.chmod(0o600)
    cafile = directory / "ca.crt"
    cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ServingCertificate(certfile, keyfile, cafile)


def load_serving_certificate(directory: Path) -> ServingCertificate:
    """tls.crt, tls.key and ca.crt from a mounted Secret (chart- or cert-manager-made)."""
    return ServingCertificate(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")


# The Secret the replicas share a self-made certificate through: its keys are the file names.
SECRET_FILES = ("tls.crt", "tls.key", "ca.crt")


def shared_serving_certificate(
    read: Callable[[], dict[str, Any] | None],
    replace: Callable[[dict[str, Any]], bool],
    directory: Path,
    hosts: list[str],
) -> ServingCertificate:
    """The self-made certificate every replica serves, so that one caBundle verifies them all:
    the one in the Secret (`read`), or, while it holds none, one made here and written there
    (`replace`, which fails when another replica wrote first: then that one is used)."""
    for _ in range(3):
        secret = read()
        if secret is None:
            raise LookupError("the Secret does not exist")
        data = secret.get("data") or {}
        if all(data.get(name) for name in SECRET_FILES):
            directory.mkdir(parents=True, exist_ok=True)
            for name in SECRET_FILES:
                (directory / name).write_bytes(base64.b64decode(data[name]))
            (directory / "tls.key").chmod(0o600)
            return load_serving_certificate(directory)
        made = make_serving_certificate(directory, hosts)
        files = {name: (directory / name).read_bytes() for name in SECRET_FILES}
        encoded = {name: base64.b64encode(content).decode() for name, content in files.items()}
        if replace({**secret, "data": encoded}):
            return made
    raise RuntimeError("the Secret kept changing while this replica tried to fill it")
