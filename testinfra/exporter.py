"""The real `prosody-exporter` console script, run as a process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from prosody_operator.settings import OperatorSettings

from .procs import Process, ProcessOwner, free_port, http_ok, venv_command


def exporter_command() -> str:
    return venv_command("prosody-exporter")


def default_memory_limit_mib() -> int:
    """The sidecar's memory limit as the operator injects it by default, in MiB."""
    quantity = str(OperatorSettings.model_fields["sidecar_memory_limit"].default)
    if not quantity.endswith("Mi"):
        raise ValueError(f"sidecar_memory_limit {quantity!r}: expected a Mi quantity")
    return int(quantity.removesuffix("Mi"))


@dataclass
class ExporterProcess(ProcessOwner):
    workdir: Path
    upstream_url: str
    interval: float = 1.0
    settings: dict[str, str] = field(default_factory=dict)  # extra PROSODY_EXPORTER_* values
    listen_host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    netns: str | None = None
    command: list[str] | None = None  # instead of the console script (bench/stallprobe.py)
    process: Process | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        if self.listen_host in ("::", "0.0.0.0"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "PROSODY_EXPORTER_UPSTREAM_URL": self.upstream_url,
            "PROSODY_EXPORTER_INTERVAL": str(self.interval),
            "PROSODY_EXPORTER_LISTEN_HOST": self.listen_host,
            "PROSODY_EXPORTER_LISTEN_PORT": str(self.port),
            **{f"PROSODY_EXPORTER_{k.upper()}": v for k, v in self.settings.items()},
        }

    def start(self, wait_for_ready: bool = True, timeout: float = 30.0) -> ExporterProcess:
        self.process = Process(
            "prosody-exporter",
            self.command or [exporter_command()],
            self.workdir / f"exporter-{self.port}.log",
            env=self.env(),
            netns=self.netns,
        )
        path = "/readyz" if wait_for_ready else "/healthz"
        if self.netns is None:
            self.process.wait_ready(lambda: http_ok(self.base_url + path), timeout)
        return self

    def sample_value(self, name: str, **labels: str) -> float | None:
        """One sample of its /metrics (from loopback, Prometheus text); None when absent."""
        response = httpx.get(self.base_url + "/metrics", timeout=5)
        assert response.status_code == 200, response.text
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None
