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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
import psycopg
from psycopg import errors as pgerr

from pgflow.config import redact_dsn
from pgflow.errors import ScrapeError
from pgflow.logs import kv
from pgflow.schema import TABLES
from pgflow.scrape.budget import ConnectionBudget, NoConnection
from pgflow.scrape.connection import classify
from pgflow.scrape.discovery import Discovered, discover
from pgflow.scrape.tables_sql import COUNT_SQL, ROW_COLUMNS, SCRAPE_SQL, SCRAPE_SQL_13, SEED_TABLES, Digests, buckets_for

log = logging.getLogger("pgflow.scrape.tables")


@dataclass
class TableScrapeStats:
    """What the table scraper did, for /metrics: per outcome, and rows read."""

    outcomes: dict[str, int] = field(default_factory=dict)
    rows: int = 0  # table rows fetched
    late: int = 0  # databases of the last round visited after its deadline (issue 20)
    tables_seen: int = 0  # tables (partitions rolled up) in the databases scraped last time

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


@dataclass
class Visit:
    """What one database's visit read: the buckets that changed (``kind``, ``bucket``: the marks)
    and the rows of their tables (:data:`~pgflow.scrape.tables_sql.ROW_COLUMNS`)."""

    database: str
    observed_at: datetime
    marks: list[tuple[str, int]]
    rows: list[tuple]


