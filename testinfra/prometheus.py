"""A real Prometheus (Debian's package) on loopback, scraping the targets it is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from .procs import Process, ProcessOwner, free_port, http_ok, require_program, wait_until


def build_prometheus_config(targets: list[str], scrape_interval: str = "1s") -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
        "scrape_configs": [{"job_name": "prosody", "static_configs": [{"targets": targets}]}],
    }


@dataclass
class PrometheusServer(ProcessOwner):
    workdir: Path
    config: dict[str, Any]
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = require_program("prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config))
        self.process = Process(
            "prometheus",
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            self.workdir / "prometheus.log",
        )
        self.process.wait_ready(lambda: http_ok(self.url + "/-/ready"), timeout)
        return self

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return targets

    def wait_for_series(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def has_series() -> bool:
            found[:] = self.query(promql)
            return bool(found)

        wait_until(has_series, timeout, f"Prometheus to return {promql}", interval=0.5)
        return found
