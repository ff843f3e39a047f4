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

import numpy as np
import polars as pl

from pgflow.ops.aggregate import SeriesTable, sum_by
from pgflow.ops.groups import group_rows

OTHER = "other"


@dataclass(frozen=True)
class CapState:
    """LRU orders (oldest first) and eviction counts; plain tuples, cheap to copy and pickle."""

    queries: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    evictions: dict[str, int] = field(default_factory=lambda: {"queries": 0, "users": 0, "databases": 0})


def _touch(lru: tuple[str, ...], active: list[str], capacity: int) -> tuple[tuple[str, ...], int]:
    """Refresh ``active`` (heaviest first, at most ``capacity``) in the LRU; evict past capacity."""
    fresh = set(active)
    order = [k for k in lru if k not in fresh] + active[::-1]
    evicted = max(0, len(order) - capacity)
    return tuple(order[evicted:]), evicted


def _heaviest(weights: np.ndarray, limit: int) -> np.ndarray:
    """Positions of the ``limit`` largest weights, heaviest first; ties: the earlier position."""
    if len(weights) > limit:
        kth = -np.partition(-weights, limit - 1)[limit - 1]
        above = np.flatnonzero(weights > kth)
        ties = np.flatnonzero(weights == kth)[: limit - len(above)]
        candidates = np.sort(np.concatenate([above, ties]))
    else:
        candidates = np.arange(len(weights))
    return candidates[np.argsort(-weights[candidates], kind="stable")]


def _ranked(keys: pl.Series, weights: np.ndarray, limit: int) -> list[str]:
    """Distinct ``keys`` by summed weight, heaviest first, at most ``limit``:
    more active than the cap, the heaviest win this window."""
    if keys.n_unique() != len(keys):
        groups = group_rows(keys.to_frame())  # a rank only orders keys: a float sum is enough
        keys, weights = keys.gather(groups.first), np.bincount(groups.of_row, weights, minlength=len(groups))
    return keys.gather(_heaviest(weights, limit)).to_list()


def _outside(column: pl.Series, tracked: tuple[str, ...]) -> np.ndarray:
    return ~column.is_in(pl.Series(tracked, dtype=pl.String).implode()).to_numpy()


def cap(
    state: CapState,
    series: SeriesTable,
    *,
    max_queries_tracked: int,
    max_users_tracked: int,
    max_databases_tracked: int,
    slow_query_threshold_ms: float = 0.0,
) -> tuple[CapState, SeriesTable]:
    """Roll untracked and fast series into ``other``; return the new LRU state and series.

    ``series`` has one row per ``(database, user, fingerprint)``; so has the result, plus
    one ``other`` row per ``(database, operation)`` that anything was rolled into.
    """
    if series.height == 0:
        return state, series
    labels = series.labels
    calls, time = series.column("calls"), series.column("total_exec_time")
    active = pl.Series(calls > 0)
    weights = time[calls > 0]

    def ranked(column: str, limit: int) -> list[str]:
        return _ranked(labels.get_column(column).filter(active), weights, limit)

    databases, ev_d = _touch(state.databases, ranked("database", max_databases_tracked), max_databases_tracked)
    users, ev_u = _touch(state.users, ranked("user", max_users_tracked), max_users_tracked)
    queries, ev_q = _touch(state.queries, ranked("fingerprint", max_queries_tracked), max_queries_tracked)
    evictions = {"queries": state.evictions["queries"] + ev_q, "users": state.evictions["users"] + ev_u,
                 "databases": state.evictions["databases"] + ev_d}
    state = replace(state, queries=queries, users=users, databases=databases, evictions=evictions)

    rolled = _outside(labels.get_column("fingerprint"), queries)
    if slow_query_threshold_ms > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            rolled |= (calls == 0) | (time / np.where(calls == 0, 1, calls) < slow_query_threshold_ms)
    renamed = []
    for column, tracked in (("database", databases), ("user", users)):
        outside = _outside(labels.get_column(column), tracked)
        if outside.any():
            renamed.append(pl.when(pl.Series(outside)).then(pl.lit(OTHER)).otherwise(pl.col(column)).alias(column))
    if not rolled.any() and not renamed:
        return state, series  # the common case: every series tracked under its own name

    if renamed:
        labels = labels.with_columns(renamed)
    kept = SeriesTable(labels.filter(pl.Series(~rolled)), series.ints[~rolled], series.floats[~rolled])
    if renamed:  # two users (or databases) renamed into one: their series merge
        kept = sum_by(kept.labels, kept.ints, kept.floats, ["database", "user", "fingerprint", "operation"])
    others = sum_by(labels.filter(pl.Series(rolled)).select("database", "operation"), series.ints[rolled],
                    series.floats[rolled], ["database", "operation"])
    others_labels = others.labels.select(
        "database", pl.lit(None, pl.String).alias("user"), pl.lit(OTHER).alias("fingerprint"), "operation",
        pl.col("operation").alias("summary"), pl.lit(None, pl.String).alias("text"),
    )
    return state, SeriesTable(pl.concat([kept.labels, others_labels]), np.concatenate([kept.ints, others.ints]),
                              np.concatenate([kept.floats, others.floats]))
