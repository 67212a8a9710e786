"""Container images built here with buildah, without a registry or a Docker engine.

    python -m testinfra.images build    # make images

- One base for every image: Debian bookworm with its Python 3.11, made by mmdebstrap and committed
  with buildah as `localhost/bookworm-python:3.11` (users' builds get the public
  python:3.11-slim-bookworm instead, the Dockerfiles' default BASE: the same Debian and Python).
- `prosody-exporter` and `prosody-operator` from exporter/Dockerfile and operator/Dockerfile,
  tagged as the chart refers to them by default (its image repositories, its appVersion).
- Prosody 0.12 (bookworm's 0.12.3) and 13.0 (bookworm-backports' 13.0.1) from
  testinfra/prosody-image, for the end-to-end pods.

Each image is saved as an OCI archive, .cache/images/<name>.oci.tar, for `ctr images import` (or
`podman load`). It is rebuilt only when its fingerprint (Dockerfile, the files it copies, build
arguments, the base's recipe) differs from the stamp written after its last build. buildah keeps
its storage under .cache/images (vfs driver, chroot isolation: no daemon); pip inside a build
reaches PyPI through the host's CA bundle, passed as the build secret `hostca`, which is mounted
for the RUN steps that ask for it and is in no layer.

containers/image writes a cache of blob metadata to /var/lib/containers/cache whatever the storage
root, so buildah and podman run in a private mount namespace with that folder replaced by one in
.cache: nothing lands in /var/lib/containers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .layout import CACHE_DIR, REPO_ROOT
from .procs import MissingPrerequisite, require_program

IMAGES_DIR = CACHE_DIR / "images"
STAMP_DIR = IMAGES_DIR / "stamps"
BUILDAH_ROOT = IMAGES_DIR / "buildah"
PODMAN_ROOT = IMAGES_DIR / "podman"
TMP_DIR = IMAGES_DIR / "tmp"
# Bound over /var/lib/containers for the tools (see the module's docstring).
VAR_LIB_CONTAINERS = IMAGES_DIR / "var-lib-containers"
HOST_VAR_LIB_CONTAINERS = Path("/var/lib/containers")
CHART_DIR = REPO_ROOT / "charts" / "prosody-operator"
PROSODY_CONTEXT = Path(__file__).resolve().parent / "prosody-image"
# The host's CA bundle (Debian's place for it), handed to pip inside builds as a secret.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

BASE_REFERENCE = "localhost/bookworm-python:3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_SOURCES = (
    f"deb {DEBIAN_MIRROR} bookworm main",
    f"deb {DEBIAN_MIRROR} bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Files nobody needs in a container; Debian's slim images leave them out the same way.
BASE_DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*")

# Names of files in a build context that never go into an image (as in .dockerignore).
IGNORED_NAMES = ("__pycache__", ".egg-info", ".pyc")


class ImageError(RuntimeError):
    """An image could not be built or is missing; the message says which and how."""


@dataclass(frozen=True)
class Image:
    name: str  # the archive's name: .cache/images/<name>.oci.tar
    reference: str  # the tag inside the archive, and the image's name once imported
    dockerfile: Path
    context: Path
    build_args: tuple[tuple[str, str], ...] = ()

    @property
    def archive(self) -> Path:
        return IMAGES_DIR / f"{self.name}.oci.tar"


def chart_image_references(chart_dir: Path = CHART_DIR) -> dict[str, str]:
    """The operator and sidecar images the chart's default values name: repository:appVersion."""
    app_version = yaml.safe_load((chart_dir / "Chart.yaml").read_text())["appVersion"]
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    operator, sidecar = values["image"], values["sidecar"]["image"]
    return {
        "prosody-operator": f"{operator['repository']}:{operator['tag'] or app_version}",
        "prosody-exporter": f"{sidecar['repository']}:{sidecar['tag'] or app_version}",
    }


def product_images() -> tuple[Image, ...]:
    references = chart_image_references()
    return tuple(
        Image(name, references[name], REPO_ROOT / folder / "Dockerfile", REPO_ROOT)
        for name, folder in (("prosody-exporter", "exporter"), ("prosody-operator", "operator"))
    )


