"""Build the test infrastructure's binaries from pinned upstream Go modules with the ordinary `go`
client.

Each folder under testinfra/go/ is a tiny Go module whose go.mod pins one upstream release (and
go.sum pins its dependencies); `tool` lines name the commands to build. All commands of a module
are built by one `go build` (the five Kubernetes binaries share most of their packages). A
module is rebuilt only when one of its binaries is missing or its fingerprint (go.mod, go.sum, go
version, packages, ldflags) differs from the stamp written after its last successful build. Go's
module and build caches stay at their defaults, so reruns on the same machine are warm.
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
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
ACTIONLINT_MODULE = "github.com/rhysd/actionlint"
COREDNS_MODULE = "github.com/coredns/coredns"
# The CRDs upstream publishes (the same files as its bundle.yaml), shipped inside the module.
CRD_SUBDIR = "example/prometheus-operator-crd"


class BuildError(RuntimeError):
    """A binary could not be built; the message says which and how."""


@dataclass(frozen=True)
class GoModule:
    """One folder under testinfra/go: a go.mod pinning `module`, whose `commands` (binary name ->
    package) are built together by one `go build`, so the packages they share compile once and
    the compiler keeps both cores busy to the end."""

    folder: str
    module: str
    commands: tuple[tuple[str, str], ...]

    @property
    def module_dir(self) -> Path:
        return GO_MODULES_DIR / self.folder

    @property
    def version(self) -> str:
        return module_version(self.module_dir, self.module)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.commands)

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(package for _, package in self.commands)

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


def helm_version_ldflags(module: GoModule) -> list[str]:
    """What helm's Makefile sets: its own version and the Kubernetes version it was built for."""
    client_go = module_version(module.module_dir, "k8s.io/client-go")  # e.g. v0.37.0 -> 1.37
    k8s_minor = client_go.removeprefix("v").split(".")[1]
    flags = [f"-X helm.sh/helm/v3/internal/version.version={module.version}"]
    flags.append("-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor=1", f"-X {package}.k8sVersionMinor={k8s_minor}"]
    return flags


def prometheus_release(module_version: str) -> str:
    """v0.305.0 -> v3.5.0: Prometheus tags its Go module v0.<major><minor:02>.<patch>."""
    minor, patch = module_version.removeprefix("v0.").split(".")[:2]
    return f"v{int(minor) // 100}.{int(minor) % 100}.{patch}"


def version_ldflags(module: GoModule) -> list[str]:
    prometheus_version = "-X github.com/prometheus/common/version.Version="
    if module.module == KUBERNETES_MODULE:
        return kubernetes_version_ldflags(module.version)
    if module.module == HELM_MODULE:
        return helm_version_ldflags(module)
    if module.module == PROMETHEUS_OPERATOR_MODULE:
        return [prometheus_version + module.version[1:]]
    if module.module == PROMETHEUS_MODULE:
        return [prometheus_version + prometheus_release(module.version)[1:]]
    if module.module == ACTIONLINT_MODULE:
        return [f"-X {ACTIONLINT_MODULE}.version={module.version}"]
    return []


