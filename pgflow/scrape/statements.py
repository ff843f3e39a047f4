"""pg_stat_statements: version-aware SQL mapped onto one stable schema (13 to 18).

Counters are read with ``pg_stat_statements(false)``: no query text every scrape. Text is
fetched only for keys the scraper has not seen, in one extra query.
"""

from __future__ import annotations

from psycopg import sql

from pgflow.schema import STATEMENT_INT_COUNTERS, STATEMENT_TIME_COUNTERS

# Every statement pgflow sends carries this comment after its first keyword (PostgreSQL 18
# drops a leading comment from pg_stat_statements' text, not an inner one). A key whose text
# holds it is pgflow's own work and is never exported: decided once per key, so a key is
# either always or never in a snapshot and the deltas stay exact.
MARK = "/*pgflow*/"


def is_own(text: str | None) -> bool:
    """True for the text of a statement pgflow itself sent."""
    return text is not None and MARK in text


def limits_sql(statement_timeout_ms: int, lock_timeout_ms: int | None = None, **extra: str) -> str:
    """The one statement that makes the rest of its implicit transaction read-only and time-limited.

    pgflow sends no transaction control (issue 19): ``BEGIN`` and ``ROLLBACK`` cannot be told
    apart from the user's in pg_stat_statements (from PostgreSQL 16 a utility statement's
    queryid is its parse tree, comments excluded). Instead the connection is in autocommit and
    each unit of work is one implicit transaction: a pipeline without an intermediate Sync, or a
    multi-statement simple query. This marked SELECT comes first in it; ``set_config(..., true)``
    is ``SET LOCAL``, so the limits end with the unit of work (also behind PgBouncer in
    transaction pooling). pgflow takes no lock a writer waits on, but a catalog lock it waits for
    must not hold it past the statement's own budget. ``extra``: more settings for the same
    transaction. One column, so readers that skip narrow results skip it.
    """
    ms = int(statement_timeout_ms)
    lock = int(lock_timeout_ms if lock_timeout_ms is not None else ms)
    settings = {"statement_timeout": str(ms), "lock_timeout": str(lock), "transaction_read_only": "on", **extra}
    calls = " || ".join(f"set_config('{k}', '{v}', true)" for k, v in settings.items())
    return f"SELECT {MARK} {calls}"


