"""Who may read the metrics: CIDR allowlists on the TCP peer address.

Pure decisions here; the ASGI middleware that applies them lives in app.py.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DenyReason(enum.Enum):
    NOT_ALLOWED = "not_allowed"  # the client address is in no allowed CIDR
    INVALID_FORWARDED_FOR = "invalid_forwarded_for"  # a trusted proxy sent a garbled header
    UNKNOWN_PEER = "unknown_peer"  # no TCP peer address at all (e.g. a Unix socket)


def parse_address(text: str) -> IPAddress:
    """Parse an address; an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4
    client) becomes the IPv4 address it carries, so IPv4 CIDRs match it."""
    address = ipaddress.ip_address(text.strip().strip("[]").split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_any(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address in network for network in networks)


@dataclass(frozen=True)
class AccessPolicy:
    allowed: Sequence[IPNetwork]
    trusted_proxies: Sequence[IPNetwork] = ()

    def decide(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> DenyReason | None:
        """Why the request is refused (None: allowed), decided on the TCP peer; X-Forwarded-For
        counts only when the peer is a trusted proxy.

        Behind trusted proxies the client is the right-most address in the chain that is not a
        trusted proxy itself: entries further left were written by the client and prove nothing.
        """
        if not peer:
            return DenyReason.UNKNOWN_PEER
        try:
            client = parse_address(peer)
        except ValueError:
            return DenyReason.UNKNOWN_PEER
        if forwarded_for and _in_any(client, self.trusted_proxies):
            hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
            for hop in reversed(hops):
                try:
                    client = parse_address(hop)
                except ValueError:
                    return DenyReason.INVALID_FORWARDED_FOR
                if not _in_any(client, self.trusted_proxies):
                    break
        if _in_any(client, self.allowed):
            return None
        return DenyReason.NOT_ALLOWED
