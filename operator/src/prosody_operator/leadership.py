"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it: every
replica serves the webhook; the Lease's holder alone reconciles.

kopf's own peering is not leader election: replicas of the same priority all pause (each sees
the other as a conflict), pausing stops the watches that feed the indexes the webhook reads, and
a dead peer is noticed only after its 60 s lifetime (kopf/_core/engines/peering.py).

The holder renews the Lease every RENEW seconds. Another replica takes it over once the record
it last saw (holder and renewTime) has not changed for the Lease's duration, measured on its own
clock (clocks of different machines never compared). The holder stops reconciling as soon as it
could not renew for RENEW_DEADLINE seconds, before anybody may take over. On shutdown the holder
releases the Lease (holder emptied), so another replica takes over at its next look, not after
the duration.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("prosody_operator")

DURATION = 15  # seconds a Lease not renewed stays its holder's (leaseDurationSeconds)
RENEW = 5.0  # seconds between two renewals by the holder
RENEW_DEADLINE = 10.0  # the holder gives up leading when it could not renew for this long
RETRY = 2.0  # seconds between two looks by a replica that does not hold the Lease


class LeaseApi(Protocol):
    """What the elector needs from the API (kube.Kube provides it)."""

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_lease(self, namespace: str, body: dict[str, Any]) -> bool: ...

    def replace_lease(self, namespace: str, body: dict[str, Any]) -> bool: ...


def default_identity() -> str:
    """This replica's name in the Lease: its host name (in a pod, the pod's name) and a suffix of
    its own (a restarted container is a new candidate, as client-go's identities are)."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def micro_time(at: float) -> str:
    """A Lease's MicroTime."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Seen:
    """The Lease's record as last seen, and when (on this replica's monotonic clock) it last
    changed."""

    holder: str
    renew_time: str
    since: float


def expired(seen: Seen, duration: float, now: float) -> bool:
    """Nobody holds the Lease: empty, or not renewed for `duration` as this replica saw it."""
    return not seen.holder or now - seen.since >= duration


class LeaderElector:
    """Runs in a thread of its own (`start`, `stop`); `on_start` and `on_stop` are called in that
    thread when this replica starts and stops leading."""

    def __init__(
        self,
        api: LeaseApi,
        lease: str,
        identity: str,
        on_start: Callable[[], None],
        on_stop: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.namespace, _, self.name = lease.partition("/")
        self.identity = identity
        self.on_start, self.on_stop = on_start, on_stop
        self.clock, self.wall_clock = clock, wall_clock
        self.leading = False
        self.seen: Seen | None = None
        self.renewed = 0.0  # when this replica last renewed (its monotonic clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, and release the Lease if held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.leading:
            self._set_leading(False)
            self._release()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.look()
            self._stop.wait(RENEW if self.leading else RETRY)

    def look(self) -> None:
        """One turn of the loop: a look at the Lease (a failure logged), then the renewal
        deadline checked."""
        try:
            self.step()
        except Exception:
            log.exception("leader election: the Lease %s/%s", self.namespace, self.name)
        self._check_deadline()

    def step(self) -> None:
        """One look at the Lease: create it, renew it, take it over, or wait."""
        now = self.clock()
        lease = self.api.read_lease(self.namespace, self.name)
        if lease is None:
            if self.api.create_lease(self.namespace, self._record(None)):
                self._won(now)
            return
        spec = lease.get("spec") or {}
        holder, renew_time = spec.get("holderIdentity") or "", spec.get("renewTime") or ""
        if self.seen is None or (self.seen.holder, self.seen.renew_time) != (holder, renew_time):
            self.seen = Seen(holder, renew_time, now)
        if holder == self.identity:
            if self.api.replace_lease(self.namespace, self._record(lease)):
                self._won(now)
            return
        duration = float(spec.get("leaseDurationSeconds") or DURATION)
        if self.leading:  # someone else holds it: this replica lost it meanwhile
            self._set_leading(False)
        if expired(self.seen, duration, now) and self.api.replace_lease(
            self.namespace, self._record(lease, take_over=True)
        ):
            self._won(now)

    def _record(self, lease: dict[str, Any] | None, take_over: bool = False) -> dict[str, Any]:
        """The Lease with this replica as holder, renewed now (resourceVersion kept: a write
        that raced another fails)."""
        now = micro_time(self.wall_clock())
        metadata = {"name": self.name, "namespace": self.namespace}
        spec: dict[str, Any] = {}
        if lease is not None:
            metadata = dict(lease["metadata"])
            spec = dict(lease.get("spec") or {})
        if lease is None or take_over:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if take_over and spec.get("holderIdentity") else 0
            )
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=DURATION, renewTime=now)
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    def _won(self, now: float) -> None:
        self.renewed = now
        if not self.leading:
            log.info("leading: this replica holds the Lease %s/%s", self.namespace, self.name)
            self._set_leading(True)

    def _check_deadline(self) -> None:
        if self.leading and self.clock() - self.renewed > RENEW_DEADLINE:
            log.warning(
                "could not renew the Lease %s/%s for %g s: no longer leading",
                self.namespace,
                self.name,
                RENEW_DEADLINE,
            )
            self._set_leading(False)

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        (self.on_start if leading else self.on_stop)()

    def _release(self) -> None:
        """Empty the holder, so that another replica takes over at its next look."""
        try:
            lease = self.api.read_lease(self.namespace, self.name)
            spec = (lease or {}).get("spec") or {}
            if lease is not None and spec.get("holderIdentity") == self.identity:
                released = {**lease, "spec": {**spec, "holderIdentity": None}}
                released["spec"]["leaseDurationSeconds"] = 1
                self.api.replace_lease(self.namespace, released)
                log.info("released the Lease %s/%s", self.namespace, self.name)
        except Exception:
            log.exception("could not release the Lease %s/%s", self.namespace, self.name)
