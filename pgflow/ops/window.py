"""Tumbling export windows aligned to the clock (every minute on the minute, by default).

A delta goes to the window in which its scrape ended; deltas are summed per series per
window: first row by row while consecutive scrapes return the same rows (a *run*, the steady
state: one vectorised addition per scrape), then, when the window closes, per series. Gauges
keep the last value observed in the window. A window closes when a scrape at or after its end
arrives (event time: ``scraped_at``, the server's clock), or when the
caller says time has passed (``close_until``) or the stream ends (``close_all``).

Points of one series never overlap and never end in the future: a window closed early
(``close_all``: shutdown, end of a replay) ends at its last scrape, and the state remembers
where the last closed window ended, so the next window of the same period (after a restart
with the same ledger) starts there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from pgflow.ops.aggregate import SeriesTable, aggregate
from pgflow.ops.delta import Counters, Deltas, active_rows
from pgflow.ops.groups import rows_where
from pgflow.schema import Snapshot

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class Gauges:
    """The last observation of the gauge sources in a window."""

    observed_at: datetime
    activity: pl.DataFrame
    locks: pl.DataFrame
    blocked: pl.DataFrame
    databases: list[str]
    max_connections: int | None

    @classmethod
    def of(cls, snapshot: Snapshot) -> Gauges:
        return cls(
            snapshot.scraped_at,
            snapshot.activity,
            snapshot.locks,
            snapshot.blocked,
            snapshot.databases["database"].to_list(),
            snapshot.max_connections,
        )


@dataclass(frozen=True)
class Resource:
    """What identifies an instance to the backend (OTLP resource attributes)."""

    instance: str
    server_address: str
    server_port: int
    server_version_num: int

    @classmethod
    def of(cls, snapshot: Snapshot) -> Resource:
        return cls(snapshot.instance, snapshot.server_address, snapshot.server_port, snapshot.server_version_num)


@dataclass(frozen=True)
class Run:
    """The summed deltas of consecutive scrapes that returned the same rows in the same order.

    Only the rows that moved are kept (issue 20): ``at`` lists them (ascending row numbers of
    ``rows``, which is the scrape's own frame, shared with the delta state) and ``counters``
    holds their sums, row ``i`` for ``rows`` row ``at[i]``. Most of a server's statements do not
    run in a given minute, so a window costs what ran, not what the server holds. ``at`` is None
    when ``counters`` covers every row of ``rows`` (every row moved; a compacted run; a ledger
    written before): then a scrape is one addition, as before.
    Sums are the same additions in the same order as summing every row: the zeros left out
    change nothing when added.
    """

    rows: pl.DataFrame
    counters: Counters
    at: np.ndarray | None = None

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("at", None)  # a ledger written before runs were sparse
        self.__dict__.update(state)

    @classmethod
    def of(cls, deltas: Deltas) -> Run:
        moved = _moved(deltas.counters)
        if moved.size == deltas.rows.height:  # every row moved: kept whole, summed as before
            return cls(deltas.rows, deltas.counters)
        return cls(deltas.rows, deltas.counters.take(moved), moved)

    def _positions(self) -> np.ndarray:
        return np.arange(len(self.counters.ints)) if self.at is None else self.at

    def plus(self, deltas: Deltas) -> Run:
        c = self.counters
        if self.at is None:  # every row already (a busy server): one addition, nothing to merge
            d = deltas.counters
            return Run(self.rows, Counters(c.ints + d.ints, c.floats + d.floats, d.since))
        moved = _moved(deltas.counters)
        if not moved.size:
            return self
        d, at = deltas.counters.take(moved), self.at
        merged = np.union1d(at, moved)
        ints = np.zeros((merged.size, c.ints.shape[1]), c.ints.dtype)
        floats = np.zeros((merged.size, c.floats.shape[1]), c.floats.dtype)
        old, into = np.searchsorted(merged, at), np.searchsorted(merged, moved)
        ints[old], floats[old] = c.ints, c.floats
        ints[into] += d.ints  # a row new to the run starts from zero, as it does in a sum over every row
        floats[into] += d.floats
        since = np.zeros(merged.size, np.int64)  # (a sum has no entry start: unused)
        return Run(self.rows, Counters(ints, floats, since), None if merged.size == self.rows.height else merged)

    def compacted(self) -> Run:
        """Only the rows that ran: what a finished run needs to keep."""
        keep = active_rows(self.counters)
        if self.at is None and keep.all():
            return self
        mask = np.zeros(self.rows.height, bool)
        mask[self._positions()[keep]] = True
        return Run(rows_where(self.rows, mask), self.counters.take(keep))


def _moved(counters: Counters) -> np.ndarray:
    """Rows with any counter that moved (ascending): every other row adds nothing to a sum."""
    return np.flatnonzero((counters.ints != 0).any(axis=1) | (counters.floats != 0).any(axis=1))


@dataclass(frozen=True)
class Window:
    """One instance's export window: ``[start, end)``; its series are summed when closed."""

    resource: Resource
    start: datetime
    end: datetime
    runs: tuple[Run, ...] = ()
    deallocated: int = 0
    gauges: Gauges | None = None
    period_end: datetime | None = None  # the aligned end of its period: ``end`` unless closed early

    @property
    def period(self) -> datetime:
        """The key of this window's period (what other per-window operators file their data under)."""
        return getattr(self, "period_end", None) or self.end

    def series(self) -> SeriesTable:
        """The window's deltas, one row per series (aggregated once, when the window closes)."""
        parts = [
            SeriesTable(run.rows, run.counters.ints, run.counters.floats) for run in (r.compacted() for r in self.runs) if run.rows.height
        ]
        # Rows keep the server's order and runs the scrapes' order, so floating-point sums
        # add up in the same order on every replay of the same snapshots.
        return aggregate(parts)


@dataclass(frozen=True)
class WindowState:
    length: timedelta
    open: dict[datetime, Window] = field(default_factory=dict)
    closed_until: datetime | None = None  # end of the last closed window: the next one starts no earlier


def window_bounds(at: datetime, length: timedelta) -> tuple[datetime, datetime]:
    """The aligned window ``[start, end)`` that contains ``at``."""
    n = (at - _EPOCH) // length
    start = _EPOCH + n * length
    return start, start + length


def _with(runs: tuple[Run, ...], deltas: Deltas) -> tuple[Run, ...]:
    if runs and runs[-1].rows is deltas.rows:
        return (*runs[:-1], runs[-1].plus(deltas))
    return (*runs[:-1], *(r.compacted() for r in runs[-1:]), Run.of(deltas))


def add(state: WindowState, snapshot: Snapshot, deltas: Deltas | None) -> WindowState:
    """Put one scrape's deltas and gauges into the window that contains its end."""
    start, end = window_bounds(snapshot.scraped_at, state.length)
    closed_until = getattr(state, "closed_until", None)  # absent from states pickled before it existed
    if closed_until is not None and start < closed_until < end:
        start = closed_until  # the first part of this period was exported before a restart
    current = state.open.get(end) or Window(Resource.of(snapshot), start, end, period_end=end)
    runs = _with(current.runs, deltas) if deltas is not None and deltas.rows.height else current.runs
    deallocated = deltas.deallocated if deltas is not None else 0
    updated = replace(
        current, resource=Resource.of(snapshot), runs=runs, deallocated=current.deallocated + deallocated, gauges=Gauges.of(snapshot)
    )
    return replace(state, open={**state.open, end: updated})


def close_until(state: WindowState, watermark: datetime) -> tuple[WindowState, list[Window]]:
    """Close every window that ends at or before ``watermark``, oldest first."""
    due = sorted(end for end in state.open if end <= watermark)
    if not due:
        return state, []
    closed = [state.open[end] for end in due]
    return replace(state, open={e: w for e, w in state.open.items() if e > watermark}, closed_until=_latest(state, closed[-1].end)), closed


def close_all(state: WindowState) -> tuple[WindowState, list[Window]]:
    """Close every open window now; each ends at its last scrape, not at its nominal end."""
    closed = [_early(state.open[end]) for end in sorted(state.open)]
    if not closed:
        return state, []
    return replace(state, open={}, closed_until=_latest(state, closed[-1].end)), closed


def _early(window: Window) -> Window:
    """A window closed before its end: what it holds was observed until its last scrape."""
    if window.gauges is None:
        return window
    last = max(window.gauges.observed_at, window.start + _TICK)  # never an empty interval
    return replace(window, end=min(window.end, last))


def _latest(state: WindowState, end: datetime) -> datetime:
    before = getattr(state, "closed_until", None)
    return end if before is None or end > before else before
