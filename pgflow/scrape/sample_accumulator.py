"""What an active-session sampler's samples add up to between two drains.

Each sample's rows (:mod:`pgflow.scrape.sampling_sql`) are folded into two compact tables the
next scrape takes (:meth:`SampleAccumulator.frames`): one count per distinct (database, user,
backend_type, state, wait_event_type, wait_event, query_id), so session-seconds = count x
period; and the session statistics: blocked session-seconds by root blocker
(:mod:`pgflow.scrape.blocking`), the gauges' maxima (hidden sessions, oldest transaction and
xmin horizon per database and state, root blockers and deepest chain per database) and the
samples taken, failed and skipped. Not thread-safe: the :class:`~pgflow.scrape.sampler.Sampler`
adds and swaps it under its lock.
"""

from __future__ import annotations

from collections import defaultdict

import polars as pl

from pgflow.schema import SAMPLES, SESSION_STATS
from pgflow.scrape.blocking import blocked_by_root
from pgflow.scrape.sampling_sql import HIDDEN


class SampleAccumulator:
    """The samples since the last drain: counts, blocked time by root, gauges, and how many were taken."""

    def __init__(self) -> None:
        self.counts: dict[tuple, int] = defaultdict(int)
        self.blocked: dict[tuple, int] = defaultdict(int)
        self.gauges: dict[tuple, float] = {}
        self.taken = self.failed = self.skipped = 0

    def frames(self, source: str, period: float) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The samples as (``samples``, ``session_stats``) frames."""
        samples = pl.DataFrame([(*key, source, n, period) for key, n in self.counts.items()], schema=SAMPLES, orient="row")
        rows = [("blocked_secs", db, state, qid, dbid, uid, n * period) for (db, state, qid, dbid, uid), n in self.blocked.items()]
        rows += [(stat, db, state, None, None, None, value) for (stat, db, state), value in self.gauges.items()]
        rows += [
            ("samples_taken", None, None, None, None, None, float(self.taken)),
            ("samples_failed", None, None, None, None, None, float(self.failed)),
            ("samples_skipped", None, None, None, None, None, float(self.skipped)),
            ("period_secs", None, None, None, None, None, period),
        ]
        return samples, pl.DataFrame(rows, schema=SESSION_STATS, orient="row")

    def gauge(self, stat: str, database: str | None, state: str | None, value: float) -> None:
        """Keep the largest value seen of a gauge."""
        key = (stat, database, state)
        old = self.gauges.get(key)
        if old is None or value > old:
            self.gauges[key] = value

    def add(self, rows: list[tuple]) -> None:
        """Fold one sample's rows (the sampler holds its lock).

        Runs every second on the collector's process: one pass over the rows, the gauges'
        maxima kept per key in local dicts and merged once.
        """
        hidden = sum(1 for r in rows if r[HIDDEN])
        if hidden:
            rows = [r for r in rows if not r[HIDDEN]]
        self.gauge("hidden_sessions", None, None, float(hidden))
        by_pid = {r[0]: r for r in rows}
        waiting: dict[int, list[int]] = {}
        counts = self.counts
        xact: dict[tuple, float] = {}
        xmin: dict[tuple, float] = {}
        for pid, dbid, userid, database, user, backend_type, state, wtype, wevent, qid, leader, xact_age, xmin_age, blockers, *_ in rows:
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
            self.gauge("xact_age_max", database, state, max(0.0, float(value)))
        for (database, state), value in xmin.items():
            self.gauge("xmin_age_max", database, state, float(value))
        if waiting:
            keys, per_database = blocked_by_root(by_pid, waiting)
            for key in keys:
                self.blocked[key] += 1
            for database, (roots, depth) in per_database.items():
                self.gauge("root_count", database, None, float(roots))
                self.gauge("chain_depth_max", database, None, float(depth))
        self.taken += 1
