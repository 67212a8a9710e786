"""Build the control plane's binaries from pinned upstream Go modules with the ordinary `go` client.

Each folder under testinfra/go/ is a tiny Go module whose go.mod pins one upstream release (and
go.sum pins its dependencies); `tool` lines name the commands to build. A binary is rebuilt only
when its fingerprint (go.mod, go.sum, go version, package, ldflags) differs from the stamp written
next to it after the last successful build. Go's module and build caches stay at their defaults,
so reruns on the same machine are warm.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .layout import BIN_DIR, CRD_DIR, GO_MODULES_DIR, STAMP_DIR

# Where the official Go tarball installs itself, for shells whose PATH lacks it.
FALLBACK_GO = Path("/usr/local/go/bin/go")

KUBERNETES_MODULE = "k8s.io/kubernetes"
HELM_MODULE = "helm.sh/helm/v3"
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"
ACTIONLINT_MODULE = "github.com/rhysd/actionlint"
# The CRDs upstream publishes (the same files as its bundle.yaml), shipped inside the module.
CRD_SUBDIR = "example/prometheus-operator-crd"


class BuildError(RuntimeError):
    """A binary could not be built; the message says which and how."""


@dataclass(frozen=True)
class GoBinary:
    name: str
    module_dir: Path
    module: str
    package: str

    @property
    def path(self) -> Path:
        return BIN_DIR / self.name

    @property
    def version(self) -> str:
        return module_version(self.module_dir, self.module)

    def ldflags(self) -> str:
        # -s -w drop the symbol table and DWARF: the binaries are half the size and link faster.
        return " ".join(["-s", "-w", *version_ldflags(self)])


def kubernetes_version_ldflags(version: str) -> list[str]:
    """What upstream's hack/lib/version.sh sets, so /version reports the release."""
    major, minor = version.removeprefix("v").split(".")[:2]
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        values = {"gitVersion": version, "gitMajor": major, "gitMinor": minor}
        values["gitTreeState"] = "clean"
        flags += [f"-X {package}.{name}={value}" for name, value in values.items()]
    return flags


def helm_version_ldflags(binary: GoBinary) -> list[str]:
    """What helm's Makefile sets: its own version and the Kubernetes version it was built for."""
    client_go = module_version(binary.module_dir, "k8s.io/client-go")  # e.g. v0.37.0 -> 1.37
    k8s_minor = client_go.removeprefix("v").split(".")[1]
    flags = [f"-X helm.sh/helm/v3/internal/version.version={binary.version}"]
    flags.append("-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor=1", f"-X {package}.k8sVersionMinor={k8s_minor}"]
    return flags


def version_ldflags(binary: GoBinary) -> list[str]:
    if binary.module == KUBERNETES_MODULE:
        return kubernetes_version_ldflags(binary.version)
    if binary.module == HELM_MODULE:
        return helm_version_ldflags(binary)
    if binary.module == PROMETHEUS_OPERATOR_MODULE:
        return [f"-X github.com/prometheus/common/version.Version={binary.version[1:]}"]
    if binary.module == ACTIONLINT_MODULE:
        return [f"-X {ACTIONLINT_MODULE}.version={binary.version}"]
    return []


# Prometheus for the end-to-end tests: Debian's 2.42 has no Kubernetes service discovery, which
# prometheus-operator's generated configuration needs. Named prometheus3 so that it does not
# shadow Debian's `prometheus` on PATH.
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"


@dataclass(frozen=True)
class PrometheusBinary(GoBinary):
    @property
    def release(self) -> str:
        """v0.305.0 -> v3.5.0: Prometheus tags its Go module v0.<major><minor:02>.<patch>."""
        minor, patch = self.version.removeprefix("v0.").split(".")[:2]
        return f"v{int(minor) // 100}.{int(minor) % 100}.{patch}"

    def ldflags(self) -> str:
        return f"-s -w -X github.com/prometheus/common/version.Version={self.release[1:]}"


PROMETHEUS = PrometheusBinary(
    "prometheus3",
    GO_MODULES_DIR / "prometheus",
    PROMETHEUS_MODULE,
    f"{PROMETHEUS_MODULE}/cmd/prometheus",
)


