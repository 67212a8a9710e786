"""What both benchmarks share: the machine, memory readings, aligned tables, targets, results."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testinfra.layout import CACHE_DIR, REPO_ROOT

RESULTS_DIR = CACHE_DIR / "results"
FIGURE = re.compile(r"[-+]?[0-9.]+( ?(x|s|ms|KiB|MiB))?|[0-9]+[/-][0-9]+|n/a|PASS|MISS")


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python and the load when the run starts."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned: figures to the right, text to the left."""
    cells = [list(headers), *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    figures = [all(FIGURE.fullmatch(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = [
            cell.rjust(width) if figure else cell.ljust(width)
            for cell, width, figure in zip(row, widths, figures, strict=True)
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def target(name: str, goal: str, measured: str, passed: bool) -> dict[str, Any]:
    return {"name": name, "goal": goal, "measured": measured, "passed": passed}


def targets_table(found: list[dict[str, Any]]) -> str:
    rows = [[t["name"], t["goal"], t["measured"], "PASS" if t["passed"] else "MISS"] for t in found]
    return format_table(["target", "goal", "measured", "result"], rows)


def write_results(name: str, document: dict[str, Any]) -> None:
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
