"""Explain plans made safe to ship, and a hash of their shape (pure: JSON in, JSON out).

``normalize`` takes ``EXPLAIN (FORMAT JSON)`` output and returns the plan with
- every expression field (Filter, Index Cond, Hash Cond, Merge Cond, Join Filter, Recheck Cond,
  Output, Cache Key, TID Cond, One-Time Filter, Function Call, Sort Key, Group Key, ...) passed
  through the SQL scanner with every constant token (strings, numbers, bit strings, booleans)
  replaced by ``?``: a plan shows constants a statement's text does not (a view's or an
  inlined function's literals, a generic plan's casts), so its text's normalization is not enough;
- every field it does not know dropped: an unknown field might hold anything;
- a field the scanner cannot read (an unterminated quote) dropped.

``plan_hash`` hashes the shape only (node types, relations, indexes, join types, parent
relationships, strategies, scan directions, in tree order), never costs or row estimates,
so it changes when the plan changes and not when statistics drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import xxhash
from pglast import parser as pg_parser

MAX_PLAN_BYTES = 128 * 1024  # New Relic stores up to 128 KB of a log body

PlanNode = dict[str, Any]  # one node of EXPLAIN (FORMAT JSON) output, parsed
Explain = str | list[Any] | dict[str, Any]  # EXPLAIN (FORMAT JSON) output, as text or parsed

# Fields whose values name things or choose among a fixed set: kept as they are. The first
# group is the plan's shape, the input of the plan hash.
SHAPE_FIELDS = (
    "Node Type",
    "Parent Relationship",
    "Join Type",
    "Relation Name",
    "Schema",
    "Index Name",
    "Operation",
    "Strategy",
    "Partial Mode",
    "Scan Direction",
    "Subplan Name",
    "CTE Name",
    "Function Name",
    "Command",
    "Table Function Name",
    "Sampling Method",
    "Custom Plan Provider",
)
_KEPT = frozenset(SHAPE_FIELDS) | frozenset(
    {
        "Alias",
        "Parallel Aware",
        "Async Capable",
        "Startup Cost",
        "Total Cost",
        "Plan Rows",
        "Plan Width",
        "Inner Unique",
        "Single Copy",
        "Workers Planned",
        "Cache Mode",
        "Conflict Resolution",
        "Conflict Arbiter Indexes",
        "Disabled",
        "Disabled Nodes",
        "Subplans Removed",
        "Planned Partitions",
    }
)
# Fields that hold expressions (a string or a list of strings): constants replaced.
EXPRESSION_FIELDS = frozenset(
    {
        "Filter",
        "Index Cond",
        "Hash Cond",
        "Merge Cond",
        "Join Filter",
        "Recheck Cond",
        "Output",
        "Cache Key",
        "TID Cond",
        "One-Time Filter",
        "Function Call",
        "Sort Key",
        "Presorted Key",
        "Group Key",
        "Hash Key",
        "Hash Keys",
        "Group Keys",
        "Sort Keys",
        "Conflict Filter",
        "Repeatable Seed",
        "Sampling Parameters",
        "Table Function Call",
        "Run Condition",
        "Order By",
        "Partition By",
        "Window",
        "Index Cond Expr",
    }
)
_NESTED = frozenset({"Plans", "Grouping Sets", "Target Tables"})  # lists of objects, same rules inside

_CONSTANTS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST", "TRUE_P", "FALSE_P"})
_PLAN_REFERENCES = (b"SubPlan", b"InitPlan", b"CTE")  # "SubPlan 1", "(InitPlan 2).col1", "CTE 1": no constants


def scrub(expression: str) -> str | None:
    """``expression`` with every constant token replaced by ``?``; None when it cannot be scanned."""
    raw = expression.encode("utf-8")
    try:
        tokens = pg_parser.scan(expression)
    except Exception:
        return None
    out, pos, previous = [], 0, b""
    for tok in tokens:
        text = raw[tok.start : tok.end + 1]
        if tok.name in _CONSTANTS and not (tok.name == "ICONST" and previous in _PLAN_REFERENCES):
            out += [raw[pos : tok.start], b"?"]
            pos = tok.end + 1
        elif tok.name in ("SQL_COMMENT", "C_COMMENT"):
            out += [raw[pos : tok.start], b" "]
            pos = tok.end + 1
        previous = text
    out.append(raw[pos:])
    return b"".join(out).decode("utf-8", "replace")


def _scrub_value(value: object) -> object:
    """A string, or lists of strings at any depth (``Hash Keys`` of grouping sets), scrubbed;
    None (drop the field) when anything in it is not a string or cannot be scanned."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        cleaned = [_scrub_value(v) for v in value]
        return None if any(c is None for c in cleaned) else cleaned
    return None


