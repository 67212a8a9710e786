"""What a Prosody pod spec tells us: which container is Prosody, where its config comes from,
and the statistics interval that follows (pure; the ConfigMaps' data is passed in)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .annotations import Overrides
from .builders import SIDECAR_NAME
from .intervals import EffectiveInterval, effective_interval
from .prosody_config import Finding, evaluate_prosody_config
from .settings import OperatorSettings

PROSODY_CONFIG_DIR = "/etc/prosody"
MAIN_CONFIG = "prosody.cfg.lua"

Obj = dict[str, Any]


def find_prosody_container(pod_spec: Mapping[str, Any], name: str | None) -> Obj | None:
    """The container named by the annotation, else one named "prosody", else the first one."""
    containers = [c for c in pod_spec.get("containers") or [] if c.get("name") != SIDECAR_NAME]
    for wanted in (name, "prosody"):
        for container in containers:
            if wanted and container.get("name") == wanted:
                return dict(container)
    if name:
        return None
    return dict(containers[0]) if containers else None


@dataclass(frozen=True)
class ConfigSource:
    """One ConfigMap mounted into Prosody's config directory."""

    configmap: str
    directory: str  # where its files land, relative to the config dir ("" or "conf.d")
    sub_path: str | None  # a single-file mount: which file of the ConfigMap
    file_name: str | None  # ... and under which name it lands
    items: Mapping[str, str] | None  # key -> path, when the volume lists items

    def files(self, data: Mapping[str, str]) -> dict[str, str]:
        """The files this mount puts into the config directory, given the ConfigMap's data."""
        by_path = (
            {path: data[key] for key, path in self.items.items() if key in data}
            if self.items is not None
            else dict(data)
        )
        if self.sub_path is not None:
            if self.sub_path not in by_path:
                return {}
            by_path = {self.file_name or self.sub_path: by_path[self.sub_path]}
        return {posixpath.join(self.directory, path): text for path, text in by_path.items()}


def config_sources(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], config_dir: str = PROSODY_CONFIG_DIR
) -> list[ConfigSource]:
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    sources = []
    for mount in container.get("volumeMounts") or []:
        configmap = (volumes.get(mount.get("name")) or {}).get("configMap")
        mount_path = posixpath.normpath(mount.get("mountPath", ""))
        if not configmap or not (mount_path + "/").startswith(config_dir + "/"):
            continue
        relative = posixpath.relpath(mount_path, config_dir)
        items = configmap.get("items")
        sub_path = mount.get("subPath")
        directory, file_name = relative, None
        if sub_path:
            directory, file_name = posixpath.split(relative)
        sources.append(
            ConfigSource(
                configmap=configmap["name"],
                directory="" if directory == "." else directory,
                sub_path=sub_path,
                file_name=file_name,
                items={i["key"]: i["path"] for i in items} if items else None,
            )
        )
    return sources


def literal_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's env values that are written out (valueFrom cannot be known here)."""
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


@dataclass(frozen=True)
class IntervalDecision:
    interval: EffectiveInterval
    findings: tuple[Finding, ...]  # what the config check found, for Warning Events


def decide_interval(
    settings: OperatorSettings,
    container: Mapping[str, Any] | None,
    sources: list[ConfigSource],
    configmaps: Mapping[str, Mapping[str, str]],
    overrides: Overrides,
) -> IntervalDecision:
    """The scrape interval for a Prosody container, and what its config check found.

    `configmaps` holds the data of the ConfigMaps in `sources` that exist.
    """
    env = literal_env(container or {})
    files: dict[str, str] = {}
    for source in sources:
        files.update(source.files(configmaps.get(source.configmap, {})))
    findings: list[Finding] = [
        Finding(source.configmap, None, f"ConfigMap {source.configmap} not found")
        for source in sources
        if source.configmap not in configmaps
    ]
    config_interval, config_source = None, None
    if MAIN_CONFIG in files:
        config = evaluate_prosody_config(files, main=MAIN_CONFIG, env=env)
        config_interval, config_source = config.interval, config.interval_source
        findings.extend(config.findings)
    interval = effective_interval(
        annotation=overrides.interval,  # type: ignore[arg-type]
        config_interval=config_interval,
        config_source=config_source,
        env=env,
        manual_interval=settings.manual_interval,
    )
    return IntervalDecision(interval, tuple(findings))