PROSODY_DOCKERFILE = PROSODY_CONTEXT / "Dockerfile"
# Tagged by release series, like the official image: a Debian or backports update of the package
# (a new revision, or 13.0.2 replacing 13.0.1 in backports, which keeps only the newest) still
# builds, and a new series fails the build.
PROSODY_0_12 = Image(
    "prosody-0.12",
    "localhost/prosody:0.12",
    PROSODY_DOCKERFILE,
    PROSODY_CONTEXT,
    (("PROSODY_SERIES", "0.12"),),
)
PROSODY_13 = Image(
    "prosody-13",
    "localhost/prosody:13.0",
    PROSODY_DOCKERFILE,
    PROSODY_CONTEXT,
    (("PROSODY_SERIES", "13.0"), ("SUITE", "bookworm-backports")),
)


def all_images() -> tuple[Image, ...]:
    return (*product_images(), PROSODY_0_12, PROSODY_13)


# --- fingerprints -------------------------------------------------------------------------------


def mmdebstrap_command(output: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        # Merged /usr without the usrmerge package (which would pull in perl).
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        f"--include={','.join(BASE_PACKAGES)}",
        '--aptopt=APT::Install-Recommends "false"',
        '--aptopt=Acquire::Languages "none"',
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in BASE_DPKG_EXCLUDES),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "bookworm",
        str(output),
        *BASE_SOURCES,
    ]


def base_fingerprint() -> str:
    recipe = mmdebstrap_command(Path("base.tar"))
    return hashlib.sha256("\0".join([BASE_REFERENCE, *recipe]).encode()).hexdigest()


def copied_sources(dockerfile: str) -> list[str]:
    """The build-context paths a Dockerfile's COPY instructions read (not `COPY --from=`)."""
    sources = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY":
            arguments = [word for word in words[1:] if not word.startswith("--")]
            if not any(word.startswith("--from") for word in words[1:]):
                sources += arguments[:-1]
    return sources


def context_files(context: Path, source: str) -> list[Path]:
    path = context / source
    if not path.exists():
        raise ImageError(f"{path} is copied into an image but does not exist")
    candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [
        file
        for file in candidates
        if file.is_file() and not any(part.endswith(IGNORED_NAMES) for part in file.parts)
    ]


