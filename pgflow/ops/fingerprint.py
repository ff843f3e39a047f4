"""Query fingerprints with libpg_query (via pglast), with a fallback that never raises.

For every statement: ``fingerprint`` (hex), ``operation`` (``db.operation.name``),
``summary`` (``db.query.summary``, e.g. ``UPDATE pgbench_branches``) and ``text`` (the
normalized statement: never a literal value, no comments, at most 4095 characters).

The text is canonical: a deterministic function of the statement, not of the variant seen
first (issue 19; how, in :mod:`pgflow.ops.canonical`). What the fingerprint ignores beyond
that (the order of a select list, table names differing only in digits) keeps the first text
seen by this collector (:meth:`Fingerprinter.apply`).

Text that pglast cannot parse (truncated by ``track_activity_query_size``, garbage,
non-UTF-8, ``<insufficient privilege>``, huge) gets a simple normalization
(:mod:`pgflow.ops.masking`) hashed with xxh3_64 (16 hex digits, like every fingerprint), so
the same bad text always yields the same fingerprint.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

import polars as pl
import xxhash
from pglast import parser as pg_parser

from pgflow.lru import LRU
from pgflow.ops.canonical import canonical_text
from pgflow.ops.masking import fallback_normalize, fold

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
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Truncate", "Comment", "Grant", "Revoke", "Index", "Define", "Composite", "View")
_FALLBACK_KEYWORDS = {
    "SELECT": "SELECT",
    "WITH": "SELECT",
    "INSERT": "INSERT",
    "UPDATE": "UPDATE",
    "DELETE": "DELETE",
    "MERGE": "MERGE",
    "COPY": "COPY",
    "CALL": "CALL",
    "BEGIN": "TRANSACTION",
    "COMMIT": "TRANSACTION",
    "ROLLBACK": "TRANSACTION",
    "START": "TRANSACTION",
    "END": "TRANSACTION",
    "SET": "SET",
    "SHOW": "SHOW",
    "VACUUM": "MAINTENANCE",
    "ANALYZE": "MAINTENANCE",
    "CREATE": "DDL",
    "ALTER": "DDL",
    "DROP": "DDL",
    "TRUNCATE": "DDL",
    "GRANT": "DDL",
    "REVOKE": "DDL",
    "EXPLAIN": "EXPLAIN",
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
_PARSEABLE = {
    "SQL_COMMENT": b" ",
    "C_COMMENT": b" ",
    "SCONST": b"'?'",
    "USCONST": b"'?'",
    "BCONST": b"'?'",
    "XCONST": b"'?'",
    "ICONST": b"0",
    "FCONST": b"0",
}
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
        if tok.name == "SCONST" and raw[tok.end - 1 : tok.end + 1] == b"\\'" and raw[tok.start : tok.start + 1] in b"'nN":
            # 'C:\' ends here only with standard_conforming_strings on; with it off, the
            # string goes on and what this scanner reads as names may be the literal.
            raise ValueError("string quoting depends on standard_conforming_strings")
        if new is not None:
            kept.append(raw[pos : tok.start])
            kept.append(new)
            pos = tok.end + 1
    if not kept:
        return text
    kept.append(raw[pos:])
    return b"".join(kept).decode("utf-8", "replace")


def _shown(normalized: str) -> str:
    """The exported text of a normalized statement: no literal, no comment; a marker if unscannable."""
    try:
        return fold(_replace_tokens(normalized, _SHOWN))
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


_FIRST_WORD = re.compile(r"[a-z]+")
_TARGET = re.compile(r"\b(?:from|into|update|table|join)\s+([a-z_][\w$.]*)")


def fallback_info(text: str) -> QueryInfo:
    """Normalization for text pglast cannot parse: comments and literals out, lists folded."""
    text = fallback_normalize(text)
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
        return fallback_info(text).text if len(text) <= MAX_TEXT else fallback_normalize(text)


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
    Python per already-seen row. The key cache holds the keys of the frame just seen (what
    the server holds); the text and label caches, shared by a worker's instances, twice the
    keys all instances hold (:meth:`_bound_shared`); all within the configured sizes.
    State is only a cache: losing it changes nothing but speed.
    """

    def __init__(self, key_cache_size: int = 50_000, text_cache_size: int = 50_000) -> None:
        self.key_cache_size = key_cache_size
        self.text_cache_size = text_cache_size
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
        # New entries never push out others while the frame is labelled (a label pushed out by the
        # frame's later fingerprints left each key of its fingerprint its own text): the caches
        # are bounded afterwards, by what the instances hold (:meth:`_bound_shared`).
        self._by_text.capacity = self._labels.capacity = sys.maxsize
        if table is None:
            table = pl.DataFrame(schema={"dbid": pl.Int64, "queryid": pl.Int64, **FINGERPRINT_COLUMNS})
        joined = frame.join(table, on=key, how="left", maintain_order="left")
        missing = joined.filter(pl.col("fingerprint").is_null())
        self.key_hits += joined.height - missing.height
        if missing.height:
            self.key_misses += missing.height
            fresh = missing.select(*key, "query").unique(subset=key, keep="first", maintain_order=True)
            infos = self._canonical(
                [
                    self.info(q) if q is not None else unknown_text_info(qid)
                    for q, qid in zip(fresh["query"].to_list(), fresh["queryid"].to_list())
                ]
            )
            new_rows = fresh.select(key).with_columns(
                pl.Series("fingerprint", [i.fingerprint for i in infos], dtype=pl.String),
                pl.Series("operation", [i.operation for i in infos], dtype=pl.String),
                pl.Series("summary", [i.summary for i in infos], dtype=pl.String),
                pl.Series("text", [i.text for i in infos], dtype=pl.String),
            )
            table = pl.concat([table, new_rows])
            # Fill the new keys in place: rows keep the server's order (sums stay deterministic).
            joined = joined.drop(*FINGERPRINT_COLUMNS).join(table, on=key, how="left", maintain_order="left")
        # Issue 20: only the keys the server holds now stay (``frame`` is every entry of the
        # scrape): the key cache is as large as the server's pg_stat_statements, whatever the
        # cache limit. A key that comes back is found again through the text cache.
        table = table.join(frame.select(key).unique(), on=key, how="semi", maintain_order="left")
        self._by_key[instance] = table
        self._bound_shared()
        return joined

    def _bound_shared(self) -> None:
        """Texts and labels (shared by the instances of a worker) bounded by the keys all of them
        hold now: twice as many, at least 100, at most the configured sizes (the labels of
        fingerprints still held are kept). An instance of a small server never carries tens of
        thousands of dead statements' texts."""
        live = sum(t.height for t in self._by_key.values())
        bound = max(2 * live, 100)
        self._by_text.resize(min(self.text_cache_size, bound))
        if len(self._labels) > min(self.key_cache_size, bound):
            # The label of a fingerprint some instance still holds stays: a new key of it (another
            # user, another database) must get the same text, or its series' identity would change.
            held = {fp for t in self._by_key.values() for fp in t.get_column("fingerprint").to_list()}
            self._labels.resize(min(self.key_cache_size, bound), keep=held)
        else:
            self._labels.resize(min(self.key_cache_size, bound))
