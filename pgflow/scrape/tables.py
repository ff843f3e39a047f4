"""Per-table statistics from each database's own catalog, bounded however many tables there are.

One connection per database at a time, opened for the visit and closed after it within the
instance's connection budget (issue 20: ``pgflow.scrape.budget``; ``application_name=pgflow``, read-only, ``statement_timeout`` and
``lock_timeout`` set transaction-local by ``set_config``), one query per scrape of a database,
pipelined with its settings and the rollback: one round trip (the first scrape of a database
counts its tables first):

- tables (partitions rolled into their root) are hashed (by their root's oid) into buckets, six
  to twelve tables each (:func:`buckets_for`). One pass over ``pg_class`` reads each table's
  statistics entry once (the floor) and folds it straight into its bucket: a table's *digest* is
  a 64-bit hash (seeded with its oid and relfilenode: a TRUNCATE moves no counter, only the
  file, the live tuples and the size) of the sum of the counters of which at least one moves
  with any use of it (sequential scans, heap block reads, inserts, updates, deletes, vacuum and
  analyze counts, manual and auto), xor-ed with a hash per index of its scan count (index and
  index-only scans, which may read no heap block at all); a bucket's digest is a hash of the
  number of its tables and the xor of their digests (PostgreSQL 13, without ``bit_xor``: a
  sum modulo 2^63 - 1). Any use, a new table, a drop or a reset changes it (but for a 2^-64
  collision). The server compares them with the previous scrape's digests, passed in by
  position as one binary array. A counter outside the digest that moves alone (blocks read by
  a vacuum still running) is not lost: it is in the table's next delta;
- a second pass over ``pg_class`` (catalog only, no statistics) picks the tables of the changed
  buckets, returned whole (so no activity is ever missed: the operator diffs each table against
  the last row it saw of it, and a table not returned has not moved; ``pg_table_size`` only for
  these), and the ``top_k`` oldest frozen xids (an age grows without any counter moving), looked
  for only in the buckets whose oldest age is at least the k-th largest bucket oldest (which
  must hold them, ties included). Dead tuples and sizes move only with the counters: the
  operator ranks those risks over every table it knows.

Nothing per table is kept between the passes (materialising every table cost as much as reading
its statistics): the work per table is one catalog row read twice, its statistics entry read
once, one hash-join probe if it has indexes, one hash-aggregate step.

A database seen for the first time is read whole (its baseline), ``SEED_TABLES`` tables'
worth of buckets per scrape so that no statement grows with the database (``seed`` marks);
after that the rows per scrape follow activity, not the number of tables. Sizes take an
``AccessShareLock``: a table held ``ACCESS EXCLUSIVE`` makes the statement fail on
``lock_timeout``; the scrape is then retried at once without the sizes of locked tables
(kept from their last observation), and the lock timeout is counted.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import polars as pl
import psycopg
from psycopg import errors as pgerr
from psycopg.adapt import Dumper
from psycopg.pq import Format

from pgflow.config import redact_dsn
from pgflow.errors import ScrapeError
from pgflow.logs import kv
from pgflow.schema import TABLE_COUNTERS, TABLE_GAUGES, TABLE_TIMES, TABLES, conform
from pgflow.scrape.budget import ConnectionBudget, NoConnection
from pgflow.scrape.connection import classify
from pgflow.scrape.discovery import Discovered, discover

log = logging.getLogger("pgflow.scrape.tables")

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
_EXCLUDED = ("ARRAY(SELECT oid FROM pg_namespace WHERE nspname IN ('pg_catalog', 'information_schema') "
             "OR nspname ~ '^pg_toast')")
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
_DIGEST = ("hashint8extended((" + " + ".join(
    ["pg_stat_get_numscans(c.oid)", "pg_stat_get_blocks_fetched(c.oid)",
     *(f"pg_stat_get_{f}(c.oid)" for f in ("tuples_inserted", "tuples_updated", "tuples_deleted", "vacuum_count",
                                           "autovacuum_count", "analyze_count", "autoanalyze_count"))])
    + ")::int8, (c.oid::int8 << 32) # c.relfilenode::int8) # coalesce(ixs.ih, 0)")
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
    "max(frozen_xid_age) AS frozen_xid_age, "
    + ", ".join(f"max({e}) AS {c}" for c, e in _TIMES.items())
    + " FROM m GROUP BY root) "
    # The digests of the changed buckets (relid null; digest and tables ride in two counter columns) ...
    "SELECT bucket, NULL::int8, NULL::text, d, roots, "
    + ", ".join("NULL::int8" for _ in TABLE_COUNTERS[2:]) + ", "
    + ", ".join("NULL::int8" for _ in TABLE_GAUGES) + ", "
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
    "(sum(hashint8extended(pg_stat_get_numscans(i.indexrelid), i.indexrelid::int8)) %% 9223372036854775807)::int8")
SCRAPE_SQL = SCRAPE_SQL.replace("XOR(", "bit_xor(")
_ROW_COLUMNS = ["bucket", "relid", "table", *TABLE_COUNTERS, *TABLE_GAUGES, *TABLE_TIMES]


class _Digests(list):  # type: ignore[type-arg]
    """The previous scrape's digests (``int | None`` per bucket), sent as one binary ``int8[]``."""


