"""What a pod spec tells us about Prosody: which container is Prosody, which files its ConfigMaps
put into its config directory, and the statistics interval that follows (pure; the ConfigMaps'
data is passed in, and the config is evaluated through one function, `evaluate`)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .annotations import Overrides
from .builders import SIDECAR_NAME
from .intervals import EffectiveInterval, effective_interval
from .prosody_config import Finding, StatisticsConfig, evaluate_prosody_config

PROSODY_CONFIG_DIR = "/etc/prosody"
MAIN_CONFIG = "prosody.cfg.lua"
# A container is recognised as Prosody by its name, or by its image's last path segment: the
# Prosody project's prosodyim/prosody (maintained) and prosody/prosody (legacy), Jitsi's
# jitsi/prosody and ghcr.io/jitsi/prosody, and any mirror of them that keeps the name.
PROSODY_NAME = "prosody"

Obj = dict[str, Any]


def image_name(image: str) -> str:
    """The image's last path segment without tag or digest (ghcr.io/jitsi/prosody:1 -> prosody)."""
    without_digest = image.split("@", 1)[0]
    last = without_digest.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def is_prosody(container: Mapping[str, Any]) -> bool:
    return container.get("name") == PROSODY_NAME or (
        image_name(str(container.get("image") or "")) == PROSODY_NAME
    )


def find_prosody_container(
    pod_spec: Mapping[str, Any], name: str | None, *, first_otherwise: bool
) -> Obj | None:
    """The container named `name` (None when there is none), else the first one named "prosody",
    else the first with a Prosody image, else (`first_otherwise`) the first container."""
    containers = [c for c in pod_spec.get("containers") or [] if c.get("name") != SIDECAR_NAME]
    if name:
        return next((dict(c) for c in containers if c.get("name") == name), None)
    named = [c for c in containers if c.get("name") == PROSODY_NAME]
    found = named or [c for c in containers if is_prosody(c)]
    if not found and first_otherwise:
        found = containers
    return dict(found[0]) if found else None


# --- ConfigMap mounts -> config files ----------------------------------------------------------


def _config_path(path: str, config_dir: str) -> str:
    """A path as evaluate_prosody_config takes it: relative to the config dir when inside it,
    else absolute."""
    path = posixpath.normpath(path)
    if path.startswith(config_dir + "/"):
        return path[len(config_dir) + 1 :]
    return path


@dataclass(frozen=True)
class ConfigMount:
    """One ConfigMap volume mounted into a container. The only place that knows how a mount
    (a directory or a `subPath`, with or without `items`) lays a ConfigMap's keys out as files."""

    configmap: str
    mount_path: str
    sub_path: str | None = None
    items: tuple[tuple[str, str], ...] | None = None  # (key, path), when the volume lists items

    def files(
        self, data: Mapping[str, str], config_dir: str = PROSODY_CONFIG_DIR
    ) -> dict[str, str]:
        """The files this mount shows, given the ConfigMap's data, keyed as for
        evaluate_prosody_config (relative to `config_dir`, or absolute outside it)."""
        in_volume = (
            {path: data[key] for key, path in self.items if key in data}
            if self.items is not None
            else dict(data)
        )
        sub_path = posixpath.normpath(self.sub_path) if self.sub_path else None
        files = {}
        for path, text in in_volume.items():
            path = posixpath.normpath(path)
            if sub_path is None:
                target = posixpath.join(self.mount_path, path)
            elif path == sub_path:  # a single file
                target = self.mount_path
            elif path.startswith(sub_path + "/"):  # a folder of the volume
                target = posixpath.join(self.mount_path, path[len(sub_path) + 1 :])
            else:
                continue
            files[_config_path(target, config_dir)] = text
        return files


def config_mounts(
    pod_spec: Mapping[str, Any],
    container: Mapping[str, Any],
    config_dir: str = PROSODY_CONFIG_DIR,
) -> list[ConfigMount]:
    """The ConfigMap volumes the container mounts in (or at) its config directory."""
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        configmap = (volumes.get(mount.get("name")) or {}).get("configMap")
        mount_path = posixpath.normpath(mount.get("mountPath") or "/")
        if not configmap or not (mount_path + "/").startswith(config_dir + "/"):
            continue
        items = configmap.get("items")
        mounts.append(
            ConfigMount(
                configmap=configmap.get("name", ""),
                mount_path=mount_path,
                sub_path=mount.get("subPath") or None,
                items=tuple((i["key"], i["path"]) for i in items) if items else None,
            )
        )
    return mounts


def prosody_configmaps(pod_spec: Mapping[str, Any], container_name: str | None) -> set[str]:
    """The ConfigMaps Prosody's config may come from (explicit opt-in rules for the container)."""
    container = find_prosody_container(pod_spec, container_name, first_otherwise=True)
    return {m.configmap for m in config_mounts(pod_spec, container)} if container else set()


# --- Evaluating the config ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigInputs:
    """Everything an evaluation depends on; hashable, so that a cache can key on it."""

    files: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    main: str = MAIN_CONFIG


Evaluator = Callable[[ConfigInputs], StatisticsConfig]


def evaluate(inputs: ConfigInputs) -> StatisticsConfig:
    """The one place the operator evaluates a Prosody config (in process, for now)."""
    return evaluate_prosody_config(dict(inputs.files), main=inputs.main, env=dict(inputs.env))


def literal_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's env values that are written out (valueFrom cannot be known here)."""
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


@dataclass(frozen=True)
class IntervalDecision:
    interval: EffectiveInterval
    findings: tuple[Finding, ...]  # what the config check found, for Warning Events


def decide_interval(
    manual_interval: float,
    pod_spec: Mapping[str, Any],
    container: Mapping[str, Any] | None,
    configmaps: Mapping[str, Mapping[str, str]],
    overrides: Overrides,
    evaluate: Evaluator = evaluate,
) -> IntervalDecision:
    """The scrape interval for a Prosody container, and what its config check found.

    `configmaps` holds the data of the mounted ConfigMaps that exist.
    """
    env = literal_env(container or {})
    mounts = config_mounts(pod_spec, container) if container else []
    files: dict[str, str] = {}
    for mount in mounts:
        files.update(mount.files(configmaps.get(mount.configmap, {})))
    findings: list[Finding] = [
        Finding(name, None, f"ConfigMap {name} not found")
        for name in sorted({m.configmap for m in mounts} - configmaps.keys())
    ]
    config_interval, config_source = None, None
    if MAIN_CONFIG in files:
        config = evaluate(ConfigInputs(tuple(sorted(files.items())), tuple(sorted(env.items()))))
        config_interval, config_source = config.interval, config.interval_source
        findings.extend(config.findings)
    interval = effective_interval(
        annotation=overrides.interval,
        config_interval=config_interval,
        config_source=config_source,
        env=env,
        manual_interval=manual_interval,
    )
    return IntervalDecision(interval, tuple(findings))
