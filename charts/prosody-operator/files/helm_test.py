"""`helm test` for prosody-operator: is the operator up, and can the API server call its webhook?

Runs in the operator image (its Python, the standard library only) as the chart's test pod, with
a ServiceAccount that may read the operator's Deployment and its webhook configuration:
1. the Deployment is rolled out and its pods are ready;
2. the MutatingWebhookConfiguration sends pods to the chart's Service and has a caBundle;
3. the webhook Service answers over TLS that this caBundle verifies, for the name the API server
   checks (`<service>.<namespace>.svc`): what every admission call needs.
Each check is retried until --timeout; the exit status is 1 if any failed, each saying why.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

IN_CLUSTER = "/var/run/secrets/kubernetes.io/serviceaccount"


class CheckFailed(Exception):
    """What a check saw instead of success."""


class Api:
    """GET requests to the Kubernetes API with the pod's ServiceAccount token."""

    def __init__(self, server: str, token_file: str, ca_file: str) -> None:
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=ca_file)

    def get(self, path: str) -> Any:
        with open(self.token_file) as file:  # reread: the kubelet rotates it
            token = file.read().strip()
        request = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise CheckFailed(f"GET {path}: HTTP {error.code} {error.reason}") from None
        except (OSError, ValueError) as error:
            raise CheckFailed(f"GET {path}: {error}") from None


def deployment_ready(api: Api, namespace: str, name: str) -> str:
    deployment = api.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    wanted = deployment["spec"].get("replicas", 1)
    status = deployment.get("status", {})
    if status.get("observedGeneration", 0) < deployment["metadata"]["generation"]:
        raise CheckFailed(f"deployment {name}: the newest spec is not rolled out yet")
    updated, ready = status.get("updatedReplicas", 0), status.get("readyReplicas", 0)
    if wanted < 1 or updated < wanted or ready < wanted:
        raise CheckFailed(f"deployment {name}: {ready}/{wanted} ready, {updated} up to date")
    return f"deployment {name}: {ready}/{wanted} ready"


def webhook_ca_bundle(api: Api, configuration: str, namespace: str, service: str) -> bytes:
    path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{configuration}"
    webhooks = api.get(path).get("webhooks") or []
    if not webhooks:
        raise CheckFailed(f"mutatingwebhookconfiguration {configuration} has no webhooks")
    bundles = set()
    for webhook in webhooks:
        client_config = webhook.get("clientConfig", {})
        target = client_config.get("service") or {}
        if (target.get("namespace"), target.get("name")) != (namespace, service):
            called = target or client_config.get("url")
            raise CheckFailed(
                f"webhook {webhook['name']} calls {called}, not {namespace}/{service}"
            )
        if not client_config.get("caBundle"):
            raise CheckFailed(
                f"webhook {webhook['name']} has no caBundle yet (the operator sets it at start-up)"
            )
        bundles.add(client_config["caBundle"])
    if len(bundles) != 1:
        raise CheckFailed(f"mutatingwebhookconfiguration {configuration}: differing caBundles")
    return base64.b64decode(bundles.pop())


def webhook_answers(ca_bundle: bytes, hostname: str, address: tuple[str, int], path: str) -> str:
    """A TLS handshake verified like the API server verifies it, then any HTTP answer."""
    context = ssl.create_default_context(cadata=ca_bundle.decode())
    try:
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            request = f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            response = http.client.HTTPResponse(tls)
            response.begin()
            status = f"{response.status} {response.reason}"
    except ssl.SSLCertVerificationError as error:
        raise CheckFailed(
            f"{hostname}: the caBundle does not verify its certificate: {error}"
        ) from None
    except (OSError, http.client.HTTPException) as error:
        raise CheckFailed(
            f"{hostname} at {address[0]}:{address[1]} does not answer: {error}"
        ) from None
    return f"webhook {hostname}: TLS verified with the caBundle, HTTP answer {status}"


def retry(check: Callable[[], Any], deadline: float, interval: float = 2.0) -> Any:
    while True:
        try:
            return check()
        except CheckFailed:
            if time.monotonic() + interval > deadline:
                raise
            time.sleep(interval)


def parse_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    env_host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    env_port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{env_host}]" if ":" in env_host else env_host
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True, help="the release namespace")
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--service", required=True, help="the webhook Service")
    parser.add_argument("--webhook-configuration", required=True)
    parser.add_argument("--path", default="/inject-exporter", help="the webhook's path")
    parser.add_argument("--address", help="host:port to connect to (default: the Service:443)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds, for all checks")
    parser.add_argument("--api-server", default=f"https://{host}:{env_port}")
    parser.add_argument("--token-file", default=f"{IN_CLUSTER}/token")
    parser.add_argument("--ca-file", default=f"{IN_CLUSTER}/ca.crt")
    args = parser.parse_args(argv)

    api = Api(args.api_server, args.token_file, args.ca_file)
    deadline = time.monotonic() + args.timeout
    hostname = f"{args.service}.{args.namespace}.svc"
    address = parse_address(args.address) if args.address else (hostname, 443)
    failed = False

    def report(check: Callable[[], Any]) -> Any:
        nonlocal failed
        try:
            result = retry(check, deadline)
        except CheckFailed as error:
            print(f"FAILED: {error}", flush=True)
            failed = True
            return None
        if isinstance(result, str):
            print(f"ok: {result}", flush=True)
        return result

    report(lambda: deployment_ready(api, args.namespace, args.deployment))
    ca_bundle = report(
        lambda: webhook_ca_bundle(api, args.webhook_configuration, args.namespace, args.service)
    )
    if ca_bundle is not None:
        print(f"ok: mutatingwebhookconfiguration {args.webhook_configuration} has a caBundle")
        report(lambda: webhook_answers(ca_bundle, hostname, address, args.path))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
