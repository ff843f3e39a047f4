"""Merge the points of two export windows into one (bounded memory during endpoint outages).

Sums of the same series add up and span both windows (``start`` of the older, ``end`` of
the newer), so no count is lost; of the gauges only the newer observation is kept.
"""

from __future__ import annotations

import polars as pl

from pgflow.schema import POINTS

_SERIES = ["instance", "metric", "kind", "unit", "monotonic", "is_int", "attributes", "server_address", "server_port", "server_version_num"]


def merge_windows(older: pl.DataFrame, newer: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Return the merged points and how many gauge points were dropped."""
    both = pl.concat([older, newer])
    sums = both.filter(pl.col("kind") == "sum")
    merged_sums = (
        sums.with_columns(pl.col("start").min(), pl.col("end").max())
        .group_by(_SERIES, maintain_order=True)
        .agg(pl.col("start").first(), pl.col("end").first(), pl.col("value").sum())
    )
    gauges_new = newer.filter(pl.col("kind") != "sum")
    dropped = older.filter(pl.col("kind") != "sum").height
    out = pl.concat([merged_sums.select(POINTS.names()), gauges_new.select(POINTS.names())])
    return out.cast(POINTS), dropped
