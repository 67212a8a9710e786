"""What a pod spec tells us about Prosody: which container is Prosody, which files its ConfigMaps
put into its config directory, which Prosody version reads them, and the statistics interval and
the /metrics URL that follow (pure; the ConfigMaps' data is passed in, and the config is
evaluated through one function, an `Evaluator`: evaluation.py's workers in the operator)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .annotations import Overrides
from .builders import SIDECAR_NAME
from .intervals import EffectiveInterval, effective_interval, format_duration
from .prosody_config import (
    DIALECT_NAMES,
    DIALECTS,
    NOT_EVALUATED,
    Dialect,
    Finding,
    StatisticsConfig,
    capped_findings,
    evaluate_prosody_config,
)
from .prosody_versions import (
    DEFAULT_UPSTREAM_URL,
    MAINTAINED_DEFAULT,
    DialectChoice,
    image_name,
    pod_dialect,
    sidecar_upstream_url,
)

PROSODY_CONFIG_DIR = "/etc/prosody"
MAIN_CONFIG = "prosody.cfg.lua"
# A container is recognised as Prosody by its name, or by its image's last path segment: the
# Prosody project's prosodyim/prosody (maintained) and prosody/prosody (legacy), Jitsi's
# jitsi/prosody and ghcr.io/jitsi/prosody, and any mirror of them that keeps the name.
PROSODY_NAME = "prosody"

Obj = dict[str, Any]


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
    dialect: Dialect = "0.12"
    version_known: bool = True  # whether the pod is known to run that dialect's Prosody


# Evaluates a config; None when its result is not there in time (the caller falls back).
Evaluator = Callable[[ConfigInputs], StatisticsConfig | None]


def evaluate(inputs: ConfigInputs) -> StatisticsConfig:
    """Evaluate in this process, as a worker of evaluation.py does: the tests' evaluator.
    Unbounded in time (see prosody_config.py): the operator never calls it itself."""
    return evaluate_prosody_config(
        dict(inputs.files),
        main=inputs.main,
        env=dict(inputs.env),
        dialect=inputs.dialect,
        version_known=inputs.version_known,
    )


def literal_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's env values that are written out (valueFrom cannot be known here)."""
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


@dataclass(frozen=True)
class Upstream:
    """Where the sidecar collects Prosody's /metrics, and why there."""

    url: str
    source: str


@dataclass(frozen=True)
class ConfigDecision:
    interval: EffectiveInterval
    upstream: Upstream
    findings: tuple[Finding, ...]  # what the config check found, for Warning Events
    # The Prosody version is unknown and its config reads differently in each dialect: which
    # reading was used, and why (for a Warning Event).
    dialects_disagree: str | None = None
    pending: bool = False  # the config was not evaluated in time: the fallbacks were used


@dataclass(frozen=True)
class _Reading:
    """What a config decides, in one dialect."""

    config: StatisticsConfig

    @property
    def failed(self) -> bool:
        return self.config.interval_source == NOT_EVALUATED

    @property
    def url(self) -> str | None:
        metrics = self.config.metrics
        return sidecar_upstream_url(metrics) if metrics else None

    def key(self) -> tuple[object, ...]:
        return (self.config.interval, self.config.interval_source, self.url)

    def __str__(self) -> str:
        if self.failed:
            return "a config error"
        interval = self.config.interval
        said = (
            "statistics off"
            if interval is None
            else f"interval {interval if isinstance(interval, str) else format_duration(interval)}"
            f" from {self.config.interval_source}"
        )
        return f"{said}, /metrics {f'at {self.url}' if self.url else 'unreachable'}"


