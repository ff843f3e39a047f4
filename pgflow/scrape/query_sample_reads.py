"""Query samples (issue 12): the texts of the statements that run long, read as few times as possible.

When a client backend's statement has been active longer than
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

:class:`QuerySampleReads` is the part of :class:`pgflow.scrape.sampler.Sampler` that does this,
after each activity sample, with the sample's rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import polars as pl
import psycopg

from pgflow import telemetry
from pgflow.logs import kv
from pgflow.ops.query_samples import sample_text
from pgflow.schema import QUERY_SAMPLES
from pgflow.scrape.blocking import PREPARED, UNKNOWN_STATE, reach, root_of
from pgflow.scrape.sampling_sql import BLOCKERS, BTYPE, DB, HIDDEN, NOW, PID, QID, QSTART, RUNNING, STATE, USER, WEVENT, WTYPE

log = logging.getLogger("pgflow.sampler")

# Issue 12: the texts of a few backends only (pg_stat_get_activity(pid) reads one backend's entry).
_TEXTS_SQL = (
    "SELECT /*pgflow*/ a.pid, a.query_start, a.application_name, host(a.client_addr), a.query "
    "FROM unnest('{{{pids}}}'::int4[]) AS p(pid), LATERAL pg_stat_get_activity(p.pid) AS a"
)
_QUERY_SIZE_SQL = "SELECT /*pgflow*/ setting::int8, unit FROM pg_settings WHERE name = 'track_activity_query_size'"
HIDDEN_TEXT = "<insufficient privilege>"
CLIENT_BACKEND = "client backend"


def _query_size(rows: list[tuple]) -> int:
    """track_activity_query_size in bytes (pg_settings reports it in bytes; 1024 if unreadable)."""
    if not rows or rows[0][0] is None:
        return 1024
    value, unit = rows[0]
    return int(value) * (1024 if unit == "kB" else 1)


class QuerySampleReads:
    """The query samples of a :class:`~pgflow.scrape.sampler.Sampler` (a mixin: it reads through
    the sampler's connection, ``_run`` and ``_recover``, and keeps its rows under its lock)."""

    instance: str
    _lock: threading.Lock

    def _init_query_samples(self, sample_min_duration_ms: float, max_query_samples: int, samples_per_fingerprint_per_hour: int) -> None:
        self.sample_min_duration_ms = float(sample_min_duration_ms)
        self.max_query_samples = int(max_query_samples)  # 0: never read a text
        self.track_activity_query_size = 1024  # read from the server once per connection
        self._seen: dict[int, object] = {}  # pid -> query_start of the execution already handled
        # query_id -> monotonic times of its texts read in the last hour (PostgreSQL 14+): a statement
        # read samples_per_fingerprint_per_hour times this hour would be dropped by the limiter anyway.
        self.samples_per_fingerprint_per_hour = int(samples_per_fingerprint_per_hour)
        self._reads: dict[int, list[float]] = {}
        self._query_rows: list[tuple] = []  # query samples waiting for the next drain (QUERY_SAMPLES order)

    def _run(self, conn: psycopg.Connection, sql: str) -> list[tuple]:
        raise NotImplementedError  # the sampler's

    def _recover(self, conn: psycopg.Connection) -> None:
        raise NotImplementedError  # the sampler's

    def _read_query_size(self, conn: psycopg.Connection) -> None:
        """Where the server cuts a text: once per connection."""
        self.track_activity_query_size = _query_size(self._run(conn, _QUERY_SIZE_SQL))

    def drain_query_samples(self) -> pl.DataFrame:
        """The query samples read since the last call, as a ``QUERY_SAMPLES`` frame (normalized texts)."""
        with self._lock:
            rows, self._query_rows = self._query_rows, []
        return pl.DataFrame(rows, schema=QUERY_SAMPLES, orient="row")

    def _candidates(self, rows: list[tuple]) -> list[tuple]:
        """Executions worth a text: client backends active past the threshold, not seen before.

        Updates the seen set: executions no longer running are forgotten (it holds at most one
        entry per backend), the chosen ones and those over the budget are remembered.
        """
        running = {r[PID]: r[QSTART] for r in rows if r[QSTART] is not None}
        self._seen = {pid: start for pid, start in self._seen.items() if running.get(pid) == start}
        threshold = self.sample_min_duration_ms / 1000
        new = [
            r
            for r in rows
            if r[STATE] == "active"
            and r[BTYPE] == CLIENT_BACKEND
            and not r[HIDDEN]
            and r[QSTART] is not None
            and (r[RUNNING] or 0.0) >= threshold
            and self._seen.get(r[PID]) != r[QSTART]
        ]
        if not new:
            return []
        for r in new:
            self._seen[r[PID]] = r[QSTART]
        new.sort(key=lambda r: -(r[RUNNING] or 0.0))  # the longest-running first
        hour_ago = time.monotonic() - 3600
        self._reads = {q: kept for q, times in self._reads.items() if (kept := [t for t in times if t > hour_ago])}
        planned: dict[int, int] = defaultdict(int)
        kept_rows = []
        for r in new:
            qid = r[QID]
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
        out = {pid: (start, app, addr, None if raw == HIDDEN_TEXT else sample_text(raw, size)) for pid, start, app, addr, raw in rows}
        del rows  # the raw texts go with the driver's result, now
        telemetry.query_sample_texts.labels(self.instance).inc(len(out))
        return out

    def _query_samples(self, conn: psycopg.Connection, rows: list[tuple]) -> list[tuple]:
        """This sample's query samples (QUERY_SAMPLES rows), reading texts only when needed."""
        chosen = self._candidates(rows)
        if not chosen:
            return []
        by_pid = {r[PID]: r for r in rows if not r[HIDDEN]}
        waiting = {r[PID]: list(r[BLOCKERS]) for r in by_pid.values() if r[BLOCKERS]}
        reach_of = reach(waiting)
        roots = {r[PID]: root_of(reach_of(r[PID])[0], by_pid) for r in chosen if r[PID] in waiting}
        try:
            texts = self._read_texts(conn, {r[PID] for r in chosen} | {p for p in roots.values() if p in by_pid})
        except Exception as exc:  # counted; the executions are tried again at the next sample
            for r in chosen:
                self._seen.pop(r[PID], None)
            telemetry.query_samples_skipped.labels(self.instance, "failed").inc(len(chosen))
            log.debug("query sample texts not read", extra=kv(instance=self.instance, error=type(exc).__name__))
            self._recover(conn)
            return []
        out = []
        now = time.monotonic()
        for r in chosen:
            start, app, addr, text = texts.get(r[PID], (None, None, None, None))
            if start != r[QSTART] or text is None:  # it ended (or another statement began) in between
                telemetry.query_samples_skipped.labels(self.instance, "ended").inc()
                continue
            if r[QID]:
                self._reads.setdefault(r[QID], []).append(now)
            root_pid = root_state = root_fp = root_qid = None
            if r[PID] in roots:
                root_pid = roots[r[PID]]
                if root_pid is None:
                    root_state = UNKNOWN_STATE
                elif root_pid == 0:
                    root_state = PREPARED
                else:
                    root_state = by_pid[root_pid][STATE] if root_pid in by_pid else None
                    root_state = root_state or UNKNOWN_STATE
                    root_text = texts.get(root_pid, (None, None, None, None))[3]
                    root_fp = root_text.fingerprint if root_text is not None else None
                    root_qid = by_pid[root_pid][QID] or None if root_pid in by_pid else None
            out.append(
                (
                    r[NOW],
                    r[DB],
                    r[USER],
                    r[PID],
                    r[QSTART],
                    max(0.0, r[RUNNING] or 0.0),
                    r[STATE],
                    r[WTYPE],
                    r[WEVENT],
                    r[QID] or None,
                    app,
                    addr,
                    text.fingerprint,
                    text.text,
                    text.truncated,
                    text.unparsable,
                    root_pid,
                    root_state,
                    root_fp,
                    root_qid,
                )
            )
        return out
