"""`prosody-exporter`: load settings, set up logging, serve."""

from __future__ import annotations

import gc
import json
import logging
import math
import socket
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from .app import create_app
from .server import bounded_protocol
from .settings import Settings, load_settings, settings_errors


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO


def ipv6_listening_socket(host: str, port: int) -> socket.socket:
    """An IPv6 socket with IPV6_V6ONLY off, so "::" also accepts IPv4 clients (as IPv4-mapped
    addresses, which access.py understands). asyncio, and so uvicorn given a host, turns
    IPV6_V6ONLY on, which would make the dual-stack default refuse every IPv4 client."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except (ValidationError, SettingsError) as error:
        for line in settings_errors(error):
            print(f"prosody-exporter: {line}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings)
    logging.getLogger("prosody_exporter").info(
        "listening on [%s]:%d, collecting %s every %gs",
        settings.listen_host,
        settings.listen_port,
        settings.upstream_url,
        settings.interval,
    )
    exporter = create_app(settings)
    config = uvicorn.Config(
        exporter,
        host=settings.listen_host,
        port=settings.listen_port,
        http=bounded_protocol(
            settings.max_connections, settings.header_timeout, exporter.answer_metrics
        ),
        ws="none",  # nothing here speaks WebSocket; "auto" would import a library for it
        # Uvicorn would otherwise rewrite the client address from X-Forwarded-For sent by any
        # loopback peer; the allowlist decides on the real TCP peer (see access.py).
        proxy_headers=False,
        access_log=False,  # one log line per state change, not one per scrape
        # One idle limit, whichever way a request was answered: server.py's head deadline.
        # uvicorn's keep-alive timer (5 s by default) runs only after answers from the app.
        timeout_keep_alive=math.ceil(settings.header_timeout),
        server_header=False,
        log_config=None,  # keep our handlers
        timeout_graceful_shutdown=5,
    )
    sockets = None
    if ":" in settings.listen_host:
        try:
            sockets = [ipv6_listening_socket(settings.listen_host, settings.listen_port)]
        except OSError as error:
            logging.getLogger("prosody_exporter").error("cannot listen: %s", error)
            sys.exit(3)  # uvicorn's STARTUP_FAILURE
    config.load()  # imports the protocol and wraps the app now, before the freeze below
    server = uvicorn.Server(config)
    # Everything allocated so far lives as long as the process: keep it out of every garbage
    # collection, so a full collection walks only what serving allocates.
    gc.collect()
    gc.freeze()
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    main()
