"""Server health: per-database and instance-level statistics to window sums and gauges.

Pure (frames in, points out). Per-database counters arrive already diffed by the delta
operator (``Deltas.databases``, reset-aware on each database's ``stats_reset``); the
instance groups' cumulative counters (checkpointer, bgwriter, WAL, I/O, archiver) are diffed
here with the same rules and the same code (``delta._diff``): a counter that went down or a
``stats_reset`` that moved (``pg_stat_reset_shared``) means the current value is the delta,
so nothing is negative and nothing is counted twice. A group is diffed against the last
scrape that read it (``Snapshot.health_scraped``), so each group keeps its own cadence.

Deltas are summed per window (the same aligned windows as the query series); gauges keep
the last observation in the window. Names, units and attributes follow the OpenTelemetry
postgresqlreceiver where it has the metric (``RECEIVER_METRICS``); the rest are pgflow's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from pgflow.ops.delta import Counters, Deltas, _diff, _positions
from pgflow.ops.points import points_frame, timestamps
from pgflow.ops.window import Resource, window_bounds
from pgflow.schema import (
    ATTRIBUTES,
    BGWRITER,
    CHECKPOINTER,
    DATABASE_COUNTERS,
    DATABASE_TIME_COUNTERS,
    IO_INT_COUNTERS,
    IO_TIME_COUNTERS,
    POINTS,
    WAL,
    Snapshot,
)


@dataclass(frozen=True)
class CounterGroup:
    """An instance group whose counters are cumulative: rows by ``key``, reset by ``stats_reset``."""

    key: tuple[str, ...]
    ints: tuple[str, ...]
    floats: tuple[str, ...]


def _counters_of(schema: pl.Schema, key: tuple[str, ...] = ()) -> CounterGroup:
    ints = tuple(c for c, t in schema.items() if t == pl.Int64 and c not in key)
    floats = tuple(c for c, t in schema.items() if t == pl.Float64 and c not in key)
    return CounterGroup(key, ints, floats)


COUNTER_GROUPS = {
    "checkpointer": _counters_of(CHECKPOINTER),
    "bgwriter": _counters_of(BGWRITER),
    "wal": _counters_of(WAL),
    "io": CounterGroup(("backend_type", "object", "context"), IO_INT_COUNTERS, IO_TIME_COUNTERS),
    "archiver": CounterGroup((), ("archived_count", "failed_count"), ()),
}
_NO_POINTS = pl.DataFrame(schema=POINTS)  # built once: an empty frame with a struct column costs ~1 ms
GAUGE_FRAMES = ("database_sizes", "archiver", "replication", "replication_slots", "wal_receiver")
_DB_KEY = ("database",)


@dataclass(frozen=True)
class HealthWindow:
    """One window's health: summed deltas per source, and the last observation of each gauge source."""

    resource: Resource
    start: datetime
    end: datetime
    # source -> deltas per scrape (frames; for "databases", the delta operator's rows and counters)
    sums: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    gauges: dict[str, tuple[datetime, pl.DataFrame]] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthState:
    """Baselines of the instance counter groups and the open windows (small, picklable)."""

    length: timedelta
    baselines: dict[str, tuple[pl.DataFrame, Counters]] = field(default_factory=dict)
    open: dict[datetime, HealthWindow] = field(default_factory=dict)


def initial(length: timedelta) -> HealthState:
    return HealthState(length)


# Diffing -------------------------------------------------------------------------------------


def _group_deltas(
    group: CounterGroup, frame: pl.DataFrame, baseline: tuple[pl.DataFrame, Counters] | None
) -> tuple[tuple[pl.DataFrame, Counters], pl.DataFrame | None]:
    """The new baseline and the deltas of one scraped group (None: this is its baseline)."""
    keys = frame.select(group.key) if group.key else pl.DataFrame({"__row": np.arange(frame.height)})
    counters = Counters.of(frame, group.ints, group.floats, "stats_reset")
    if baseline is None:
        return (keys, counters), None
    prev_keys, prev = baseline
    if not group.key and prev_keys.height != keys.height:
        return (keys, counters), None
    at = _positions(keys, prev_keys, list(keys.columns))
    d = _diff(counters, prev, at, False)
    out = pl.concat(
        [
            keys,
            pl.from_numpy(d.ints, schema=list(group.ints), orient="row"),
            pl.from_numpy(d.floats, schema=list(group.floats), orient="row"),
        ],
        how="horizontal",
    )
    return (keys, counters), out.drop("__row", strict=False)


