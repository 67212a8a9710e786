"""SIGTERM and Ctrl-C unwind a long-running program (the demo, a benchmark) the same way, so
every `with` and `finally` stops and deletes what it started: processes, the control plane it
started, namespaces, network namespaces.

Python's default SIGTERM ends the process on the spot, leaving all of that behind; Ctrl-C
raises KeyboardInterrupt, which unwinds. `unwind_on_signals()` makes SIGTERM raise it too, and
ignores further signals while the unwinding runs (a second one would cut the clean-up short).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _while_cleaning_up(signum: int, frame: FrameType | None) -> None:
    # A Python handler, not SIG_IGN: processes started during the clean-up (helm uninstall...)
    # get the default dispositions back when they exec.
    print(f"{signal.Signals(signum).name} again: still cleaning up", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    for sig in SIGNALS:
        signal.signal(sig, _while_cleaning_up)
    print(
        f"\n{signal.Signals(signum).name}: stopping what was started ...",
        file=sys.stderr,
        flush=True,
    )
    raise Interrupted(signum)


def unwind_on_signals() -> None:
    """Call first thing in main(), from the main thread."""
    for sig in SIGNALS:
        signal.signal(sig, _interrupt)


def exit_status(error: KeyboardInterrupt) -> int:
    """What a shell reports for a process ended by that signal: 128 + its number."""
    signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
    return 128 + signum
