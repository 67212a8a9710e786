"""Every address the local cluster uses, in one place; all of them in 198.18.0.0/15 (RFC 2544).

Several checkouts on one machine may each run a control plane and a test node. Control planes
listen on loopback only and may share the service range (a ClusterIP exists only in its node's
own network namespace); a node's pod network and its link to the host are routed from the host,
so each node takes a free slot: its own /24 of pods and /30 of link.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# Sized like a real cluster's (EKS and AKS default to a /16): a /24 ran out at 253 Services.
SERVICE_CIDR = ipaddress.IPv4Network("198.19.0.0/16")
# The `kubernetes` Service's ClusterIP: the first address of the range, as the API server picks.
KUBERNETES_SERVICE_IP = str(SERVICE_CIDR[1])
POD_CIDR_POOL = ipaddress.IPv4Network("198.18.96.0/19")  # slot k: its k-th /24
NODE_LINK_POOL = ipaddress.IPv4Network("198.18.95.0/24")  # slot k: its k-th /30
SLOTS = 32
# Where every node serves its pods, on its own loopback interface, the same on all nodes (each
# reaches only its own): the API server at NODE_API_PORT (the `kubernetes` Service's endpoint)
# and the cluster DNS on port 53 (the kubelet's clusterDNS).
NODE_LOCAL_IP = "198.18.94.1"
NODE_API_PORT = 6443


@dataclass(frozen=True)
class NodeAddresses:
    """The addresses of the node in slot `slot` (0 <= slot < SLOTS)."""

    slot: int

    def __post_init__(self) -> None:
        if not 0 <= self.slot < SLOTS:
            raise ValueError(f"node slot {self.slot} is outside 0..{SLOTS - 1}")

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return list(POD_CIDR_POOL.subnets(new_prefix=24))[self.slot]

    @property
    def pod_gateway(self) -> str:
        """The pod bridge's address in the node's namespace: where the kubelet probes from."""
        return str(self.pod_cidr[1])

    @property
    def link(self) -> ipaddress.IPv4Network:
        return list(NODE_LINK_POOL.subnets(new_prefix=30))[self.slot]

    @property
    def host_ip(self) -> str:
        """The host's end of the link: outside the pod network, like a client off-cluster."""
        return str(self.link[1])

    @property
    def node_ip(self) -> str:
        """The node's end of the link: its InternalIP."""
        return str(self.link[2])
