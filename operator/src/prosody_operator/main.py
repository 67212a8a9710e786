"""`prosody-operator`: check the settings and the Kubernetes credentials, then run the kopf
operator cluster-wide.

kopf runs in a thread of its own and this main thread handles SIGTERM and SIGINT: it releases
the Lease at once (another replica takes over reconciling), reports not ready, and keeps the
webhook serving for PROSODY_OPERATOR_SHUTDOWN_DELAY seconds while the API server stops calling
this replica (its endpoint goes when the pod is deleted), so no pod is admitted without the
sidecar during a rollout or a drain. kopf stops at once on a signal when it handles it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

import kopf
from pydantic import ValidationError

from . import logs, metrics
from .kube import NoCredentials, load_config
from .settings import ENV_PREFIX, OperatorSettings

log = logging.getLogger("prosody_operator")


def _not_about_signals(record: logging.LogRecord) -> bool:
    # kopf warns that it ignores OS signals outside the main thread: here, that is the design.
    return not record.getMessage().startswith("OS signals are ignored")


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
    logs.configure(settings.log_format, settings.log_level)
    try:
        load_config()
    except NoCredentials as error:
        # Without this, kopf would retry its startup handler forever, a traceback each time.
        print(f"prosody-operator: no Kubernetes API to talk to: {error}", file=sys.stderr)
        sys.exit(1)
    from . import handlers  # registers the handlers with kopf

    # kopf names this process after the passwd database's user name, which a container running
    # as a uid the image does not list (65532 here, any on OpenShift) lacks: it would crash.
    # POD_ID, kopf's documented override, is the pod's name: the host name in a pod.
    os.environ.setdefault("POD_ID", socket.gethostname())
    logging.getLogger("kopf._core.reactor.running").addFilter(_not_about_signals)
    memo = kopf.Memo(settings=settings)  # the handlers' settings: checked once, here
    stopping = threading.Event()
    try:
        metrics.serve(
            settings.metrics_port,
            ready=lambda: bool(getattr(memo, "webhook_serving", False)) and not stopping.is_set(),
        )
    except OSError as error:
        print(f"prosody-operator: cannot serve metrics: {error}", file=sys.stderr)
        sys.exit(1)
    stop_flag = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            kopf.run(
                memo=memo,
                # Namespaced resources (Deployments, ConfigMaps, Prometheuses...) are watched in
                # these namespaces only; Nodes, being cluster-scoped, everywhere.
                clusterwide=not settings.watch_namespaces,
                namespaces=settings.watch_namespaces,
                standalone=True,  # no kopf peering: leader election is leadership.py's
                liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
                stop_flag=stop_flag,
            )
        except BaseException as error:
            failed.append(error)

    operator = threading.Thread(target=run, name="kopf")
    signalled = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signalled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    operator.start()
    while operator.is_alive() and not signalled.wait(1.0):
        pass
    if signalled.is_set() and operator.is_alive():
        stopping.set()
        handlers.stop_reconciling(memo)
        log.info(
            "stopping: the webhook serves %g s more, not ready, while its endpoint goes",
            settings.shutdown_delay,
        )
        signalled.clear()
        signalled.wait(settings.shutdown_delay)  # a second signal stops at once
        stop_flag.set()
    operator.join()
    if failed:
        log.error("the operator stopped: %s", failed[0], exc_info=failed[0])
        sys.exit(1)


if __name__ == "__main__":
    main()
