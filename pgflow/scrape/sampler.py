"""Active-session sampling: ``pg_stat_activity`` every second, on its own connection and thread.

The scrape stays one item per interval; the sampler runs beside it and accumulates what it
sees into two compact tables that the next scrape takes with :meth:`Sampler.drain` and puts on
its :class:`~pgflow.schema.Snapshot` (``samples`` and ``session_stats``):

- one row per distinct (database, user, backend_type, state, wait_event_type, wait_event,
  query_id) with a sample count and the period: session-seconds = count x period;
- blocked session-seconds by the *root* blocker (state and statement), the most root blockers
  and the deepest chain seen in one sample, and the oldest transaction and xmin horizon.

One round trip per sample (simple protocol, one implicit transaction: the marked ``set_config``
of statement_timeout, lock_timeout and read-only, then ``EXECUTE`` of the sampling query,
prepared once per connection; no ``BEGIN`` or ``ROLLBACK``, issue 19). It never returns the ``query`` text, reads a backend's status row
only when a text-free look says it may be busy (see ``_SAMPLE_SQL``), and asks
``pg_blocking_pids()`` only for sessions waiting on a heavyweight lock (the function takes the
lock manager's locks). A sample that fails or runs late
is counted (``failed``, ``skipped``) and never guessed: missing samples add no session-seconds.

Query samples (issue 12): when a client backend's statement has been active longer than
``sample_min_duration_ms`` and its execution (pid, query_start) was not seen before, a second
narrow statement (same transaction rules) reads the text of those pids only, plus their root
blockers' when they are blocked. Each text goes through
:func:`~pgflow.ops.query_samples.sample_text` the moment it is read: only the normalized text
(or a marker) and the fingerprint are kept, in a third table that rides on the Snapshot as
``query_samples``. At most ``max_query_samples`` wait there between two drains; past that no
text is read (counted as skipped, reason ``budget``), so a busy server costs no more reads; and
on PostgreSQL 14+ a query id whose text was read ``samples_per_fingerprint_per_hour`` times in
the last hour is not read again (reason ``fingerprint``). The limiter
(:func:`pgflow.ops.query_samples.query_sample_events`) applies the exact limits downstream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import polars as pl
import psycopg

from pgflow import telemetry
from pgflow.config import Settings, redact_dsn
from pgflow.logs import kv
from pgflow.ops.query_samples import sample_text
from pgflow.schema import QUERY_SAMPLES, SAMPLES, SESSION_STATS, Snapshot
from pgflow.scrape.connection import connect

log = logging.getLogger("pgflow.sampler")

SOURCE_ACTIVITY = "pg_stat_activity"
SOURCE_WAIT_SAMPLING = "pg_wait_sampling"
PREPARED = "prepared transaction"  # pg_blocking_pids() reports a prepared transaction's locks as pid 0
UNKNOWN_STATE = "unknown"  # the root blocker was not in the sample (or a cycle, before deadlock detection)

# Rows worth a sample: not idle, not a background process idling in its main loop
# (wait_event_type Activity), not pgflow itself. The last column flags other roles' sessions
# that the monitoring role may not see (no state, no wait event): counted, never sampled.
# pg_stat_get_activity() rather than the pg_stat_activity view: the view's joins with
# pg_database and pg_authid cost planning and execution every second, for names that a
# client-side cache of oids gives for free (see Sampler._names).
#
# pg_stat_get_activity(NULL) builds a row for every backend, and most of a row's cost is its
# statement text (clipped character by character): idle sessions, usually most of them, cost
# as much as the busy ones. So the backends are sorted first with the per-backend functions,
# which read no text:
# - in a transaction, or waiting on anything but the client: a candidate;
# - idling in a main loop (wait event type Activity): never sampled;
# - waiting on ClientRead outside a transaction: idle, or idle in an aborted transaction (the
#   per-backend functions cannot tell these apart). Which of the two is fixed by the session's
#   last statement, (pid, its start): once a read has shown such a statement ended idle, the
#   sampler passes it back as known ($1 pids, $2 starts in microseconds) and the session is
#   not read again until it runs another statement. Unknown ones are candidates, and their
#   idle rows come back (flagged by state) so that the sampler learns them.
# The candidates are then read with pg_stat_get_activity(pid), one call each; but each such call
# walks every backend, so when a quarter or more are candidates one pg_stat_get_activity(NULL)
# is cheaper and is used instead (a one-time filter: only one branch runs). Both read the same
# per-transaction copy of the backends' status, and the final filter is the same either way.
_SAMPLE_SQL = """
WITH /*pgflow*/ backends AS MATERIALIZED (
  SELECT b, pg_stat_get_backend_pid(b) AS pid,
         CASE WHEN pg_stat_get_backend_xact_start(b) IS NOT NULL THEN 'busy'
              WHEN pg_stat_get_backend_wait_event(b) = 'ClientRead' THEN 'ended'
              WHEN pg_stat_get_backend_wait_event_type(b) = 'Activity' THEN 'loop'
              ELSE 'busy' END AS kind
  FROM pg_stat_get_backend_idset() b),
