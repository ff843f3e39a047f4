"""Closed windows to the points frame: one row per data point, names and units of DESIGN.md.

Durations leave in seconds (pg_stat_statements reports milliseconds). Sums are deltas over
the window ``[start, end)``; gauges carry the time they were observed. ``attributes`` is a
struct with one field per known attribute key (null: absent), which costs nothing to build.
This frame is the only input of the OTLP encoder, the local receiver's store and the tuning tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from pgflow.ops.aggregate import SeriesTable
from pgflow.ops.window import Window
from pgflow.schema import ATTRIBUTE_KEYS, POINTS, UTC_TS

_BLOCK_KINDS = (
    "shared_hit",
    "shared_read",
    "shared_dirtied",
    "shared_written",
    "local_hit",
    "local_read",
    "local_dirtied",
    "local_written",
    "temp_read",
    "temp_written",
)


def attributes(values: Mapping[str, pl.Expr | str]) -> pl.Expr:
    """The attributes struct: given keys from expressions or constants, the rest null."""
    unknown = set(values) - set(ATTRIBUTE_KEYS)
    if unknown:
        raise ValueError(f"attribute keys not in schema.ATTRIBUTE_KEYS: {sorted(unknown)}")
    fields = []
    for key in ATTRIBUTE_KEYS:
        value = values.get(key)
        expr = pl.lit(None, pl.String) if value is None else (pl.lit(value) if isinstance(value, str) else value)
        fields.append(expr.cast(pl.String).alias(key))
    return pl.struct(fields)


def _columns(window: Window, kind: str, start: datetime, end: datetime) -> list[pl.Expr]:
    r = window.resource
    return [
        pl.lit(r.instance).alias("instance"),
        pl.col("metric"),
        pl.lit(kind).alias("kind"),
        pl.col("unit"),
        pl.lit(kind == "sum").alias("monotonic"),
        pl.lit(start, UTC_TS).alias("start"),
        pl.lit(end, UTC_TS).alias("end"),
        pl.col("value").cast(pl.Float64),
        pl.col("is_int"),
        pl.col("attributes"),
        pl.lit(r.server_address).alias("server_address"),
        pl.lit(r.server_port, pl.Int32).alias("server_port"),
        pl.lit(r.server_version_num, pl.Int32).alias("server_version_num"),
    ]


@dataclass(frozen=True)
class _Spec:
    """One postgresql.query.* point per series: sum of ``columns`` / ``divisor``."""

    metric: str
    unit: str
    columns: tuple[str, ...]
    divisor: float = 1.0
    only_nonzero: bool = False
    block_kind: str | None = None
    io_direction: str | None = None

    def values(self, series: SeriesTable) -> np.ndarray:
        total = series.column(self.columns[0]).astype(np.float64)
        for column in self.columns[1:]:
            total = total + series.column(column)
        return total / self.divisor if self.divisor != 1.0 else total


def _query_specs() -> list[_Spec]:
    ms = 1000.0  # pg_stat_statements reports milliseconds; durations leave in seconds
    specs = [
        _Spec("postgresql.query.calls", "{call}", ("calls",)),
        _Spec("postgresql.query.duration", "s", ("total_exec_time",), ms),
        _Spec("postgresql.query.rows", "{row}", ("rows",)),
        _Spec("postgresql.query.plan.duration", "s", ("total_plan_time",), ms, only_nonzero=True),
        _Spec("postgresql.query.wal.bytes", "By", ("wal_bytes",), only_nonzero=True),
    ]
    for kind in _BLOCK_KINDS:
        scope, op = kind.split("_")
        specs.append(_Spec("postgresql.query.blocks", "{block}", (f"{scope}_blks_{op}",), only_nonzero=True, block_kind=kind))
    for direction in ("read", "write"):
        specs.append(
            _Spec(
                "postgresql.query.io.duration",
                "s",
                tuple(f"{s}_blk_{direction}_time" for s in ("shared", "local", "temp")),
                ms,
                only_nonzero=True,
                io_direction=direction,
            )
        )
    return specs


_SPECS = _query_specs()
_SPEC_TABLE = pl.DataFrame(
    {
        "metric": [s.metric for s in _SPECS],
        "unit": [s.unit for s in _SPECS],
        "is_int": [s.divisor == 1.0 for s in _SPECS],
        "block_kind": [s.block_kind for s in _SPECS],
        "io_direction": [s.io_direction for s in _SPECS],
    },
    schema_overrides={"block_kind": pl.String, "io_direction": pl.String},
)
_ONLY_NONZERO = np.array([s.only_nonzero for s in _SPECS])
_QUERY_ATTRIBUTES = attributes(
    {
        "db.system.name": "postgresql",
        "db.namespace": pl.col("database"),
        "user.name": pl.col("user"),
        "db.operation.name": pl.col("operation"),
        "db.query.summary": pl.col("summary"),
        "postgresql.query.fingerprint": pl.col("fingerprint"),
        "db.query.text": pl.col("text"),
        "postgresql.query.toplevel": pl.col("toplevel"),  # cast: "true" / "false"
        "postgresql.block.kind": pl.col("block_kind"),
        "postgresql.io.direction": pl.col("io_direction"),
    }
)


def query_points(window: Window, series: SeriesTable) -> pl.DataFrame | None:
    """The postgresql.query.* sums of one window's (capped) series, metric by metric."""
    n = series.height
    if n == 0:
        return None
    values = np.concatenate([spec.values(series) for spec in _SPECS])
    spec = np.repeat(np.arange(len(_SPECS)), n)
    row = np.tile(np.arange(n), len(_SPECS))
    keep = ~_ONLY_NONZERO[spec] | (values != 0)
    spec, row, values = spec[keep], row[keep], values[keep]
    labels = series.labels[row]
    if 0 < window.resource.server_version_num < 140000:
        # PostgreSQL 13 keys statements without ``toplevel``: one entry holds top-level and
        # nested executions alike, so the attribute is left out rather than guessed.
        labels = labels.with_columns(pl.lit(None, pl.Boolean).alias("toplevel"))
    # polars types a frame indexed by an array as Any, and so the concatenation
    long: pl.DataFrame = pl.concat([_SPEC_TABLE[spec], labels, pl.DataFrame({"value": values})], how="horizontal")
    return long.with_columns(_QUERY_ATTRIBUTES.alias("attributes")).select(_columns(window, "sum", window.start, window.end))