def _database_frame(rows: pl.DataFrame, counters: Counters) -> pl.DataFrame:
    """Per-database deltas as a frame; built when the window closes, not on every scrape."""
    return pl.concat(
        [
            rows.drop("datid"),
            pl.from_numpy(counters.ints, schema=list(DATABASE_COUNTERS), orient="row"),
            pl.from_numpy(counters.floats, schema=list(DATABASE_TIME_COUNTERS), orient="row"),
        ],
        how="horizontal",
    )


# The operator ---------------------------------------------------------------------------------


def step(
    state: HealthState, snapshot: Snapshot, deltas: Deltas | None, *, closed_until: datetime | None = None
) -> tuple[HealthState, pl.DataFrame]:
    """Feed one snapshot (and its per-database deltas); return the points of windows it closed.

    ``closed_until``: where the query windows' last closed window ended (window.WindowState):
    after a restart inside a period, this period's window starts there, as theirs does.
    """
    due = sorted(end for end in state.open if end <= snapshot.scraped_at)
    out = [window_points(state.open[end]) for end in due]
    open_ = {e: w for e, w in state.open.items() if e > snapshot.scraped_at}

    baselines = dict(state.baselines)
    sums: dict[str, object] = {}
    if deltas is not None and deltas.database_rows.height:
        sums["databases"] = (deltas.database_rows, deltas.database_counters)
    scraped = {name for name in snapshot.health_scraped}
    for name, group in COUNTER_GROUPS.items():
        if name not in scraped:
            continue
        baselines[name], d = _group_deltas(group, getattr(snapshot, name), baselines.get(name))
        if d is not None and d.height:
            sums[name] = d
    gauges = {"databases": (snapshot.scraped_at, snapshot.databases)}
    for name in GAUGE_FRAMES:
        scrape_group = "db_size" if name == "database_sizes" else name
        if scrape_group in scraped:
            gauges[name] = (snapshot.scraped_at, getattr(snapshot, name))

    start, end = window_bounds(snapshot.scraped_at, state.length)
    if closed_until is not None and start < closed_until < end:
        start = closed_until  # the first part of this period was exported before a restart
    current = open_.get(end) or HealthWindow(Resource.of(snapshot), start, end)
    merged = dict(current.sums)
    for name, frame in sums.items():
        merged[name] = (*merged.get(name, ()), frame)
    open_[end] = replace(current, resource=Resource.of(snapshot), sums=merged, gauges={**current.gauges, **gauges})
    frames = [f for f in out if f.height]
    return HealthState(state.length, baselines, open_), (pl.concat(frames) if frames else _NO_POINTS)


def finish(state: HealthState) -> tuple[HealthState, pl.DataFrame]:
    """Close every open window (end of stream); each ends at its last scrape, as window.close_all does."""
    frames = [f for f in (window_points(_early(state.open[end])) for end in sorted(state.open)) if f.height]
    return replace(state, open={}), (pl.concat(frames) if frames else _NO_POINTS)


def _early(window: HealthWindow) -> HealthWindow:
    """A window closed before its end holds what was observed until its last scrape."""
    seen = [at for at, _ in window.gauges.values()]
    if not seen:
        return window
    return replace(window, end=min(window.end, max(max(seen), window.start + timedelta(microseconds=1))))


def without_baselines(state: HealthState) -> HealthState:
    """Forget every counter baseline: the server behind the instance changed (another history)."""
    return replace(state, baselines={})


# Points ----------------------------------------------------------------------------------------

