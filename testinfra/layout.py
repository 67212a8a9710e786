"""Where the control plane's binaries, CRDs and state live: all under the repo's ignored .cache/."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
BIN_DIR = CACHE_DIR / "bin"
# Which source each binary in BIN_DIR was built from, so a rebuild happens only when it changes.
STAMP_DIR = BIN_DIR / ".stamps"
CRD_DIR = CACHE_DIR / "crds" / "prometheus-operator"
CLUSTER_DIR = CACHE_DIR / "cluster"
GO_MODULES_DIR = Path(__file__).resolve().parent / "go"
