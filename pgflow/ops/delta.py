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
- keys that vanished are forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl

from pgflow.schema import DATABASE_COUNTERS, STATEMENT_COUNTERS, STATEMENT_KEY, Snapshot

_PREV = "__prev"


@dataclass(frozen=True)
class DeltaState:
    """What the next snapshot is diffed against (immutable: cheap to copy and pickle)."""

    scraped_at: datetime
    stats_reset: datetime | None
    dealloc: int | None
    statements: pl.DataFrame  # key + stats_since + counters
    databases: pl.DataFrame  # datid + stats_reset + counters


@dataclass(frozen=True)
class Deltas:
    """One interval's deltas for one instance: ``[start, end]`` = the two scrapes' times."""

    instance: str
    start: datetime
    end: datetime
    statements: pl.DataFrame  # key, database, user, query, counter deltas (rows with activity only)
    databases: pl.DataFrame  # datid, database, counter deltas
    deallocated: int


def _keyed(statements: pl.DataFrame) -> pl.DataFrame:
    # PostgreSQL 13 has no toplevel: every entry is top level there.
    return statements.with_columns(pl.col("toplevel").fill_null(True))


class _Differ:
    """Per-key delta of ``counters``; a key whose entry restarted yields its current value.

    The expressions are built once: rebuilding ~80 of them per scrape costs more than the
    join itself.
    """

    def __init__(self, key: tuple[str, ...], counters: tuple[str, ...], since: str) -> None:
        self.key = list(key)
        self.renamed = [pl.col(c).alias(c + _PREV) for c in (*counters, since)]
        conditions = [pl.col(counters[0] + _PREV).is_null()]  # a new key
        conditions += [pl.col(c) < pl.col(c + _PREV) for c in counters]  # went down (null: column absent)
        conditions.append((pl.col(since) != pl.col(since + _PREV)).fill_null(False))  # re-created
        self.restarted = pl.any_horizontal(conditions).alias("__restarted")
        self.deltas = [
            pl.when(pl.col("__restarted")).then(pl.col(c)).otherwise(pl.col(c) - pl.col(c + _PREV)).alias(c)
            for c in counters
        ]

    def __call__(self, cur: pl.DataFrame, prev: pl.DataFrame, whole_reset: bool) -> pl.DataFrame:
        if whole_reset:
            return cur
        if cur.height == prev.height and cur.select(self.key).equals(prev.select(self.key)):
            # The steady state: the same entries in the same order as last scrape (the server
            # walks its hash table in bucket order), so rows pair up without a join.
            paired = pl.concat([cur, prev.select(self.renamed)], how="horizontal").lazy()
        else:
            paired = cur.lazy().join(prev.lazy().select(*self.key, *self.renamed), on=self.key, how="left",
                                     nulls_equal=True, maintain_order="left")
        return paired.with_columns(self.restarted).with_columns(self.deltas).select(cur.columns).collect()


_diff_statements = _Differ(STATEMENT_KEY, STATEMENT_COUNTERS, "stats_since")
_diff_databases = _Differ(("datid",), DATABASE_COUNTERS, "stats_reset")
# Every counter moves only when a statement is executed (calls) or planned (plans).
_ACTIVE = (pl.col("calls") > 0) | (pl.col("plans").fill_null(0) > 0)
_STATE_COLUMNS = [*STATEMENT_KEY, "stats_since", *STATEMENT_COUNTERS]


def delta(state: DeltaState | None, snapshot: Snapshot) -> tuple[DeltaState, Deltas | None]:
    """Diff ``snapshot`` against ``state``; returns the new state and the deltas (None at baseline)."""
    statements = _keyed(snapshot.statements)
    new_state = DeltaState(
        scraped_at=snapshot.scraped_at,
        stats_reset=snapshot.stats_reset,
        dealloc=snapshot.dealloc,
        statements=statements.select(_STATE_COLUMNS),
        databases=snapshot.databases.select("datid", "stats_reset", *DATABASE_COUNTERS),
    )
    if state is None:
        return new_state, None
    if snapshot.scraped_at <= state.scraped_at:
        # A snapshot from the past (clock step, replayed item): never diff backwards.
        return state, None

    whole_reset = snapshot.stats_reset is not None and snapshot.stats_reset != state.stats_reset
    diffed = _diff_statements(statements, state.statements, whole_reset).filter(_ACTIVE).drop("stats_since")
    databases = _diff_databases(snapshot.databases, state.databases, False) if snapshot.databases.height else snapshot.databases

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
        statements=diffed,
        databases=databases.select("datid", "database", *DATABASE_COUNTERS),
        deallocated=int(deallocated),
    )
    return new_state, deltas


__all__ = ["DeltaState", "Deltas", "delta"]
