"""Which Prosody version a pod runs, so its config is read in that version's dialect, and the
URL the sidecar collects from (pure).

The dialect comes from, in this order:
1. the pod annotation `prosody-operator.io/prosody-version` ("13", "13.0", "13.0.1", "0.12", ...;
   annotations.py checks it with `dialect_of_version`);
2. the Prosody container's image, when it is an official one: the maintained `prosodyim/prosody`
   (its untagged/`latest` image is 13.0: the image's Dockerfile builds PROSODY_PACKAGE=prosody-13.0
   by default) or the legacy `prosody/prosody`, by version tag;
3. otherwise unknown: the caller evaluates the config in every dialect and reports when they
   disagree.
Prosody 0.10 and 0.11 read their configs like 0.12 (what 13.0 added is what differs), so they
speak the "0.12" dialect; their metrics come from mod_prometheus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from .prosody_config import HTTP_DEFAULT_PORT, METRICS_DEFAULT_PATH, Dialect, MetricsLocation

MAINTAINED_IMAGE: Final = "prosodyim/prosody"
LEGACY_IMAGE: Final = "prosody/prosody"
# What the maintained image's untagged (`latest`) build runs.
MAINTAINED_DEFAULT: Final[Dialect] = "13"

_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # what a URL path keeps unescaped
_DOCKER_HUB = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")
# "13", "13.0", "13.0.1", "0.12.4", optionally followed by "-<variant>" (e.g. a distribution)
_VERSION = re.compile(r"(?P<major>\d+)(?:\.(?P<minor>\d+)(?:\.\d+)?)?(?:-[A-Za-z0-9._-]+)?")


@dataclass(frozen=True)
class DialectChoice:
    dialect: Dialect | None  # None: unknown, evaluate the config in every dialect
    source: str  # why: which annotation or image decided it, or why nothing did


def dialect_of_version(version: str) -> Dialect | None:
    """The config dialect of Prosody `version` ("13.0.1", "0.12", "13"), None if unknown."""
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        return None
    major, minor = int(match["major"]), match["minor"]
    if major == 13:
        return "13"
    if major == 0 and minor is not None and int(minor) in (10, 11, 12):
        return "0.12"
    return None


def image_name(image: str) -> str:
    """The image's last path segment without tag or digest (ghcr.io/jitsi/prosody:1 -> prosody)."""
    return split_image(image)[0].rsplit("/", 1)[-1]


def split_image(image: str) -> tuple[str, str | None]:
    """(repository without a Docker Hub registry prefix, tag or None) of an image reference."""
    name = image.strip().split("@", 1)[0]  # a digest pins a build, the tag still names it
    tag = None
    last_slash = name.rfind("/")
    if ":" in name[last_slash + 1 :]:
        name, tag = name.rsplit(":", 1)
    lowered = name.lower()
    for prefix in _DOCKER_HUB:
        if lowered.startswith(prefix):
            lowered = lowered[len(prefix) :]
            break
    return lowered, tag


def dialect_of_image(image: str) -> DialectChoice:
    repository, tag = split_image(image)
    if repository not in (MAINTAINED_IMAGE, LEGACY_IMAGE):
        return DialectChoice(None, f"image {image} is not an official Prosody image")
    if tag is None and "@" in image:
        return DialectChoice(None, f"image {image}: a digest names no Prosody version")
    if tag is None or tag == "latest":
        if repository == MAINTAINED_IMAGE:
            return DialectChoice(
                MAINTAINED_DEFAULT, f"image {image} (the maintained image's default is 13.0)"
            )
        return DialectChoice(None, f"image {image}: the legacy image's latest names no version")
    dialect = dialect_of_version(tag)
    if dialect is None:
        return DialectChoice(None, f"image {image}: tag {tag} names no Prosody version known here")
    return DialectChoice(dialect, f"image {image}")


def pod_dialect(version: str | None, image: str | None) -> DialectChoice:
    """The dialect of a pod's Prosody: its version annotation (`version`, already checked),
    else its container's image."""
    dialect = dialect_of_version(version) if version is not None else None
    if dialect is not None:
        return DialectChoice(dialect, f"the pod's version annotation ({version})")
    if image:
        return dialect_of_image(image)
    return DialectChoice(None, "the Prosody container names no image")


def sidecar_upstream_url(location: MetricsLocation) -> str:
    """The sidecar's upstream URL for Prosody's /metrics at `location`."""
    host = f"[{location.address}]" if ":" in location.address else location.address
    return f"http://{host}:{location.port}{quote(location.path, safe=_PATH_SAFE)}"


# Where Prosody serves /metrics unless its config says otherwise (and the exporter's default).
DEFAULT_UPSTREAM_URL: Final = sidecar_upstream_url(
    MetricsLocation("127.0.0.1", HTTP_DEFAULT_PORT, METRICS_DEFAULT_PATH, "Prosody's defaults")
)
