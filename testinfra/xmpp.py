"""A real XMPP client (slixmpp) that logs in to a test Prosody and stays connected.

It runs as its own process (`python -m testinfra.xmpp`) so its event loop lives and dies with it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import slixmpp

from .layout import REPO_ROOT
from .prosody import ProsodyServer

SESSION_STARTED = "session started"


def register_account(prosody: ProsodyServer, user: str, password: str) -> None:
    """Create the account the way an admin would, with prosodyctl."""
    argv = [prosody.installation.prosodyctl, "--config", str(prosody.config_path), "register"]
    subprocess.run(
        [*argv, user, "localhost", password], check=True, capture_output=True, timeout=60
    )


class XmppSession:
    """A logged-in client session; `close()` logs out."""

    def __init__(
        self,
        prosody: ProsodyServer | None,
        user: str,
        password: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        """Logs in to `prosody` on loopback, or to the Prosody at `host`:`port`."""
        port = port if prosody is None else prosody.c2s_port
        self._argv = [sys.executable, "-m", "testinfra.xmpp", user, password, host, str(port)]
        self._process: subprocess.Popen[str] | None = None

    def open(self, timeout: float = 30.0) -> XmppSession:
        self._process = subprocess.Popen(
            self._argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT
        )
        assert self._process.stdout is not None
        try:
            line = self._process.stdout.readline()  # the client exits on failure or timeout
        finally:
            if self._process.poll() is not None:
                raise RuntimeError(f"XMPP login failed: {self._process.stdout.read()}")
        if line.strip() != SESSION_STARTED:
            self.close()
            raise RuntimeError(f"XMPP login failed: {line}")
        return self

    def close(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(15)


async def _stay_logged_in(
    jid: str, password: str, host: str, port: int, timeout: float = 20.0
) -> None:
    # The test Prosody has no certificate: plain TCP (on loopback, or to a pod), SCRAM auth.
    client = slixmpp.ClientXMPP(
        jid, password, plugin_config={"feature_mechanisms": {"unencrypted_scram": True}}
    )
    client.enable_starttls = False
    client.enable_direct_tls = False
    client.enable_plaintext = True
    started, stop = asyncio.Event(), asyncio.Event()
    client.add_event_handler("session_start", lambda _: started.set())
    client.add_event_handler("failed_auth", lambda _: sys.exit("authentication failed"))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client.connect(host, port)
    await asyncio.wait_for(started.wait(), timeout)
    client.send_presence()
    print(SESSION_STARTED, flush=True)
    await stop.wait()
    await client.disconnect()


if __name__ == "__main__":
    user, password, host, port = sys.argv[1:5]
    asyncio.run(_stay_logged_in(f"{user}@localhost", password, host, int(port)))
