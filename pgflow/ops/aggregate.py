"""Sum delta rows that share a series: ``(database, user, fingerprint)`` within an instance.

Several queryids can share a fingerprint (libpg_query ignores differences that queryid
keeps, e.g. IN-list lengths on older servers): their deltas add up, never overwrite.
"""

from __future__ import annotations

import polars as pl

from pgflow.schema import STATEMENT_COUNTERS

SERIES_KEY = ("database", "user", "fingerprint")
SERIES_LABELS = ("operation", "summary", "text")
UNKNOWN = "<unknown>"


_FILL = pl.col("database", "user").fill_null(UNKNOWN)
_AGGS = [*(pl.col(c).first() for c in SERIES_LABELS), *(pl.col(c).sum() for c in STATEMENT_COUNTERS)]


def aggregate(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per series: counters summed, labels taken from the first row.

    The window calls it once per closed window over all of the window's delta rows, which
    is both the per-scrape and the per-window sum in one group-by. Groups keep input order,
    so floating-point sums add up in the same order on every path (replays are bit-identical).
    """
    return frame.with_columns(_FILL).group_by(SERIES_KEY, maintain_order=True).agg(_AGGS)
