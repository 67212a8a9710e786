"""Leader election (leadership.py) in what the real API server cannot show: an API server that
one replica cannot reach while another can, time advanced by tens of seconds at will, and two
replicas' reads both made before either writes. So the Lease lives in `FakeLeases`, a dict with
the API server's resourceVersion check, and the clocks are the test's. What a real API server
shows (taking the Lease, renewing it, a takeover after a SIGKILL, the release on SIGTERM) is in
test_high_availability.py."""

from __future__ import annotations

import copy
from typing import Any

from prosody_operator import leadership
from prosody_operator.leadership import LeaderElector

LEASE = "operators/prosody-operator"


class FakeLeases:
    """One namespace's Leases with optimistic concurrency: a write based on an older
    resourceVersion is refused, as the API server's 409 Conflict."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.leases.get(name)
        return copy.deepcopy(found) if found is not None else None

    def create_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        name = body["metadata"]["name"]
        if name in self.leases:
            return False
        self._store(body)
        return True

    def replace_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        stored = self.leases.get(body["metadata"]["name"])
        if stored is None or stored["metadata"]["resourceVersion"] != body["metadata"].get(
            "resourceVersion"
        ):
            return False
        self._store(body)
        return True

    def _store(self, body: dict[str, Any]) -> None:
        self.version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.leases[body["metadata"]["name"]] = body


class Unreachable:
    """A replica's view of the API server while the network between them is down."""

    def __getattr__(self, name: str) -> Any:
        def fail(*_: Any) -> Any:
            raise ConnectionError("the API server is unreachable")

        return fail


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replica:
    """An elector and the times it started and stopped leading."""

    def __init__(self, api: Any, identity: str, clock: Clock) -> None:
        self.transitions: list[tuple[str, float]] = []
        self.elector = LeaderElector(
            api,
            LEASE,
            identity,
            on_start=lambda: self.transitions.append(("start", clock.now)),
            on_stop=lambda: self.transitions.append(("stop", clock.now)),
            clock=clock,
            wall_clock=lambda: 1_700_000_000 + clock.now,
        )

    @property
    def leading(self) -> bool:
        return self.elector.leading


def test_a_holder_cut_off_from_the_api_stops_leading_before_another_takes_over():
    """The holder that cannot renew gives up after RENEW_DEADLINE; the other replica, which
    reaches the API server, takes over only after the Lease's duration: never two leaders."""
    leases, clock = FakeLeases(), Clock()
    a, b = Replica(leases, "a", clock), Replica(leases, "b", clock)
    a.elector.look()
    b.elector.look()
    assert a.leading and not b.leading
    cut_off_at = clock.now
    a.elector.api = Unreachable()
    for _ in range(40):  # each looks every second: more often than the real RENEW and RETRY
        clock.now += 1
        a.elector.look()
        b.elector.look()
        assert not (a.leading and b.leading), clock.now - cut_off_at
    assert a.transitions == [("start", 1000.0), ("stop", cut_off_at + 11)]  # > RENEW_DEADLINE
    assert b.transitions == [("start", cut_off_at + leadership.DURATION)]
    assert leases.leases["prosody-operator"]["spec"]["holderIdentity"] == "b"
    assert leases.leases["prosody-operator"]["spec"]["leaseTransitions"] == 1


def test_a_holder_that_cannot_renew_briefly_keeps_leading():
    """Failures shorter than RENEW_DEADLINE (an API server restarting) change nothing."""
    leases, clock = FakeLeases(), Clock()
    a = Replica(leases, "a", clock)
    a.elector.look()
    a.elector.api = Unreachable()
    for _ in range(int(leadership.RENEW_DEADLINE)):
        clock.now += 1
        a.elector.look()
    a.elector.api = leases
    clock.now += 1
    a.elector.look()
    assert a.leading and a.transitions == [("start", 1000.0)]


def test_a_renewed_lease_is_never_taken_over_whatever_its_renew_time_says():
    """Expiry is measured on the taker's own clock from when it last saw the record change: a
    holder whose clock is an hour behind (renewTime in the past) keeps the Lease."""
    leases, clock = FakeLeases(), Clock()
    a, b = Replica(leases, "a", clock), Replica(leases, "b", clock)
    a.elector.wall_clock = lambda: 1_700_000_000 + clock.now - 3600
    a.elector.look()
    for _ in range(60):
        clock.now += 1
        if clock.now % leadership.RENEW == 0:
            a.elector.look()
        b.elector.look()
    assert a.leading and not b.leading and b.transitions == []


def test_two_replicas_racing_for_a_free_lease_one_wins():
    """Both read the released Lease before either writes: the second write is refused."""
    leases, clock = FakeLeases(), Clock()
    a, b = Replica(leases, "a", clock), Replica(leases, "b", clock)
    a.elector.look()
    a.elector.stop()  # released: the holder emptied
    assert leases.leases["prosody-operator"]["spec"]["holderIdentity"] is None
    seen = leases.read_lease("", "prosody-operator")

    class Stale(FakeLeases):
        """b's reads return what it read before a wrote."""

        def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
            return copy.deepcopy(seen)

    stale = Stale()
    stale.leases, stale.version = leases.leases, leases.version
    c = Replica(leases, "c", clock)
    b.elector.api = stale
    c.elector.look()  # c writes first
    b.elector.look()  # b's write, based on the older version, is refused
    assert c.leading and not b.leading
    assert leases.leases["prosody-operator"]["spec"]["holderIdentity"] == "c"
