"""Bounded cardinality: a keyed LRU of tracked fingerprints, users and databases per instance.

Applied once per closed window, so a series is either named or rolled up for a whole
window. A fingerprint is *active* in a window when its calls delta is > 0; active ones are
refreshed in the LRU, heaviest (by execution time) last, and when a new one arrives at the
cap the least recently active is evicted. Everything not tracked, and (with
``slow_query_threshold_ms``) every series whose mean time per call is under the threshold,
rolls into one ``other`` series per ``(database, operation)``: the sum over all exported
series equals the sum of the deltas exactly. Nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import polars as pl

from pgflow.schema import STATEMENT_COUNTERS

OTHER = "other"


@dataclass(frozen=True)
class CapState:
    """LRU orders (oldest first) and eviction counts; plain tuples, cheap to copy and pickle."""

    queries: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    evictions: dict[str, int] = field(default_factory=lambda: {"queries": 0, "users": 0, "databases": 0})


def _touch(lru: tuple[str, ...], active: list[str], capacity: int) -> tuple[tuple[str, ...], int]:
    """Refresh ``active`` (heaviest first) in the LRU; evict the least recent past capacity."""
    active = active[:capacity]  # more active than the cap: the heaviest win this window
    fresh = set(active)
    order = [k for k in lru if k not in fresh] + list(reversed(active))
    evicted = max(0, len(order) - capacity)
    return tuple(order[evicted:]), evicted


def _ranked(series: pl.DataFrame, column: str) -> list[str]:
    return (
        series.filter(pl.col("calls") > 0)
        .group_by(column)
        .agg(pl.col("total_exec_time").sum().alias("t"))
        .sort(["t", column], descending=[True, False])[column]
        .to_list()
    )


def cap(
    state: CapState,
    series: pl.DataFrame,
    *,
    max_queries_tracked: int,
    max_users_tracked: int,
    max_databases_tracked: int,
    slow_query_threshold_ms: float = 0.0,
) -> tuple[CapState, pl.DataFrame]:
    """Roll untracked and fast series into ``other``; return the new LRU state and series."""
    if series.height == 0:
        return state, series
    databases, ev_d = _touch(state.databases, _ranked(series, "database"), max_databases_tracked)
    users, ev_u = _touch(state.users, _ranked(series, "user"), max_users_tracked)
    queries, ev_q = _touch(state.queries, _ranked(series, "fingerprint"), max_queries_tracked)

    series = series.with_columns(
        pl.when(pl.col("database").is_in(databases)).then(pl.col("database")).otherwise(pl.lit(OTHER)).alias("database"),
        pl.when(pl.col("user").is_in(users)).then(pl.col("user")).otherwise(pl.lit(OTHER)).alias("user"),
    )
    rolled = ~pl.col("fingerprint").is_in(queries)
    if slow_query_threshold_ms > 0:
        mean = pl.col("total_exec_time") / pl.col("calls")
        rolled = rolled | (pl.col("calls") == 0) | (mean < slow_query_threshold_ms)
    series = series.with_columns(
        pl.when(rolled).then(pl.lit(OTHER)).otherwise(pl.col("fingerprint")).alias("fingerprint"),
        pl.when(rolled).then(pl.lit(None, pl.String)).otherwise(pl.col("user")).alias("user"),
        pl.when(rolled).then(pl.col("operation")).otherwise(pl.col("summary")).alias("summary"),
        pl.when(rolled).then(pl.lit(None, pl.String)).otherwise(pl.col("text")).alias("text"),
    )
    capped = (
        series.group_by("database", "user", "fingerprint", "operation", maintain_order=True)
        .agg(pl.col("summary").first(), pl.col("text").first(), *(pl.col(c).sum() for c in STATEMENT_COUNTERS))
    )
    evictions = {"queries": state.evictions["queries"] + ev_q, "users": state.evictions["users"] + ev_u,
                 "databases": state.evictions["databases"] + ev_d}
    return replace(state, queries=queries, users=users, databases=databases, evictions=evictions), capped
