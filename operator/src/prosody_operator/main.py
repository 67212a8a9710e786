"""`prosody-operator`: check the settings and the Kubernetes credentials, then run the kopf
operator cluster-wide."""

from __future__ import annotations

import logging
import os
import socket
import sys

import kopf
from pydantic import ValidationError

from .kube import NoCredentials, load_config
from .settings import ENV_PREFIX, OperatorSettings


def main() -> None:
    try:
        settings = OperatorSettings()
    except ValidationError as error:
        named = set()
        for item in error.errors():
            field, *inside = item["loc"] or ("?",)
            if field in named:
                continue  # one line per setting: its first problem
            named.add(field)
            # Where in a JSON setting: [0].action, runAsUser.
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inside)
            message = item["msg"].removeprefix("Value error, ")
            if where:
                message = f"{where.lstrip('.')}: {message}"
            print(
                f"prosody-operator: invalid setting {ENV_PREFIX}{str(field).upper()}: {message}",
                file=sys.stderr,
            )
        sys.exit(2)
    try:
        load_config()
    except NoCredentials as error:
        # Without this, kopf would retry its startup handler forever, a traceback each time.
        print(f"prosody-operator: no Kubernetes API to talk to: {error}", file=sys.stderr)
        sys.exit(1)
    from . import handlers  # noqa: F401 - registers the handlers with kopf

    kopf.configure(verbose=False)
    # kopf names this process after the passwd database's user name, which a container running
    # as a uid the image does not list (65532 here, any on OpenShift) lacks: it would crash.
    # POD_ID, kopf's documented override, is the pod's name: the host name in a pod.
    os.environ.setdefault("POD_ID", socket.gethostname())
    # kopf logs every handled event and aiohttp every webhook call at INFO: keep decisions only.
    for noisy in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kopf.run(
        memo=kopf.Memo(settings=settings),  # the handlers' settings: checked once, here
        # Namespaced resources (Deployments, ConfigMaps, Prometheuses...) are watched in these
        # namespaces only; Nodes, being cluster-scoped, everywhere.
        clusterwide=not settings.watch_namespaces,
        namespaces=settings.watch_namespaces,
        standalone=True,  # one active replica (the chart runs one); no peering objects
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    )


if __name__ == "__main__":
    main()
