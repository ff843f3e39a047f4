"""Query fingerprints with libpg_query (via pglast), with a fallback that never raises.

For every statement: ``fingerprint`` (hex), ``operation`` (``db.operation.name``),
``summary`` (``db.query.summary``, e.g. ``UPDATE pgbench_branches``) and ``text`` (the
normalized statement: never a literal value, no comments, at most 4095 characters).

The text is canonical: a deterministic function of the statement, not of the variant seen
first (issue 19). It is the normalized parse tree deparsed (keywords upper case, one layout:
``END`` and ``commit`` are both ``COMMIT``), with what libpg_query's fingerprint ignores
made uniform: select-list aliases dropped, parameters renumbered in order of appearance,
repeated items of ``IN`` lists and ``VALUES`` rows folded, the schema of a relation read or
written dropped, and the names of savepoints, prepared statements, cursors and channels
shown as ``?``. So every collector, restart and arrival order gives a statement the same
text, and a series is never split by its text. What the fingerprint ignores beyond that
(the order of a select list, table names differing only in digits) keeps the first text seen
by this collector (:meth:`Fingerprinter.apply`).

Text that pglast cannot parse (truncated by ``track_activity_query_size``, garbage,
non-UTF-8, ``<insufficient privilege>``, huge) gets a simple normalization hashed with
xxh3_64 (16 hex digits, like every fingerprint), so the same bad text always yields the same
fingerprint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import polars as pl
import xxhash
from pglast import ast as pg_ast
from pglast import parse_sql
from pglast import parser as pg_parser
from pglast.stream import RawStream

from pgflow.lru import LRU

MAX_TEXT = 4095
MAX_PARSE_BYTES = 200_000  # longer statements go straight to the fallback: parsing them is not worth it
FINGERPRINT_COLUMNS = {"fingerprint": pl.String, "operation": pl.String, "summary": pl.String, "text": pl.String}

_OPERATIONS = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
    "CopyStmt": "COPY",
    "CallStmt": "CALL",
    "TransactionStmt": "TRANSACTION",
    "VacuumStmt": "MAINTENANCE",
    "ClusterStmt": "MAINTENANCE",
    "ReindexStmt": "MAINTENANCE",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "ExplainStmt": "EXPLAIN",
}
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Truncate", "Comment", "Grant", "Revoke", "Index",
                 "Define", "Composite", "View")
_FALLBACK_KEYWORDS = {
    "SELECT": "SELECT", "WITH": "SELECT", "INSERT": "INSERT", "UPDATE": "UPDATE", "DELETE": "DELETE",
    "MERGE": "MERGE", "COPY": "COPY", "CALL": "CALL", "BEGIN": "TRANSACTION", "COMMIT": "TRANSACTION",
    "ROLLBACK": "TRANSACTION", "START": "TRANSACTION", "END": "TRANSACTION", "SET": "SET", "SHOW": "SHOW",
    "VACUUM": "MAINTENANCE", "ANALYZE": "MAINTENANCE", "CREATE": "DDL", "ALTER": "DDL", "DROP": "DDL",
    "TRUNCATE": "DDL", "GRANT": "DDL", "REVOKE": "DDL", "EXPLAIN": "EXPLAIN",
}


@dataclass(frozen=True)
class QueryInfo:
    fingerprint: str
    operation: str
    summary: str
    text: str


def _operation(stmt_type: str) -> str:
    if stmt_type in _OPERATIONS:
        return _OPERATIONS[stmt_type]
    return "DDL" if stmt_type.startswith(_DDL_PREFIXES) else "OTHER"


def _relations(node: object, out: list[str]) -> None:
    """Collect RangeVar names in tree order (a statement's target relation comes first)."""
    if isinstance(node, dict):
        name = node.get("relname")  # a RangeVar, wrapped ({"RangeVar": {...}}) or as a typed field
        if isinstance(name, str) and name not in out:
            out.append(name)
        for value in node.values():
            if len(out) >= 2:
                return
            _relations(value, out)
    elif isinstance(node, list):
        for value in node:
            _relations(value, out)


# Every literal is a place a secret can hide (passwords, tokens, PINs, function bodies):
# libpg_query normalizes only the constants it visits, and keeps utility statements'
# literals (``OPTIONS (password '...')``, ``COPY ... FROM PROGRAM '...'``, ``DO $$...$$``)
# verbatim. So every text that leaves is scanned with PostgreSQL's own scanner and every
# remaining literal token (strings of every quoting, dollar-quoted bodies, numbers, bit
# strings) and comment is replaced. ``_PARSEABLE`` keeps the text parseable (capture files,
# fingerprint input); ``_SHOWN`` is what an exported text shows.
_PARSEABLE = {"SQL_COMMENT": b" ", "C_COMMENT": b" ", "SCONST": b"'?'", "USCONST": b"'?'", "BCONST": b"'?'",
              "XCONST": b"'?'", "ICONST": b"0", "FCONST": b"0"}
_SHOWN = {**_PARSEABLE, "ICONST": b"?", "FCONST": b"?"}
UNREADABLE = "<statement text not shown: it could not be scanned>"
# Where a literal or comment token could start: a quote, a comment, a dollar quote (``$`` not
# before a digit), a number (a digit not inside a name or a ``$n`` parameter).
_MAY_HOLD_LITERAL = re.compile(r"'|--|/\*|\$(?!\d)|(?<![\w$])\d")


def _replace_tokens(text: str, replacements: dict[str, bytes]) -> str:
    """Replace the scanner's tokens of the given kinds (comments, literals) in ``text``.

    Raises when the scanner cannot read ``text``: callers never fall back to the raw text.
    """
    if not _MAY_HOLD_LITERAL.search(text):
        return text  # no quote, comment, dollar quote or number: nothing to replace (most texts)
    raw = text.encode("utf-8")
    kept, pos = [], 0
    for tok in pg_parser.scan(text):
        new = replacements.get(tok.name)
        if (tok.name == "SCONST" and raw[tok.end - 1:tok.end + 1] == b"\\'"
                and raw[tok.start:tok.start + 1] in b"'nN"):
            # 'C:\' ends here only with standard_conforming_strings on; with it off, the
            # string goes on and what this scanner reads as names may be the literal.
            raise ValueError("string quoting depends on standard_conforming_strings")
        if new is not None:
            kept.append(raw[pos:tok.start])
            kept.append(new)
            pos = tok.end + 1
    if not kept:
        return text
    kept.append(raw[pos:])
    return b"".join(kept).decode("utf-8", "replace")


_WS = re.compile(r"\s+")


def _fold(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _shown(normalized: str) -> str:
    """The exported text of a normalized statement: no literal, no comment; a marker if unscannable."""
    try:
        return _fold(_replace_tokens(normalized, _SHOWN))
    except Exception:
        return UNREADABLE


def _cleaned(text: str) -> str:
    """``text`` with every literal and comment replaced (raises if the scanner cannot read it).

    Everything the parse path derives comes from this text, never from the raw one: what
    is not in it cannot leak, and statements that differ only in literals (even one that
    makes the raw text unparseable, such as an integer past 2**31) are treated alike.
    """
    if len(text) > MAX_PARSE_BYTES:
        raise ValueError("statement too long to parse")
    return _replace_tokens(text, _PARSEABLE)


MAX_DEPARSE_CHARS = 20_000  # longer normalized texts are shown as normalized, not deparsed
_NAME = "pgflow_name_placeholder"  # a name the fingerprint ignores, shown as ``?``
_NAMED = {  # node type -> the fields that only name something (savepoint, prepared statement, cursor, channel)
    "TransactionStmt": ("savepoint_name", "gid"), "PrepareStmt": ("name",), "ExecuteStmt": ("name",),
    "DeallocateStmt": ("name",), "DeclareCursorStmt": ("portalname",), "FetchStmt": ("portalname",),
    "ClosePortalStmt": ("portalname",), "ListenStmt": ("conditionname",), "UnlistenStmt": ("conditionname",),
    "NotifyStmt": ("conditionname",),
}
# Where a relation is read or written (the fingerprint ignores its schema there, as PostgreSQL 18's query id does)
_DML = {("SelectStmt", "fromClause"), ("InsertStmt", "relation"), ("UpdateStmt", "relation"),
        ("UpdateStmt", "fromClause"), ("DeleteStmt", "relation"), ("DeleteStmt", "usingClause"),
        ("MergeStmt", "relation"), ("MergeStmt", "sourceRelation"), ("JoinExpr", "larg"), ("JoinExpr", "rarg")}
_PARAM_NUMBER = re.compile(r"\$\d+")


def _deparse(node: object) -> str:
    return RawStream()(node)


def _fold_items(items: tuple) -> tuple:
    """Items that differ only in parameters (``IN ($1, $2)``, ``VALUES ($1), ($2)``) kept once."""
    seen: set[str] = set()
    kept = []
    for item in items:
        key = _PARAM_NUMBER.sub("$", _deparse(item))
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return tuple(kept)


def _canonicalize(node: object, parent: str = "", field: str = "", params: list | None = None) -> None:
    """Make uniform, in place, what the fingerprint ignores (see the module's docstring)."""
    if isinstance(node, (tuple, list)):
        for item in node:
            _canonicalize(item, parent, field, params)
        return
    if not isinstance(node, pg_ast.Node):
        return
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
            params: list = []
            _canonicalize(stmt, params=params)
            numbers: dict[int, int] = {}
            for ref in sorted(params, key=lambda r: r.location if r.location is not None else -1):
                ref.number = numbers.setdefault(ref.number, len(numbers) + 1)
            out.append(_deparse(stmt))
        text = "; ".join(out).replace(f'"{_NAME}"', "?").replace(_NAME, "?")
    except Exception:
        return None
    return text or None


def statement_count(text: str) -> int:
    """How many statements ``text`` holds (raises on text libpg_query cannot parse)."""
    return len(pg_parser.split(_cleaned(text)))


def parse_info(text: str) -> QueryInfo:
    """Fingerprint one statement with pglast; raises on text libpg_query cannot parse."""
    text = _cleaned(text)
    tree = json.loads(pg_parser.parse_sql_json(text))
    stmts = tree.get("stmts") or []
    if not stmts:
        raise ValueError("empty statement")
    stmt = stmts[0].get("stmt") or {}
    stmt_type = next(iter(stmt), "")
    operation = _operation(stmt_type)
    tables: list[str] = []
    _relations(stmt, tables)
    summary = " ".join([operation, *tables])
    if stmt_type == "TransactionStmt":  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT ... rather than one blur
        kind = str(stmt[stmt_type].get("kind", "")).removeprefix("TRANS_STMT_").replace("_", " ")
        summary = kind or operation
    normalized = pg_parser.normalize(text)
    normalized = _shown(canonical_text(normalized) or normalized)
    # libpg_query keeps some literals in its fingerprint (a role's password, a function's
    # body): fingerprinted without them, a hash of a secret cannot leave either.
    fingerprint = pg_parser.fingerprint(text)
    return QueryInfo(fingerprint, operation, summary, normalized[:MAX_TEXT])


_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_PARAM = re.compile(r"\$\d+")
_NUMBER = re.compile(r"(?:0[xob][0-9a-f_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:e[-+]?\d+)?)\w*", re.I)
_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
# Spaces and operators (nothing starts there), or a name (digits and $ inside it are its own).
_SIMPLE = re.compile(r"[^-/'\"$.\w\x80-\U0010ffff]+|[^\W\d][\w$]*")
_STRING_PREFIXES = frozenset("eEbBxXnN")
_FIRST_WORD = re.compile(r"[a-z]+")
_TARGET = re.compile(r"\b(?:from|into|update|table|join)\s+([a-z_][\w$.]*)")


def _string_end(text: str, quote: int, escapes: bool) -> int:
    """Where the string literal opened at ``quote`` ends (past its closing quote, or the end).

    A backslash in a standard string is ambiguous (``standard_conforming_strings`` may be
    off on the server), so the rest of the text is treated as the literal: hidden, not guessed.
    """
    j, n = quote + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == "\\":
            if not escapes:
                return n
            j += 2
        elif ch == "'":
            if text.startswith("''", j):
                j += 2
            else:
                return j + 1
        else:
            j += 1
    return n


def _mask(text: str) -> str:
    """Every literal (any quoting, dollar-quoted, numbers, parameters) to ``?``, comments out.

    A small lexer for text libpg_query cannot read (truncated, garbage, not UTF-8): it never
    fails, and whatever it cannot close (a literal, a comment, a quoted name) runs to the end
    of the text and is hidden, so a secret never survives because the text was broken.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        m = _SIMPLE.match(text, i)  # spaces, operators, a whole name: most of any text
        if m:
            word, j = m.group(), m.end()
            if j < n and text[j] == "'" and word in _STRING_PREFIXES:  # E'...', B'...', X'...', N'...'
                i = _string_end(text, j, escapes=word in "eE")
                out.append("?")
            elif word in ("u", "U") and text.startswith("&'", j):  # U&'...'
                i = _string_end(text, j + 1, escapes=False)
                out.append("?")
            else:
                out.append(word)
                i = j
            continue
        c = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif text.startswith("/*", i):
            j, depth = i + 2, 1
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            out.append(" ")
        elif c == "'":
            i = _string_end(text, i, escapes=False)
            out.append("?")
        elif c == "$" and (m := _DOLLAR_TAG.match(text, i)):
            end = text.find(m.group(0), m.end())
            i = n if end < 0 else end + len(m.group(0))
            out.append("?")
        elif c == "$" and (m := _PARAM.match(text, i)):
            i = m.end()
            out.append("?")
        elif c == '"':
            j = i + 1
            while (j := text.find('"', j)) >= 0 and text.startswith('""', j):
                j += 2
            if j < 0:  # an unclosed quoted name: whatever follows may be a literal
                out.append("?")
                i = n
            else:
                out.append(text[i:j + 1])
                i = j + 1
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER.match(text, i)
            i = m.end() if m else i + 1
            out.append("?")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _fallback_normalize(text: str) -> str:
    return _LIST.sub("(?)", _fold(_mask(text)).lower())


def fallback_info(text: str) -> QueryInfo:
    """Normalization for text pglast cannot parse: comments and literals out, lists folded."""
    text = _fallback_normalize(text)
    word = _FIRST_WORD.search(text)
    operation = _FALLBACK_KEYWORDS.get(word.group(0).upper(), "OTHER") if word else "OTHER"
    target = _TARGET.search(text)
    summary = f"{operation} {target.group(1)}" if target else operation
    digest = xxhash.xxh3_64_hexdigest(text.encode("utf-8", "replace"))
    return QueryInfo(digest, operation, summary, text[:MAX_TEXT])


def redact_text(text: str) -> str:
    """The statement with its literals (strings, numbers) and comments replaced, layout otherwise kept.

    What a capture stores: pg_stat_statements keeps utility statements verbatim
    (``ALTER ROLE ... PASSWORD '...'``), and a capture file must not hold such secrets.
    """
    try:
        # String literals become '?' and numbers 0 rather than $n, so the text still parses
        # where a parameter may not stand (ALTER ROLE ... PASSWORD) and fingerprints the same.
        cleaned = _cleaned(text)
        pg_parser.parse_sql_json(cleaned)  # only text libpg_query accepts keeps its layout
        return cleaned
    except Exception:
        return fallback_info(text).text if len(text) <= MAX_TEXT else _fallback_normalize(text)


def query_info(text: str | None) -> QueryInfo:
    """pglast when it can parse ``text``, the fallback otherwise; never raises."""
    if text is None:
        return fallback_info("<unknown text>")
    try:
        return parse_info(text)
    except Exception:
        return fallback_info(text)


def unknown_text_info(queryid: int) -> QueryInfo:
    """A statement whose text is gone (deallocated before it was read): one series per queryid."""
    return QueryInfo(xxhash.xxh3_64_hexdigest(f"queryid:{queryid}".encode()), "OTHER", "OTHER", "")


class Fingerprinter:
    """Fingerprints a scrape's rows, caching by ``(instance, dbid, queryid)`` and by text hash.

    The pipeline calls it only when a scrape's rows differ from the previous scrape's. The
    key cache is a polars table per instance joined against each frame: one join and no
    Python per already-seen row. Both caches are bounded; a
    key cache over capacity keeps the keys of the frame just seen and the newest others.
    State is only a cache: losing it changes nothing but speed.
    """

    def __init__(self, key_cache_size: int = 50_000, text_cache_size: int = 50_000) -> None:
        self.key_cache_size = key_cache_size
        self._by_key: dict[str, pl.DataFrame] = {}
        self._by_text: LRU[int, QueryInfo] = LRU(text_cache_size)
        self._labels: LRU[str, QueryInfo] = LRU(key_cache_size)
        self.key_hits = 0
        self.key_misses = 0
        self.parses = 0

    def info(self, text: str | None) -> QueryInfo:
        digest = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) if text is not None else 0
        cached = self._by_text.get(digest)
        if cached is None:
            self.parses += 1
            cached = query_info(text)
            self._by_text.put(digest, cached)
        return cached

    def _canonical(self, infos: list[QueryInfo]) -> list[QueryInfo]:
        """One label set per fingerprint. Canonical texts make the variants of a statement one
        text (:func:`canonical_text`); what they do not fold (the order of a select list, table
        names that differ only in digits, which libpg_query ignores) would otherwise flip a
        series' attributes, and so its identity, from window to window. For those the first seen
        wins; among new ones, the smallest text.
        """
        for info in sorted(infos, key=lambda i: i.text):
            if info.fingerprint not in self._labels:
                self._labels.put(info.fingerprint, info)
        return [self._labels.get(i.fingerprint) or i for i in infos]

    def apply(self, instance: str, frame: pl.DataFrame) -> pl.DataFrame:
        """Add fingerprint, operation, summary and text to ``frame`` (dbid, queryid, query)."""
        table = self._by_key.get(instance)
        key = ["dbid", "queryid"]
        if table is None:
            table = pl.DataFrame(schema={"dbid": pl.Int64, "queryid": pl.Int64, **FINGERPRINT_COLUMNS})
        joined = frame.join(table, on=key, how="left", maintain_order="left")
        missing = joined.filter(pl.col("fingerprint").is_null())
        self.key_hits += joined.height - missing.height
        if missing.height:
            self.key_misses += missing.height
            fresh = missing.select(*key, "query").unique(subset=key, keep="first", maintain_order=True)
            infos = self._canonical([self.info(q) if q is not None else unknown_text_info(qid)
                                     for q, qid in zip(fresh["query"].to_list(), fresh["queryid"].to_list())])
            new_rows = fresh.select(key).with_columns(
                pl.Series("fingerprint", [i.fingerprint for i in infos], dtype=pl.String),
                pl.Series("operation", [i.operation for i in infos], dtype=pl.String),
                pl.Series("summary", [i.summary for i in infos], dtype=pl.String),
                pl.Series("text", [i.text for i in infos], dtype=pl.String),
            )
            table = pl.concat([table, new_rows])
            if table.height > self.key_cache_size:
                used = frame.select(key).unique()
                recent = table.join(used, on=key, how="semi")
                rest = table.join(used, on=key, how="anti").tail(max(0, self.key_cache_size - recent.height))
                table = pl.concat([rest, recent])
            # Fill the new keys in place: rows keep the server's order (sums stay deterministic).
            joined = joined.drop(*FINGERPRINT_COLUMNS).join(
                table, on=key, how="left", maintain_order="left")
        self._by_key[instance] = table
        return joined
