"""A real Prosody (Debian's package) on free loopback ports, with mod_http_openmetrics on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .procs import Process, ProcessOwner, free_port, http_ok, require_program

MODULES = ("http_openmetrics", "roster", "saslauth", "register", "ping")


def build_prosody_config(
    workdir: Path,
    *,
    http_port: int,
    c2s_port: int,
    statistics_interval: str | int = "manual",
    extra_global: str = "",
    modules: tuple[str, ...] = MODULES,
) -> str:
    interval = (
        f'"{statistics_interval}"' if isinstance(statistics_interval, str) else statistics_interval
    )
    modules_enabled = ", ".join(f'"{module}"' for module in modules)
    return f'''
-- Written by testinfra/prosody.py for one test run.
pidfile = "{workdir}/prosody.pid"
data_path = "{workdir}/data"
daemonize = false
run_as_root = true -- tests and CI run as root; Prosody refuses otherwise
log = {{ info = "*console" }}
plugin_paths = {{}}
modules_enabled = {{ {modules_enabled} }}
allow_registration = true
authentication = "internal_hashed"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
c2s_ports = {{ {c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{}}
component_ports = {{}}
http_ports = {{ {http_port} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{}}
statistics = "internal"
statistics_interval = {interval}
{extra_global}
VirtualHost "localhost"
'''


@dataclass
class ProsodyServer(ProcessOwner):
    workdir: Path
    statistics_interval: str | int = "manual"
    extra_global: str = ""
    modules: tuple[str, ...] = MODULES  # the global modules_enabled
    http_port: int = field(default_factory=free_port)
    c2s_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "prosody.cfg.lua"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    def start(self, timeout: float = 30.0) -> ProsodyServer:
        binary = require_program("prosody")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            build_prosody_config(
                self.workdir,
                http_port=self.http_port,
                c2s_port=self.c2s_port,
                statistics_interval=self.statistics_interval,
                extra_global=self.extra_global,
                modules=self.modules,
            )
        )
        self.process = Process(
            "prosody", [binary, "--config", str(self.config_path)], self.workdir / "prosody.log"
        )
        self.process.wait_ready(lambda: http_ok(self.metrics_url), timeout)
        return self
