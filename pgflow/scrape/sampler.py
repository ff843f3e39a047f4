"""Active-session sampling: ``pg_stat_activity`` every second, on its own connection.

The scrape stays one item per interval; the sampler runs beside it and accumulates what it
sees into two compact tables that the next scrape takes with :meth:`Sampler.drain` and puts on
its :class:`~pgflow.schema.Snapshot` (``samples`` and ``session_stats``):

- one row per distinct (database, user, backend_type, state, wait_event_type, wait_event,
  query_id) with a sample count and the period: session-seconds = count x period;
- blocked session-seconds by the *root* blocker (state and statement), the most root blockers
  and the deepest chain seen in one sample (:mod:`pgflow.scrape.blocking`), and the oldest
  transaction and xmin horizon.

One round trip per sample, reading no statement text (the query: :mod:`pgflow.scrape.sampling_sql`).
A sample that fails or runs late is counted (``failed``, ``skipped``) and never guessed: missing
samples add no session-seconds. After a sample, the texts of the statements running long are
read as query samples (issue 12: :mod:`pgflow.scrape.query_sample_reads`), a third table that
rides on the Snapshot as ``query_samples``. Here: the :class:`Sampler` (one sample, its thread
and timing; what the samples add up to: :mod:`pgflow.scrape.sample_accumulator`) and what
builds and checks one (:func:`sampler_for`, :func:`check_sampling`, :func:`with_samples`).
Every started sampler of the process is sampled by one thread (issue 20:
:mod:`pgflow.scrape.sampler_loop`), each round trip under a client-side deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import polars as pl
import psycopg
from psycopg import pq
from psycopg.adapt import Transformer
from psycopg.generators import execute as exchange

from pgflow import telemetry
from pgflow.config import Settings, redact_dsn
from pgflow.logs import kv
from pgflow.schema import Snapshot
from pgflow.scrape.blocking import PREPARED, UNKNOWN_STATE
from pgflow.scrape.connection import connect
from pgflow.scrape.query_sample_reads import QuerySampleReads
from pgflow.scrape.sample_accumulator import SampleAccumulator
from pgflow.scrape.sampler_loop import MARGIN_SECS, DeadlineConnection, sampler_loop
from pgflow.scrape.sampling_sql import (
    IDLE_SINCE,
    KNOWN_IDLE_MAX,
    NAMES_SQL,
    PID,
    PREPARED_NAME,
    known_idle_arrays,
    sample_sql,
    with_known_idle,
)
from pgflow.scrape.statements import limits_sql

log = logging.getLogger("pgflow.sampler")
_FATAL_ERROR, _TUPLES_OK = pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.TUPLES_OK

__all__ = [
    "PREPARED",
    "SOURCE_ACTIVITY",
    "SOURCE_WAIT_SAMPLING",
    "UNKNOWN_STATE",
    "Sampler",
    "SamplerStats",
    "check_sampling",
    "sample_sql",
    "sampler_for",
    "with_known_idle",
    "with_samples",
]

SOURCE_ACTIVITY = "pg_stat_activity"
SOURCE_WAIT_SAMPLING = "pg_wait_sampling"


@dataclass
class SamplerStats:
    taken: int = 0
    failed: int = 0
    skipped: int = 0  # ticks missed because a sample (or a reconnect) ran past the next one
    last_duration_secs: float = 0.0
    last_error: str = ""


class Sampler(QuerySampleReads):
    """Samples one instance every ``interval_secs``; ``drain`` hands over.

    ``sample()`` takes one sample synchronously (tests, ``pgflow check``); ``start()`` puts
    the instance on the process's sampling schedule (one thread for all instances:
    :class:`~pgflow.scrape.sampler_loop.SamplerLoop`). Thread-safe: one sample at a time
    (``_busy``), and the accumulator is swapped under a lock.
    """

    def __init__(
        self,
        dsn: str,
        *,
        instance: str,
        interval_secs: float,
        statement_timeout_ms: int = 500,
        lock_timeout_ms: int = 100,
        connect_timeout_secs: int = 5,
        sample_min_duration_ms: float = 100.0,
        max_query_samples: int = 100,
        samples_per_fingerprint_per_hour: int = 15,
    ) -> None:
        if interval_secs <= 0:
            raise ValueError("interval_secs must be > 0 (0 means: do not build a Sampler)")
        self._dsn = dsn
        self.instance = instance
        self.period = float(interval_secs)
        self.statement_timeout_ms = int(statement_timeout_ms)
        self.lock_timeout_ms = int(lock_timeout_ms)
        self._limits = limits_sql(self.statement_timeout_ms, self.lock_timeout_ms)  # sent before every statement
        self.connect_timeout_secs = connect_timeout_secs
        self._init_query_samples(sample_min_duration_ms, max_query_samples, samples_per_fingerprint_per_hour)
        self.stats = SamplerStats()
        self.version_num = 0
        self.source = SOURCE_ACTIVITY
        self._conn: psycopg.Connection | None = None
        self._sql = ""
        self._statement = ""  # what a sample sends: EXECUTE of the prepared _sql, or _sql itself
        self._known_idle: dict[int, int] = {}  # pid -> start (us) of its last statement, which ended idle
        self._known_arrays: tuple[str, str] | None = None  # _known_idle as the statement's literals
        self._databases: dict[int, str] = {}  # oid -> name, per connection
        self._users: dict[int, str] = {}
        self._lock = threading.Lock()
        self._failing = False
        self._acc = SampleAccumulator()
        self._busy = threading.Lock()  # one sample at a time (the loop, its side lane, a caller)
        self._running = False  # on the loop's schedule
        self._close_when_done = False  # stop() found a sample still running: it closes the connection
        self._taken_metrics: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"Sampler(instance={self.instance!r}, target={redact_dsn(self._dsn)!r}, period={self.period})"

    # Accumulator --------------------------------------------------------------------

    def drain(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The samples since the last drain as (``samples``, ``session_stats``) frames."""
        with self._lock:
            acc, self._acc = self._acc, SampleAccumulator()
        return acc.frames(self.source, self.period)

    def _recover(self, conn: psycopg.Connection) -> None:
        """End the failed statement's transaction (or drop the connection when that fails too)."""
        try:
            conn.rollback()  # autocommit: a ROLLBACK only if a transaction is still open (issue 19)
        except Exception:
            self.close()

    # One sample ---------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self._dsn, connect_timeout=self.connect_timeout_secs, cls=DeadlineConnection)
            assert isinstance(conn, DeadlineConnection)
            conn.round_trip_secs = self.statement_timeout_ms / 1000 + MARGIN_SECS  # issue 20: a deadline on every round trip
            try:
                conn.autocommit = True  # each sample is one implicit transaction
                self._databases, self._users = {}, {}
                self.version_num = int(conn.info.server_version)
                self._sql = sample_sql(self.version_num)
                self._statement = self._prepare(conn)
                self._known_idle, self._known_arrays = {}, None
                if self.max_query_samples:  # issue 12: where a text is cut, once per connection
                    self._read_query_size(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _prepare(self, conn: psycopg.Connection) -> str:
        """The statement a sample sends: ``EXECUTE`` of the sampling query prepared on this connection.

        Planning the sampling query cost twice its execution on PostgreSQL 18 (0.5 ms of 0.8 ms
        with 200 backends); a prepared statement is planned once per connection. Preparing reads
        nothing (it only parses and plans). When it fails, the query is sent whole each time.
        """
        try:
            self._run(
                conn, f"PREPARE {PREPARED_NAME}(int4[], int8[]) AS {self._sql}"
            )  # under the same limits (a prepared statement outlives its transaction)
            return f"EXECUTE /*pgflow*/ {PREPARED_NAME}"
        except psycopg.Error as exc:
            self._recover(conn)
            log.info(
                "the sampling query is not prepared; it is planned at every sample",
                extra=kv(instance=self.instance, error=type(exc).__name__),
            )
            return self._sql

    def _run(self, conn: psycopg.Connection, sql: str) -> list[tuple]:
        """``sql`` read-only under SET LOCAL statement_timeout and lock_timeout, in one round trip:
        the rows of its last result with more than one column.

        No parameters: the statements go as one simple-protocol query, one implicit transaction
        (issue 19: no BEGIN/ROLLBACK). Sent on the connection's libpq handle and read with psycopg's
        own loaders (issue 20): this runs every second for every instance, and a cursor's
        machinery (building the cursor, converting the query, the prepare bookkeeping) cost more
        than the round trip: with the limits statement built once and the labelled metrics looked
        up once, a whole sample takes 0.50 ms of CPU a second apart, 0.67-0.75 ms before
        (PostgreSQL 15, near idle, median of 40).
        """
        query = f"{self._limits}; {sql}".encode(conn.info.encoding)
        with conn.lock:
            conn.pgconn.send_query(query)
            results = conn.wait(exchange(conn.pgconn))  # the deadline of a DeadlineConnection applies
        rows: list[tuple] = []
        for result in results:
            if result.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
            if result.status == _TUPLES_OK and result.nfields > 1:
                loader = Transformer(conn)
                loader.set_pgresult(result)
                rows = loader.load_rows(0, result.ntuples, tuple)
        return rows

    def _sample_rows(self, conn: psycopg.Connection) -> list[tuple]:
        """One sample's rows, the sessions found idle left out (and remembered: see sampling_sql._SAMPLE_SQL).

        A prepared statement the server lost (a pooler in between) is sent whole from then on.
        """
        if self._known_arrays is None:  # rebuilt only when a session was learned
            self._known_arrays = known_idle_arrays(self._known_idle)
        try:
            rows = self._run(conn, with_known_idle(self._statement, self._known_arrays))
        except psycopg.errors.InvalidSqlStatementName:
            self._recover(conn)
            log.info(
                "the prepared sampling query is gone (a pooler in transaction mode?); it is planned at every sample from now on",
                extra=kv(instance=self.instance),
            )
            self._statement = self._sql
            rows = self._run(conn, with_known_idle(self._statement, self._known_arrays))
        if len(self._known_idle) > KNOWN_IDLE_MAX:  # pids come and go: start over now and then
            self._known_idle, self._known_arrays = {}, None
        sampled = []
        for row in rows:
            if row[IDLE_SINCE] is None:
                sampled.append(row)
            else:
                self._known_idle[row[PID]] = row[IDLE_SINCE]
                self._known_arrays = None
        return sampled

    def _names(self, conn: psycopg.Connection, rows: list[tuple]) -> list[tuple]:
        """Rows with database and user names from the oid cache (refreshed when an oid is new)."""
        if any((r[1] is not None and r[1] not in self._databases) or (r[2] is not None and r[2] not in self._users) for r in rows):
            names = self._run(conn, NAMES_SQL)
            self._databases = {oid: name for kind, oid, name in names if kind == "d"}
            self._users = {oid: name for kind, oid, name in names if kind == "u"}
        db, users = self._databases, self._users
        return [(r[0], r[1], r[2], db.get(r[1]), users.get(r[2]), *r[5:]) for r in rows]

    def sample(self) -> bool:
        """Take one sample now; False (counted, logged at debug) when it failed."""
        with self._busy:
            try:
                return self._sample()
            finally:
                if self._close_when_done:
                    self._close_when_done = False
                    self.close()

    def _sample(self) -> bool:
        started = time.perf_counter()
        try:
            conn = self._connection()
            rows = self._names(conn, self._sample_rows(conn))
        except Exception as exc:  # a failed sample is counted and skipped, never fatal
            self.close()
            with self._lock:
                self._acc.failed += 1
            self.stats.failed += 1
            self.stats.last_error = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            telemetry.activity_samples.labels(self.instance, "failed").inc()
            if not self._failing:  # once per outage; every failure is counted in /metrics
                log.warning("activity sample failed; retrying every period", extra=kv(instance=self.instance, error=self.stats.last_error))
            self._failing = True
            return False
        if self._failing:
            log.info("activity sampling resumed", extra=kv(instance=self.instance))
            self._failing = False
        try:
            queries = self._query_samples(conn, rows) if self.max_query_samples else []
        except Exception as exc:  # never costs the activity sample (nor the sampler's thread)
            queries = []
            telemetry.query_samples_skipped.labels(self.instance, "failed").inc()
            log.debug("query samples failed", extra=kv(instance=self.instance, error=type(exc).__name__))
        with self._lock:
            self._acc.add(rows)
            self._query_rows.extend(queries)
        elapsed = time.perf_counter() - started
        self.stats.taken += 1
        self.stats.last_duration_secs = elapsed
        if self._taken_metrics is None:  # the labelled series, looked up once (every second otherwise)
            self._taken_metrics = (
                telemetry.activity_samples.labels(self.instance, "taken"),
                telemetry.activity_sample_duration.labels(self.instance),
            )
        taken, duration = self._taken_metrics
        taken.inc()
        duration.observe(elapsed)
        return True

    def skip(self, ticks: int) -> None:
        """Count ``ticks`` scheduled samples that were not taken (the previous one ran late)."""
        with self._lock:
            self._acc.skipped += ticks
        self.stats.skipped += ticks
        telemetry.activity_samples.labels(self.instance, "skipped").inc(ticks)

    # Schedule -----------------------------------------------------------------------

    def start(self) -> Sampler:
        """Sample every period from the next tick of the process's sampling thread."""
        if not self._running:
            self._running = True
            sampler_loop().add(self)
        return self

    def running(self) -> bool:
        return self._running

    def healthy(self) -> bool:
        """Sampled on the shared thread: connected, last sample taken, in under a quarter period."""
        conn = self._conn
        return conn is not None and not conn.closed and not self._failing and self.stats.last_duration_secs <= self.period / 4

    def stop(self, timeout: float = 5.0) -> None:
        """Off the schedule; the connection is closed (once a running sample ends, within ``timeout``)."""
        self._running = False
        sampler_loop().remove(self)
        if self._busy.acquire(timeout=timeout):
            try:
                self.close()
            finally:
                self._busy.release()
        else:
            self._close_when_done = True
            if self._busy.acquire(blocking=False):  # it ended meanwhile
                try:
                    self.close()
                finally:
                    self._busy.release()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def with_samples(snapshot: Snapshot, sampler: Sampler | None) -> Snapshot:
    """``snapshot`` carrying the samples taken since the last call (unchanged without a sampler)."""
    if sampler is None:
        return snapshot
    samples, stats = sampler.drain()
    return replace(snapshot, samples=samples, session_stats=stats, query_samples=sampler.drain_query_samples())


def sampler_for(dsn: str, instance: str, settings: Settings) -> Sampler | None:
    """The sampler the settings ask for (None when ``activity_sample_interval_secs`` is 0).

    A sample may take at most its period (and never more than ``statement_timeout_ms``).
    """
    interval = settings.activity_sample_interval_secs
    if interval <= 0:
        return None
    timeout = max(50, min(settings.statement_timeout_ms, int(interval * 1000)))
    return Sampler(
        dsn,
        instance=instance,
        interval_secs=interval,
        statement_timeout_ms=timeout,
        lock_timeout_ms=timeout,
        connect_timeout_secs=settings.connect_timeout_secs,
        sample_min_duration_ms=settings.sample_min_duration_ms,
        max_query_samples=settings.max_samples_per_window,
        samples_per_fingerprint_per_hour=settings.samples_per_fingerprint_per_hour,
    )


_CHECK_SQL = """
SELECT /*pgflow*/ (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
         OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
       current_user::text,
       (SELECT extversion FROM pg_extension WHERE extname = 'pg_wait_sampling'),
       current_setting('compute_query_id', true)
"""


def check_sampling(dsn: str, interval_secs: float, *, connect_timeout: int = 5, samples: int = 5) -> list[tuple[str, str, str]]:
    """``pgflow check``'s lines about sampling: (level, name, detail); never raises.

    Whether sampling is on, whether the role sees other roles' wait events and query ids,
    which source the waits come from, and the measured cost of one sample (median of a few).
    """
    if interval_secs <= 0:
        return [("ok", "activity sampling", "off (activity_sample_interval_secs = 0)")]
    out: list[tuple[str, str, str]] = []
    try:
        with connect(dsn, connect_timeout=connect_timeout) as conn:
            can_read_all, user, wait_sampling, compute_query_id = conn.execute(_CHECK_SQL).fetchone()  # type: ignore[misc]
            readable = False
            if wait_sampling is not None:
                try:
                    conn.execute("SELECT /*pgflow*/ 1 FROM pg_wait_sampling_profile LIMIT 1").fetchall()
                    readable = True
                except psycopg.Error:
                    pass
            conn.rollback()
            version = int(conn.info.server_version)
    except Exception as exc:
        return [("warn", "activity sampling", f"could not check ({str(exc).strip().splitlines()[0][:200]})")]
    if can_read_all:
        out.append(("ok", "sampling privileges", f"{user} sees every session's wait event and query id"))
    else:
        out.append(
            (
                "warn",
                "sampling privileges",
                f"{user} cannot see other roles' sessions' state, wait event, query id or text, so they are not "
                f"sampled (no activity, no query samples): "
                f"GRANT pg_read_all_stats TO {user} (or GRANT pg_monitor)",
            )
        )
    if version < 140000:
        out.append(("warn", "sampling query ids", "PostgreSQL 13 has no query_id: activity is attributed to fingerprint 'unknown'"))
    elif compute_query_id == "off":
        out.append(
            (
                "warn",
                "sampling query ids",
                "compute_query_id is off: activity is attributed to fingerprint 'unknown' (set compute_query_id = auto)",
            )
        )
    if wait_sampling is None:
        out.append(("ok", "wait source", SOURCE_ACTIVITY))
    elif readable:
        out.append(
            (
                "ok",
                "wait source",
                f"{SOURCE_ACTIVITY} (pg_wait_sampling {wait_sampling} is installed; pgflow does not read its profile yet)",
            )
        )
    else:
        out.append(
            (
                "warn",
                "wait source",
                f"{SOURCE_ACTIVITY} (pg_wait_sampling {wait_sampling} is installed but {user} cannot read pg_wait_sampling_profile)",
            )
        )
    sampler = Sampler(
        dsn, instance="check", interval_secs=interval_secs, connect_timeout_secs=connect_timeout, max_query_samples=0
    )  # the check reads no statement text
    try:
        durations = []
        for _ in range(samples):
            if not sampler.sample():
                return out + [("warn", "activity sampling", f"a sample failed ({sampler.stats.last_error})")]
            durations.append(sampler.stats.last_duration_secs)
        sampled, stats = sampler.drain()
        rows = int(sampled["count"].sum()) // samples
        hidden = int(stats.filter(pl.col("stat") == "hidden_sessions")["value"].max() or 0)
    finally:
        sampler.close()
    median = sorted(durations)[len(durations) // 2]
    out.append(
        (
            "ok",
            "activity sampling",
            f"every {interval_secs:g} s; one sample took {median * 1000:.1f} ms "
            f"(median of {samples}, {rows} sessions seen"
            f"{f', {hidden} hidden' if hidden else ''}, "
            f"{median / interval_secs:.2%} of the period)",
        )
    )
    return out
