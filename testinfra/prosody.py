"""A real Prosody on free loopback ports, with mod_http_openmetrics on: Debian's 0.12 package, or
13.0 from bookworm-backports unpacked into .cache/prosody-13 by `make prosody-13`."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .layout import CACHE_DIR
from .procs import MissingPrerequisite, Process, ProcessOwner, free_port, http_ok, require_program

# The versions the tests run; parametrize over these to run a test on each.
VERSIONS = ("0.12", "13")
PROSODY_13_ROOT = CACHE_DIR / "prosody-13"


@dataclass(frozen=True)
class Installation:
    """Where one Prosody version's launchers and Lua source are."""

    version: str
    prosody: str
    prosodyctl: str
    source_dir: Path  # CFG_SOURCEDIR: core/configmanager.lua and friends


def installation(version: str) -> Installation:
    """The installed Prosody `version` ("0.12" or "13"); fails naming the make target if missing."""
    if version == "0.12":
        return Installation(
            version,
            require_program("prosody"),
            require_program("prosodyctl"),
            Path("/usr/lib/prosody"),
        )
    if version == "13":
        launcher = PROSODY_13_ROOT / "usr" / "bin" / "prosody"
        source_dir = PROSODY_13_ROOT / "usr" / "lib" / "prosody"
        # The launchers name the tree they were unpacked into: a moved checkout needs a reinstall.
        if not launcher.exists() or f"CFG_SOURCEDIR='{source_dir}'" not in launcher.read_text():
            raise MissingPrerequisite(
                f"Prosody 13 is not installed in {PROSODY_13_ROOT}: run `make prosody-13`"
            )
        return Installation(
            version, str(launcher), str(launcher.with_name("prosodyctl")), source_dir
        )
    raise ValueError(f"unknown Prosody version {version!r} (known: {', '.join(VERSIONS)})")


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
    version: str = "0.12"
    http_port: int = field(default_factory=free_port)
    c2s_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "prosody.cfg.lua"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    @property
    def installation(self) -> Installation:
        return installation(self.version)

    def start(self, timeout: float = 30.0) -> ProsodyServer:
        binary = self.installation.prosody
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
            f"prosody {self.version}",
            [binary, "--config", str(self.config_path)],
            self.workdir / "prosody.log",
        )
        self.process.wait_ready(lambda: http_ok(self.metrics_url), timeout)
        return self


def metrics_text(version: str, statistics_interval: str | int = "manual") -> str:
    """Start Prosody `version`, read its /metrics once, stop it: what a real one emits."""
    workdir = Path(tempfile.mkdtemp(prefix=f"prosody-{version}-"))
    try:
        with ProsodyServer(workdir, statistics_interval, version=version) as prosody:
            return httpx.get(prosody.metrics_url, timeout=10).text
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