# Metrics whose name, unit and attributes are the OpenTelemetry postgresqlreceiver's.
RECEIVER_METRICS = frozenset(
    {
        "postgresql.commits",
        "postgresql.rollbacks",
        "postgresql.blks_hit",
        "postgresql.blks_read",
        "postgresql.tup_returned",
        "postgresql.tup_fetched",
        "postgresql.tup_inserted",
        "postgresql.tup_updated",
        "postgresql.tup_deleted",
        "postgresql.deadlocks",
        "postgresql.temp_files",
        "postgresql.temp.io",
        "postgresql.query.conflicts",
        "postgresql.db_size",
        "postgresql.backends",
        "postgresql.bgwriter.checkpoint.count",
        "postgresql.bgwriter.duration",
        "postgresql.bgwriter.buffers.writes",
        "postgresql.bgwriter.buffers.allocated",
        "postgresql.bgwriter.maxwritten",
        "postgresql.wal.age",
        "postgresql.replication.data_delay",
        "postgresql.wal.delay",
    }
)

_DATABASE_SUMS = (  # metric, unit, column (pg_stat_database)
    ("postgresql.commits", "1", "xact_commit"),
    ("postgresql.rollbacks", "1", "xact_rollback"),
    ("postgresql.blks_hit", "{blks_hit}", "blks_hit"),
    ("postgresql.blks_read", "{blks_read}", "blks_read"),
    ("postgresql.tup_returned", "{tup_returned}", "tup_returned"),
    ("postgresql.tup_fetched", "{tup_fetched}", "tup_fetched"),
    ("postgresql.tup_inserted", "{tup_inserted}", "tup_inserted"),
    ("postgresql.tup_updated", "{tup_updated}", "tup_updated"),
    ("postgresql.tup_deleted", "{tup_deleted}", "tup_deleted"),
    ("postgresql.deadlocks", "{deadlock}", "deadlocks"),
    ("postgresql.temp_files", "{temp_file}", "temp_files"),
    ("postgresql.temp.io", "By", "temp_bytes"),
)
assert all(c in DATABASE_COUNTERS for _, _, c in _DATABASE_SUMS)
_CONFLICT_TYPES = ("tablespace", "lock", "snapshot", "bufferpin", "deadlock")
_SESSION_TIMES = (
    ("postgresql.session.time", "session_time"),
    ("postgresql.session.active.time", "active_time"),
    ("postgresql.session.idle_in_transaction.time", "idle_in_transaction_time"),
)
assert all(c in DATABASE_TIME_COUNTERS for _, c in _SESSION_TIMES)
_IO_OPS = {
    "reads": "read",
    "writes": "write",
    "writebacks": "writeback",
    "extends": "extend",
    "hits": "hit",
    "evictions": "eviction",
    "reuses": "reuse",
    "fsyncs": "fsync",
}
_IO_TIMES = {"read_time": "read", "write_time": "write", "writeback_time": "writeback", "extend_time": "extend", "fsync_time": "fsync"}


