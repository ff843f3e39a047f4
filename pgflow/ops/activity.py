"""Active-session samples to points: session-seconds by wait event and query, blocking, ages.

Pure (polars in, polars out). Each snapshot's ``samples`` and ``session_stats`` frames go to
the export window that contains the snapshot (the same window as its deltas,
``window.window_bounds``); when the pipeline closes that window, :func:`close` turns them into:

- ``postgresql.activity.time`` (DELTA sum, s): samples x period, by database, user, backend
  type, session state, wait event type and name, and fingerprint. AAS = value / window length.
- ``postgresql.blocking.time`` (DELTA sum, s): session-seconds spent blocked, by the root
  blocker's state and statement fingerprint.
- gauges: ``postgresql.blocking.root.count``, ``postgresql.blocking.chain.depth.max`` (by
  database, max over the window, 0 where nothing blocked), ``postgresql.transaction.age.max``
  and ``postgresql.backend_xmin.age.max`` (by database and state, max over the window).

Names of statements: ``query_id`` with the session's (datid, usesysid) is pg_stat_statements'
(dbid, userid, queryid), looked up in the labelled rows the delta step holds (every entry of
the last scrape, whether it ran in the window or not; an entry pg_stat_statements shows under
another database or user names the query id too). The cap's set of tracked fingerprints
decides the name: a window's sampled statements compete for it like statements with calls
(:func:`sampled`, passed to :func:`pgflow.ops.cap.cap` before :func:`close`), so a long
statement carries its own name in every window it spans, not only in the one where its call
completes; a fingerprint the cap rolls into ``other`` for the query metrics is ``other`` here
too. pgflow also remembers what it has seen of a query id (``ActivityState.seen``): the
fingerprint of a query sample's text (read while the statement runs, before
pg_stat_statements shows it) and the names pg_stat_statements gave sampled query ids (kept after
a reset or an eviction). A query id nothing knows yet (pg_stat_statements shows an entry only
once it has been planned, with ``track_planning``, or executed; no query sample read its text),
PostgreSQL 13 (no query_id) and statements without one are ``unknown``. Nothing is dropped: renaming never changes a total.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from pgflow.ops.cap import OTHER, CapState
from pgflow.ops.points import attributes
from pgflow.ops.window import Window, window_bounds
from pgflow.schema import POINTS, SAMPLES, SESSION_STATS, UTC_TS, Snapshot

UNKNOWN = "unknown"
CPU = "CPU"

_GAUGES = {  # session_stats.stat -> (metric, unit, by state)
    "root_count": ("postgresql.blocking.root.count", "{session}", False),
    "chain_depth_max": ("postgresql.blocking.chain.depth.max", "{session}", False),
    "xact_age_max": ("postgresql.transaction.age.max", "s", True),
    "xmin_age_max": ("postgresql.backend_xmin.age.max", "{transaction}", True),
}

_NO_STATS = pl.DataFrame(schema={name: dtype for name, dtype in SESSION_STATS.items() if name != "stat"})  # a gauge nothing reported


@dataclass(frozen=True)
class Pending:
    """One window's samples so far (frames appended scrape by scrape, concatenated at close)."""

    samples: tuple[pl.DataFrame, ...] = ()
    stats: tuple[pl.DataFrame, ...] = ()


SEEN_MAX = 10_000  # query ids remembered (most recent): a few hundred kB at most