def _gauge(metric: str, unit: str, rows: pl.DataFrame, value: pl.Expr, attrs: Mapping[str, pl.Expr], is_int: bool) -> pl.DataFrame:
    """One gauge's rows: metric, unit, value, is_int and one column per attribute it has. The
    attributes struct and the window's columns are built once for all gauges (:func:`gauge_points`):
    building them per gauge was most of a window's cost (issue 20)."""
    return rows.select(
        pl.lit(metric).alias("metric"),
        pl.lit(unit).alias("unit"),
        value.cast(pl.Float64).alias("value"),
        pl.lit(is_int).alias("is_int"),
        *(expr.cast(pl.String).alias(key) for key, expr in attrs.items()),
    )


_CONNECTION_ATTRIBUTES = {
    "db.namespace": pl.col("database"),
    "user.name": pl.col("user"),
    "postgresql.connection.state": pl.col("state"),
    "postgresql.wait_event.type": pl.col("wait_event_type"),
}
_LOCK_ATTRIBUTES = {
    "db.namespace": pl.col("database"),
    "postgresql.lock.mode": pl.col("mode"),
    "postgresql.lock.type": pl.col("locktype"),
    "postgresql.lock.granted": pl.col("granted"),
}
_DATABASE_ATTRIBUTES = {"db.namespace": pl.col("database")}


# Gauge series a dashboard or an alert expects to read 0 rather than vanish (a chart of
# "idle in transaction" or of waiting locks must show 0, not "no data"): per database,
# these connection states and both lock states are always exported, 0 when nothing is there.
ZERO_CONNECTION_STATES = ("active", "idle", "idle in transaction")
ZERO_LOCK_GRANTED = (True, False)