ended AS MATERIALIZED (
  SELECT e.pid FROM (SELECT pid, coalesce((date_part('epoch', pg_stat_get_backend_activity_start(b)) * 1000000)::int8, 0)
                     AS started FROM backends WHERE kind = 'ended') e
  LEFT JOIN unnest($1::int4[], $2::int8[]) AS k(pid, started) ON k.pid = e.pid AND k.started = e.started
  WHERE k.pid IS NULL),
candidates AS MATERIALIZED (SELECT pid FROM backends WHERE kind = 'busy' UNION ALL SELECT pid FROM ended),
many AS (SELECT count(*) * {ratio} >= (SELECT count(*) FROM backends) AS yes FROM candidates),
activity AS (
  SELECT * FROM pg_stat_get_activity(NULL) WHERE (SELECT yes FROM many)
  UNION ALL
  SELECT a.* FROM candidates c, LATERAL pg_stat_get_activity(c.pid) a WHERE NOT (SELECT yes FROM many))
SELECT /*pgflow*/ pid, datid::int8, usesysid::int8, NULL::text, NULL::text, backend_type, state,
       wait_event_type, wait_event, {query_id}, leader_pid,
       extract(epoch FROM now() - xact_start)::float8, age(backend_xmin)::int8,
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END,
       query = '<insufficient privilege>',
       query_start, extract(epoch FROM now() - query_start)::float8, now(),
       CASE WHEN state = 'idle' THEN coalesce((date_part('epoch', query_start) * 1000000)::int8, 0) END
FROM activity
WHERE pid <> pg_backend_pid()
  AND (state IS DISTINCT FROM 'idle' OR pid IN (SELECT pid FROM ended))
  AND state IS DISTINCT FROM 'disabled'
  AND wait_event_type IS DISTINCT FROM 'Activity'
  AND application_name IS DISTINCT FROM 'pgflow'
