"""The series a PromQL expression reads, found by a real PromQL parser (`promql-parser`, Python
bindings of the Rust crate GreptimeDB uses), for the chart's dashboard and alerts.

Grafana's range variables ($__rate_interval, ...) are not PromQL: they are replaced by a duration
first. Its other variables sit inside label values (`pod=~"$pod"`), which PromQL parses as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import promql_parser

GRAFANA_RANGES = re.compile(
    r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}"
)
LABEL_VALUES = re.compile(
    r"^label_values\((?P<selector>.*),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$"
)


@dataclass(frozen=True)
class Selector:
    """One vector selector: its metric name (None for `{__name__=~...}`) and label matchers as
    (label, operator, value), the operator as PromQL writes it (=, !=, =~, !~)."""

    name: str | None
    matchers: tuple[tuple[str, str, str], ...]

    def matcher(self, label: str) -> tuple[str, str] | None:
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


# MatchOp is not hashable: a list of pairs.
_OPS = [
    (promql_parser.MatchOp.Equal, "="),
    (promql_parser.MatchOp.NotEqual, "!="),
    (promql_parser.MatchOp.Re, "=~"),
    (promql_parser.MatchOp.NotRe, "!~"),
]


def _op(op: object) -> str:
    return next(text for known, text in _OPS if op == known)


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in a PromQL expression (Grafana range variables allowed);
    ValueError with the parser's message when it is not PromQL."""
    found: list[Selector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple((m.name, _op(m.op), m.value) for m in node.matchers.matchers)
            found.append(Selector(node.name, matchers))

    promql_parser.walk(promql_parser.parse(GRAFANA_RANGES.sub("5m", expr)), visit)
    return found


def grafana_query_selectors(query: str) -> list[Selector]:
    """The selectors of a Grafana Prometheus query: an expression, or a variable's
    `label_values(selector, label)`."""
    if match := LABEL_VALUES.match(query.strip()):
        return selectors(match["selector"])
    return selectors(query)


def family_names(selector: Selector, known: set[str]) -> set[str]:
    """The series names a selector reads among `known`: its name, or every known name its
    `__name__` matchers accept (anchored like PromQL's; Python's `re` reads the simple RE2
    patterns a dashboard uses alike)."""
    if selector.name is not None:
        return {selector.name}
    names = set(known)
    for label, op, value in selector.matchers:
        if label != "__name__":
            continue
        accepts = {
            "=": lambda n, v=value: n == v,
            "!=": lambda n, v=value: n != v,
            "=~": lambda n, v=value: re.fullmatch(v, n) is not None,
            "!~": lambda n, v=value: re.fullmatch(v, n) is None,
        }[op]
        names = {n for n in names if accepts(n)}
    return names