class _Out:
    """Collects one window's points (a window has tens of them) into the POINTS schema.

    ``add`` only notes what to compute; :meth:`frame` evaluates every expression on one source
    frame in a single select (issue 20: one select per ``add`` was most of a window's cost),
    then lays the points out in the order they were added, row by row.
    """

    def __init__(self, window: HealthWindow) -> None:
        self.window = window
        self.columns: dict[str, list[Any]] = {k: [] for k in ("metric", "kind", "unit", "start", "end", "value", "is_int", "attributes")}
        self._jobs: list[tuple[pl.DataFrame, str, str, pl.Expr, Mapping[str, pl.Expr | str], str, bool, datetime | None, bool]] = []

    def add(
        self,
        rows: pl.DataFrame,
        metric: str,
        unit: str,
        value: pl.Expr,
        *,
        attrs: Mapping[str, pl.Expr | str] | None = None,
        kind: str = "sum",
        is_int: bool = True,
        at: datetime | None = None,
        nonzero: bool = False,
    ) -> None:
        if rows.height == 0:
            return
        self._jobs.append((rows, metric, unit, value, attrs or {}, kind, is_int, at, nonzero))

    def _evaluate(self) -> None:
        """Every noted ``add``: one select per source frame, points laid out in ``add`` order."""
        exprs: dict[int, list[pl.Expr]] = {}
        frames: dict[int, pl.DataFrame] = {}
        names = []
        # An attribute's column is evaluated once per source frame however many points carry it (the
        # same expression object: ``db`` in window_points), a constant one not at all (issue 20).
        evaluated: dict[tuple[int, int], str] = {}
        sources: list[list[str | None]] = []
        for j, (rows, _, _, value, attrs, *_rest) in enumerate(self._jobs):
            group = exprs.setdefault(id(rows), [])
            frames[id(rows)] = rows
            group.append(value.cast(pl.Float64).alias(f"__v{j}"))
            source: list[str | None] = []
            for v in attrs.values():
                if isinstance(v, str):
                    source.append(None)  # pl.lit(v).cast(pl.String) is v on every row
                    continue
                name = evaluated.get((id(rows), id(v)))
                if name is None:
                    name = evaluated[(id(rows), id(v))] = f"__a{len(evaluated)}"
                    group.append(v.cast(pl.String).alias(name))
                source.append(name)
            sources.append(source)
            names.append(id(rows))
        results = {key: frames[key].select_seq(group) for key, group in exprs.items()}
        cols = self.columns
        for j, (_, metric, unit, _, attrs, kind, is_int, at, nonzero) in enumerate(self._jobs):
            result = results[names[j]]
            start, end = (self.window.start, self.window.end) if kind == "sum" else (at, at)
            keys = list(attrs)
            values = result.get_column(f"__v{j}").to_list()
            labels = [
                result.get_column(name).to_list() if name is not None else [attrs[k]] * len(values) for k, name in zip(keys, sources[j])
            ]
            for r, v in enumerate(values):
                if v is None or not np.isfinite(v) or (nonzero and v == 0):
                    continue
                cols["metric"].append(metric)
                cols["kind"].append(kind)
                cols["unit"].append(unit)
                cols["start"].append(start)
                cols["end"].append(end)
                cols["value"].append(v)
                cols["is_int"].append(is_int)
                cols["attributes"].append({k: labels[i][r] for i, k in enumerate(keys)})
        self._jobs = []

    def frame(self) -> pl.DataFrame:
        self._evaluate()
        cols, r = self.columns, self.window.resource
        n = len(cols["value"])
        if n == 0:
            return _NO_POINTS
        # Issue 20: built from the columns (a frame of Python datetimes and a select of literals: ~0.5 ms a window)
        columns = {
            "metric": pl.Series("metric", cols["metric"], dtype=pl.String),
            "kind": pl.Series("kind", cols["kind"], dtype=pl.String),
            "unit": pl.Series("unit", cols["unit"], dtype=pl.String),
            "monotonic": pl.Series("monotonic", [k == "sum" for k in cols["kind"]], dtype=pl.Boolean),
            "value": pl.Series("value", cols["value"], dtype=pl.Float64),
            "is_int": pl.Series("is_int", cols["is_int"], dtype=pl.Boolean),
            "attributes": pl.Series("attributes", cols["attributes"], dtype=ATTRIBUTES),
        }
        return points_frame(r, "", timestamps("start", cols["start"]), timestamps("end", cols["end"]), columns)


def _summed(parts: tuple[pl.DataFrame, ...], key: tuple[str, ...]) -> pl.DataFrame:
    """The window's deltas of one source, summed per key in first-seen order (scrape order)."""
    frame = pl.concat(parts, how="vertical_relaxed")
    if not key:
        return frame.sum()
    return frame.group_by(list(key), maintain_order=True).sum()


def _database_sums(parts: tuple[tuple[pl.DataFrame, Counters], ...]) -> pl.DataFrame:
    """The window's per-database deltas summed per database. In the steady state every scrape had
    the same databases in the same order: the matrices are added as they are (issue 20), in scrape
    order as the group-by would; otherwise summed per database name."""
    rows, first = parts[0]
    if all(r is rows or r.equals(rows) for r, _ in parts[1:]) and rows.get_column("database").n_unique() == rows.height:
        ints, floats = first.ints, first.floats
        for _, c in parts[1:]:
            ints, floats = ints + c.ints, floats + c.floats
        return _database_frame(rows, Counters(ints, floats, first.since))
    return _summed(tuple(_database_frame(*part) for part in parts), _DB_KEY)


