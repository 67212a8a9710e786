"""The allowlist decision, table-driven. (Real source addresses: test_access_netns.py.)"""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from prosody_exporter.access import AccessPolicy, DenyReason, parse_address

POD_NETWORK = [ip_network("198.18.0.0/16"), ip_network("2001:db8:1::/48")]
PROXIES = [ip_network("198.19.9.0/24")]

ALLOWED = None
NOT_ALLOWED = DenyReason.NOT_ALLOWED


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "expected"),
    [
        ("198.18.3.4", [], [], ALLOWED),
        ("198.19.3.4", [], [], NOT_ALLOWED),
        ("2001:db8:1::7", [], [], ALLOWED),
        ("2001:db8:2::7", [], [], NOT_ALLOWED),
        # A dual-stack socket reports IPv4 clients as IPv4-mapped IPv6 addresses.
        ("::ffff:198.18.3.4", [], [], ALLOWED),
        ("::ffff:198.19.3.4", [], [], NOT_ALLOWED),
        ("fe80::1%eth0", [], [], NOT_ALLOWED),
        # X-Forwarded-For from an untrusted peer changes nothing, either way.
        ("198.19.3.4", ["198.18.3.4"], [], NOT_ALLOWED),
        ("198.18.3.4", ["203.0.113.9"], [], ALLOWED),
        ("198.19.3.4", ["198.18.3.4"], PROXIES, NOT_ALLOWED),
        # From a trusted proxy, the right-most untrusted hop is the client.
        ("198.19.9.1", ["198.18.3.4"], PROXIES, ALLOWED),
        ("198.19.9.1", ["198.19.3.4"], PROXIES, NOT_ALLOWED),
        ("198.19.9.1", ["198.18.3.4, 198.19.3.4"], PROXIES, NOT_ALLOWED),
        ("198.19.9.1", ["198.19.3.4, 198.18.3.4"], PROXIES, ALLOWED),  # left part is the client's
        ("198.19.9.1", ["198.18.3.4", "198.19.9.2"], PROXIES, ALLOWED),  # proxy chain
        ("198.19.9.1", ["not-an-ip"], PROXIES, DenyReason.INVALID_FORWARDED_FOR),
        # A trusted proxy with no header is judged by its own address.
        ("198.19.9.1", [], PROXIES, NOT_ALLOWED),
        (None, [], [], DenyReason.UNKNOWN_PEER),
        ("", [], [], DenyReason.UNKNOWN_PEER),
        ("garbage", [], [], DenyReason.UNKNOWN_PEER),
    ],
)
def test_decide(peer, forwarded_for, trusted, expected):
    assert AccessPolicy(POD_NETWORK, trusted).decide(peer, forwarded_for) is expected


def test_ipv4_mapped_addresses_become_ipv4():
    assert str(parse_address("::ffff:198.18.0.1")) == "198.18.0.1"
    assert str(parse_address("[2001:db8::1]")) == "2001:db8::1"