def _missing(
    present: pl.DataFrame, databases: list[str], column: str, values: tuple[str | bool, ...], dtype: pl.DataType | type[pl.DataType]
) -> pl.DataFrame:
    """The (database, ``column``) pairs of the grid that ``present`` has no row for (a few databases
    and states: a set in Python costs less than a cross join and an anti join)."""
    seen = set(zip(present.get_column("database").to_list(), present.get_column(column).to_list()))
    pairs = [(d, v) for d in databases for v in values if (d, v) not in seen]
    return pl.DataFrame(pairs, schema={"database": pl.String, column: dtype}, orient="row")


def gauge_points(window: Window) -> list[pl.DataFrame]:
    """Connections, locks and blocked sessions as last observed in the window (0s included)."""
    g = window.gauges
    if g is None:
        return []
    at, c = g.observed_at, pl.col
    out = []
    clients = g.activity.filter(c("backend_type") == "client backend")
    idle = _missing(clients, g.databases, "state", ZERO_CONNECTION_STATES, pl.String)
    if idle.height:
        clients = pl.concat([clients, idle.with_columns(count=pl.lit(0, pl.Int64))], how="diagonal_relaxed")
    if clients.height:
        out.append(_gauge("postgresql.connection.count", "{connection}", clients, c("count"), _CONNECTION_ATTRIBUTES, True))
    if g.max_connections is not None:
        out.append(_gauge("postgresql.connection.max", "{connection}", pl.DataFrame({"v": [g.max_connections]}), c("v"), {}, True))
    locks = g.locks
    unlocked = _missing(locks, g.databases, "granted", ZERO_LOCK_GRANTED, pl.Boolean)
    if unlocked.height:
        locks = pl.concat([locks, unlocked.with_columns(count=pl.lit(0, pl.Int64))], how="diagonal_relaxed")
    if locks.height:
        out.append(_gauge("postgresql.lock.count", "{lock}", locks, c("count"), _LOCK_ATTRIBUTES, True))
    if g.databases:
        blocked = (
            pl.DataFrame({"database": g.databases}, schema={"database": pl.String})
            .join(g.blocked, on="database", how="left")
            .with_columns(c("sessions").fill_null(0), c("max_wait_secs").fill_null(0.0))
        )
        out.append(_gauge("postgresql.blocked.count", "{session}", blocked, c("sessions"), _DATABASE_ATTRIBUTES, True))
        out.append(_gauge("postgresql.blocked.wait.max", "s", blocked, c("max_wait_secs"), _DATABASE_ATTRIBUTES, False))
    if not out:
        return []
    long = pl.concat(out, how="diagonal_relaxed")
    return [long.with_columns(_struct_of(frozenset(long.columns))).select(_columns(window, "gauge", at, at))]


_STRUCTS: dict[frozenset[str], pl.Expr] = {}


def _struct_of(columns: frozenset[str]) -> pl.Expr:
    """The attributes struct of a frame holding the attribute ``columns`` it has (built once per set)."""
    struct = _STRUCTS.get(columns)
    if struct is None:
        fields = [pl.col(k) if k in columns else pl.lit(None, pl.String).alias(k) for k in ATTRIBUTE_KEYS]
        struct = _STRUCTS[columns] = pl.struct(fields).alias("attributes")
    return struct


def points(window: Window, series: SeriesTable) -> pl.DataFrame:
    """Every data point of one closed window, in the POINTS schema."""
    frames = [f for f in [query_points(window, series)] if f is not None] + gauge_points(window)
    if window.deallocated:
        frames.append(
            pl.DataFrame(
                {
                    "metric": ["postgresql.statements.deallocated"],
                    "unit": ["{statement}"],
                    "value": [float(window.deallocated)],
                    "is_int": [True],
                }
            )
            .with_columns(attributes({}).alias("attributes"))
            .select(_columns(window, "sum", window.start, window.end))
        )
    if not frames:
        return pl.DataFrame(schema=POINTS)
    return pl.concat(frames, how="vertical_relaxed").cast(POINTS)
