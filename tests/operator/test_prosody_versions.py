"""Which dialect a pod's Prosody speaks, and the sidecar's upstream URL: table-driven.

The image tags are those the official images publish: the maintained prosodyim/prosody
(`13.0`, `0.12`, `latest`: its Dockerfile builds prosody-13.0 by default) and the legacy
prosody/prosody (`0.12`, `0.11`, `0.11.9`, `0.10`, `trunk`, `latest`).
"""

from __future__ import annotations

import pytest

from prosody_operator import annotations as ann
from prosody_operator.prosody_config import MetricsLocation
from prosody_operator.prosody_versions import (
    dialect_of_image,
    dialect_of_version,
    image_name,
    pod_dialect,
    sidecar_upstream_url,
    split_image,
)


@pytest.mark.parametrize(
    ("version", "dialect"),
    [
        ("13", "13"),
        ("13.0", "13"),
        ("13.0.1", "13"),
        (" 13.0.1 ", "13"),
        ("13.0.1-trixie", "13"),
        ("0.12", "0.12"),
        ("0.12.3", "0.12"),
        ("0.11.9", "0.12"),  # 0.10 and 0.11 read their configs like 0.12
        ("0.10", "0.12"),
        ("0.9", None),
        ("12", None),
        ("14.0", None),
        ("0", None),
        ("trunk", None),
        ("latest", None),
        ("", None),
        ("13.0.1.2", None),
        ("v13", None),
    ],
)
def test_dialect_of_version(version: str, dialect: str | None) -> None:
    assert dialect_of_version(version) == dialect


@pytest.mark.parametrize(
    ("image", "repository", "tag"),
    [
        ("prosodyim/prosody", "prosodyim/prosody", None),
        ("prosodyim/prosody:13.0", "prosodyim/prosody", "13.0"),
        ("docker.io/prosodyim/prosody:13.0", "prosodyim/prosody", "13.0"),
        ("index.docker.io/Prosodyim/Prosody:0.12", "prosodyim/prosody", "0.12"),
        ("prosodyim/prosody:13.0@sha256:0123abcd", "prosodyim/prosody", "13.0"),
        ("prosodyim/prosody@sha256:0123abcd", "prosodyim/prosody", None),
        (
            "registry.example:5000/prosodyim/prosody",
            "registry.example:5000/prosodyim/prosody",
            None,
        ),
        ("registry.example:5000/prosody:13.0", "registry.example:5000/prosody", "13.0"),
    ],
)
def test_split_image(image: str, repository: str, tag: str | None) -> None:
    assert split_image(image) == (repository, tag)


@pytest.mark.parametrize(
    ("image", "dialect"),
    [
        ("prosodyim/prosody:13.0", "13"),
        ("prosodyim/prosody:0.12", "0.12"),
        ("prosodyim/prosody", "13"),  # the maintained image's default build is 13.0
        ("prosodyim/prosody:latest", "13"),
        ("docker.io/prosodyim/prosody:latest@sha256:0123abcd", "13"),
        ("prosodyim/prosody@sha256:0123abcd", None),  # a digest alone names no version
        ("prosodyim/prosody:trunk", None),
        ("prosody/prosody:0.12", "0.12"),
        ("prosody/prosody:0.11.9", "0.12"),
        ("prosody/prosody:0.10", "0.12"),
        ("prosody/prosody", None),  # the legacy image's latest is an old manual build
        ("prosody/prosody:latest", None),
        ("prosody/prosody:trunk", None),
        ("example.org/team/prosody:13.0", None),  # not an official image
        ("mirror.example/prosodyim/prosody:13.0", None),  # another registry: not known to be it
        ("ghcr.io/prosody-operator/prosody-exporter:0.1.0", None),
    ],
)
def test_dialect_of_image(image: str, dialect: str | None) -> None:
    choice = dialect_of_image(image)
    assert choice.dialect == dialect
    assert image in choice.source


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("prosodyim/prosody:13.0", "prosody"),
        ("ghcr.io/jitsi/prosody:stable-10008", "prosody"),
        ("registry.example:5000/mirror/prosody@sha256:0123abcd", "prosody"),
        ("docker.io/library/nginx", "nginx"),
        ("prosody", "prosody"),
        ("", ""),
    ],
)
def test_image_name(image: str, name: str) -> None:
    """The one image-name parser: what recognises a container as Prosody by its image."""
    assert image_name(image) == name


@pytest.mark.parametrize(
    ("annotations", "image", "dialect", "source", "problem"),
    [
        ({ann.PROSODY_VERSION: "13.0"}, "prosody/prosody:0.12", "13", "annotation", False),
        ({ann.PROSODY_VERSION: "0.12"}, "prosodyim/prosody", "0.12", "annotation", False),
        ({}, "prosodyim/prosody:13.0", "13", "image", False),
        ({ann.PROSODY_VERSION: "thirteen"}, "prosodyim/prosody:0.12", "0.12", "image", True),
        ({ann.PROSODY_VERSION: "thirteen"}, "example.org/prosody", None, "not an official", True),
        ({}, "example.org/prosody:13.0", None, "not an official", False),
        ({}, None, None, "names no image", False),
        ({"other": "13.0"}, "", None, "names no image", False),
    ],
)
def test_pod_dialect(
    annotations: dict[str, str],
    image: str | None,
    dialect: str | None,
    source: str,
    problem: bool,
) -> None:
    """The annotation (as annotations.py checked it: an invalid one is a problem, and ignored),
    else the image."""
    parsed = ann.parse_annotations(annotations)
    choice = pod_dialect(parsed.overrides.prosody_version, image)
    assert choice.dialect == dialect
    assert source in choice.source
    assert bool(parsed.problems) == problem
    if problem:
        assert ann.PROSODY_VERSION in parsed.problems[0]


@pytest.mark.parametrize(
    ("location", "url"),
    [
        (MetricsLocation("127.0.0.1", 5280, "/metrics", ""), "http://127.0.0.1:5280/metrics"),
        (MetricsLocation("::1", 5285, "/metrics", ""), "http://[::1]:5285/metrics"),
        (MetricsLocation("127.0.0.1", 80, "/prom", ""), "http://127.0.0.1:80/prom"),
        (MetricsLocation("127.0.0.1", 5280, "/", ""), "http://127.0.0.1:5280/"),
        (MetricsLocation("127.0.0.1", 5280, "/*/metrics", ""), "http://127.0.0.1:5280/*/metrics"),
        (
            MetricsLocation("127.0.0.1", 5280, "/my metrics?#", ""),
            "http://127.0.0.1:5280/my%20metrics%3F%23",
        ),
    ],
)
def test_sidecar_upstream_url(location: MetricsLocation, url: str) -> None:
    assert sidecar_upstream_url(location) == url
