"""Sum delta rows that share a series: ``(database, user, fingerprint, toplevel)`` within an instance.

Several queryids can share a fingerprint (libpg_query ignores differences that queryid
keeps, e.g. IN-list lengths on older servers): their deltas add up, never overwrite.
Top-level and nested executions of one statement (``pg_stat_statements.track = all``) stay
apart: a nested statement's time is already inside its caller's, so a dashboard must be
able to sum top-level time alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pgflow.ops.groups import columns, group_rows, rows_where
from pgflow.schema import STATEMENT_INT_COUNTERS, STATEMENT_TIME_COUNTERS

SERIES_KEY = ("database", "user", "fingerprint", "toplevel")
SERIES_LABELS = ("operation", "summary", "text")
UNKNOWN = "<unknown>"


@dataclass(frozen=True)
class SeriesTable:
    """Series of one window: ``labels`` row ``i`` names the counter sums of matrix row ``i``."""

    labels: pl.DataFrame  # SERIES_KEY + SERIES_LABELS (toplevel: Boolean, the rest String)
    ints: np.ndarray  # STATEMENT_INT_COUNTERS, int64
    floats: np.ndarray  # STATEMENT_TIME_COUNTERS, float64 (milliseconds)

    @property
    def height(self) -> int:
        return self.labels.height

    def column(self, name: str) -> np.ndarray:
        if name in STATEMENT_INT_COUNTERS:
            return self.ints[:, STATEMENT_INT_COUNTERS.index(name)]
        return self.floats[:, STATEMENT_TIME_COUNTERS.index(name)]


def empty_series() -> SeriesTable:
    labels = pl.DataFrame(schema={c: pl.Boolean if c == "toplevel" else pl.String for c in (*SERIES_KEY, *SERIES_LABELS)})
    return SeriesTable(labels, np.zeros((0, len(STATEMENT_INT_COUNTERS)), np.int64), np.zeros((0, len(STATEMENT_TIME_COUNTERS))))


def sum_by(labels: pl.DataFrame, ints: np.ndarray, floats: np.ndarray, key: list[str]) -> SeriesTable:
    """One row per distinct ``key``: counters summed, other labels taken from the first row."""
    groups = group_rows(columns(labels, key))
    if len(groups) == labels.height:
        return SeriesTable(labels, ints, floats)  # already one row per series
    first = np.zeros(labels.height, bool)
    first[groups.first] = True  # (groups are numbered in first-seen order: these rows, in order)
    return SeriesTable(rows_where(labels, first), groups.sum(ints), groups.sum(floats))


def aggregate(parts: list[SeriesTable]) -> SeriesTable:
    """One row per series over every part, in first-seen order.

    The window calls it once per closed window over all of the window's delta rows, which
    is both the per-scrape and the per-window sum in one grouping.
    """
    if not parts:
        return empty_series()
    frames = [columns(p.labels, (*SERIES_KEY, *SERIES_LABELS)) for p in parts]
    labels = frames[0] if len(frames) == 1 else pl.concat(frames)
    if labels.get_column("database").has_nulls() or labels.get_column("user").has_nulls():
        labels = labels.with_columns_seq(pl.col("database", "user").fill_null(UNKNOWN))
    return sum_by(labels, np.concatenate([p.ints for p in parts]), np.concatenate([p.floats for p in parts]), list(SERIES_KEY))