@dataclass(frozen=True)
class ActivityState:
    open: dict[datetime, Pending] = field(default_factory=dict)
    # query id -> fingerprint pgflow has seen: from query samples (the statement's text, read while
    # it runs) and from pg_stat_statements' entries of sampled sessions (kept after the entry goes)
    seen: dict[int, str] = field(default_factory=dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("seen", {})  # a ledger written before issue 19 has none
        self.__dict__.update(state)


def _seen(state: ActivityState) -> dict[int, str]:
    seen: dict[int, str] | None = getattr(state, "seen", None)  # states pickled before issue 19 lack it
    return seen or {}


def _remember(state: ActivityState, pairs: pl.DataFrame) -> ActivityState:
    """``state`` with (query_id, fingerprint) ``pairs`` remembered, the most recent SEEN_MAX kept."""
    seen = _seen(state)
    fresh = [(q, f) for q, f in pairs.unique(maintain_order=True).iter_rows() if seen.get(q) != f]
    if not fresh:
        return state
    merged = {q: f for q, f in seen.items() if q not in {q for q, _ in fresh}}
    merged.update(fresh)
    if len(merged) > SEEN_MAX:
        merged = dict(list(merged.items())[-SEEN_MAX:])
    return replace(state, seen=merged)


def _from_query_samples(snapshot: Snapshot) -> pl.DataFrame | None:
    """(query_id, fingerprint) of the snapshot's query samples whose text named the statement
    (not truncated, parsed, one statement): the metrics' key once its call completes."""
    qs: pl.DataFrame | None = getattr(snapshot, "query_samples", None)
    if qs is None or not qs.height:
        return None
    c = pl.col
    return qs.filter(
        c("query_id").is_not_null()
        & c("fingerprint").is_not_null()
        & (c("fingerprint") != UNKNOWN)
        & ~c("truncated").fill_null(False)
        & ~c("unparsable").fill_null(False)
    ).select(c("query_id").cast(pl.Int64), c("fingerprint").cast(pl.String))


def add(state: ActivityState, snapshot: Snapshot, length: timedelta) -> ActivityState:
    """Put one snapshot's samples into the window that contains its end (as window.add does)."""
    named = _from_query_samples(snapshot)
    if named is not None and named.height:
        state = _remember(state, named)
    samples, stats = snapshot.samples, snapshot.session_stats
    if not samples.height and not stats.height:
        return state
    _, end = window_bounds(snapshot.scraped_at, length)
    pending = state.open.get(end) or Pending()
    pending = Pending(pending.samples + ((samples,) if samples.height else ()), pending.stats + ((stats,) if stats.height else ()))
    return replace(state, open={**state.open, end: pending})


def fingerprints(labels: pl.DataFrame | None) -> pl.DataFrame:
    """(dbid, userid, queryid) -> fingerprint from the delta step's labelled rows (top level first)."""
    schema = {"dbid": pl.Int64, "userid": pl.Int64, "queryid": pl.Int64, "fingerprint": pl.String}
    if labels is None or "fingerprint" not in labels.columns or not labels.height:
        return pl.DataFrame(schema=schema)
    return (
        labels.select("dbid", "userid", "queryid", "fingerprint", "toplevel")
        .sort("toplevel", descending=True, maintain_order=True, nulls_last=True)
        .unique(["dbid", "userid", "queryid"], keep="first", maintain_order=True)
        .select(list(schema))
    )


def by_query_id(known: pl.DataFrame) -> pl.DataFrame:
    """queryid -> fingerprint whatever the database and user: a statement another role (or
    database) ran before has the same query id, and pg_stat_statements shows a new entry only
    once it is planned or has run. Several fingerprints for one query id: the smallest, so
    every path and every arrival order names it alike."""
    return known.filter(pl.col("fingerprint").is_not_null()).group_by("queryid").agg(pl.col("fingerprint").min().alias("any_fingerprint"))


def _lookup(frame: pl.DataFrame, known: pl.DataFrame, seen: dict[int, str] | None = None) -> pl.DataFrame:
    """``frame`` (dbid, userid, query_id) with the statement's ``fingerprint`` (null: nothing knows
    it): pg_stat_statements' entry for the session's database and user, else any entry of the
    query id, else what pgflow has seen of it."""
    joined = frame.join(
        known, left_on=["dbid", "userid", "query_id"], right_on=["dbid", "userid", "queryid"], how="left", maintain_order="left"
    )
    if not joined.get_column("fingerprint").has_nulls():
        return joined
    joined = joined.join(by_query_id(known), left_on="query_id", right_on="queryid", how="left", maintain_order="left")
    joined = joined.with_columns(pl.coalesce("fingerprint", "any_fingerprint").alias("fingerprint")).drop("any_fingerprint")
    if not seen or not joined.get_column("fingerprint").has_nulls():
        return joined
    remembered = pl.DataFrame(
        {"query_id": list(seen), "seen_fingerprint": list(seen.values())}, schema={"query_id": pl.Int64, "seen_fingerprint": pl.String}
    )
    joined = joined.join(remembered, on="query_id", how="left", maintain_order="left")
    return joined.with_columns(pl.coalesce("fingerprint", "seen_fingerprint").alias("fingerprint")).drop("seen_fingerprint")


def sampled(state: ActivityState, window: Window, labels: pl.DataFrame | None) -> pl.DataFrame:
    """The statements sampled in ``window`` (``fingerprint``, ``value``: session-seconds, running
    or blocking others), for the cap: a statement that ran (or held a lock) through the window
    competes for a name there like one whose calls completed in it."""
    out = pl.DataFrame(schema={"fingerprint": pl.String, "value": pl.Float64})
    pending = state.open.get(window.period)
    if pending is None:
        return out
    c = pl.col
    frames = []
    if pending.samples:
        samples = pl.concat(pending.samples).cast(SAMPLES)
        frames.append(samples.select("dbid", "userid", "query_id", (c("count") * c("period_secs")).alias("value")))
    if pending.stats:
        stats = pl.concat(pending.stats).cast(SESSION_STATS)
        frames.append(stats.filter(c("stat") == "blocked_secs").select("dbid", "userid", "query_id", "value"))
    frames = [f for f in frames if f.height]
    if not frames:
        return out  # (before naming anything: the labels' fingerprints cost ~1 ms to gather)
    named = _lookup(pl.concat(frames, how="vertical_relaxed"), fingerprints(labels), _seen(state)).filter(c("fingerprint").is_not_null())
    return named.group_by("fingerprint", maintain_order=True).agg(c("value").cast(pl.Float64).sum())


def _named(frame: pl.DataFrame, known: pl.DataFrame, tracked: tuple[str, ...], seen: dict[int, str] | None = None) -> pl.DataFrame:
    """``frame`` (dbid, userid, query_id) with ``fingerprint``: tracked, ``other`` or ``unknown``."""
    joined = _lookup(frame, known, seen)
    is_tracked = pl.col("fingerprint").is_in(pl.Series(tracked, dtype=pl.String).implode())
    return joined.with_columns(
        pl.when(pl.col("fingerprint").is_null())
        .then(pl.lit(UNKNOWN))
        .when(is_tracked)
        .then(pl.col("fingerprint"))
        .otherwise(pl.lit(OTHER))
        .alias("fingerprint")
    )


def _fit(names: pl.Series, lru: tuple[str, ...], capacity: int) -> bool:
    """Whether every name of ``names`` keeps its own (the tracked ones, and the others fit the room left)."""
    untracked = names.filter(names.is_not_null() & ~names.is_in(pl.Series(lru, dtype=pl.String).implode()))
    return untracked.n_unique() <= capacity - len(lru)


def _bounded(frame: pl.DataFrame, column: str, lru: tuple[str, ...], capacity: int) -> pl.DataFrame:
    """Names the cap tracks keep; others keep theirs while the cap has room, heaviest first; the rest ``other``."""
    room = capacity - len(lru)
    if _fit(frame.get_column(column), lru, capacity):
        return frame  # the common case: every name fits
    untracked = frame.filter(pl.col(column).is_not_null() & ~pl.col(column).is_in(pl.Series(lru, dtype=pl.String).implode()))
    extra = (
        untracked.group_by(column, maintain_order=True)
        .agg(pl.col("value").sum())
        .sort("value", descending=True, maintain_order=True)
        .head(max(0, room))
        .get_column(column)
    )
    keep = pl.Series([*lru, *extra.to_list()], dtype=pl.String)
    return frame.with_columns(
        pl.when(pl.col(column).is_null() | pl.col(column).is_in(keep.implode())).then(pl.col(column)).otherwise(pl.lit(OTHER)).alias(column)
    )


def _frame(
    window: Window,
    metric: str | pl.Expr,
    unit: str | pl.Expr,
    kind: str,
    rows: pl.DataFrame,
    attrs: Mapping[str, pl.Expr | str],
    start: datetime,
    end: datetime,
) -> pl.DataFrame:
    """``rows`` (``value`` and the attributes' columns) as points; ``metric`` and ``unit`` are
    constants, or expressions when one frame carries several metrics."""
    r = window.resource
    metric, unit = (pl.lit(v) if isinstance(v, str) else v for v in (metric, unit))
    return rows.select(
        pl.lit(r.instance).alias("instance"),
        metric.alias("metric"),
        pl.lit(kind).alias("kind"),
        unit.alias("unit"),
        pl.lit(kind == "sum").alias("monotonic"),
        pl.lit(start, UTC_TS).alias("start"),
        pl.lit(end, UTC_TS).alias("end"),
        pl.col("value").cast(pl.Float64),
        (unit != "s").alias("is_int"),
        attributes(attrs).alias("attributes"),
        pl.lit(r.server_address).alias("server_address"),
        pl.lit(r.server_port, pl.Int32).alias("server_port"),
        pl.lit(r.server_version_num, pl.Int32).alias("server_version_num"),
    )


def close(
    state: ActivityState, window: Window, cap: CapState, labels: pl.DataFrame | None, *, max_users_tracked: int, max_databases_tracked: int
) -> tuple[ActivityState, pl.DataFrame | None]:
    """The points of ``window``'s samples (None without any), and the state without them."""
    period = window.period  # ``window.end`` is earlier when the window closed early (shutdown)
    pending = state.open.get(period)
    if pending is None:
        return state, None
    state = replace(state, open={e: p for e, p in state.open.items() if e != period})
    seen = _seen(state)
    ids = [f.get_column("query_id") for f in (*pending.samples, *pending.stats) if f.get_column("query_id").null_count() < f.height]
    # Only a window that sampled statements needs their names: one with nothing but session
    # gauges (every window of an idle server) skips gathering the labels' fingerprints (~1 ms).
    known = fingerprints(labels) if ids else fingerprints(None)
    if known.height:  # remember what pg_stat_statements names of the sampled query ids (a reset may drop it)
        sampled_ids = pl.DataFrame({"query_id": pl.concat([i.cast(pl.Int64) for i in ids])})
        state = _remember(
            state,
            by_query_id(known)
            .join(sampled_ids.unique(), left_on="queryid", right_on="query_id", how="semi")
            .select("queryid", "any_fingerprint")
            .sort("queryid"),
        )
    out = []
    system = {"db.system.name": "postgresql"}
    c = pl.col
    if pending.samples:
        samples = pl.concat(pending.samples).cast(SAMPLES)
        named = _named(samples.with_columns((c("count") * c("period_secs")).alias("value")), known, cap.queries, seen)
        named = _bounded(named, "database", cap.databases, max_databases_tracked)
        named = _bounded(named, "user", cap.users, max_users_tracked)
        key = ["database", "user", "backend_type", "state", "wait_event_type", "wait_event", "fingerprint", "source"]
        summed = named.group_by(key, maintain_order=True).agg(c("value").sum())
        out.append(
            _frame(
                window,
                "postgresql.activity.time",
                "s",
                "sum",
                summed,
                {
                    **system,
                    "db.namespace": c("database"),
                    "user.name": c("user"),
                    "postgresql.backend.type": c("backend_type"),
                    "postgresql.session.state": c("state"),
                    "postgresql.wait_event.type": c("wait_event_type"),
                    "postgresql.wait_event.name": c("wait_event"),
                    "postgresql.query.fingerprint": c("fingerprint"),
                    "postgresql.wait.source": c("source"),
                },
                window.start,
                window.end,
            )
        )
    if pending.stats:
        stats = pl.concat(pending.stats).cast(SESSION_STATS)
        blocked = stats.filter(c("stat") == "blocked_secs")
        if blocked.height:
            named = _bounded(_named(blocked, known, cap.queries, seen), "database", cap.databases, max_databases_tracked)
            summed = named.group_by(["database", "state", "fingerprint"], maintain_order=True).agg(c("value").sum())
            out.append(
                _frame(
                    window,
                    "postgresql.blocking.time",
                    "s",
                    "sum",
                    summed,
                    {
                        **system,
                        "db.namespace": c("database"),
                        "postgresql.blocking.root.state": c("state"),
                        "postgresql.query.fingerprint": c("fingerprint"),
                    },
                    window.start,
                    window.end,
                )
            )
        at = window.gauges.observed_at if window.gauges is not None else window.end
        databases = window.gauges.databases if window.gauges is not None else []
        by_stat = stats.partition_by("stat", as_dict=True, include_key=False)
        # When the window's databases all fit the cap, so do each gauge's (a subset of names that
        # fit fits too): one check for the four gauges, not one per gauge (issue 20).
        fits = _fit(pl.concat([stats.get_column("database"), pl.Series(databases, dtype=pl.String)]), cap.databases, max_databases_tracked)
        gauges = []
        for stat, (metric, unit, by_state) in _GAUGES.items():
            rows = by_stat.get((stat,), _NO_STATS)
            if not by_state:  # every database, 0 where nothing was blocked
                zeros = pl.DataFrame(
                    {"database": databases, "value": [0.0] * len(databases)}, schema={"database": pl.String, "value": pl.Float64}
                )
                rows = pl.concat([rows.select("database", "value"), zeros])
                rows = rows if fits else _bounded(rows, "database", cap.databases, max_databases_tracked)
                rows = rows.group_by("database", maintain_order=True).agg(c("value").max())
            else:
                rows = rows.select("database", "state", "value")
                rows = rows if fits else _bounded(rows, "database", cap.databases, max_databases_tracked)
                rows = rows.group_by(["database", "state"], maintain_order=True).agg(c("value").max())
            if rows.height:
                state_column = c("state") if by_state else pl.lit(None, pl.String).alias("state")
                gauges.append(rows.select("database", state_column, "value", pl.lit(metric).alias("metric"), pl.lit(unit).alias("unit")))
        if gauges:  # one frame for the four gauges (a state is null where a gauge has none, as in every points frame)
            attrs = {"db.namespace": c("database"), "postgresql.session.state": c("state")}
            out.append(_frame(window, c("metric"), c("unit"), "gauge", pl.concat(gauges), attrs, at, at))
    if not out:
        return state, None
    return state, pl.concat(out, how="vertical_relaxed").cast(POINTS)


__all__ = ["ActivityState", "add", "by_query_id", "close", "fingerprints", "sampled", "UNKNOWN", "CPU"]
