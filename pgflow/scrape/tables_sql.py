"""The table scrape's statement: buckets, digests by hash and xor, the two passes over pg_class,
and the binary ``int8[]`` of the previous digests (see :mod:`pgflow.scrape.tables`)."""

from __future__ import annotations

import struct

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

from pgflow.schema import TABLE_COUNTERS, TABLE_GAUGES, TABLE_TIMES

MIN_BUCKETS, MAX_BUCKETS = 256, 32768
TABLES_PER_BUCKET = 6
SEED_TABLES = 20_000  # tables read whole per scrape while a database is first seeded (sizes cost)  # a moved table brings about this many rows along: rows follow activity


def buckets_for(tables: int) -> int:
    """How many buckets a database of ``tables`` tables is hashed into (a power of two)."""
    want = max(1, tables // TABLES_PER_BUCKET)
    return max(MIN_BUCKETS, min(MAX_BUCKETS, 1 << (want.bit_length() - 1)))  # 6 to 12 tables per bucket


# The schemas whose tables are not the user's: their oids, looked up once per statement (an
# InitPlan), so that each table is kept by comparing its namespace oid with a handful (no join).
# Toast and temporary schemas hold no table of the kinds read (relkind, relpersistence): the
# pattern only keeps the rule as it always was.
_EXCLUDED = "ARRAY(SELECT oid FROM pg_namespace WHERE nspname IN ('pg_catalog', 'information_schema') OR nspname ~ '^pg_toast')"
_USER_TABLE = f"c.relkind IN ('r', 'm', 'p') AND c.relpersistence <> 't' AND c.relnamespace <> ALL ({_EXCLUDED})"
COUNT_SQL = f"SELECT count(*) FROM pg_class c WHERE {_USER_TABLE} AND NOT c.relispartition"


def _blocks(oid: str) -> tuple[str, str]:
    return f"pg_stat_get_blocks_fetched({oid}) - pg_stat_get_blocks_hit({oid})", f"pg_stat_get_blocks_hit({oid})"


# Per relation, straight from the statistics functions (the pg_stat_user_tables and
# pg_statio_user_tables views compute far more per row: five times the time on 10,000 tables).
_STAT = {
    "seq_scan": "pg_stat_get_numscans(x.relid)",
    "idx_scan": "coalesce(ix.idx_scan, 0)",
    "n_tup_ins": "pg_stat_get_tuples_inserted(x.relid)",
    "n_tup_upd": "pg_stat_get_tuples_updated(x.relid)",
    "n_tup_del": "pg_stat_get_tuples_deleted(x.relid)",
    "n_tup_hot_upd": "pg_stat_get_tuples_hot_updated(x.relid)",
    "vacuum_count": "pg_stat_get_vacuum_count(x.relid)",
    "autovacuum_count": "pg_stat_get_autovacuum_count(x.relid)",
    "analyze_count": "pg_stat_get_analyze_count(x.relid)",
    "autoanalyze_count": "pg_stat_get_autoanalyze_count(x.relid)",
    "heap_blks_read": _blocks("x.relid")[0],
    "heap_blks_hit": _blocks("x.relid")[1],
    "idx_blks_read": "coalesce(ix.idx_blks_read, 0)",
    "idx_blks_hit": "coalesce(ix.idx_blks_hit, 0)",
    "toast_blks_read": f"CASE WHEN x.toast <> 0 THEN {_blocks('x.toast')[0]} ELSE 0 END",
    "toast_blks_hit": f"CASE WHEN x.toast <> 0 THEN {_blocks('x.toast')[1]} ELSE 0 END",
}
_TIMES = {f"last_{w}": f"pg_stat_get_last_{w}_time(relid)" for w in ("vacuum", "autovacuum", "analyze", "autoanalyze")}

# The digest of a table: a 64-bit hash (seeded with its oid and its relfilenode: a TRUNCATE moves no
# counter, only the file, the live tuples and the size) of the sum of the counters of which at
# least one moves with any use of it (a scan of any kind, a block read, a write, a vacuum or an
# analyze), xor-ed with the hashes of its indexes' scan counts. Hashes and xor, not sums: the
# aggregates stay by-value int8 (a numeric sum per bucket and per table cost a third of the time).
_DIGEST = (
    "hashint8extended(("
    + " + ".join(
        [
            "pg_stat_get_numscans(c.oid)",
            "pg_stat_get_blocks_fetched(c.oid)",
            *(
                f"pg_stat_get_{f}(c.oid)"
                for f in (
                    "tuples_inserted",
                    "tuples_updated",
                    "tuples_deleted",
                    "vacuum_count",
                    "autovacuum_count",
                    "analyze_count",
                    "autoanalyze_count",
                )
            ),
        ]
    )
    + ")::int8, (c.oid::int8 << 32) # c.relfilenode::int8) # coalesce(ixs.ih, 0)"
)
# One statement, two passes over pg_class: the first reads each table's statistics entry once
# (the floor) and folds them straight into one digest per bucket, compared on the server with the
# previous scrape's (passed as one array); the second (catalog only, no statistics) picks the
# tables of the changed buckets and the candidates for the oldest frozen xids. Nothing per table
# is stored in between (materialising every table cost as much as reading its statistics). The
# rest of the statistics (and the sizes) are read only for the tables returned.
_ROOT = "coalesce(CASE WHEN c.relispartition THEN pg_partition_root(c.oid) END, c.oid)::int8"
_AGE = "CASE WHEN c.relfrozenxid <> '0'::xid THEN age(c.relfrozenxid) END::int8"
SCRAPE_SQL = (
    "WITH /*pgflow*/ ixs AS (SELECT i.indrelid, XOR(hashint8extended(pg_stat_get_numscans(i.indexrelid), i.indexrelid::int8)) AS ih "
    "FROM pg_index i GROUP BY i.indrelid), "
    # (a table without indexes (relhasindex false: none now) skips the join's probe)
    # Per bucket (tables hashed by their root: partitions roll into it): digest = a 64-bit hash
    # of (number of tables, xor of their digests); the oldest frozen-xid age in it.
    "bk AS (SELECT hashint8(root) & (%(b)s - 1) AS bucket, hashint8extended(XOR(dg), count(*)) AS d, "
    "(count(*) FILTER (WHERE root = relid))::int8 AS roots, max(frozen_xid_age) AS oldest FROM ("
    f"SELECT {_ROOT} AS root, c.oid AS relid, {_AGE} AS frozen_xid_age, {_DIGEST} AS dg "
    f"FROM pg_class c LEFT JOIN ixs ON ixs.indrelid = CASE WHEN c.relhasindex THEN c.oid END WHERE {_USER_TABLE}) y GROUP BY 1), "
    # the previous digests, one per bucket by position (null: the bucket was empty)
    # (buckets from %(hi)s on are not seeded yet: not looked at)
    "changed AS (SELECT coalesce(bk.bucket, p.bucket) AS bucket, bk.d, bk.roots FROM (SELECT * FROM bk WHERE bucket < %(hi)s) bk "
    "FULL JOIN (SELECT (ord - 1)::int4 AS bucket, pd FROM unnest(%(pd)b) WITH ORDINALITY AS p(pd, ord)) p "
    "ON p.bucket = bk.bucket WHERE bk.d IS DISTINCT FROM p.pd), "
    # The buckets that may hold one of the k oldest frozen xids (an age grows without any counter
    # moving): those whose oldest is at least the k-th largest bucket oldest (each of these k
    # buckets has a table at least that old, so the k-th oldest table is too; ties included);
    # all of them while fewer than k buckets have an age.
    "aged AS (SELECT bucket FROM bk WHERE oldest >= (SELECT CASE WHEN count(oldest) = %(k)s THEN min(oldest) END "
    "FROM (SELECT oldest FROM bk ORDER BY oldest DESC NULLS LAST LIMIT %(k)s) o) "
    "OR (SELECT count(oldest) < %(k)s FROM bk)), "
    # Second pass: the tables of those buckets.
    "x AS MATERIALIZED (SELECT * FROM (SELECT hashint8(root) & (%(b)s - 1) AS bucket, * FROM ("
    f"SELECT {_ROOT} AS root, c.oid AS relid, c.reltoastrelid AS toast, {_AGE} AS frozen_xid_age "
    f"FROM pg_class c WHERE {_USER_TABLE}) y) z "
    "WHERE bucket IN (SELECT bucket FROM changed) OR bucket IN (SELECT bucket FROM aged)), "
    # The oldest frozen xids (sizes not re-read: the operator keeps them).
    "old AS (SELECT root FROM x ORDER BY frozen_xid_age DESC NULLS LAST, root LIMIT %(k)s), "
    "locked AS (SELECT l.relation FROM pg_locks l WHERE %(skip_locked)s AND l.granted "
    "AND l.mode = 'AccessExclusiveLock' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())), "
    # The tables returned: every table of a changed bucket (read whole, sizes included) and those
    # of the oldest frozen xids; everything else is read for them only.
    "m AS (SELECT x.root, x.relid, x.frozen_xid_age, x.bucket IN (SELECT bucket FROM changed) "
    "AND NOT (EXISTS (SELECT 1 FROM locked WHERE relation = x.relid) "
    "OR EXISTS (SELECT 1 FROM locked JOIN pg_index i ON i.indexrelid = locked.relation WHERE i.indrelid = x.relid)) AS sized, "
    + ", ".join(f"({e})::int8 AS {c}" for c, e in _STAT.items())
    + " FROM (SELECT * FROM x WHERE bucket IN (SELECT bucket FROM changed) OR root IN (SELECT root FROM old) OFFSET 0) x "
    "LEFT JOIN LATERAL (SELECT sum(pg_stat_get_numscans(i.indexrelid)) AS idx_scan, "
    f"sum({_blocks('i.indexrelid')[0]}) AS idx_blks_read, sum({_blocks('i.indexrelid')[1]}) AS idx_blks_hit "
    "FROM pg_index i WHERE i.indrelid = x.relid) ix ON true), "
    "r AS (SELECT root, "
    + ", ".join(f"sum({c})::int8 AS {c}" for c in TABLE_COUNTERS)
    + ", sum(pg_stat_get_live_tuples(relid))::int8 AS n_live_tup, sum(pg_stat_get_dead_tuples(relid))::int8 AS n_dead_tup, "
    "CASE WHEN bool_and(sized) THEN sum(CASE WHEN sized THEN pg_table_size(relid) END) END::int8 AS table_size, "
    "CASE WHEN bool_and(sized) THEN sum(CASE WHEN sized THEN pg_indexes_size(relid) END) END::int8 AS index_size, "
    "max(frozen_xid_age) AS frozen_xid_age, " + ", ".join(f"max({e}) AS {c}" for c, e in _TIMES.items()) + " FROM m GROUP BY root) "
    # The digests of the changed buckets (relid null; digest and tables ride in two counter columns) ...
    "SELECT bucket, NULL::int8, NULL::text, d, roots, "
    + ", ".join("NULL::int8" for _ in TABLE_COUNTERS[2:])
    + ", "
    + ", ".join("NULL::int8" for _ in TABLE_GAUGES)
    + ", "
    + ", ".join("NULL::timestamptz" for _ in TABLE_TIMES)
    + " FROM changed UNION ALL "
    # ... and the tables.
    "SELECT (hashint8(r.root) & (%(b)s - 1)), r.root, n.nspname || '.' || c.relname, "
    + ", ".join(f"r.{x}" for x in TABLE_COUNTERS)
    + ", r.n_live_tup, r.n_dead_tup, r.table_size, r.index_size, r.frozen_xid_age, "
    + ", ".join(f"r.{x}" for x in TABLE_TIMES)
    + " FROM r JOIN pg_class c ON c.oid = r.root JOIN pg_namespace n ON n.oid = c.relnamespace"
)
# bit_xor came with PostgreSQL 14; before, a sum modulo 2^63 - 1 (a numeric sum: slower, as exact).
SCRAPE_SQL_13 = SCRAPE_SQL.replace("XOR(dg)", "(sum(dg) %% 9223372036854775807)::int8").replace(
    "XOR(hashint8extended(pg_stat_get_numscans(i.indexrelid), i.indexrelid::int8))",
    "(sum(hashint8extended(pg_stat_get_numscans(i.indexrelid), i.indexrelid::int8)) %% 9223372036854775807)::int8",
)
SCRAPE_SQL = SCRAPE_SQL.replace("XOR(", "bit_xor(")
ROW_COLUMNS = ["bucket", "relid", "table", *TABLE_COUNTERS, *TABLE_GAUGES, *TABLE_TIMES]


class Digests(list):  # type: ignore[type-arg]
    """The previous scrape's digests (``int | None`` per bucket), sent as one binary ``int8[]``."""


_ARRAY_HEAD, _ELEMENT, _NULL = struct.Struct(">iiiii"), struct.Struct(">iq").pack, b"\xff\xff\xff\xff"


class DigestsDumper(Dumper):
    """psycopg's list dumper inspects every element (a tenth of a second of Python per 100,000
    tables' worth of buckets): the binary array is written here in one go."""

    format = Format.BINARY
    oid = 1016  # int8[]

    def dump(self, obj: list[int | None]) -> bytes:
        if not obj:
            return struct.pack(">iii", 0, 0, 20)
        head = _ARRAY_HEAD.pack(1, 1 if None in obj else 0, 20, len(obj), 1)
        return head + b"".join([_NULL if v is None else _ELEMENT(8, v) for v in obj])


psycopg.adapters.register_dumper(Digests, DigestsDumper)  # private type: no other query sees it
