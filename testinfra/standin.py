"""A stand-in for a broken Prosody: a tiny loopback HTTP server whose answer a test chooses.

Used only for failures a real Prosody cannot be made to produce on demand (malformed or oversized
bodies, a hang, old mod_prometheus output, gzip bombs, huge error bodies). Everything a real
Prosody can show is tested against the real one.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@functools.cache
def gzip_bomb(expanded: int) -> bytes:
    """A gzip body of about expanded / 1000 bytes that inflates to `expanded` zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(expanded >> 20)]
    return b"".join([*parts, compressor.compress(bytes(expanded % (1 << 20))), compressor.flush()])


# Sample lines for exposition_of: like Prosody's per-host series, and as short as they come.
PROSODY_LIKE_LINE = (
    'prosody_mod_bench__sessions{{host="h{0}.bench",type="c2s",ip_family="ipv4"}} {0}'
)
SHORT_LINE = 'prosody_mod_bench__sessions{{h="{0}"}} 1'


def exposition_of(size: int, line: str) -> bytes:
    """A valid OpenMetrics body of at most `size` bytes: one family of samples like `line`.

    One family, because the exporter holds one parsed family at a time; short lines, because
    each sample costs hundreds of bytes parsed whatever its length.
    """
    head, end = "# TYPE prosody_mod_bench__sessions gauge\n", "# EOF\n"
    lines, total, i = [head], len(head) + len(end), 0
    while total + len(sample := line.format(i) + "\n") <= size:
        lines.append(sample)
        total += len(sample)
        i += 1
    return ("".join(lines) + end).encode()


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/openmetrics-text; version=0.0.4"
    delay: float = 0.0  # seconds before answering
    repeat: int = 1  # the body is sent this many times (large bodies without holding them)
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: the body ends when the connection closes
    pause_after_headers: float = 0.0  # seconds, so that the body arrives in full reads


@dataclass
class StandInProsody:
    answer: Answer = field(default_factory=Answer)
    requests: int = 0
    forwarded_headers: list[dict[str, str]] = field(default_factory=list)
    body_bytes_sent: int = 0  # of the last answer, up to where the client stopped reading

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
                if answer.content_length:
                    self.send_header("Content-Length", str(len(answer.body) * answer.repeat))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                time.sleep(answer.pause_after_headers)
                standin.body_bytes_sent = 0
                # The exporter may have given up waiting or reading, as it should.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for _ in range(answer.repeat):
                        self.wfile.write(answer.body)
                        standin.body_bytes_sent += len(answer.body)

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