_ARRAY_HEAD, _ELEMENT, _NULL = struct.Struct(">iiiii"), struct.Struct(">iq").pack, b"\xff\xff\xff\xff"


class _DigestsDumper(Dumper):
    """psycopg's list dumper inspects every element (a tenth of a second of Python per 100,000
    tables' worth of buckets): the binary array is written here in one go."""

    format = Format.BINARY
    oid = 1016  # int8[]

    def dump(self, obj: list[int | None]) -> bytes:
        if not obj:
            return struct.pack(">iii", 0, 0, 20)
        head = _ARRAY_HEAD.pack(1, 1 if None in obj else 0, 20, len(obj), 1)
        return head + b"".join([_NULL if v is None else _ELEMENT(8, v) for v in obj])


psycopg.adapters.register_dumper(_Digests, _DigestsDumper)  # private type: no other query sees it

@dataclass
class TableScrapeStats:
    """What the table scraper did, for /metrics: per outcome, and rows read."""

    outcomes: dict[str, int] = field(default_factory=dict)
    rows: int = 0  # table rows fetched
    late: int = 0  # databases of the last round visited after its deadline (issue 20)
    tables_seen: int = 0  # tables (partitions rolled up) in the databases scraped last time

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class TableScraper:
    """Scrapes the per-table statistics of every chosen database of one instance.

    ``scrape()`` returns one :data:`~pgflow.schema.TABLES` frame; a database that fails is
    left out of it (logged once, counted) and the others are kept: the next successful
    scrape of that database covers the gap exactly, as every row is cumulative.
    """

    @classmethod
    def for_instance(cls, instance: object, settings: object, budget: ConnectionBudget | None = None) -> TableScraper:
        """The table scraper ``pgflow.config.Settings`` describes for one configured instance."""
        s = settings
        return cls(instance.dsn, instance=instance.name, include=s.table_stats_databases,  # type: ignore[attr-defined]
                   exclude=s.table_stats_exclude_databases, max_databases=s.max_databases_tracked,  # type: ignore[attr-defined]
                   top_k=s.max_tables_tracked, statement_timeout_ms=s.statement_timeout_ms,  # type: ignore[attr-defined]
                   lock_timeout_ms=s.table_stats_lock_timeout_ms,  # type: ignore[attr-defined]
                   connect_timeout_secs=s.connect_timeout_secs, budget=budget)  # type: ignore[attr-defined]

    def __init__(self, dsn: str, *, instance: str, include: Iterable[str] = (), exclude: Iterable[str] = (),
                 max_databases: int = 100, top_k: int = 300, statement_timeout_ms: int = 5000,
                 lock_timeout_ms: int = 1000, connect_timeout_secs: int = 5,
                 budget: ConnectionBudget | None = None) -> None:
        self._dsn = dsn
        self.instance = instance
        self.include, self.exclude = list(include), list(exclude)
        self.max_databases = max_databases
        self.top_k = top_k
        self.statement_timeout_ms = statement_timeout_ms
        self.lock_timeout_ms = min(lock_timeout_ms, statement_timeout_ms)
        self.connect_timeout_secs = connect_timeout_secs
        # Issue 20: every database is visited on a connection of the instance's budget (connect,
        # scrape, disconnect); used alone, one connection at a time and no headroom check.
        self.budget = budget or ConnectionBudget(dsn, instance=instance, max_connections=1, fixed=0,
                                                 connect_timeout=connect_timeout_secs)
        self.stats = TableScrapeStats()
        # database -> (digest per bucket (None: empty), tables per bucket, buckets seeded so far)
        self._buckets: dict[str, tuple[list[int | None], list[int], int]] = {}
        self._table_counts: dict[str, int] = {}
        self._said: dict[str, str] = {}  # database -> reason it is not scraped (said once)
        self.discovered: Discovered | None = None

    def __repr__(self) -> str:
        return f"TableScraper(instance={self.instance!r})"

    def __enter__(self) -> TableScraper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between visits (issue 20): kept for callers that close."""

    def _dsn_for(self, database: str) -> str:
        return psycopg.conninfo.make_conninfo(self._dsn, dbname=database)

    def _say_once(self, database: str, reason: str) -> None:
        if self._said.get(database) != reason:
            self._said[database] = reason
            log.warning("table statistics skipped for a database",
                        extra=kv(instance=self.instance, database=database, reason=reason))

    # Scrape -------------------------------------------------------------------------

    def scrape(self, deadline: float | None = None) -> pl.DataFrame:
        """Discover the databases, visit each in turn; raises ScrapeError only if discovery fails.

        ``deadline`` (``time.monotonic()``): a database whose visit starts after it is counted
        late (``stats.late``): the round was too long for its interval. It is still visited.
        """
        home = psycopg.conninfo.conninfo_to_dict(self._dsn).get("dbname") or None
        frames: list[pl.DataFrame] = []
        seen = 0
        self.stats.late = 0
        try:
            with self.budget.connection(str(home) if home else None, wait=True) as conn:
                try:
                    found = discover(conn, include=self.include, exclude=self.exclude, limit=self.max_databases)
                except psycopg.Error as exc:
                    raise classify(exc, self._dsn, self.statement_timeout_ms) from None
                home = conn.info.dbname
                self.discovered = found
                if home in found.chosen:  # the discovery's connection scrapes its own database too
                    frame, tables = self._scrape_database(home, conn)
                    if frame is not None:
                        frames.append(frame)
                        seen += tables
        except NoConnection as exc:  # stopping, or the budget leaves no slot (said by the budget)
            self.stats.count("deferred")
            log.debug("table statistics round not started", extra=kv(instance=self.instance, reason=exc.reason))
            return pl.DataFrame(schema=TABLES)
        for name, reason in found.skipped.items():  # chosen by the settings: not worth a line
            if reason.startswith(("refuses", "over")):
                self._say_once(name, reason)
        for name in list(self._buckets):  # databases no longer chosen: forget their baselines
            if name not in found.chosen:
                self._buckets.pop(name, None)
                self._table_counts.pop(name, None)
        for database in found.chosen:
            if database == home:
                continue
            if deadline is not None and time.monotonic() > deadline:
                self.stats.late += 1
            try:
                with self.budget.connection(database, wait=True) as conn:
                    frame, tables = self._scrape_database(database, conn)
            except NoConnection:  # the flow is stopping
                self.stats.count("deferred")
                break
            except ScrapeError as exc:
                self.stats.count("connect_failed")
                self._say_once(database, f"cannot connect ({exc.message})")
                continue
            if frame is not None:
                frames.append(frame)
                seen += tables
        self.stats.tables_seen = seen
        return pl.concat(frames) if frames else pl.DataFrame(schema=TABLES)

    def _scrape_database(self, database: str, conn: psycopg.Connection) -> tuple[pl.DataFrame | None, int]:
        try:
            try:
                result = self._query(conn, database, skip_locked=False)
            except pgerr.LockNotAvailable:
                conn.rollback()
                self.stats.count("lock_timeout")
                log.info("a table is locked ACCESS EXCLUSIVE: its size is kept from the last scrape",
                         extra=kv(instance=self.instance, database=database))
                result = self._query(conn, database, skip_locked=True)
        except psycopg.Error as exc:
            err = classify(exc, self._dsn_for(database), self.statement_timeout_ms)
            self.stats.count("timeout" if isinstance(exc, pgerr.QueryCanceled) else "error")
            log.warning("table statistics scrape failed",
                        extra=kv(instance=self.instance, database=database, error=err.message))
            return None, 0
        if self._said.pop(database, None) is not None:
            log.info("table statistics scraped again", extra=kv(instance=self.instance, database=database))
        self.stats.count("ok")
        return result

    def _query(self, conn: psycopg.Connection, database: str, *, skip_locked: bool) -> tuple[pl.DataFrame, int]:
        previous = self._buckets.get(database)
        # The settings ride in one statement (set_config(..., true) is SET LOCAL), pipelined with
        # the scrape: one round trip, one implicit transaction (no BEGIN or ROLLBACK: issue 19).
        settings = [("statement_timeout", int(self.statement_timeout_ms)), ("lock_timeout", int(self.lock_timeout_ms)),
                    # The planner cannot know how few tables moved: it would sort every table for a merge join.
                    ("enable_mergejoin", "off")]
        if conn.info.server_version >= 150000:  # one statistics snapshot: a third cheaper than entry by entry
            settings.append(("stats_fetch_consistency", "snapshot"))
        settings.append(("transaction_read_only", "on"))
        prepare = "SELECT /*pgflow*/ now(), " + ", ".join(f"set_config('{k}', '{v}', true)" for k, v in settings)
        fresh = previous is None
        with conn.cursor(binary=True) as first, conn.cursor(binary=True) as cur:
            if fresh:  # the bucket count is chosen once per database, by its size then (its own transaction)
                row = first.execute(f"{prepare}, ({COUNT_SQL})").fetchone()
                tables = row[-1]  # type: ignore[index]
                b = buckets_for(tables)
                previous = ([None] * b, [0] * b, 0)
                self._table_counts[database] = tables
            digests, counts, seeded = list(previous[0]), list(previous[1]), previous[2]
            b = len(digests)
            # Seeding: the first scrapes read the database whole, SEED_TABLES tables' worth of buckets at a time.
            hi = min(b, seeded + max(1, b * SEED_TABLES // max(1, self._table_counts.get(database, 0))))
            params = {"b": b, "hi": hi, "pd": _Digests(digests[:hi]), "k": max(10, self.top_k // 6),
                      "skip_locked": skip_locked}
            with conn.pipeline():  # no Sync before the end: the settings hold for the scrape
                first.execute(prepare)
                cur.execute(SCRAPE_SQL if conn.info.server_version >= 140000 else SCRAPE_SQL_13, params)
            observed_at = first.fetchone()[0]  # type: ignore[index]
            rows = cur.fetchall()
        changed = []
        for row in rows:
            if row[1] is None:  # a digest row
                changed.append(int(row[0]))
                digests[row[0]], counts[row[0]] = row[3], row[4] or 0
        rows = [r for r in rows if r[1] is not None]
        self._buckets[database] = (digests, counts, hi)
        self.stats.rows += len(rows)
        frame = pl.DataFrame(rows, schema=[(c, TABLES[c]) for c in _ROW_COLUMNS], orient="row") if rows \
            else pl.DataFrame(schema={c: TABLES[c] for c in _ROW_COLUMNS})
        frame = frame.with_columns(pl.lit("table").alias("kind"))
        changed.sort()
        kinds = ["seed" if bucket >= seeded else "bucket" for bucket in changed]
        marks = pl.DataFrame({"kind": kinds, "bucket": changed}, schema={"kind": pl.String, "bucket": pl.Int64})
        frame = pl.concat([marks, frame], how="diagonal_relaxed").with_columns(
            pl.lit(database).alias("database"), pl.lit(observed_at).alias("observed_at"))
        return conform(frame, TABLES), sum(counts)

def scrape_tables_once(dsn: str, **kwargs: object) -> pl.DataFrame:
    """Convenience for notebooks and tests: connect, scrape every database's tables once, close."""
    with TableScraper(dsn, **{"instance": redact_dsn(dsn), **kwargs}) as scraper:  # type: ignore[arg-type]
        return scraper.scrape()
