"""Bounded cardinality: a keyed LRU of tracked fingerprints, users and databases per instance.

Applied once per closed window, so a series is either named or rolled up for a whole
window. A fingerprint is *active* in a window when its calls delta is > 0, or when sessions
were sampled running it (``sampled``: a long statement has no completed call in the windows
before its last, yet its wait time must carry its name); active ones are refreshed in the
LRU, heaviest (execution time plus sampled time) last, and when a new one arrives at the
cap the least recently active is evicted. Everything not tracked, and (with
``slow_query_threshold_ms``) every series whose mean time per call is under the threshold,
rolls into one ``other`` series per ``(database, user, operation, toplevel)``: the sum over
all exported series equals the sum of the deltas exactly, and so does the sum per database
and per user (untracked users and databases are themselves named ``other``, so the rollup
is bounded by the caps: at most databases x users x operations x 2 ``other`` series).
Nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from pgflow.ops.aggregate import SeriesTable, sum_by
from pgflow.ops.groups import columns, number, rows_where

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


def _ranked(names: pl.Series, hashes: np.ndarray, rows: np.ndarray, weights: np.ndarray, limit: int, distinct: bool = False) -> list[str]:
    """The distinct names of ``rows`` by summed weight, heaviest first (ties: first seen), at
    most ``limit``: more active than the cap, the heaviest win this window.

    Names are told apart by their 64-bit hash: two names sharing one would be ranked as one
    (the other then goes untracked, into ``other``: totals stay exact).
    """
    if not distinct:
        groups = number(hashes[rows])
        if len(groups) < len(rows):
            weights = np.bincount(groups.of_row, weights, minlength=len(groups))
            rows = rows[groups.first]
    return _names_at(names, rows[_heaviest(weights, limit)])


def _names_at(names: pl.Series, at: np.ndarray) -> list[str]:
    """``names.gather(at).to_list()`` for distinct positions ``at``: filtered in row order, then
    put in the order of ``at`` (a Series.gather goes through the query engine: ~0.1 ms)."""
    ordered = np.sort(at)
    keep = np.zeros(len(names), bool)
    keep[ordered] = True
    values = names.filter(pl.Series(keep, dtype=pl.Boolean)).to_list()
    return [values[i] for i in np.searchsorted(ordered, at)]


def _with_sampled(names: pl.Series, weights: np.ndarray, sampled: pl.DataFrame, limit: int) -> list[str]:
    """The active names and the sampled ones by summed weight (ms), heaviest first (ties: first
    seen, statements with calls before sampled ones), at most ``limit``."""
    both = pl.concat(
        [
            pl.DataFrame({"name": names.cast(pl.String), "w": pl.Series(weights, dtype=pl.Float64)}),
            sampled.select(pl.col("fingerprint").cast(pl.String).alias("name"), (pl.col("value").cast(pl.Float64) * 1000.0).alias("w")),
        ]
    )
    ranked = both.group_by("name", maintain_order=True).agg(pl.col("w").sum()).sort("w", descending=True, maintain_order=True).head(limit)
    return ranked.get_column("name").to_list()


def _tracked(labels: pl.DataFrame, lrus: dict[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    """Per column, which rows carry a tracked name (one pass for all columns)."""
    out = {}
    for c, lru in lrus.items():  # (a set per column: an is_in through the query engine costs ~0.3 ms)
        names = set(lru)
        values = labels.get_column(c).to_list()
        out[c] = np.fromiter((v in names for v in values), bool, len(values))  # a null is in none
    return out


def cap(
    state: CapState,
    series: SeriesTable,
    *,
    max_queries_tracked: int,
    max_users_tracked: int,
    max_databases_tracked: int,
    slow_query_threshold_ms: float = 0.0,
    sampled: pl.DataFrame | None = None,
) -> tuple[CapState, SeriesTable]:
    """Roll untracked and fast series into ``other``; return the new LRU state and series.

    ``series`` has one row per ``(database, user, fingerprint, toplevel)``; so has the result,
    plus one ``other`` row per ``(database, user, operation, toplevel)`` anything was rolled into.
    ``sampled`` (``fingerprint``, ``value``: session-seconds) are the window's sampled
    statements (:func:`pgflow.ops.activity.sampled`): they compete for a name like statements
    with calls, weighted by their sampled time.
    """
    sampled = sampled if sampled is not None and sampled.height else None
    if series.height == 0 and sampled is None:
        return state, series
    labels = series.labels
    calls, time = series.column("calls"), series.column("total_exec_time")
    active = np.flatnonzero(calls > 0)
    weights = time[active]
    # Each column's hash, as ``pl.col(c).hash()`` gives it (a one-column hash_rows is that hash, no query engine)
    hashes = {c: pl.DataFrame([labels.get_column(c)]).hash_rows().to_numpy() for c in ("database", "user", "fingerprint")}
    distinct = labels.get_column("fingerprint").n_unique() == labels.height  # the common case

    def touch(lru: tuple[str, ...], column: str, limit: int) -> tuple[tuple[str, ...], int]:
        ranked = _ranked(labels.get_column(column), hashes[column], active, weights, limit, distinct=column == "fingerprint" and distinct)
        return _touch(lru, ranked, limit)

    databases, ev_d = touch(state.databases, "database", max_databases_tracked)
    users, ev_u = touch(state.users, "user", max_users_tracked)
    if sampled is None:
        queries, ev_q = touch(state.queries, "fingerprint", max_queries_tracked)
    else:
        queries, ev_q = _touch(
            state.queries,
            _with_sampled(labels.get_column("fingerprint").gather(active), weights, sampled, max_queries_tracked),
            max_queries_tracked,
        )
    evictions = {
        "queries": state.evictions["queries"] + ev_q,
        "users": state.evictions["users"] + ev_u,
        "databases": state.evictions["databases"] + ev_d,
    }
    state = replace(state, queries=queries, users=users, databases=databases, evictions=evictions)

    tracked = _tracked(labels, {"fingerprint": queries, "database": databases, "user": users})
    rolled = ~tracked["fingerprint"]
    if slow_query_threshold_ms > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            rolled |= (calls == 0) | (time / np.where(calls == 0, 1, calls) < slow_query_threshold_ms)
    renamed = [
        pl.when(pl.Series(tracked[c])).then(pl.col(c)).otherwise(pl.lit(OTHER)).alias(c)
        for c in ("database", "user")
        if not tracked[c].all()
    ]
    if not rolled.any() and not renamed:
        return state, series  # the common case: every series tracked under its own name

    if renamed:
        labels = labels.with_columns_seq(renamed)
    kept = SeriesTable(rows_where(labels, ~rolled), series.ints[~rolled], series.floats[~rolled])
    if renamed:  # two users (or databases) renamed into one: their series merge
        kept = sum_by(kept.labels, kept.ints, kept.floats, ["database", "user", "fingerprint", "toplevel", "operation"])
    rollup = ["database", "user", "operation", "toplevel"]
    others = sum_by(rows_where(columns(labels, rollup), rolled), series.ints[rolled], series.floats[rolled], rollup)
    others_labels = others.labels.select_seq(
        "database",
        "user",
        pl.lit(OTHER).alias("fingerprint"),
        "toplevel",
        "operation",
        pl.col("operation").alias("summary"),
        pl.lit(None, pl.String).alias("text"),
    )
    return state, SeriesTable(
        pl.concat([kept.labels, others_labels]), np.concatenate([kept.ints, others.ints]), np.concatenate([kept.floats, others.floats])
    )


def track(lru: tuple[str, ...], rankings: list[list[str]], quotas: list[int], capacity: int) -> tuple[tuple[str, ...], int]:
    """The LRU step for a dimension ranked by several criteria (issue 13: tables by activity and risk).

    Takes the first ``quotas[i]`` names of each ranking (most important ranking first, each
    heaviest first), refreshes them in the LRU like one window's active names, and evicts past
    ``capacity``: names stay tracked until newcomers push them out.
    """
    chosen: list[str] = []
    seen: set[str] = set()
    for ranking, quota in zip(rankings, quotas):
        for name in ranking[:quota]:
            if name not in seen:
                seen.add(name)
                chosen.append(name)
    # Below capacity (first windows, few candidates): top up from the rankings, round robin,
    # so that as many names as the cap allows are tracked; names already tracked keep their place.
    tracked = set(lru)
    room = capacity - len(tracked | seen)
    depth = 0
    while room > 0 and any(q + depth < len(r) for r, q in zip(rankings, quotas)):
        for ranking, quota in zip(rankings, quotas):
            extra = ranking[quota + depth] if quota + depth < len(ranking) else None
            if extra is not None and extra not in seen and extra not in tracked and room > 0:
                seen.add(extra)
                chosen.append(extra)
                room -= 1
        depth += 1
    return _touch(lru, chosen[:capacity], capacity)
