"""A stand-in for a broken Prosody: a tiny loopback HTTP server whose answer a test chooses.

Used only for failures a real Prosody cannot be made to produce on demand (malformed or oversized
bodies, a hang, old mod_prometheus output). Everything a real Prosody can show is tested against
the real one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/openmetrics-text; version=0.0.4"
    delay: float = 0.0  # seconds before answering


@dataclass
class StandInProsody:
    answer: Answer = field(default_factory=Answer)
    requests: int = 0
    forwarded_headers: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                standin.requests += 1
                standin.forwarded_headers.append(dict(self.headers.items()))
                answer = standin.answer
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                # The exporter may have given up waiting, as it should.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(answer.body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def __enter__(self) -> StandInProsody:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
