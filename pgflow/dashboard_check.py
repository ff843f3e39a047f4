"""Check a New Relic dashboard's NRQL against the metric registry.

Every name a query uses must be declared (a metric, an attribute of the metrics or events it
queries, a resource attribute), a value it compares a fixed-value attribute with must be one pgflow
sends, and each metric must be aggregated the way its kind means: a DELTA sum with ``sum()`` (or
``rate()``), a gauge with ``average()``, ``max()``, ``min()`` or ``latest()``; ``average()`` of a
DELTA sum or ``sum()`` of a gauge gives a number that means nothing. The NRQL reader knows the
forms dashboards use (``FROM Metric SELECT agg(name) WHERE ... FACET ...``, ``filter(agg(x), WHERE
...)``, ``metricName = / IN``, ``event.name``, ``{{variables}}``), not the whole language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pgflow import metrics as reg

SUM_AGGREGATES = frozenset({"sum", "rate"})
GAUGE_AGGREGATES = frozenset({"average", "max", "min", "latest"})
NRQL_NAMES = frozenset({"metricName", "timestamp", "event.name"})  # New Relic's own, not pgflow's
LOG_FIELDS = frozenset({"message", "timestamp", "event.name"})  # New Relic's fields of a Log record

_CLAUSES = frozenset(
    {"SELECT", "FROM", "WHERE", "FACET", "TIMESERIES", "SINCE", "UNTIL", "LIMIT", "COMPARE", "ORDER", "WITH", "EXTRAPOLATE", "SLIDE"}
)
_WORDS = frozenset(
    {
        "AS",
        "AND",
        "OR",
        "NOT",
        "IN",
        "IS",
        "NULL",
        "LIKE",
        "RLIKE",
        "TRUE",
        "FALSE",
        "BY",
        "AGO",
        "AUTO",
        "MAX",
        "MIN",
        "ASC",
        "DESC",
        "SECOND",
        "SECONDS",
        "MINUTE",
        "MINUTES",
        "HOUR",
        "HOURS",
        "DAY",
        "DAYS",
        "WEEK",
        "WEEKS",
        "MONTH",
        "MONTHS",
    }
)
_TOKEN = re.compile(
    r"`(?P<tick>[^`]+)`|'(?P<str>(?:[^'\\]|\\.)*)'|\"(?P<dstr>[^\"]*)\"|"
    r"(?P<num>\d+(?:\.\d+)?)|(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)|(?P<op>!=|\S)"
)


@dataclass
class Use:
    """One name in one query: where, inside which function, compared with which literals."""

    name: str
    clause: str  # SELECT, WHERE (filter(..., WHERE ...) included) or FACET
    function: str | None = None  # the innermost function around it (SELECT)
    compared: list[str] = field(default_factory=list)  # literals after ``=`` or ``IN (...)``


def read_nrql(query: str) -> tuple[str, list[Use]]:
    """The ``FROM`` source of a query and every name it uses."""
    query = re.sub(r"\{\{\s*\w+\s*\}\}", "'{{variable}}'", query)
    tokens = [(m.lastgroup or "", m.group(m.lastgroup or 0)) for m in _TOKEN.finditer(query)]
    source, clause, uses = "", "", []
    stack: list[str | None] = []  # one entry per open parenthesis: its function, if any
    inner_where = -1  # depth of a filter(..., WHERE ...) condition
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "op":
            if text == "(":
                prev = tokens[i - 1] if i else ("", "")
                is_function = prev[0] == "ident" and prev[1].upper() not in _CLAUSES | {"IN", "AND", "OR", "NOT"}
                stack.append(prev[1] if is_function else None)
            elif text == ")" and stack:
                stack.pop()
                if len(stack) < inner_where:
                    inner_where = -1
            continue
        upper = text.upper() if kind == "ident" else ""
        if upper in _CLAUSES and not stack:
            clause = upper
            continue
        if upper == "WHERE":  # filter(agg(x), WHERE ...)
            inner_where = len(stack)
            continue
        if kind not in ("ident", "tick") or clause not in ("SELECT", "FROM", "WHERE", "FACET"):
            continue
        if kind == "ident" and (upper in _WORDS or nxt == ("op", "(")):
            continue  # a keyword or a function's name
        if i and tokens[i - 1][0] == "ident" and tokens[i - 1][1].upper() == "AS":
            continue  # an alias
        if clause == "FROM":
            source = text
            continue
        where = clause == "WHERE" or (clause == "SELECT" and inner_where >= 0)
        function = next((f for f in reversed(stack) if f), None) if clause == "SELECT" and not where else None
        uses.append(Use(text, "WHERE" if where else clause, function.lower() if function else None, _compared(tokens, i) if where else []))
    return source, uses


def _compared(tokens: list[tuple[str, str]], i: int) -> list[str]:
    rest = tokens[i + 1 :]
    if rest[:1] == [("op", "=")] and len(rest) > 1 and rest[1][0] == "str":
        return [rest[1][1]]
    if rest and rest[0][0] == "ident" and rest[0][1].upper() == "IN":
        values = []
        for kind, text in rest[2:]:
            if kind == "op" and text == ")":
                break
            if kind == "str":
                values.append(text)
        return values
    return []


def query_problems(query: str) -> list[str]:
    """What is wrong with one NRQL query against the registry (empty: nothing)."""
    source, uses = read_nrql(query)
    if source == "Metric":
        return _metric_problems(uses)
    if source == "Log":
        return _log_problems(uses)
    return [f"FROM {source or '?'}: pgflow exports Metric and Log data only"]


def _metric_problems(uses: list[Use]) -> list[str]:
    declared, resource = reg.metrics(), reg.resource_attributes()
    problems = []
    named = [v for u in uses if u.name == "metricName" for v in u.compared]
    for name in named:
        if name not in declared:
            problems.append(f"metricName {name!r} is not a declared metric")
    queried = [declared[u.name] for u in uses if u.name in declared] + [declared[n] for n in named if n in declared]
    if not queried:
        problems.append("queries no declared metric")
    for u in uses:
        m = declared.get(u.name)
        if m is not None:
            if u.clause != "SELECT":
                problems.append(f"metric {m.name} used in {u.clause}")
                continue
            allowed = SUM_AGGREGATES if m.kind == "sum" else GAUGE_AGGREGATES
            if u.function not in allowed:
                problems.append(
                    f"{m.name} is a {'DELTA sum' if m.kind == 'sum' else 'gauge'}: aggregate it with "
                    f"{' or '.join(sorted(allowed))}(), not {u.function or 'nothing'}"
                )
            continue
        if u.name in NRQL_NAMES or u.name in resource:
            continue
        carriers = [a for q in queried if (a := q.attribute(u.name)) is not None]
        if not carriers:
            known = u.name in reg.point_attributes()
            problems.append(
                f"{u.name!r} is {'not an attribute of the metrics queried' if known else 'not declared'}"
                f" ({', '.join(sorted({q.name for q in queried})) or 'none'})"
            )
            continue
        problems += _value_problems(u, carriers)
    return problems


def _log_problems(uses: list[Use]) -> list[str]:
    declared, resource = reg.events(), reg.resource_attributes()
    problems = []
    names = [v for u in uses if u.name == "event.name" for v in u.compared]
    if not names:
        problems.append("a Log query without an event.name filter")
    for name in names:
        if name not in declared:
            problems.append(f"event.name {name!r} is not a declared event")
    queried = [declared[n] for n in names if n in declared] or list(declared.values())
    for u in uses:
        if u.name in resource or u.name in LOG_FIELDS - {"message"}:
            continue
        if u.name == "message":
            if all(e.body is None for e in queried):
                problems.append(f"message: {', '.join(e.name for e in queried)} has no body")
            continue
        carriers = [a for e in queried for a in e.attributes if a.key == u.name]
        if not carriers:
            problems.append(f"{u.name!r} is not an attribute of {', '.join(e.name for e in queried)}")
            continue
        problems += _value_problems(u, carriers)
    return problems


def _value_problems(use: Use, carriers: list[reg.Attribute]) -> list[str]:
    if any(not a.values for a in carriers):
        return []
    allowed = {v for a in carriers for v in a.values}
    return [f"{use.name} = {v!r}: pgflow sends only {sorted(allowed)}" for v in use.compared if v not in allowed and v != "{{variable}}"]


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    """Every problem of every query (widgets and variables), as ``where: what``."""
    queries: list[tuple[str, str]] = [
        (f"variable {v.get('name')}", v["nrqlQuery"]["query"]) for v in dashboard.get("variables", []) if v.get("nrqlQuery")
    ]
    for page in dashboard.get("pages", []):
        for widget in page.get("widgets", []):
            for q in (widget.get("rawConfiguration") or {}).get("nrqlQueries", []):
                queries.append((f"{page.get('name')} / {widget.get('title')}", q["query"]))
    return [f"{where}: {problem}" for where, query in queries for problem in query_problems(query)]


__all__ = ["Use", "dashboard_problems", "query_problems", "read_nrql"]
