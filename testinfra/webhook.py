"""A tiny HTTPS mutating admission webhook for tests, serving a certificate from the cluster's CA.

The API server reaches it through `clientConfig.url` on 127.0.0.1 and trusts it through the CA
bundle `ca_bundle()` returns. It adds one label to every object it reviews and records the names.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import controlplane


def add_label_patch(obj: dict, key: str, value: str) -> list[dict]:
    """A JSON patch adding one label, creating the labels map when the object has none."""
    if "labels" not in obj["metadata"]:
        return [{"op": "add", "path": "/metadata/labels", "value": {key: value}}]
    escaped = key.replace("~", "~0").replace("/", "~1")  # JSON pointer escaping
    return [{"op": "add", "path": f"/metadata/labels/{escaped}", "value": value}]


def pod_admission_review(pod: dict, namespace: str, username: str = "test") -> dict:
    """The AdmissionReview the API server sends a mutating webhook for a pod's creation."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": username},
            "object": {**pod, "metadata": {**pod["metadata"], "namespace": namespace}},
            "dryRun": False,
        },
    }


def tls_context(hosts: tuple[str, ...]) -> ssl.SSLContext:
    pair = controlplane.certificate_authority().issue_server("test-webhook", hosts)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:
        cert_path, key_path = pair.write(Path(directory), "webhook")
        context.load_cert_chain(cert_path, key_path)
    return context


def ca_bundle() -> str:
    """The base64 CA bundle for `clientConfig.caBundle`."""
    return base64.b64encode(controlplane.ca_cert_path().read_bytes()).decode()


@dataclass
class LabellingWebhook:
    """Runs in a thread of the test process; use as a context manager."""

    label: tuple[str, str] = ("mutated-by", "test-webhook")
    # metadata.name (or generateName) of every object reviewed, in order.
    reviewed: list[str] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the webhook is not started"
        return f"https://127.0.0.1:{self._httpd.server_port}/mutate"

    def review(self, admission_review: dict) -> dict:
        request = admission_review["request"]
        metadata = request["object"]["metadata"]
        self.reviewed.append(metadata.get("name") or metadata.get("generateName", ""))
        patch = add_label_patch(request["object"], *self.label)
        return {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": request["uid"],
                "allowed": True,
                "patchType": "JSONPatch",
                "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
            },
        }

    def __enter__(self) -> LabellingWebhook:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        context = tls_context(("127.0.0.1",))
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()


def handler_for(webhook: LabellingWebhook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            admission_review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps(webhook.review(admission_review)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # request lines would only clutter the test output

    return Handler
