"""Test infrastructure: a real local Kubernetes control plane built from upstream Go modules.

`python -m testinfra.controlplane build|up|down|status` is the entry point; see README.md.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Everything built or run here lives in the repository's ignored cache folder.
CACHE_DIR = REPO_ROOT / ".cache"
BIN_DIR = CACHE_DIR / "bin"