"""
# pg_stat_get_activity(NULL) when candidates x 4 >= backends: measured with 200 client backends
# on PostgreSQL 18, a row of the whole read costs about a quarter of a pg_stat_get_activity(pid).
WHOLE_READ_RATIO = 4
KNOWN_IDLE_MAX = 10_000  # (pid, start) pairs remembered; past that the map starts over (one full read)
_NAMES_SQL = ("SELECT /*pgflow*/ 'd', oid::int8, datname::text FROM pg_database "
              "UNION ALL SELECT 'u', oid::int8, rolname::text FROM pg_roles")
# Issue 12: the texts of a few backends only (pg_stat_get_activity(pid) reads one backend's entry).
_TEXTS_SQL = ("SELECT /*pgflow*/ a.pid, a.query_start, a.application_name, host(a.client_addr), a.query "
              "FROM unnest('{{{pids}}}'::int4[]) AS p(pid), LATERAL pg_stat_get_activity(p.pid) AS a")
_QUERY_SIZE_SQL = "SELECT /*pgflow*/ setting::int8, unit FROM pg_settings WHERE name = 'track_activity_query_size'"
HIDDEN_TEXT = "<insufficient privilege>"
PREPARED_NAME = "pgflow_sample"
CLIENT_BACKEND = "client backend"
# Row fields of _SAMPLE_SQL after _names (database and user names filled in).
_PID, _DBID, _USERID, _DB, _USER, _BTYPE, _STATE, _WTYPE, _WEVENT, _QID, _LEADER = range(11)
_BLOCKERS, _HIDDEN, _QSTART, _RUNNING, _NOW, _IDLE_SINCE = 13, 14, 15, 16, 17, 18


def sample_sql(version_num: int) -> str:
    """The sampling query for a server version (``query_id`` exists from PostgreSQL 14).

    Parameters: ``$1`` int4[] and ``$2`` int8[], the sessions known idle (pids, and the start of
    their last statement in microseconds); see :func:`with_known_idle` to send it unprepared.
    """
    return _SAMPLE_SQL.format(query_id="query_id" if version_num >= 140000 else "NULL::int8", ratio=WHOLE_READ_RATIO)


def known_idle_arrays(known: dict[int, int]) -> tuple[str, str]:
    """The known-idle sessions as two array literals (integers only): pids, starts."""
    return "'{" + ",".join(map(str, known)) + "}'", "'{" + ",".join(map(str, known.values())) + "}'"


def with_known_idle(sql: str, known: dict[int, int] | tuple[str, str]) -> str:
    """``sql`` (or ``EXECUTE name``) with the known-idle sessions (a dict, or its arrays) as literals."""
    pids, starts = known_idle_arrays(known) if isinstance(known, dict) else known
    if sql.startswith("EXECUTE"):
        return f"{sql}({pids}, {starts})"
    return sql.replace("$1", pids).replace("$2", starts)


def _query_size(rows: list[tuple]) -> int:
    """track_activity_query_size in bytes (pg_settings reports it in bytes; 1024 if unreadable)."""
    if not rows or rows[0][0] is None:
        return 1024
    value, unit = rows[0]
    return int(value) * (1024 if unit == "kB" else 1)


def _reach(waiting: dict[int, list[int]]):  # noqa: ANN202 (a closure over one sample's waits)
    """``reach(pid)``: the root blockers ``pid`` leads to and the longest chain above it.

    Roots block others and wait on nothing; a cycle (before the deadlock detector breaks it)
    leads to no root.
    """
    memo: dict[int, tuple[frozenset[int], int]] = {}

    def walk(pid: int, path: frozenset[int]) -> tuple[frozenset[int], int]:
        if pid in memo:
            return memo[pid]
        blockers = waiting.get(pid)
        if not blockers:
            return frozenset({pid}), 0
        roots: set[int] = set()
        hops = 0
        for b in blockers:
            if b in path:
                continue  # a cycle: the deadlock detector will break it
            r, h = walk(b, path | {b})
            roots |= r
            hops = max(hops, h + 1)
        memo[pid] = (frozenset(roots), hops)
        return memo[pid]

    return lambda pid: walk(pid, frozenset({pid}))


def _root(roots: frozenset[int], by_pid: dict[int, tuple]) -> int | None:
    """The one root a waiter's time goes to: a sampled session first, then the lowest pid."""
    return min(roots, key=lambda r: (r == 0, r not in by_pid, r)) if roots else None


@dataclass
class SamplerStats:
    taken: int = 0
    failed: int = 0
    skipped: int = 0  # ticks missed because a sample (or a reconnect) ran past the next one
    last_duration_secs: float = 0.0
    last_error: str = ""


