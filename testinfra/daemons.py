"""Long-running processes that outlive the command that started them: the control plane's and the
test node's components.

Each is started with `posix_spawn` in a new session, its output appended to `<dir>/logs/<name>.log`;
`<dir>/run/<name>.pid` records its pid and binary, so a later command stops only a pid that still
runs that binary (a recycled pid is someone else's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class StartError(RuntimeError):
    """A component did not start; the message names it, its log and the log's last lines."""


@dataclass(frozen=True)
class Component:
    name: str
    binary: Path
    args: tuple[str, ...]
    directory: Path  # logs/ and run/ are under it
    # argv that runs first and ends by exec'ing the binary (e.g. nsenter into a namespace)
    wrapper: tuple[str, ...] = ()

    @property
    def log_path(self) -> Path:
        return self.directory / "logs" / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.directory / "run" / f"{self.name}.pid"


def spawn(component: Component, env: dict[str, str] | None = None) -> int:
    """Start a component in its own session (it outlives us), output appended to its log."""
    for path in (component.log_path, component.pid_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (
            os.POSIX_SPAWN_OPEN,
            1,
            str(component.log_path),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o644,
        ),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    argv = [*component.wrapper, str(component.binary), *component.args]
    environment = os.environ if env is None else env
    pid = os.posix_spawnp(argv[0], argv, environment, file_actions=file_actions, setsid=True)
    component.pid_path.write_text(f"{pid}\n{component.binary}\n")
    return pid


def recorded_process(directory: Path, name: str) -> tuple[int, str] | None:
    """The pid and binary a pid file records, if the file exists."""
    try:
        pid, binary = (directory / "run" / f"{name}.pid").read_text().split("\n")[:2]
    except (FileNotFoundError, ValueError):
        return None
    return int(pid), binary


def is_running(pid: int, binary: str) -> bool:
    """Whether `pid` is alive and still runs `binary` (a recycled pid is someone else's)."""
    try:
        # Our own child (started by this process): waitpid knows, and reaps it once it exits.
        # Its /proc cmdline is no proof: it reads empty for a moment while exec sets it up.
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        pass  # started by an earlier command
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return cmdline.split(b"\0")[0].decode() == binary


def running_pid(directory: Path, name: str) -> int | None:
    recorded = recorded_process(directory, name)
    if recorded is None or not is_running(*recorded):
        return None
    return recorded[0]


def stop_process(directory: Path, name: str) -> None:
    recorded = recorded_process(directory, name)
    if recorded is None:
        return
    # SIGTERM once (a second one makes the API server skip its graceful shutdown), then SIGKILL.
    for signal_to_send, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        if not is_running(*recorded):
            return
        with contextlib.suppress(ProcessLookupError):  # it may exit between check and kill
            os.kill(recorded[0], signal_to_send)
        wait_for_exit(*recorded, timeout)


def wait_for_exit(pid: int, binary: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while is_running(pid, binary) and time.monotonic() < deadline:
        time.sleep(0.1)


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_until_ready(
    component: Component,
    pid: int,
    is_ready: Callable[[], bool],
    timeout: float = START_TIMEOUT,
    error: type[Exception] = StartError,
) -> None:
    deadline = time.monotonic() + timeout
    while not is_ready():
        problem = None
        if not is_running(pid, str(component.binary)):
            problem = "exited during start"
        elif time.monotonic() > deadline:
            problem = f"not ready after {timeout:.0f} s"
        if problem:
            raise error(
                f"{component.name} {problem}; log: {component.log_path}\n"
                f"{log_tail(component.log_path)}"
            )
        time.sleep(0.2)
