"""Starting and stopping the real servers the tests use, with logs kept for the failure message."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import httpx


class MissingPrerequisite(RuntimeError):
    """A program the tests need is not installed; the message names the make target."""


def require_program(name: str, make_target: str = "make system-packages") -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingPrerequisite(f"{name} is not installed: run `{make_target}`")
    return path


def venv_command(name: str) -> str:
    """A console script of this project (prosody-exporter, prosody-operator): the venv running
    the tests installed it next to its interpreter, even when not on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        raise MissingPrerequisite(f"{name} is not installed: run `make venv`")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether a process exists (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class Process:
    """A server process with its output in a log file; stop() is safe to call twice."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_argv = [*(["ip", "netns", "exec", netns] if netns else []), *argv]
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                full_argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # so stop() can signal everything it started
            )

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.running():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}; log {self.log_path}:\n"
                    + self.log_tail()
                )
            return check()

        try:
            wait_until(ready, timeout, f"{self.name} to be ready")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; log {self.log_path}:\n{self.log_tail()}") from None

    def signal(self, sig: int) -> None:
        if self.running():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.running():
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()


class ProcessOwner:
    """Mixin for the server classes: `with Server(...) as server:` starts and stops it."""

    process: Process | None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