class Sampler:
    """Samples one instance every ``interval_secs`` on a private thread; ``drain`` hands over.

    ``sample()`` takes one sample synchronously (tests, ``pgflow check``); ``start()`` runs
    the schedule on a daemon thread. Thread-safe: the accumulator is swapped under a lock.
    """

    def __init__(self, dsn: str, *, instance: str, interval_secs: float, statement_timeout_ms: int = 500,
                 lock_timeout_ms: int = 100, connect_timeout_secs: int = 5, sample_min_duration_ms: float = 100.0,
                 max_query_samples: int = 100, samples_per_fingerprint_per_hour: int = 15) -> None:
        if interval_secs <= 0:
            raise ValueError("interval_secs must be > 0 (0 means: do not build a Sampler)")
        self._dsn = dsn
        self.instance = instance
        self.period = float(interval_secs)
        self.statement_timeout_ms = int(statement_timeout_ms)
        self.lock_timeout_ms = int(lock_timeout_ms)
        self.connect_timeout_secs = connect_timeout_secs
        self.sample_min_duration_ms = float(sample_min_duration_ms)
        self.max_query_samples = int(max_query_samples)  # 0: never read a text
        self.track_activity_query_size = 1024  # read from the server once per connection
        self._seen: dict[int, object] = {}  # pid -> query_start of the execution already handled
        # query_id -> monotonic times of its texts read in the last hour (PostgreSQL 14+): a statement
        # read samples_per_fingerprint_per_hour times this hour would be dropped by the limiter anyway.
        self.samples_per_fingerprint_per_hour = int(samples_per_fingerprint_per_hour)
        self._reads: dict[int, list[float]] = {}
        self._query_rows: list[tuple] = []  # query samples waiting for the next drain (QUERY_SAMPLES order)
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
        self._reset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Sampler(instance={self.instance!r}, target={redact_dsn(self._dsn)!r}, period={self.period})"

    # Accumulator --------------------------------------------------------------------

    def drain_query_samples(self) -> pl.DataFrame:
        """The query samples read since the last call, as a ``QUERY_SAMPLES`` frame (normalized texts)."""
        with self._lock:
            rows, self._query_rows = self._query_rows, []
        return pl.DataFrame(rows, schema=QUERY_SAMPLES, orient="row")

    def _reset(self) -> None:
        self._counts: dict[tuple, int] = defaultdict(int)
        self._blocked: dict[tuple, int] = defaultdict(int)
        self._gauges: dict[tuple, float] = {}
        self._taken = self._failed = self._skipped = 0

    def drain(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The samples since the last drain as (``samples``, ``session_stats``) frames."""
        with self._lock:
            counts, blocked, gauges = self._counts, self._blocked, self._gauges
            taken, failed, skipped = self._taken, self._failed, self._skipped
            self._reset()
        samples = pl.DataFrame(
            [(*key, self.source, n, self.period) for key, n in counts.items()], schema=SAMPLES, orient="row")
        rows = [("blocked_secs", db, state, qid, dbid, uid, n * self.period)
                for (db, state, qid, dbid, uid), n in blocked.items()]
        rows += [(stat, db, state, None, None, None, value) for (stat, db, state), value in gauges.items()]
        rows += [("samples_taken", None, None, None, None, None, float(taken)),
                 ("samples_failed", None, None, None, None, None, float(failed)),
                 ("samples_skipped", None, None, None, None, None, float(skipped)),
                 ("period_secs", None, None, None, None, None, self.period)]
        return samples, pl.DataFrame(rows, schema=SESSION_STATS, orient="row")

    def _gauge(self, stat: str, database: str | None, state: str | None, value: float) -> None:
        key = (stat, database, state)
        old = self._gauges.get(key)
        if old is None or value > old:
            self._gauges[key] = value

    def _add(self, rows: list[tuple]) -> None:
        """Fold one sample's rows into the accumulator (caller holds the lock).

        Runs every second on the collector's process: one pass over the rows, the gauges'
        maxima kept per key in local dicts and merged once.
        """
        hidden = sum(1 for r in rows if r[_HIDDEN])
        if hidden:
            rows = [r for r in rows if not r[_HIDDEN]]
        self._gauge("hidden_sessions", None, None, float(hidden))
        by_pid = {r[0]: r for r in rows}
        waiting: dict[int, list[int]] = {}
        counts = self._counts
        xact: dict[tuple, float] = {}
        xmin: dict[tuple, float] = {}
        for (pid, dbid, userid, database, user, backend_type, state, wtype, wevent, qid, leader,
             xact_age, xmin_age, blockers, *_) in rows:
            if qid is None and leader is not None and leader in by_pid:  # a parallel worker: its leader's statement
                qid = by_pid[leader][9]
            if wevent is None and (state == "active" or state is None):
                wtype = wevent = "CPU"  # running, waiting on nothing: on CPU (or runnable)
            counts[(dbid, userid, database, user, backend_type, state, wtype, wevent, qid or None)] += 1
            if blockers:
                waiting[pid] = list(blockers)
            if xact_age is not None and xact.get(key := (database, state), -1.0) < xact_age:
                xact[key] = xact_age
            if xmin_age is not None and xmin.get(key := (database, state), -1.0) < xmin_age:
                xmin[key] = xmin_age
        for (database, state), value in xact.items():
            self._gauge("xact_age_max", database, state, max(0.0, float(value)))
        for (database, state), value in xmin.items():
            self._gauge("xmin_age_max", database, state, float(value))
        if waiting:
            self._add_blocking(by_pid, waiting)
        self._taken += 1

    def _add_blocking(self, by_pid: dict[int, tuple], waiting: dict[int, list[int]]) -> None:
        """Root blockers (blocking others, waiting on nothing), chain depth, blocked time by root.

        Depth is the longest path from a root (depth 0) down to a waiter; a waiter's time goes
        to one root it leads to (the lowest pid: deterministic), so it is never counted twice.
        """
        reach = _reach(waiting)
        roots_by_db: dict[str | None, set[int]] = defaultdict(set)
        depth: dict[str | None, int] = defaultdict(int)
        for pid in waiting:
            database = by_pid[pid][3]
            roots, hops = reach(pid)
            depth[database] = max(depth[database], hops)
            roots_by_db[database] |= roots
            root = _root(roots, by_pid)
            if root is None:
                key = (database, UNKNOWN_STATE, None, None, None)
            elif root == 0:
                key = (database, PREPARED, None, None, None)
            elif root in by_pid:
                r = by_pid[root]
                key = (database, r[6] or UNKNOWN_STATE, r[9] or None, r[1], r[2])
            else:  # blocking from outside the sample (e.g. an idle-looking background process)
                key = (database, UNKNOWN_STATE, None, None, None)
            self._blocked[key] += 1
        for database in depth:
            self._gauge("root_count", database, None, float(len(roots_by_db[database])))
            self._gauge("chain_depth_max", database, None, float(depth[database]))

    # Query samples (issue 12) ---------------------------------------------------------

    def _candidates(self, rows: list[tuple]) -> list[tuple]:
        """Executions worth a text: client backends active past the threshold, not seen before.

        Updates the seen set: executions no longer running are forgotten (it holds at most one
        entry per backend), the chosen ones and those over the budget are remembered.
        """
        running = {r[_PID]: r[_QSTART] for r in rows if r[_QSTART] is not None}
        self._seen = {pid: start for pid, start in self._seen.items() if running.get(pid) == start}
        threshold = self.sample_min_duration_ms / 1000
        new = [r for r in rows if r[_STATE] == "active" and r[_BTYPE] == CLIENT_BACKEND and not r[_HIDDEN]
               and r[_QSTART] is not None and (r[_RUNNING] or 0.0) >= threshold
               and self._seen.get(r[_PID]) != r[_QSTART]]
        if not new:
            return []
        for r in new:
            self._seen[r[_PID]] = r[_QSTART]
        new.sort(key=lambda r: -(r[_RUNNING] or 0.0))  # the longest-running first
        hour_ago = time.monotonic() - 3600
        self._reads = {q: kept for q, times in self._reads.items() if (kept := [t for t in times if t > hour_ago])}
        planned: dict[int, int] = defaultdict(int)
        kept_rows = []
        for r in new:
            qid = r[_QID]
            if qid and len(self._reads.get(qid, ())) + planned[qid] >= self.samples_per_fingerprint_per_hour:
                continue
            planned[qid] += 1
            kept_rows.append(r)
        if len(kept_rows) < len(new):
            telemetry.query_samples_skipped.labels(self.instance, "fingerprint").inc(len(new) - len(kept_rows))
            new = kept_rows
        with self._lock:
            room = max(0, self.max_query_samples - len(self._query_rows))
        if len(new) > room:
            telemetry.query_samples_skipped.labels(self.instance, "budget").inc(len(new) - room)
        return new[:room]

    def _read_texts(self, conn: psycopg.Connection, pids: set[int]) -> dict[int, tuple]:
        """pid -> (query_start, application_name, client address, SampleText) for ``pids``.

        The raw texts become SampleTexts right after the fetch and are dropped with the result.
        """
        size = self.track_activity_query_size
        rows = self._run(conn, _TEXTS_SQL.format(pids=",".join(map(str, sorted(pids)))))
        out = {pid: (start, app, addr, None if raw == HIDDEN_TEXT else sample_text(raw, size))
               for pid, start, app, addr, raw in rows}
        del rows  # the raw texts go with the driver's result, now
        telemetry.query_sample_texts.labels(self.instance).inc(len(out))
        return out

    def _query_samples(self, conn: psycopg.Connection, rows: list[tuple]) -> list[tuple]:
        """This sample's query samples (QUERY_SAMPLES rows), reading texts only when needed."""
        chosen = self._candidates(rows)
        if not chosen:
            return []
        by_pid = {r[_PID]: r for r in rows if not r[_HIDDEN]}
        waiting = {r[_PID]: list(r[_BLOCKERS]) for r in by_pid.values() if r[_BLOCKERS]}
        reach = _reach(waiting)
        roots = {r[_PID]: _root(reach(r[_PID])[0], by_pid) for r in chosen if r[_PID] in waiting}
        try:
            texts = self._read_texts(conn, {r[_PID] for r in chosen} | {p for p in roots.values() if p in by_pid})
        except Exception as exc:  # counted; the executions are tried again at the next sample
            for r in chosen:
                self._seen.pop(r[_PID], None)
            telemetry.query_samples_skipped.labels(self.instance, "failed").inc(len(chosen))
            log.debug("query sample texts not read", extra=kv(instance=self.instance, error=type(exc).__name__))
            self._recover(conn)
            return []
        out = []
        now = time.monotonic()
        for r in chosen:
            start, app, addr, text = texts.get(r[_PID], (None, None, None, None))
            if start != r[_QSTART] or text is None:  # it ended (or another statement began) in between
                telemetry.query_samples_skipped.labels(self.instance, "ended").inc()
                continue
            if r[_QID]:
                self._reads.setdefault(r[_QID], []).append(now)
            root_pid = root_state = root_fp = root_qid = None
            if r[_PID] in roots:
                root_pid = roots[r[_PID]]
                if root_pid is None:
                    root_state = UNKNOWN_STATE
                elif root_pid == 0:
                    root_state = PREPARED
                else:
                    root_state = by_pid[root_pid][_STATE] if root_pid in by_pid else None
                    root_state = root_state or UNKNOWN_STATE
                    root_text = texts.get(root_pid, (None, None, None, None))[3]
                    root_fp = root_text.fingerprint if root_text is not None else None
                    root_qid = by_pid[root_pid][_QID] or None if root_pid in by_pid else None
            out.append((r[_NOW], r[_DB], r[_USER], r[_PID], r[_QSTART], max(0.0, r[_RUNNING] or 0.0), r[_STATE],
                        r[_WTYPE], r[_WEVENT], r[_QID] or None, app, addr, text.fingerprint, text.text, text.truncated,
                        text.unparsable, root_pid, root_state, root_fp, root_qid))
        return out

    def _recover(self, conn: psycopg.Connection) -> None:
        """End the failed statement's transaction (or drop the connection when that fails too)."""
        try:
            conn.rollback()  # autocommit: a ROLLBACK only if a transaction is still open (issue 19)
        except Exception:
            self.close()

    # One sample ---------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self._dsn, connect_timeout=self.connect_timeout_secs)
            try:
                conn.autocommit = True  # each sample is one implicit transaction
                self._databases, self._users = {}, {}
                self.version_num = int(conn.info.server_version)
                self._sql = sample_sql(self.version_num)
                self._statement = self._prepare(conn)
                self._known_idle, self._known_arrays = {}, None
                if self.max_query_samples:  # issue 12: where a text is cut, once per connection
                    self.track_activity_query_size = _query_size(self._run(conn, _QUERY_SIZE_SQL))
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
            self._run(conn, f"PREPARE {PREPARED_NAME}(int4[], int8[]) AS {self._sql}")  # under the same limits (a prepared statement outlives its transaction)
            return f"EXECUTE /*pgflow*/ {PREPARED_NAME}"
        except psycopg.Error as exc:
            self._recover(conn)
            log.info("the sampling query is not prepared; it is planned at every sample",
                     extra=kv(instance=self.instance, error=type(exc).__name__))
            return self._sql

    def _run(self, conn: psycopg.Connection, sql: str) -> list[tuple]:
        """``sql`` read-only under SET LOCAL statement_timeout and lock_timeout, in one round trip.

        No parameters, so psycopg sends the five statements as one simple-protocol query.
        """
        from pgflow.scrape.statements import limits_sql  # issue 19: no BEGIN/ROLLBACK, one implicit transaction
        cur = conn.execute(f"{limits_sql(self.statement_timeout_ms, self.lock_timeout_ms)}; {sql}")  # type: ignore[arg-type]
        rows: list[tuple] = []
        while True:
            result = cur.pgresult
            if result is not None and result.nfields > 1:  # (not cur.description: it builds every column's object)
                rows = cur.fetchall()
            if not cur.nextset():
                return rows

    def _sample_rows(self, conn: psycopg.Connection) -> list[tuple]:
        """One sample's rows, the sessions found idle left out (and remembered: see _SAMPLE_SQL).

        A prepared statement the server lost (a pooler in between) is sent whole from then on.
        """
        if self._known_arrays is None:  # rebuilt only when a session was learned
            self._known_arrays = known_idle_arrays(self._known_idle)
        try:
            rows = self._run(conn, with_known_idle(self._statement, self._known_arrays))
        except psycopg.errors.InvalidSqlStatementName:
            self._recover(conn)
            log.info("the prepared sampling query is gone (a pooler in transaction mode?); it is planned at "
                     "every sample from now on", extra=kv(instance=self.instance))
            self._statement = self._sql
            rows = self._run(conn, with_known_idle(self._statement, self._known_arrays))
        if len(self._known_idle) > KNOWN_IDLE_MAX:  # pids come and go: start over now and then
            self._known_idle, self._known_arrays = {}, None
        sampled = []
        for row in rows:
            if row[_IDLE_SINCE] is None:
                sampled.append(row)
            else:
                self._known_idle[row[_PID]] = row[_IDLE_SINCE]
                self._known_arrays = None
        return sampled

    def _names(self, conn: psycopg.Connection, rows: list[tuple]) -> list[tuple]:
        """Rows with database and user names from the oid cache (refreshed when an oid is new)."""
        if any((r[1] is not None and r[1] not in self._databases) or (r[2] is not None and r[2] not in self._users)
               for r in rows):
            names = self._run(conn, _NAMES_SQL)
            self._databases = {oid: name for kind, oid, name in names if kind == "d"}
            self._users = {oid: name for kind, oid, name in names if kind == "u"}
        db, users = self._databases, self._users
        return [(r[0], r[1], r[2], db.get(r[1]), users.get(r[2]), *r[5:]) for r in rows]

    def sample(self) -> bool:
        """Take one sample now; False (counted, logged at debug) when it failed."""
        started = time.perf_counter()
        try:
            conn = self._connection()
            rows = self._names(conn, self._sample_rows(conn))
        except Exception as exc:  # a failed sample is counted and skipped, never fatal
            self.close()
            with self._lock:
                self._failed += 1
            self.stats.failed += 1
            self.stats.last_error = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            telemetry.activity_samples.labels(self.instance, "failed").inc()
            if not self._failing:  # once per outage; every failure is counted in /metrics
                log.warning("activity sample failed; retrying every period",
                            extra=kv(instance=self.instance, error=self.stats.last_error))
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
            self._add(rows)
            self._query_rows.extend(queries)
        elapsed = time.perf_counter() - started
        self.stats.taken += 1
        self.stats.last_duration_secs = elapsed
        telemetry.activity_samples.labels(self.instance, "taken").inc()
        telemetry.activity_sample_duration.labels(self.instance).observe(elapsed)
        return True

    def skip(self, ticks: int) -> None:
        """Count ``ticks`` scheduled samples that were not taken (the previous one ran late)."""
        with self._lock:
            self._skipped += ticks
        self.stats.skipped += ticks
        telemetry.activity_samples.labels(self.instance, "skipped").inc(ticks)

    # Thread -------------------------------------------------------------------------

    def start(self) -> Sampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"sampler-{self.instance}", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            next_at += self.period
            now = time.monotonic()
            if now >= next_at:  # ran past the next tick(s): count them, never burst
                missed = int((now - next_at) // self.period) + 1
                self.skip(missed)
                next_at += missed * self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        self.close()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        self.close()

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
    return Sampler(dsn, instance=instance, interval_secs=interval, statement_timeout_ms=timeout,
                   lock_timeout_ms=timeout, connect_timeout_secs=settings.connect_timeout_secs,
                   sample_min_duration_ms=settings.sample_min_duration_ms,
                   max_query_samples=settings.max_samples_per_window,
                   samples_per_fingerprint_per_hour=settings.samples_per_fingerprint_per_hour)


_CHECK_SQL = """
SELECT /*pgflow*/ (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
         OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
       current_user::text,
       (SELECT extversion FROM pg_extension WHERE extname = 'pg_wait_sampling'),
       current_setting('compute_query_id', true)
"""


def check_sampling(dsn: str, interval_secs: float, *, connect_timeout: int = 5,
                   samples: int = 5) -> list[tuple[str, str, str]]:
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
        out.append(("warn", "sampling privileges",
                    f"{user} cannot see other roles' sessions' state, wait event, query id or text, so they are not "
                    f"sampled (no activity, no query samples): "
                    f"GRANT pg_read_all_stats TO {user} (or GRANT pg_monitor)"))
    if version < 140000:
        out.append(("warn", "sampling query ids", "PostgreSQL 13 has no query_id: activity is attributed to "
                                                  "fingerprint 'unknown'"))
    elif compute_query_id == "off":
        out.append(("warn", "sampling query ids", "compute_query_id is off: activity is attributed to "
                                                  "fingerprint 'unknown' (set compute_query_id = auto)"))
    if wait_sampling is None:
        out.append(("ok", "wait source", SOURCE_ACTIVITY))
    elif readable:
        out.append(("ok", "wait source", f"{SOURCE_ACTIVITY} (pg_wait_sampling {wait_sampling} is installed; "
                                         "pgflow does not read its profile yet)"))
    else:
        out.append(("warn", "wait source", f"{SOURCE_ACTIVITY} (pg_wait_sampling {wait_sampling} is installed but "
                                           f"{user} cannot read pg_wait_sampling_profile)"))
    sampler = Sampler(dsn, instance="check", interval_secs=interval_secs, connect_timeout_secs=connect_timeout,
                      max_query_samples=0)  # the check reads no statement text
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
    out.append(("ok", "activity sampling", f"every {interval_secs:g} s; one sample took {median * 1000:.1f} ms "
                                           f"(median of {samples}, {rows} sessions seen"
                                           f"{f', {hidden} hidden' if hidden else ''}, "
                                           f"{median / interval_secs:.2%} of the period)"))
    return out
