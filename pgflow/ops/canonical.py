"""Canonical statement texts: one text per statement, whatever variant of it was seen first.

The text a statement is exported with (issue 19) is a deterministic function of the statement:
the normalized parse tree deparsed (keywords upper case, one layout: ``END`` and ``commit`` are
both ``COMMIT``), with what libpg_query's fingerprint ignores made uniform: select-list aliases
dropped, parameters renumbered in order of appearance, repeated items of ``IN`` lists and
``VALUES`` rows folded, the schema of a relation read or written dropped, and the names of
savepoints, prepared statements, cursors and channels shown as ``?``. So every collector,
restart and arrival order gives a statement the same text, and a series is never split by its
text. :mod:`pgflow.ops.fingerprint` calls :func:`canonical_text` on the normalized text (already
cleaned of literals) and scans what it returns once more before it leaves.
"""

from __future__ import annotations

import re
from typing import Any, cast

from pglast import ast as pg_ast
from pglast import parse_sql
from pglast.stream import RawStream

MAX_DEPARSE_CHARS = 20_000  # longer normalized texts are shown as normalized, not deparsed
_NAME = "pgflow_name_placeholder"  # a name the fingerprint ignores, shown as ``?``
_NAMED = {  # node type -> the fields that only name something (savepoint, prepared statement, cursor, channel)
    "TransactionStmt": ("savepoint_name", "gid"),
    "PrepareStmt": ("name",),
    "ExecuteStmt": ("name",),
    "DeallocateStmt": ("name",),
    "DeclareCursorStmt": ("portalname",),
    "FetchStmt": ("portalname",),
    "ClosePortalStmt": ("portalname",),
    "ListenStmt": ("conditionname",),
    "UnlistenStmt": ("conditionname",),
    "NotifyStmt": ("conditionname",),
}
# Where a relation is read or written (the fingerprint ignores its schema there, as PostgreSQL 18's query id does)
_DML = {
    ("SelectStmt", "fromClause"),
    ("InsertStmt", "relation"),
    ("UpdateStmt", "relation"),
    ("UpdateStmt", "fromClause"),
    ("DeleteStmt", "relation"),
    ("DeleteStmt", "usingClause"),
    ("MergeStmt", "relation"),
    ("MergeStmt", "sourceRelation"),
    ("JoinExpr", "larg"),
    ("JoinExpr", "rarg"),
}
_PARAM_NUMBER = re.compile(r"\$\d+")


def _deparse(node: Any) -> str:
    return RawStream()(node)


def _fold_items(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """Items that differ only in parameters (``IN ($1, $2)``, ``VALUES ($1), ($2)``) kept once."""
    seen: set[str] = set()
    kept = []
    for item in items:
        key = _PARAM_NUMBER.sub("$", _deparse(item))
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return tuple(kept)


def _canonicalize(node: Any, parent: str = "", field: str = "", params: list[Any] | None = None) -> None:
    """Make uniform, in place, what the fingerprint ignores (see the module's docstring)."""
    if isinstance(node, (tuple, list)):
        for item in node:
            _canonicalize(item, parent, field, params)
        return
    if not isinstance(node, pg_ast.Node):
        return
    node = cast(Any, node)  # pglast's nodes have their fields as attributes its stubs do not list
    kind = type(node).__name__
    if kind == "ParamRef" and params is not None:
        params.append(node)
    elif kind == "ResTarget" and parent == "SelectStmt" and field == "targetList":
        node.name = None
    elif kind == "RangeVar" and (parent, field) in _DML:
        node.schemaname = None
        node.catalogname = None
    elif kind == "A_Expr" and isinstance(node.rexpr, tuple) and len(node.rexpr) > 1:
        node.rexpr = _fold_items(node.rexpr)
    elif kind == "SelectStmt" and node.valuesLists and len(node.valuesLists) > 1:
        node.valuesLists = _fold_items(node.valuesLists)
    for name in _NAMED.get(kind, ()):
        if getattr(node, name, None):
            setattr(node, name, _NAME)
    for name in node.__slots__:
        if name != "location":
            _canonicalize(getattr(node, name, None), kind, name, params)


def canonical_text(normalized: str) -> str | None:
    """The statement's canonical text (None when pglast cannot deparse it: the caller shows the
    normalized text instead). ``normalized``: already cleaned of literals and normalized."""
    if len(normalized) > MAX_DEPARSE_CHARS:
        return None
    try:
        stmts = parse_sql(normalized)
        out = []
        for stmt in stmts:
            params: list[Any] = []
            _canonicalize(stmt, params=params)
            numbers: dict[int, int] = {}
            for ref in sorted(params, key=lambda r: r.location if r.location is not None else -1):
                ref.number = numbers.setdefault(ref.number, len(numbers) + 1)
            out.append(_deparse(stmt))
        text = "; ".join(out).replace(f'"{_NAME}"', "?").replace(_NAME, "?")
    except Exception:
        return None
    return text or None