def _choose(
    readings: Mapping[Dialect, _Reading], choice: DialectChoice, container: str
) -> tuple[Dialect, str | None]:
    """The dialect to use when the version is unknown, and what to say if the readings differ:
    the only one that reads the config without error (a running Prosody read it), else 13.0,
    the current release and what the maintained image runs by default."""
    ok = [dialect for dialect, reading in readings.items() if not reading.failed]
    chosen: Dialect
    if len(ok) == 1:
        chosen, why = ok[0], "the only one that reads it without an error"
    else:
        chosen = MAINTAINED_DEFAULT
        why = "the current release, what the maintained image prosodyim/prosody runs by default"
    if len({reading.key() for reading in readings.values()}) == 1:
        return chosen, None
    each = "; ".join(f"{DIALECT_NAMES[d]}: {readings[d]}" for d in DIALECTS)
    return chosen, (
        f"The Prosody version of container {container} is not known ({choice.source}), and its "
        f"config reads differently in each ({each}). Used {DIALECT_NAMES[chosen]}'s reading: "
        f"{why}. Say which with the pod annotation prosody-operator.io/prosody-version "
        '(e.g. "13.0" or "0.12")'
    )


def decide_config(
    manual_interval: float,
    pod_spec: Mapping[str, Any],
    container: Mapping[str, Any] | None,
    configmaps: Mapping[str, Mapping[str, str]],
    overrides: Overrides,
    evaluate: Evaluator = evaluate,
) -> ConfigDecision:
    """The scrape interval and the sidecar's upstream URL for a Prosody container, and what its
    config check found. `configmaps` holds the data of the mounted ConfigMaps that exist."""
    container = container or {}
    env = literal_env(container)
    mounts = config_mounts(pod_spec, container) if container else []
    files: dict[str, str] = {}
    for mount in mounts:
        files.update(mount.files(configmaps.get(mount.configmap, {})))
    missing = [
        Finding(name, None, f"ConfigMap {name} not found")
        for name in sorted({m.configmap for m in mounts} - configmaps.keys())
    ]
    config: StatisticsConfig | None = None
    disagree, pending = None, False
    if MAIN_CONFIG in files:
        choice = pod_dialect(overrides.prosody_version, container.get("image"))
        dialects = (choice.dialect,) if choice.dialect else DIALECTS
        inputs = {
            dialect: ConfigInputs(
                tuple(sorted(files.items())),
                tuple(sorted(env.items())),
                dialect=dialect,
                version_known=choice.dialect is not None,
            )
            for dialect in dialects
        }
        results = {dialect: evaluate(each) for dialect, each in inputs.items()}
        if all(result is not None for result in results.values()):
            readings = {d: _Reading(r) for d, r in results.items() if r is not None}
            chosen = choice.dialect
            if chosen is None:
                chosen, disagree = _choose(readings, choice, str(container.get("name")))
            config = readings[chosen].config
        else:
            pending = True
    interval = effective_interval(
        annotation=overrides.interval,
        config_interval=config.interval if config else None,
        config_source=config.interval_source if config else None,
        env=env,
        manual_interval=manual_interval,
    )
    if pending and interval.source != "annotation":
        interval = replace(interval, source=f"{interval.source}; config not evaluated yet")
    # The evaluation's findings are capped already; missing ConfigMaps are one per mount.
    findings = capped_findings(missing, [], MAIN_CONFIG) + (config.findings if config else ())
    return ConfigDecision(
        interval, _upstream(overrides.metrics_url, config, pending), findings, disagree, pending
    )


def _upstream(annotation: str | None, config: StatisticsConfig | None, pending: bool) -> Upstream:
    if annotation:
        return Upstream(annotation, "annotation")
    if config is not None and config.metrics is not None:
        return Upstream(sidecar_upstream_url(config.metrics), config.metrics.source)
    if pending:
        return Upstream(DEFAULT_UPSTREAM_URL, "Prosody's defaults; config not evaluated yet")
    if config is not None and config.interval_source != NOT_EVALUATED:
        # The config leaves /metrics out of the sidecar's reach: its findings say why.
        return Upstream(DEFAULT_UPSTREAM_URL, "Prosody's defaults (see the config's findings)")
    return Upstream(DEFAULT_UPSTREAM_URL, "Prosody's defaults")