def window_points(window: HealthWindow) -> pl.DataFrame:
    """Every health point of one closed window."""
    out = _Out(window)
    c = pl.col
    version = window.resource.server_version_num
    db = {"db.namespace": c("database")}

    if "databases" in window.sums:
        d = _database_sums(window.sums["databases"])
        for metric, unit, column in _DATABASE_SUMS:
            out.add(d, metric, unit, c(column), attrs=db)
        for kind in _CONFLICT_TYPES:
            out.add(
                d, "postgresql.query.conflicts", "{query}", c(f"confl_{kind}"), attrs=db | {"postgresql.conflict.type": kind}, nonzero=True
            )
        if version >= 140000:
            for metric, column in _SESSION_TIMES:
                out.add(d, metric, "s", c(column) / 1000.0, attrs=db, is_int=False)
            out.add(d, "postgresql.session.count", "{session}", c("sessions"), attrs=db)
            for end in ("abandoned", "fatal", "killed"):
                out.add(
                    d, "postgresql.sessions", "{session}", c(f"sessions_{end}"), attrs=db | {"postgresql.session.end": end}, nonzero=True
                )

    if "checkpointer" in window.sums:
        d = _summed(window.sums["checkpointer"], ())
        out.add(d, "postgresql.bgwriter.checkpoint.count", "{checkpoints}", c("num_timed"), attrs={"type": "scheduled"})
        out.add(d, "postgresql.bgwriter.checkpoint.count", "{checkpoints}", c("num_requested"), attrs={"type": "requested"})
        out.add(d, "postgresql.bgwriter.duration", "ms", c("write_time"), attrs={"type": "write"}, is_int=False)
        out.add(d, "postgresql.bgwriter.duration", "ms", c("sync_time"), attrs={"type": "sync"}, is_int=False)
        out.add(d, "postgresql.bgwriter.buffers.writes", "{buffers}", c("buffers_written"), attrs={"source": "checkpoints"})
        if version >= 170000:
            for kind, column in (("scheduled", "restartpoints_timed"), ("requested", "restartpoints_req"), ("done", "restartpoints_done")):
                out.add(d, "postgresql.checkpointer.restartpoint.count", "{restartpoints}", c(column), attrs={"type": kind})
    if "bgwriter" in window.sums:
        d = _summed(window.sums["bgwriter"], ())
        out.add(d, "postgresql.bgwriter.buffers.writes", "{buffers}", c("buffers_clean"), attrs={"source": "bgwriter"})
        if version < 170000:
            out.add(d, "postgresql.bgwriter.buffers.writes", "{buffers}", c("buffers_backend"), attrs={"source": "backend"})
            out.add(d, "postgresql.bgwriter.buffers.writes", "{buffers}", c("buffers_backend_fsync"), attrs={"source": "backend_fsync"})
        out.add(d, "postgresql.bgwriter.buffers.allocated", "{buffers}", c("buffers_alloc"))
        out.add(d, "postgresql.bgwriter.maxwritten", "1", c("maxwritten_clean"))

    if "wal" in window.sums:
        d = _summed(window.sums["wal"], ())
        out.add(d, "postgresql.wal.records", "{record}", c("wal_records"))
        out.add(d, "postgresql.wal.fpi", "{record}", c("wal_fpi"))
        out.add(d, "postgresql.wal.bytes", "By", c("wal_bytes"))
        out.add(d, "postgresql.wal.buffers_full", "{event}", c("wal_buffers_full"))
        if version < 180000:
            _wal_io(out, d, "wal_write", "wal_sync", "wal_write_time", "wal_sync_time")
    if "io" in window.sums:
        d = _summed(window.sums["io"], COUNTER_GROUPS["io"].key)
        io = {"postgresql.backend.type": c("backend_type"), "postgresql.io.object": c("object"), "postgresql.io.context": c("context")}
        for column, op in _IO_OPS.items():
            out.add(d, "postgresql.io.operations", "{operation}", c(column), attrs=io | {"postgresql.io.operation": op}, nonzero=True)
        for column, op in _IO_TIMES.items():
            out.add(
                d, "postgresql.io.duration", "s", c(column) / 1000.0, attrs=io | {"postgresql.io.operation": op}, is_int=False, nonzero=True
            )
        if version >= 180000:  # 18 counts WAL writes and syncs in pg_stat_io only
            _wal_io(out, d.filter(c("object") == "wal").sum(), "writes", "fsyncs", "write_time", "fsync_time")
    if "archiver" in window.sums:
        d = _summed(window.sums["archiver"], ())
        out.add(d, "postgresql.archiver.archived", "{file}", c("archived_count"))
        out.add(d, "postgresql.archiver.failed", "{file}", c("failed_count"))

    _gauges(out, window)
    return out.frame()