KUBERNETES = GoModule(
    "kubernetes",
    KUBERNETES_MODULE,
    tuple(
        (name, f"k8s.io/kubernetes/cmd/{name}")
        for name in (
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",  # the test node's (testinfra/node.py)
            "kube-proxy",
        )
    ),
)
PROMETHEUS_OPERATOR = GoModule(
    "prometheus-operator",
    PROMETHEUS_OPERATOR_MODULE,
    (
        ("prometheus-operator", f"{PROMETHEUS_OPERATOR_MODULE}/cmd/operator"),
        # The sidecar of the Prometheus pods it makes (an image on the test node).
        (
            "prometheus-config-reloader",
            f"{PROMETHEUS_OPERATOR_MODULE}/cmd/prometheus-config-reloader",
        ),
    ),
)
# Prometheus for the end-to-end tests: Debian's 2.42 has no Kubernetes service discovery, which
# prometheus-operator's generated configuration needs. Named prometheus3 so that it does not
# shadow Debian's `prometheus` on PATH.
PROMETHEUS = GoModule(
    "prometheus", PROMETHEUS_MODULE, (("prometheus3", f"{PROMETHEUS_MODULE}/cmd/prometheus"),)
)
MODULES = (
    KUBERNETES,
    GoModule("helm", HELM_MODULE, (("helm", "helm.sh/helm/v3/cmd/helm"),)),
    PROMETHEUS_OPERATOR,
    PROMETHEUS,
    # The test node's cluster DNS: CoreDNS with the plugins it needs (testinfra/go/coredns/main.go).
    GoModule("coredns", COREDNS_MODULE, (("coredns", "github.com/local/testinfra/coredns"),)),
    # Checks .github/workflows (tests/test_release.py).
    GoModule(
        "actionlint", ACTIONLINT_MODULE, (("actionlint", f"{ACTIONLINT_MODULE}/cmd/actionlint"),)
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


def fingerprint(module: GoModule, go_version: str) -> str:
    digest = hashlib.sha256()
    for part in (go_version, *(f"{n}={p}" for n, p in module.commands), module.ldflags()):
        digest.update(part.encode() + b"\0")
    for name in ("go.mod", "go.sum"):
        digest.update((module.module_dir / name).read_bytes())
    return digest.hexdigest()


def stamp_path(module: GoModule) -> Path:
    return STAMP_DIR / f"{module.folder}.stamp"


def stamp_text(module: GoModule, go_version: str) -> str:
    return f"{module.module} {module.version}\n{fingerprint(module, go_version)}\n"


def is_up_to_date(module: GoModule, go_version: str) -> bool:
    stamp = stamp_path(module)
    return (
        all((BIN_DIR / name).exists() for name in module.names)
        and stamp.exists()
        and stamp.read_text() == stamp_text(module, go_version)
    )


def build_module(module: GoModule, go_version: str) -> None:
    """All of the module's commands in one `go build`, into a scratch folder beside BIN_DIR and
    renamed into place, so an interrupted build never leaves half a binary."""
    stamp_path(module).unlink(missing_ok=True)
    started = time.monotonic()
    run_go(["mod", "download"], module.module_dir)
    downloaded = time.monotonic()
    scratch = BIN_DIR / f".{module.folder}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    # With -o a folder, go writes each command under its package's last path element.
    run_go(
        ["build", "-ldflags", module.ldflags(), "-o", f"{scratch}/", *module.packages],
        module.module_dir,
    )
    for name, package in module.commands:
        (scratch / package.rsplit("/", 1)[-1]).rename(BIN_DIR / name)
    scratch.rmdir()
    stamp_path(module).write_text(stamp_text(module, go_version))
    finished = time.monotonic()
    log(
        f"built {', '.join(module.names)} {module.version}: download {downloaded - started:.0f} s, "
        f"compile {finished - downloaded:.0f} s"
    )


def ensure_built(module: GoModule, go_version: str | None = None) -> None:
    """Build the module's commands when any is missing or its stamp differs."""
    go_version = go_version or run_go(["version"], GO_MODULES_DIR).strip()
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    STAMP_DIR.mkdir(parents=True, exist_ok=True)
    if is_up_to_date(module, go_version):
        log(f"{', '.join(module.names)} {module.version}: up to date")
    else:
        log(f"building {', '.join(module.names)} {module.version} ({module.module})")
        build_module(module, go_version)


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
    """Build every module whose binaries are missing or stale (one module at a time: each
    `go build` already uses both cores of a 2-core CI machine) and copy the CRDs."""
    go_version = run_go(["version"], GO_MODULES_DIR).strip()
    for module in MODULES:
        ensure_built(module, go_version)
    install_crds()


def log(message: str) -> None:
    print(f"[testinfra] {message}", file=sys.stderr, flush=True)
