"""The names and label values the operator gives the objects it makes for a workload (pure).

A workload's name is a DNS-1123 subdomain: up to 253 characters, dots, a leading digit. A
Service's name must be a DNS-1035 label (63 characters, a letter first, no dots), and a label
value at most 63 characters. Names that do not fit are made to fit and given a short hash of
the whole name, so two names that differ only past the cut, or in a dot, never share one.
"""

from __future__ import annotations

import hashlib
import re

MAX = 63  # a DNS label, and a label value
METRICS_SUFFIX = "-prosody-metrics"
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def metrics_object_name(workload_name: str) -> str:
    """`<workload>-prosody-metrics` (the name of its Service and ServiceMonitor) when that is a
    DNS-1035 label, else `<workload, made one>-<hash>-prosody-metrics`: the suffix always ends
    it, which the chart's alerts and dashboard select by."""
    name = workload_name + METRICS_SUFFIX
    if len(name) <= MAX and _DNS_1035.fullmatch(name):
        return name
    base = re.sub(r"[^a-z0-9-]", "-", workload_name.lower())
    if not base[:1].isalpha():
        base = "w" + base
    room = MAX - len(METRICS_SUFFIX) - 1 - 8
    return f"{base[:room].rstrip('-')}-{_digest(workload_name)}{METRICS_SUFFIX}"


def label_value(workload_name: str) -> str:
    """The workload's name as a label value: itself up to 63 characters, else cut, with a hash.
    (A subdomain's characters are all allowed in label values, and it begins with one of
    [a-z0-9]; the hash ends it with one.)"""
    if len(workload_name) <= MAX:
        return workload_name
    return f"{workload_name[: MAX - 9]}-{_digest(workload_name)}"