def image_fingerprint(image: Image, base: str) -> str:
    digest = hashlib.sha256()
    for part in (base, image.reference, repr(image.build_args)):
        digest.update(part.encode() + b"\0")
    text = image.dockerfile.read_text()
    digest.update(text.encode() + b"\0")
    for source in copied_sources(text):
        for file in context_files(image.context, source):
            digest.update(str(file.relative_to(image.context)).encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp_path(name: str) -> Path:
    return STAMP_DIR / f"{name}.stamp"


def is_stamped(name: str, fingerprint: str) -> bool:
    stamp = stamp_path(name)
    return stamp.exists() and stamp.read_text().strip() == fingerprint


# --- the tools ----------------------------------------------------------------------------------


def contained(command: list[str]) -> list[str]:
    """`command` in a private mount namespace whose /var/lib/containers is VAR_LIB_CONTAINERS."""
    VAR_LIB_CONTAINERS.mkdir(parents=True, exist_ok=True)
    HOST_VAR_LIB_CONTAINERS.mkdir(parents=True, exist_ok=True)  # a mount point; stays empty
    private = shlex.quote(str(VAR_LIB_CONTAINERS))
    script = f'mount --bind {private} {HOST_VAR_LIB_CONTAINERS} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]


def tool_env() -> dict[str, str]:
    TMP_DIR.mkdir(parents=True, exist_ok=True)
    # Large temporary files (layers being compressed, mmdebstrap's tree) stay in .cache.
    return {**os.environ, "TMPDIR": str(TMP_DIR)}


def buildah(*args: str) -> list[str]:
    return contained(
        [
            require_program("buildah"),
            "--root",
            str(BUILDAH_ROOT / "storage"),
            "--runroot",
            str(BUILDAH_ROOT / "run"),
            "--storage-driver",
            "vfs",
            *args,
        ]
    )


def run(command: list[str], what: str) -> str:
    """Run a build step; its progress goes to the terminal, its standard output is returned."""
    result = subprocess.run(command, env=tool_env(), stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ImageError(f"{what} failed (exit {result.returncode}): {shlex.join(command)}")
    return result.stdout


def has_image(reference: str) -> bool:
    result = subprocess.run(
        buildah("inspect", "--type", "image", reference),
        env=tool_env(),
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


# --- building -----------------------------------------------------------------------------------


def build_base(fingerprint: str) -> None:
    require_program("mmdebstrap")
    tarball = TMP_DIR / "bookworm-python.tar"
    try:
        run(mmdebstrap_command(tarball), "mmdebstrap of the base image")
        container = run(buildah("from", "scratch"), "buildah from scratch").strip()
        run(buildah("add", container, str(tarball), "/"), "buildah add of the base")
        run(buildah("config", "--cmd", '["python3"]', container), "buildah config of the base")
        run(buildah("commit", "--rm", container, BASE_REFERENCE), "buildah commit of the base")
    finally:
        tarball.unlink(missing_ok=True)
    stamp_path("base").write_text(fingerprint + "\n")


def build_command(image: Image) -> list[str]:
    command = [
        "bud",
        "--isolation",
        "chroot",
        "--pull=never",
        "--build-arg",
        f"BASE={BASE_REFERENCE}",
    ]
    for name, value in image.build_args:
        command += ["--build-arg", f"{name}={value}"]
    if HOST_CA_BUNDLE.exists():
        command += ["--secret", f"id=hostca,src={HOST_CA_BUNDLE}"]
    return buildah(*command, "-f", str(image.dockerfile), "-t", image.reference, str(image.context))


def build_image(image: Image, fingerprint: str) -> None:
    stamp_path(image.name).unlink(missing_ok=True)
    run(build_command(image), f"building {image.reference}")
    # Written beside the archive and renamed, so an interrupted push never leaves half of one.
    partial = image.archive.with_name(image.archive.name + ".partial")
    partial.unlink(missing_ok=True)
    run(
        buildah("push", "--quiet", image.reference, f"oci-archive:{partial}:{image.reference}"),
        f"saving {image.reference} to {image.archive}",
    )
    partial.rename(image.archive)
    stamp_path(image.name).write_text(fingerprint + "\n")


def build_all(images: tuple[Image, ...] | None = None) -> None:
    """Build the base and every image that is missing or stale, one at a time (2-core CI)."""
    STAMP_DIR.mkdir(parents=True, exist_ok=True)
    base = base_fingerprint()
    stale = []
    for image in all_images() if images is None else images:
        fingerprint = image_fingerprint(image, base)
        if image.archive.exists() and is_stamped(image.name, fingerprint):
            log(f"{image.reference} is up to date ({image.archive.name})")
        else:
            stale.append((image, fingerprint))
    if not stale:
        return
    if not (is_stamped("base", base) and has_image(BASE_REFERENCE)):
        started = time.monotonic()
        log(f"making the base image {BASE_REFERENCE} with mmdebstrap")
        build_base(base)
        log(f"made {BASE_REFERENCE} in {time.monotonic() - started:.0f} s")
    for image, fingerprint in stale:
        started = time.monotonic()
        log(f"building {image.reference} from {image.dockerfile.relative_to(REPO_ROOT)}")
        build_image(image, fingerprint)
        log(f"built {image.archive.name} in {time.monotonic() - started:.0f} s")
    # Images replaced by a rebuild are left untagged; with vfs each holds a full copy of its tree.
    run(buildah("rmi", "--prune"), "removing replaced images")


# --- reading and running the archives ----------------------------------------------------------


def require_archive(image: Image) -> Path:
    if not image.archive.exists():
        raise ImageError(f"{image.archive} is missing: `make images` builds it")
    return image.archive


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise ImageError(f"no {name} in an image archive")
    return member.read()


def _blob(tar: tarfile.TarFile, digest: str) -> bytes:
    return _member(tar, "blobs/" + digest.replace(":", "/"))


REF_NAME = "org.opencontainers.image.ref.name"


def _manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    index = json.loads(_member(tar, "index.json"))
    manifest: dict[str, Any] = json.loads(_blob(tar, index["manifests"][0]["digest"]))
    return manifest


def archive_references(image: Image) -> list[str]:
    """The names the archive gives its images (what `ctr images import` tags them as)."""
    with tarfile.open(require_archive(image)) as tar:
        index = json.loads(_member(tar, "index.json"))
    return [manifest["annotations"][REF_NAME] for manifest in index["manifests"]]


def archive_config(image: Image) -> dict[str, Any]:
    """The image's OCI configuration (its `config` holds User, Entrypoint, Env...) and `id`."""
    with tarfile.open(require_archive(image)) as tar:
        digest = _manifest(tar)["config"]["digest"]
        config: dict[str, Any] = json.loads(_blob(tar, digest))
    return {**config, "id": digest.removeprefix("sha256:")}


def archive_files(image: Image) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every regular file in the image's layers, lowest layer first."""
    with tarfile.open(require_archive(image)) as tar:
        for layer in _manifest(tar)["layers"]:
            with tarfile.open(fileobj=io.BytesIO(_blob(tar, layer["digest"]))) as files:
                for member in files:
                    if member.isfile() and (content := files.extractfile(member)) is not None:
                        yield member.name, content.read()


def podman(*args: str) -> list[str]:
    """podman on storage of its own in .cache (overlay: a container starts in a second, where
    vfs copies the whole tree), with the flags this host needs: runc (crun refuses hybrid
    cgroups), cgroupfs, no journald."""
    return contained(
        [
            require_program("podman"),
            "--root",
            str(PODMAN_ROOT / "storage"),
            "--runroot",
            str(PODMAN_ROOT / "run"),
            "--tmpdir",
            str(PODMAN_ROOT / "tmp"),
            "--storage-driver",
            "overlay",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]
    )


def load_into_podman(image: Image) -> None:
    """Load the archive into podman's storage unless that very image is there already."""
    wanted = archive_config(image)["id"]
    present = subprocess.run(
        podman("image", "inspect", "--format", "{{.Id}}", image.reference),
        env=tool_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if present.returncode != 0 or present.stdout.strip() != wanted:
        run(
            podman("load", "--quiet", "--input", str(image.archive)), f"podman load {image.archive}"
        )
        # The image this one replaced under the same name, if any.
        run(podman("image", "prune", "--force"), "podman image prune")


@dataclass(frozen=True)
class Confinement:
    """What podman enforces on a container, as a pod's securityContext would."""

    user: str | None = "65532:65532"  # None: the image's own USER
    read_only: bool = True
    env: tuple[tuple[str, str], ...] = ()


def run_container(
    image: Image,
    args: list[str],
    confinement: Confinement = Confinement(),
    *,
    entrypoint: str | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run the image (from its archive) once, with all capabilities dropped, no new privileges,
    podman's default seccomp profile and no network but loopback; killed after `timeout`."""
    load_into_podman(image)
    name = f"prosody-operator-test-{uuid.uuid4().hex[:8]}"
    flags = ["--rm", "--name", name, "--network", "none", "--timeout", str(int(timeout))]
    flags += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    # Raising rlimits is not permitted here: keep podman from trying.
    flags += ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
    if confinement.user:
        flags += ["--user", confinement.user]
    if confinement.read_only:
        # No tmpfs on /tmp, /run, /var/tmp either: a pod's read-only root has none.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    for key, value in confinement.env:
        flags += ["--env", f"{key}={value}"]
    if entrypoint is not None:
        flags += ["--entrypoint", entrypoint]
    try:
        return subprocess.run(
            podman("run", *flags, image.reference, *args),
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            check=False,
        )
    finally:
        subprocess.run(
            podman("rm", "--force", "--ignore", "--time", "1", name),
            env=tool_env(),
            capture_output=True,
            check=False,
        )


def log(message: str) -> None:
    print(f"[testinfra] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m testinfra.images")
    parser.add_argument("command", choices=["build"])
    parser.parse_args()
    try:
        build_all()
    except (ImageError, MissingPrerequisite) as error:
        sys.exit(f"testinfra.images: {error}")


if __name__ == "__main__":
    main()