EXTENSION_SQL = """
SELECT /*pgflow*/ e.extversion, n.nspname,
       array(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = format('%I.pg_stat_statements', n.nspname)::regclass
               AND a.attnum > 0 AND NOT a.attisdropped)
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""

# Stable name -> the names PostgreSQL has used for it, newest first.
_RENAMED = {
    "shared_blk_read_time": ("shared_blk_read_time", "blk_read_time"),  # renamed in 17
    "shared_blk_write_time": ("shared_blk_write_time", "blk_write_time"),
}


def _source(column: str, available: set[str]) -> str | None:
    for name in _RENAMED.get(column, (column,)):
        if name in available:
            return name
    return None


def statements_sql(schema: str, available: set[str]) -> sql.Composed:
    """The per-scrape counters query for a server whose view has ``available`` columns.

    Columns a server lacks (``toplevel`` before 14, ``stats_since`` before 17, ...) are
    typed NULLs, so every server yields the same frame.
    """

    def col(name: str, cast: str) -> sql.Composable:
        src = _source(name, available)
        expr = sql.SQL("s.{}::{}").format(sql.Identifier(src), sql.SQL(cast)) if src else sql.SQL(f"NULL::{cast}")
        return sql.SQL("{} AS {}").format(expr, sql.Identifier(name))

    columns = [
        sql.SQL("s.dbid::int8 AS dbid"),
        sql.SQL("s.userid::int8 AS userid"),
        sql.SQL("s.queryid AS queryid"),
        col("toplevel", "bool"),
        sql.SQL("d.datname::text AS database"),
        sql.SQL('r.rolname::text AS "user"'),
        col("stats_since", "timestamptz"),
        *(col(c, "int8") for c in STATEMENT_INT_COUNTERS),
        *(col(c, "float8") for c in STATEMENT_TIME_COUNTERS),
    ]
    return sql.SQL(
        "SELECT /*pgflow*/ {} FROM {}.pg_stat_statements(false) s "
        "LEFT JOIN pg_database d ON d.oid = s.dbid LEFT JOIN pg_roles r ON r.oid = s.userid"
    ).format(sql.SQL(", ").join(columns), sql.Identifier(schema))


# Issue 20: the counters arrive column by column, each as one bytea of the values' binary
# send form (big-endian int8 / float8 / bool, timestamptz as microseconds since 2000-01-01),
# so the collector turns them into arrays without a Python object per value. One aggregate
# node advances every aggregate on the same row, so the i-th value of every column is the same
# entry. Names come as two small arrays per kind (oids and names) of the entries' databases and
# roles. Rows without a queryid (other roles' statements, hidden from a role without
# pg_read_all_stats) are counted, not sent.
COLUMNAR_PREFIX = ("hidden", "n", "dbid", "userid", "queryid", "toplevel", "stats_since")
COLUMNAR_NAMES = ("db_oids", "db_names", "role_oids", "role_names")
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01


def statements_columnar_sql(schema: str, available: set[str]) -> sql.Composed:
    """The per-scrape counters query: one row ``(i, n, b, o, t)`` per column of the columnar
    layout (see ``COLUMNAR_PREFIX``; then one bytea per counter of STATEMENT_INT_COUNTERS and
    STATEMENT_TIME_COUNTERS, NULL where the server lacks the column; then ``COLUMNAR_NAMES``),
    the value in the column of its type (int8, bytea, int8[], text[]); :func:`columnar_row`
    puts them back in order.

    Why rows, not one row of columns: libpq keeps a connection's input buffer as large as the
    largest message it ever received, for the connection's life. One row of every counter
    (~450 KB at 2,000 statements) left ~0.7 MB resident per instance; rows of one column each
    (16 KB at 2,000 statements) need a buffer of a few tens of KB (issue 20). The aggregates
    still run once over one read of pg_stat_statements, so every column is the same snapshot.
    """

    def agg(expr: str) -> sql.Composable:
        return sql.SQL("string_agg(" + expr + ", ''::bytea) FILTER (WHERE s.queryid IS NOT NULL)")

    def counter(name: str, kind: str) -> sql.Composable:
        src = _source(name, available)
        if src is None:
            return sql.SQL("NULL::bytea")
        cast = "int8" if kind == "int8send" else "float8"
        return sql.SQL("string_agg({}(coalesce(s.{}::" + cast + ", 0)), ''::bytea) FILTER (WHERE s.queryid IS NOT NULL)").format(
            sql.SQL(kind), sql.Identifier(src)
        )

    since = _source("stats_since", available)
    typed: list[tuple[str, sql.Composable]] = [
        ("n", sql.SQL("count(*) FILTER (WHERE s.queryid IS NULL)")),
        ("n", sql.SQL("count(s.queryid)")),
        ("b", agg("int8send(s.dbid::int8)")),
        ("b", agg("int8send(s.userid::int8)")),
        ("b", agg("int8send(s.queryid)")),
        ("b", agg("boolsend(s.toplevel)") if "toplevel" in available else sql.SQL("NULL::bytea")),
        ("b", agg(f"timestamptz_send(coalesce(s.{since}, '-infinity'))") if since else sql.SQL("NULL::bytea")),
        *(("b", counter(c, "int8send")) for c in STATEMENT_INT_COUNTERS),
        *(("b", counter(c, "float8send")) for c in STATEMENT_TIME_COUNTERS),
        ("o", sql.SQL("(SELECT array_agg(d.oid::int8 ORDER BY d.oid) FROM pg_database d WHERE d.oid IN (SELECT dbid FROM s))")),
        ("t", sql.SQL("(SELECT array_agg(d.datname::text ORDER BY d.oid) FROM pg_database d WHERE d.oid IN (SELECT dbid FROM s))")),
        ("o", sql.SQL("(SELECT array_agg(r.oid::int8 ORDER BY r.oid) FROM pg_roles r WHERE r.oid IN (SELECT userid FROM s))")),
        ("t", sql.SQL("(SELECT array_agg(r.rolname::text ORDER BY r.oid) FROM pg_roles r WHERE r.oid IN (SELECT userid FROM s))")),
    ]
    nulls = {"n": "NULL::int8", "b": "NULL::bytea", "o": "NULL::int8[]", "t": "NULL::text[]"}
    values = [
        sql.SQL("({}, {})").format(
            sql.Literal(i), sql.SQL(", ").join(sql.SQL(f"r.c{i}") if k == kind else sql.SQL(nulls[k]) for k in "nbot")
        )
        for i, (kind, _) in enumerate(typed)
    ]
    return sql.SQL(
        "WITH /*pgflow*/ s AS MATERIALIZED (SELECT * FROM {}.pg_stat_statements(false)), r AS (SELECT {} FROM s) "
        "SELECT v.i, v.n, v.b, v.o, v.t FROM r CROSS JOIN LATERAL (VALUES {}) AS v(i, n, b, o, t)"
    ).format(
        sql.Identifier(schema),
        sql.SQL(", ").join(sql.SQL("{} AS {}").format(expr, sql.Identifier(f"c{i}")) for i, (_, expr) in enumerate(typed)),
        sql.SQL(", ").join(values),
    )


def columnar_width() -> int:
    """How many rows :func:`statements_columnar_sql` returns (one per column of the layout)."""
    return len(COLUMNAR_PREFIX) + len(STATEMENT_INT_COUNTERS) + len(STATEMENT_TIME_COUNTERS) + len(COLUMNAR_NAMES)


def info_sql(schema: str) -> sql.Composed:
    """``pg_stat_statements_info`` (extension 1.9+, PostgreSQL 14+): deallocations and last reset."""
    return sql.SQL("SELECT /*pgflow*/ dealloc, stats_reset FROM {}.pg_stat_statements_info").format(sql.Identifier(schema))


def texts_sql(schema: str, has_toplevel: bool = True) -> sql.Composed:
    """Text for the given queryids only: the one place query text crosses the wire.

    Keyed like the counters, ``toplevel`` included: one queryid may have a top-level entry
    (the workload's) and a nested one with another text (an EXPLAIN of pgflow's, say)."""
    toplevel = "toplevel" if has_toplevel else "NULL::bool"
    return sql.SQL(
        "SELECT /*pgflow*/ dbid::int8, userid::int8, queryid, " + toplevel + ", query FROM {}.pg_stat_statements(true) "
        "WHERE queryid = ANY(%s)"
    ).format(sql.Identifier(schema))