def _node(node: PlanNode) -> PlanNode:
    kept: PlanNode = {}
    for key, value in node.items():
        if key in _KEPT:
            if (
                isinstance(value, (str, int, float, bool))
                or value is None
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                kept[key] = value
        elif key in EXPRESSION_FIELDS:
            clean = _scrub_value(value)
            if clean is not None:
                kept[key] = clean
        elif key in _NESTED and isinstance(value, list):
            kept[key] = [_node(v) for v in value if isinstance(v, dict)]
    return kept


def _plan_of(explain: Explain) -> PlanNode:
    """The root plan node of EXPLAIN (FORMAT JSON) output, given as text or parsed."""
    data = json.loads(explain) if isinstance(explain, str) else explain
    if isinstance(data, list):
        data = data[0] if data else {}
    if isinstance(data, dict) and "Plan" in data:
        data = data["Plan"]
    if not isinstance(data, dict):
        raise ValueError("not EXPLAIN (FORMAT JSON) output")
    return data


def obfuscate(explain: Explain) -> PlanNode:
    """The root plan node with no constant left and no unknown field (see the module's docstring)."""
    return _node(_plan_of(explain))


def _shape(node: PlanNode) -> list[Any]:
    return [[node.get(f) for f in SHAPE_FIELDS], [_shape(child) for child in node.get("Plans", [])]]


def plan_hash(plan: PlanNode) -> str:
    """16 hex digits over the plan's shape (not costs, rows or expressions), stable across runs."""
    return xxhash.xxh3_64_hexdigest(json.dumps(_shape(_plan_of(plan)), separators=(",", ":")).encode())


def _without_depth(node: PlanNode, depth: int) -> PlanNode:
    if depth <= 0:
        return {k: v for k, v in node.items() if k != "Plans"} | ({"Plans Omitted": True} if "Plans" in node else {})
    return node | ({"Plans": [_without_depth(c, depth - 1) for c in node["Plans"]]} if "Plans" in node else {})


def _depth(node: PlanNode) -> int:
    return 1 + max((_depth(c) for c in node.get("Plans", [])), default=0)


def body(plan: PlanNode, limit: int = MAX_PLAN_BYTES) -> str:
    """``[{"Plan": plan}]`` as compact JSON within ``limit`` bytes: when too long, only the shape
    fields are kept, then the deepest levels are cut (marked ``"Plans Omitted": true``)."""
    text = json.dumps([{"Plan": plan}], separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text

    def shape_only(node: PlanNode) -> PlanNode:
        out = {k: node[k] for k in SHAPE_FIELDS if k in node}
        if "Plans" in node:
            out["Plans"] = [shape_only(c) for c in node["Plans"]]
        return out

    slim = shape_only(plan)
    for depth in range(_depth(slim), -1, -1):
        text = json.dumps([{"Plan": _without_depth(slim, depth)}], separators=(",", ":"))
        if len(text.encode()) <= limit:
            return text
    return json.dumps([{"Plan": {"Node Type": plan.get("Node Type"), "Plans Omitted": True}}])


@dataclass(frozen=True)
class NormalizedPlan:
    hash: str  # postgresql.plan.hash
    body: str  # the obfuscated plan, JSON, at most MAX_PLAN_BYTES


def normalize(explain: Explain) -> NormalizedPlan:
    """EXPLAIN (FORMAT JSON) output → its shape hash and its shippable body."""
    plan = obfuscate(explain)
    return NormalizedPlan(plan_hash(plan), body(plan))
