"""Images of the test node's own infrastructure, built here with buildah from scratch and saved as
OCI archives in .cache/infra-images (the product's images are `make images`' business):

* `pause`: the pod sandbox's first process (infra/pause.c, a static C program), which containerd
  runs in every pod to hold its namespaces;
* `prometheus` and `prometheus-config-reloader`: the Prometheus v3.5 and config-reloader v0.85
  binaries built from their Go modules (`make cluster-bins`), so prometheus-operator's StatefulSet
  runs real Prometheus pods on the node.

An image is rebuilt only when what it is made of (the file's bytes, its configuration) changed.
buildah runs as `make images` runs it (testinfra/images.py): storage under .cache/images, vfs
driver, in a mount namespace of its own.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import images
from .gobuild import PROMETHEUS, PROMETHEUS_OPERATOR, prometheus_release
from .layout import BIN_DIR, CACHE_DIR
from .procs import MissingPrerequisite, require_program

INFRA_IMAGE_DIR = CACHE_DIR / "infra-images"
PAUSE_SOURCE = Path(__file__).resolve().parent / "infra" / "pause.c"


@dataclass(frozen=True)
class InfraImage:
    """A one-file image: `source` copied to `/<entrypoint>`, run as `user`."""

    name: str  # e.g. localhost/testinfra/pause:1
    entrypoint: str
    user: str
    directories: tuple[str, ...] = ()  # created empty, owned by `user`

    @property
    def archive(self) -> Path:
        return INFRA_IMAGE_DIR / f"{self.name.rsplit('/', 1)[-1].split(':')[0]}.oci.tar"


PAUSE = InfraImage("localhost/testinfra/pause:1", "/pause", "65535:65535")
PROMETHEUS_IMAGE = InfraImage(
    f"localhost/testinfra/prometheus:{prometheus_release(PROMETHEUS.version)}",
    "/bin/prometheus",
    "65534:65534",
    ("/prometheus",),
)
CONFIG_RELOADER_IMAGE = InfraImage(
    f"localhost/testinfra/prometheus-config-reloader:{PROMETHEUS_OPERATOR.version}",
    "/bin/prometheus-config-reloader",
    "65534:65534",
)


def buildah(*args: str) -> str:
    return images.run(images.buildah(*args), f"buildah {args[0]}").strip()


def compile_pause(directory: Path) -> Path:
    """A static binary, so the image needs nothing else."""
    output = directory / "pause"
    gcc = require_program("gcc", "make system-packages")
    argv = [gcc, "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", str(output)]
    done = subprocess.run([*argv, str(PAUSE_SOURCE)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MissingPrerequisite(
            f"gcc could not build {PAUSE_SOURCE} statically (`make system-packages` installs "
            f"gcc and libc6-dev): {done.stderr.strip()}"
        )
    return output


def build(image: InfraImage, binary: Path) -> None:
    """`buildah from scratch`, the binary, its config; committed and pushed as an OCI archive."""
    container = buildah("from", "scratch")
    try:
        buildah("copy", "--chmod", "0755", container, str(binary), image.entrypoint)
        if image.directories:
            with tempfile.TemporaryDirectory() as empty:
                for directory in image.directories:
                    buildah("copy", "--chown", image.user, container, empty, directory)
        buildah(
            "config",
            "--entrypoint", json.dumps([image.entrypoint]),
            "--user", image.user,
            "--label", "org.opencontainers.image.source=testinfra/infraimages.py",
            container,
        )  # fmt: skip
        buildah("commit", "--quiet", "--rm", container, image.name)
    except BaseException:
        buildah("rm", container)
        raise
    partial = image.archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    buildah("push", "--quiet", image.name, f"oci-archive:{partial}:{image.name}")
    buildah("rmi", image.name)
    partial.rename(image.archive)


def fingerprint(image: InfraImage, binary: Path) -> str:
    digest = hashlib.sha256(repr(image).encode())
    digest.update(binary.read_bytes())
    return digest.hexdigest()


def ensure_built(image: InfraImage, binary: Path) -> Path:
    stamp = image.archive.with_suffix(".stamp")
    wanted = fingerprint(image, binary)
    if not image.archive.exists() or not stamp.exists() or stamp.read_text() != wanted:
        INFRA_IMAGE_DIR.mkdir(parents=True, exist_ok=True)
        build(image, binary)
        stamp.write_text(wanted)
    return image.archive


def build_all(*, prometheus: bool = True) -> list[Path]:
    """The archives of the infrastructure images (the pause image alone without `prometheus`),
    built where missing or stale."""
    with tempfile.TemporaryDirectory() as scratch:
        archives = [ensure_built(PAUSE, compile_pause(Path(scratch)))]
    if prometheus:
        for image, name in (
            (PROMETHEUS_IMAGE, "prometheus3"),
            (CONFIG_RELOADER_IMAGE, "prometheus-config-reloader"),
        ):
            if not (BIN_DIR / name).exists():
                raise MissingPrerequisite(f"{BIN_DIR / name} is missing: run `make cluster-bins`")
            archives.append(ensure_built(image, BIN_DIR / name))
    return archives
