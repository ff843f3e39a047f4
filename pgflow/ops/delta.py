"""Cumulative counters to exact interval deltas, per instance, reset-aware.

Keyed on ``(dbid, userid, queryid, toplevel)`` before any merge by fingerprint: two
queryids that later share a fingerprint are diffed separately, so neither inflates the
other. The rules, per key:

- first snapshot of an instance: the baseline, nothing emitted;
- key seen in the previous snapshot: current − previous;
- key not seen before (created after the previous scrape): its whole value;
- a counter went down, or ``stats_since`` changed (17+): the entry was reset or
  re-created since, so its current value is the delta;
- ``stats_reset`` of ``pg_stat_statements_info`` changed: every entry restarted, so every
  current value is the delta;
- another server answered (its :class:`ServerIdentity` does not continue the previous one,
  or ``stats_reset`` moved to a time before the previous scrape, which no reset inside the
  interval can do): its counters are another history, so this snapshot is a new baseline
  and nothing is emitted for the interval (see :func:`server_changed`);
- keys that vanished are forgotten.

The arithmetic runs on numpy matrices (integers stay int64, exact; times float64): a
5,000-row scrape is a few vectorised operations rather than a join. In the steady state the
server returns the same entries in the same order as last scrape (it walks its hash table
in bucket order), rows pair up by position and the previous scrape's row frame is reused,
which tells the window that it may keep adding into the same accumulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from pgflow.schema import (
    DATABASE_COUNTERS,
    DATABASE_TIME_COUNTERS,
    STATEMENT_INT_COUNTERS,
    STATEMENT_KEY,
    STATEMENT_TIME_COUNTERS,
    ServerIdentity,
    Snapshot,
)

ROW_COLUMNS = (*STATEMENT_KEY, "database", "user", "query")
_NO_SINCE = np.iinfo(np.int64).min  # stats_since / stats_reset absent


@dataclass(frozen=True)
class Counters:
    """One frame's counters as matrices, row ``i`` = the frame's row ``i``."""

    ints: np.ndarray  # (rows, int counters), int64
    floats: np.ndarray  # (rows, time counters), float64
    since: np.ndarray  # (rows,), int64 microseconds; _NO_SINCE when null

    @classmethod
    def of(cls, frame: pl.DataFrame, ints: tuple[str, ...], floats: tuple[str, ...], since: str) -> Counters:
        return cls(_matrix(frame, ints, np.int64), _matrix(frame, floats, np.float64), _since(frame[since]))

    def take(self, rows: np.ndarray) -> Counters:
        return Counters(self.ints[rows], self.floats[rows], self.since[rows])


def _matrix(frame: pl.DataFrame, columns: tuple[str, ...], dtype: type) -> np.ndarray:
    # Column by column: a DataFrame.select costs more than copying the numbers.
    out: np.ndarray = np.empty((frame.height, len(columns)), dtype, order="F")
    for j, name in enumerate(columns):
        column = frame.get_column(name)
        # A column a server version lacks is null: it never moves, so 0 counts the same.
        out[:, j] = (column.fill_null(0) if column.has_nulls() else column).to_numpy()
    return out


def _since(column: pl.Series) -> np.ndarray:
    if column.null_count() == len(column):  # before PostgreSQL 17, or never reset
        return np.full(len(column), _NO_SINCE, np.int64)
    dtype = column.dtype  # already in microseconds (what the scrape reads): no cast_time_unit, a select
    in_us = isinstance(dtype, pl.Datetime) and dtype.time_unit == "us"
    values = (column if in_us else column.dt.cast_time_unit("us")).cast(pl.Int64)
    return (values.fill_null(_NO_SINCE) if values.has_nulls() else values).to_numpy()


def _positions(cur: pl.DataFrame, prev: pl.DataFrame, key: list[str]) -> np.ndarray | None:
    """Row of ``prev`` for each row of ``cur`` (-1: new key); None when they pair up by position."""
    if cur.height == prev.height and all(np.array_equal(cur[k].to_numpy(), prev[k].to_numpy()) for k in key):
        return None
    indexed = prev.select(key).with_row_index("__row")
    joined = cur.select(key).join(indexed, on=key, how="left", nulls_equal=True, maintain_order="left")
    return joined["__row"].fill_null(-1).cast(pl.Int64).to_numpy()


def _diff(cur: Counters, prev: Counters, at: np.ndarray | None, whole_reset: bool) -> Counters:
    """Per-row deltas; a row whose entry restarted (or is new) yields its current values."""
    if whole_reset:
        return cur
    if at is None:
        prev_ints, prev_floats, prev_since, new = prev.ints, prev.floats, prev.since, None
    else:
        new = at < 0
        safe = np.where(new, 0, at)
        prev_ints, prev_floats, prev_since = prev.ints[safe], prev.floats[safe], prev.since[safe]
    restarted = (cur.ints < prev_ints).any(axis=1) | (cur.floats < prev_floats).any(axis=1)
    restarted |= (cur.since != prev_since) & (cur.since != _NO_SINCE) & (prev_since != _NO_SINCE)
    if new is not None:
        restarted |= new
    ints = cur.ints - prev_ints
    floats = cur.floats - prev_floats
    if restarted.any():
        ints[restarted] = cur.ints[restarted]
        floats[restarted] = cur.floats[restarted]
    return Counters(ints, floats, cur.since)


@dataclass(frozen=True)
class DeltaState:
    """What the next snapshot is diffed against (immutable: cheap to copy and pickle)."""

    scraped_at: datetime
    stats_reset: datetime | None
    dealloc: int | None
    rows: pl.DataFrame  # the last scrape's rows, labelled
    counters: Counters
    databases: pl.DataFrame  # datid, database
    database_counters: Counters
    identity: ServerIdentity | None = None  # of the server the state's counters came from


def server_changed(state: DeltaState, snapshot: Snapshot) -> str | None:
    """Why ``snapshot``'s counters do not continue ``state``'s (another server), or None.

    Both parts are needed: the identity needs no particular privilege beyond
    pg_postmaster_start_time() but may lack the system identifier; ``stats_reset`` (PostgreSQL
    14+) is kept across a clean restart of the same server, so a value that moved backwards
    past the previous scrape comes from another server's counters.
    """
    previous = getattr(state, "identity", None)  # ledgers written before the field existed
    if previous is not None and snapshot.identity is not None:
        reason = snapshot.identity.same_history(previous)
        if reason:
            return reason
    if (
        snapshot.stats_reset is not None
        and state.stats_reset is not None
        and snapshot.stats_reset != state.stats_reset
        and snapshot.stats_reset <= state.scraped_at
    ):
        return "pg_stat_statements was last reset before the previous scrape: another server's counters"
    return None


@dataclass(frozen=True)
class Deltas:
    """One interval's deltas for one instance: ``[start, end]`` = the two scrapes' times.

    ``rows`` is the scrape's row frame (ROW_COLUMNS, or what ``label`` made of them);
    ``counters`` row ``i`` is the delta of ``rows`` row ``i``, idle rows included. ``rows`` is
    the very object of the previous Deltas when the server returned the same entries in the
    same order.
    """

    instance: str
    start: datetime
    end: datetime
    rows: pl.DataFrame
    counters: Counters
    database_rows: pl.DataFrame  # datid, database
    database_counters: Counters  # their counter deltas
    deallocated: int

    @property
    def databases(self) -> pl.DataFrame:
        """pg_stat_database deltas: datid, database and the counters (built when asked for)."""
        return _side_by_side(
            self.database_rows, (self.database_counters.ints, DATABASE_COUNTERS), (self.database_counters.floats, DATABASE_TIME_COUNTERS)
        )

    @property
    def statements(self) -> pl.DataFrame:
        """The rows that ran in the interval, with their counter deltas, as one frame."""
        keep = active_rows(self.counters)
        return _side_by_side(
            self.rows.filter(pl.Series(keep)),
            (self.counters.ints[keep], STATEMENT_INT_COUNTERS),
            (self.counters.floats[keep], STATEMENT_TIME_COUNTERS),
        )


def active_rows(counters: Counters) -> np.ndarray:
    """Rows executed or planned in the interval: every counter moves only then."""
    calls = STATEMENT_INT_COUNTERS.index("calls")
    plans = STATEMENT_INT_COUNTERS.index("plans")
    return (counters.ints[:, calls] > 0) | (counters.ints[:, plans] > 0)


def _side_by_side(rows: pl.DataFrame, *matrices: tuple[np.ndarray, tuple[str, ...]]) -> pl.DataFrame:
    """``rows`` with the columns of each (matrix, column names) appended."""
    return pl.concat([rows, *(pl.from_numpy(m, schema=list(names), orient="row") for m, names in matrices)], how="horizontal")


def _rows(statements: pl.DataFrame) -> pl.DataFrame:
    columns = [statements.get_column(c) for c in ROW_COLUMNS]
    toplevel = ROW_COLUMNS.index("toplevel")
    if columns[toplevel].has_nulls():  # PostgreSQL 13 has no toplevel: every entry is top level there
        columns[toplevel] = columns[toplevel].fill_null(True)
    return pl.DataFrame(columns)


def delta(
    state: DeltaState | None, snapshot: Snapshot, label: Callable[[pl.DataFrame], pl.DataFrame] | None = None
) -> tuple[DeltaState, Deltas | None]:
    """Diff ``snapshot`` against ``state``; returns the new state and the deltas (None at baseline).

    ``label`` turns a scrape's rows (ROW_COLUMNS) into the rows kept in the state and the
    deltas; the pipeline passes the fingerprinter, which replaces the raw ``query`` (it may
    hold literals) with its fingerprint and normalized text. It runs only when the rows
    differ from the previous scrape's: in the steady state the labelled rows are reused.
    """
    if state is not None and snapshot.scraped_at <= state.scraped_at:
        # A snapshot from the past (clock step, replayed item): never diff backwards.
        return state, None
    rows = _rows(snapshot.statements)
    counters = Counters.of(snapshot.statements, STATEMENT_INT_COUNTERS, STATEMENT_TIME_COUNTERS, "stats_since")
    databases = pl.DataFrame([snapshot.databases.get_column("datid"), snapshot.databases.get_column("database")])
    database_counters = Counters.of(snapshot.databases, DATABASE_COUNTERS, DATABASE_TIME_COUNTERS, "stats_reset")
    at = None if state is None else _positions(rows, state.rows, list(STATEMENT_KEY))
    if at is None and state is not None and all(rows[c].equals(state.rows[c]) for c in ("database", "user")):
        rows = state.rows  # same entries, same names, same order: keep the frame the window holds
    elif label is not None:
        rows = label(rows)
    new_state = DeltaState(
        snapshot.scraped_at, snapshot.stats_reset, snapshot.dealloc, rows, counters, databases, database_counters, snapshot.identity
    )
    if state is None or server_changed(state, snapshot) is not None:
        return new_state, None  # a baseline: the first snapshot, or the first of another server

    whole_reset = snapshot.stats_reset is not None and snapshot.stats_reset != state.stats_reset
    diffed = _diff(counters, state.counters, at, whole_reset)
    db_at = _positions(databases, state.databases, ["datid"])
    db_diffed = _diff(database_counters, state.database_counters, db_at, False)

    if snapshot.dealloc is None:
        deallocated = 0
    elif whole_reset or state.dealloc is None or snapshot.dealloc < state.dealloc:
        deallocated = snapshot.dealloc
    else:
        deallocated = snapshot.dealloc - state.dealloc

    deltas = Deltas(
        instance=snapshot.instance,
        start=state.scraped_at,
        end=snapshot.scraped_at,
        rows=rows,
        counters=diffed,
        database_rows=databases,
        database_counters=db_diffed,
        deallocated=int(deallocated),
    )
    return new_state, deltas


__all__ = ["Counters", "DeltaState", "Deltas", "active_rows", "delta", "server_changed"]