BINARIES = (
    GoBinary(
        "kube-apiserver",
        GO_MODULES_DIR / "kubernetes",
        KUBERNETES_MODULE,
        "k8s.io/kubernetes/cmd/kube-apiserver",
    ),
    GoBinary(
        "kube-controller-manager",
        GO_MODULES_DIR / "kubernetes",
        KUBERNETES_MODULE,
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    GoBinary("helm", GO_MODULES_DIR / "helm", HELM_MODULE, "helm.sh/helm/v3/cmd/helm"),
    GoBinary(
        "prometheus-operator",
        GO_MODULES_DIR / "prometheus-operator",
        PROMETHEUS_OPERATOR_MODULE,
        "github.com/prometheus-operator/prometheus-operator/cmd/operator",
    ),
    PROMETHEUS,
    # Checks .github/workflows (tests/test_release.py).
    GoBinary(
        "actionlint",
        GO_MODULES_DIR / "actionlint",
        ACTIONLINT_MODULE,
        f"{ACTIONLINT_MODULE}/cmd/actionlint",
    ),
)


def module_version(module_dir: Path, module: str) -> str:
    """The version go.mod requires of `module` (a plain text lookup: no network needed)."""
    text = (module_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.MULTILINE)
    if match is None:
        raise BuildError(f"{module_dir / 'go.mod'} does not require {module}")
    return match.group(1)


def go_command() -> str:
    found = shutil.which("go") or (str(FALLBACK_GO) if FALLBACK_GO.exists() else None)
    if found is None:
        raise BuildError("the `go` command is not installed (Go >= 1.24 is needed to build)")
    return found


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Static binaries like upstream's releases; -trimpath keeps local paths out of them and
    # -mod=readonly makes a go.mod/go.sum that needs changes an error instead of an edit.
    env["CGO_ENABLED"] = "0"
    env["GOFLAGS"] = "-trimpath -mod=readonly -buildvcs=false"
    return env


def run_go(args: list[str], module_dir: Path) -> str:
    """Run `go ARGS` in a module folder; go's progress and errors go to the terminal."""
    command = [go_command(), *args]
    result = subprocess.run(
        command, cwd=module_dir, env=go_env(), stdout=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise BuildError(f"`{' '.join(command)}` in {module_dir} failed (exit {result.returncode})")
    return result.stdout


def fingerprint(binary: GoBinary, go_version: str) -> str:
    digest = hashlib.sha256()
    for part in (go_version, binary.package, binary.ldflags()):
        digest.update(part.encode() + b"\0")
    for name in ("go.mod", "go.sum"):
        digest.update((binary.module_dir / name).read_bytes())
    return digest.hexdigest()


def stamp_path(binary: GoBinary) -> Path:
    return STAMP_DIR / f"{binary.name}.stamp"


def stamp_text(binary: GoBinary, go_version: str) -> str:
    return f"{binary.package} {binary.version}\n{fingerprint(binary, go_version)}\n"


def is_up_to_date(binary: GoBinary, go_version: str) -> bool:
    stamp = stamp_path(binary)
    return (
        binary.path.exists()
        and stamp.exists()
        and stamp.read_text() == stamp_text(binary, go_version)
    )


def build_binary(binary: GoBinary, go_version: str) -> None:
    stamp_path(binary).unlink(missing_ok=True)
    started = time.monotonic()
    run_go(["mod", "download"], binary.module_dir)
    downloaded = time.monotonic()
    # Build beside the target and rename, so an interrupted build never leaves half a binary.
    partial = binary.path.with_name(binary.path.name + ".partial")
    run_go(
        ["build", "-ldflags", binary.ldflags(), "-o", str(partial), binary.package],
        binary.module_dir,
    )
    partial.rename(binary.path)
    stamp_path(binary).write_text(stamp_text(binary, go_version))
    finished = time.monotonic()
    log(
        f"built {binary.name} {binary.version}: download {downloaded - started:.0f} s, "
        f"compile {finished - downloaded:.0f} s"
    )


def install_crds() -> None:
    """Copy the Prometheus Operator's own CRD files out of its module into CRD_DIR."""
    module_dir = GO_MODULES_DIR / "prometheus-operator"
    version = module_version(module_dir, PROMETHEUS_OPERATOR_MODULE)
    stamp = CRD_DIR / ".version"
    if stamp.exists() and stamp.read_text() == version:
        return
    info = json.loads(
        run_go(["mod", "download", "-json", f"{PROMETHEUS_OPERATOR_MODULE}@{version}"], module_dir)
    )
    sources = sorted((Path(info["Dir"]) / CRD_SUBDIR).glob("*.yaml"))
    if not sources:
        raise BuildError(f"no CRD files in {Path(info['Dir']) / CRD_SUBDIR}")
    shutil.rmtree(CRD_DIR, ignore_errors=True)
    CRD_DIR.mkdir(parents=True)
    for source in sources:
        # Copied, not linked: the module cache is read-only and may be cleaned.
        shutil.copyfile(source, CRD_DIR / source.name)
    stamp.write_text(version)
    log(f"copied {len(sources)} Prometheus Operator {version} CRDs to {CRD_DIR}")


def build_all() -> None:
    """Build every binary that is missing or stale (one at a time: 2-core CI) and copy the CRDs."""
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    STAMP_DIR.mkdir(parents=True, exist_ok=True)
    go_version = run_go(["version"], GO_MODULES_DIR).strip()
    for binary in BINARIES:
        if is_up_to_date(binary, go_version):
            log(f"{binary.name} {binary.version} is up to date")
        else:
            log(f"building {binary.name} {binary.version} ({binary.package})")
            build_binary(binary, go_version)
    install_crds()


def log(message: str) -> None:
    print(f"[testinfra] {message}", file=sys.stderr, flush=True)