def round_frame(visits: list[Visit]) -> pl.DataFrame:
    """One :data:`~pgflow.schema.TABLES` frame for a round: per database its marks, then its rows.

    Built once per round from the rows' columns (issue 20: a frame per database and its
    concatenation cost about eight polars calls a database, most of a visit's CPU).
    """
    columns: dict[str, list] = {name: [] for name in TABLES}
    for visit in visits:
        marked, n = len(visit.marks), len(visit.marks) + len(visit.rows)
        columns["database"] += [visit.database] * n
        columns["observed_at"] += [visit.observed_at] * n
        columns["kind"] += [kind for kind, _ in visit.marks]
        columns["kind"] += ["table"] * len(visit.rows)
        values = list(zip(*visit.rows)) if visit.rows else [()] * len(ROW_COLUMNS)
        for name, column in zip(ROW_COLUMNS, values):
            columns[name] += [bucket for _, bucket in visit.marks] if name == "bucket" else [None] * marked
            columns[name] += column
    return pl.DataFrame(columns, schema=TABLES)


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
        return cls(
            instance.dsn,
            instance=instance.name,
            include=s.table_stats_databases,  # type: ignore[attr-defined]
            exclude=s.table_stats_exclude_databases,
            max_databases=s.max_databases_tracked,  # type: ignore[attr-defined]
            top_k=s.max_tables_tracked,
            statement_timeout_ms=s.statement_timeout_ms,  # type: ignore[attr-defined]
            lock_timeout_ms=s.table_stats_lock_timeout_ms,  # type: ignore[attr-defined]
            connect_timeout_secs=s.connect_timeout_secs,
            budget=budget,
        )  # type: ignore[attr-defined]

    def __init__(
        self,
        dsn: str,
        *,
        instance: str,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        max_databases: int = 100,
        top_k: int = 300,
        statement_timeout_ms: int = 5000,
        lock_timeout_ms: int = 1000,
        connect_timeout_secs: int = 5,
        budget: ConnectionBudget | None = None,
    ) -> None:
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
        self.budget = budget or ConnectionBudget(dsn, instance=instance, max_connections=1, fixed=0, connect_timeout=connect_timeout_secs)
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
            log.warning("table statistics skipped for a database", extra=kv(instance=self.instance, database=database, reason=reason))

    # Scrape -------------------------------------------------------------------------

    def scrape(self, deadline: float | None = None) -> pl.DataFrame:
        """Discover the databases, visit each in turn; raises ScrapeError only if discovery fails.

        ``deadline`` (``time.monotonic()``): a database whose visit starts after it is counted
        late (``stats.late``): the round was too long for its interval. It is still visited.
        """
        home = psycopg.conninfo.conninfo_to_dict(self._dsn).get("dbname") or None
        visits: list[Visit] = []
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
                    visit, tables = self._scrape_database(home, conn)
                    if visit is not None:
                        visits.append(visit)
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
                    visit, tables = self._scrape_database(database, conn)
            except NoConnection:  # the flow is stopping
                self.stats.count("deferred")
                break
            except ScrapeError as exc:
                self.stats.count("connect_failed")
                self._say_once(database, f"cannot connect ({exc.message})")
                continue
            if visit is not None:
                visits.append(visit)
                seen += tables
        self.stats.tables_seen = seen
        return round_frame(visits)

    def _scrape_database(self, database: str, conn: psycopg.Connection) -> tuple[Visit | None, int]:
        try:
            try:
                result = self._query(conn, database, skip_locked=False)
            except pgerr.LockNotAvailable:
                conn.rollback()
                self.stats.count("lock_timeout")
                log.info(
                    "a table is locked ACCESS EXCLUSIVE: its size is kept from the last scrape",
                    extra=kv(instance=self.instance, database=database),
                )
                result = self._query(conn, database, skip_locked=True)
        except psycopg.Error as exc:
            err = classify(exc, self._dsn_for(database), self.statement_timeout_ms)
            self.stats.count("timeout" if isinstance(exc, pgerr.QueryCanceled) else "error")
            log.warning("table statistics scrape failed", extra=kv(instance=self.instance, database=database, error=err.message))
            return None, 0
        if self._said.pop(database, None) is not None:
            log.info("table statistics scraped again", extra=kv(instance=self.instance, database=database))
        self.stats.count("ok")
        return result

    def _query(self, conn: psycopg.Connection, database: str, *, skip_locked: bool) -> tuple[Visit, int]:
        previous = self._buckets.get(database)
        # The settings ride in one statement (set_config(..., true) is SET LOCAL), pipelined with
        # the scrape: one round trip, one implicit transaction (no BEGIN or ROLLBACK: issue 19).
        settings = [
            ("statement_timeout", int(self.statement_timeout_ms)),
            ("lock_timeout", int(self.lock_timeout_ms)),
            # The planner cannot know how few tables moved: it would sort every table for a merge join.
            ("enable_mergejoin", "off"),
        ]
        if conn.info.server_version >= 150000:  # one statistics snapshot: a third cheaper than entry by entry
            settings.append(("stats_fetch_consistency", "snapshot"))
        settings.append(("transaction_read_only", "on"))
        # The table count rides in the same statement, asked for by a parameter: the first visit
        # (which counts) and every later one (which does not) are one pg_stat_statements entry, not two.
        prepare = (
            "SELECT /*pgflow*/ now(), "
            + ", ".join(f"set_config('{k}', '{v}', true)" for k, v in settings)
            + f", CASE WHEN %(count)s THEN ({COUNT_SQL}) END"
        )
        fresh = previous is None
        with conn.cursor(binary=True) as first, conn.cursor(binary=True) as cur:
            if fresh:  # the bucket count is chosen once per database, by its size then (its own transaction)
                row = first.execute(prepare, {"count": True}).fetchone()
                tables = row[-1]  # type: ignore[index]
                b = buckets_for(tables)
                previous = ([None] * b, [0] * b, 0)
                self._table_counts[database] = tables
            digests, counts, seeded = list(previous[0]), list(previous[1]), previous[2]
            b = len(digests)
            # Seeding: the first scrapes read the database whole, SEED_TABLES tables' worth of buckets at a time.
            hi = min(b, seeded + max(1, b * SEED_TABLES // max(1, self._table_counts.get(database, 0))))
            params = {"b": b, "hi": hi, "pd": Digests(digests[:hi]), "k": max(10, self.top_k // 6), "skip_locked": skip_locked}
            with conn.pipeline():  # no Sync before the end: the settings hold for the scrape
                first.execute(prepare, {"count": False})
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
        changed.sort()
        marks = [("seed" if bucket >= seeded else "bucket", bucket) for bucket in changed]
        return Visit(database, observed_at, marks, rows), sum(counts)


def scrape_tables_once(dsn: str, **kwargs: object) -> pl.DataFrame:
    """Convenience for notebooks and tests: connect, scrape every database's tables once, close."""
    with TableScraper(dsn, **{"instance": redact_dsn(dsn), **kwargs}) as scraper:  # type: ignore[arg-type]
        return scraper.scrape()
