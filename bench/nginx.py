"""The baseline a user would deploy instead of the sidecar: nginx in front of Prosody.

Configured as issue 15 describes it: allow/deny on the pod network (loopback here, where the
benchmark's clients are), a 5 s cache of 200 answers with `proxy_cache_lock on` (so concurrent
misses cost Prosody one request), and X-Forwarded-For cleared (Prosody would believe it from
loopback). One worker process: the sidecar is one process too. Debian's nginx-light (which is
Debian's nginx plus the echo module) is installed by `make bench-exporter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from testinfra.procs import Process, ProcessOwner, free_port, http_ok, require_program


def build_nginx_config(workdir: Path, *, port: int, upstream_url: str, allow: str) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {workdir}/temp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
# Written by bench/nginx.py for one benchmark run.
daemon off;
worker_processes 1;
user root;  # the benchmark runs as root; the workers must read and write the cache below
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temp}
  proxy_cache_path {workdir}/cache levels=1 keys_zone=metrics:1m max_size=16m;
  server {{
    listen 127.0.0.1:{port};
    allow {allow};
    deny all;
    location = /metrics {{
      proxy_pass {upstream_url};
      proxy_cache metrics;
      proxy_cache_valid 200 5s;
      proxy_cache_lock on;
      proxy_set_header X-Forwarded-For "";
    }}
  }}
}}
"""


@dataclass
class NginxSidecar(ProcessOwner):
    workdir: Path
    upstream_url: str
    allow: str = "127.0.0.0/8"
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self, timeout: float = 30.0) -> NginxSidecar:
        binary = require_program("nginx", "make bench-exporter")
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nginx.conf"
        config.write_text(
            build_nginx_config(
                self.workdir, port=self.port, upstream_url=self.upstream_url, allow=self.allow
            )
        )
        argv = [binary, "-p", str(self.workdir), "-e", str(self.workdir / "error.log")]
        self.process = Process("nginx", [*argv, "-c", str(config)], self.workdir / "nginx.log")
        self.process.wait_ready(lambda: http_ok(self.metrics_url), timeout)
        return self

    def pids(self) -> list[int]:
        """The master and its workers: their memory is what the sidecar's would be."""
        assert self.process is not None
        master = self.process.popen.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return [master, *(int(pid) for pid in children)]