def _wal_io(out: _Out, d: pl.DataFrame, writes: str, syncs: str, write_time: str, sync_time: str) -> None:
    c = pl.col
    out.add(d, "postgresql.wal.writes", "{write}", c(writes))
    out.add(d, "postgresql.wal.syncs", "{sync}", c(syncs))
    out.add(d, "postgresql.wal.write.time", "s", c(write_time) / 1000.0, is_int=False)
    out.add(d, "postgresql.wal.sync.time", "s", c(sync_time) / 1000.0, is_int=False)


def _gauges(out: _Out, window: HealthWindow) -> None:
    c, g = pl.col, window.gauges
    db = {"db.namespace": c("database")}
    if "databases" in g:
        at, d = g["databases"]
        out.add(d, "postgresql.backends", "1", c("numbackends"), attrs=db, kind="gauge", at=at)
        out.add(d, "postgresql.database.frozen_xid.age", "{transaction}", c("frozen_xid_age"), attrs=db, kind="gauge", at=at)
        out.add(d, "postgresql.database.min_mxid.age", "{multixact}", c("min_mxid_age"), attrs=db, kind="gauge", at=at)
    if "database_sizes" in g:
        at, d = g["database_sizes"]
        out.add(d, "postgresql.db_size", "By", c("size_bytes"), attrs=db, kind="gauge", at=at)
    if "archiver" in g:
        at, d = g["archiver"]
        out.add(d, "postgresql.wal.age", "s", c("last_archived_age_secs"), kind="gauge", at=at, is_int=False)
    if "replication" in g:
        at, d = g["replication"]
        # issue 19: how many standbys are connected, 0 when none (an alert on it never turns into "no
        # data"; the per-standby lag series below stop when their standby leaves). A base backup's
        # walsender (state ``backup``) is not a standby.
        standbys = d.filter(c("state").is_null() | (c("state") != "backup")).height
        out.add(pl.DataFrame({"n": [standbys]}), "postgresql.replication.standbys", "{standby}", c("n"), kind="gauge", at=at)
        client = {"replication_client": c("client_addr"), "postgresql.replication.application_name": c("application_name")}
        out.add(d, "postgresql.replication.data_delay", "By", c("data_delay_bytes"), attrs=client, kind="gauge", at=at)
        for op in ("write", "flush", "replay"):
            out.add(d, "postgresql.wal.delay", "s", c(f"{op}_lag"), attrs=client | {"operation": op}, kind="gauge", at=at, is_int=False)
    if "replication_slots" in g:
        at, d = g["replication_slots"]
        slot = {"postgresql.replication_slot.name": c("slot_name"), "postgresql.replication_slot.type": c("slot_type")}
        out.add(d, "postgresql.replication_slot.retained_wal", "By", c("retained_wal_bytes"), attrs=slot, kind="gauge", at=at)
        out.add(d, "postgresql.replication_slot.active", "1", c("active").cast(pl.Int64), attrs=slot, kind="gauge", at=at)
        out.add(d, "postgresql.replication_slot.xmin.age", "{transaction}", c("xmin_age"), attrs=slot, kind="gauge", at=at)
        out.add(d, "postgresql.replication_slot.catalog_xmin.age", "{transaction}", c("catalog_xmin_age"), attrs=slot, kind="gauge", at=at)
    if "wal_receiver" in g:
        at, d = g["wal_receiver"]
        out.add(
            d, "postgresql.wal_receiver.connected", "1", (c("status") == "streaming").fill_null(False).cast(pl.Int64), kind="gauge", at=at
        )
        out.add(d, "postgresql.wal_receiver.last_msg_receipt.age", "s", c("last_msg_receipt_age_secs"), kind="gauge", at=at, is_int=False)
        out.add(d, "postgresql.wal_receiver.replay.delay", "By", c("replay_delay_bytes"), kind="gauge", at=at)
        out.add(d, "postgresql.wal_receiver.replay.lag", "s", c("replay_lag_secs"), kind="gauge", at=at, is_int=False)


__all__ = ["COUNTER_GROUPS", "HealthState", "HealthWindow", "RECEIVER_METRICS", "finish", "initial", "step", "window_points"]
