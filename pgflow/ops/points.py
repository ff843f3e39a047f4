"""Closed windows to the points frame: one row per data point, names and units of DESIGN.md.

Durations leave in seconds (pg_stat_statements reports milliseconds). Sums are deltas over
the window ``[start, end)``; gauges carry the time they were observed. ``attributes`` is a
struct with one field per known attribute key (null: absent), which costs nothing to build.
This frame is the only input of the OTLP encoder, the local receiver's store and the tuning tools.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from pgflow.ops.aggregate import SeriesTable
from pgflow.ops.window import Window
from pgflow.schema import ATTRIBUTE_KEYS, ATTRIBUTES, POINTS, UTC_TS

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
    return long.with_columns_seq(_QUERY_ATTRIBUTES.alias("attributes")).select_seq(_columns(window, "sum", window.start, window.end))


# Gauge series a dashboard or an alert expects to read 0 rather than vanish (a chart of
# "idle in transaction" or of waiting locks must show 0, not "no data"): per database,
# these connection states and both lock states are always exported, 0 when nothing is there.
ZERO_CONNECTION_STATES = ("active", "idle", "idle in transaction")
ZERO_LOCK_GRANTED = (True, False)


class _Gauges:
    """A window's gauge points, row by row: the sources hold a few rows each (per database, state,
    lock mode), so plain Python lists and one frame at the end cost a fraction of a polars select
    per gauge (issue 20: ~3 ms a window to ~0.5)."""

    def __init__(self) -> None:
        self.metric: list[str] = []
        self.unit: list[str] = []
        self.value: list[float | None] = []
        self.is_int: list[bool] = []
        self.attributes: list[dict[str, str | None]] = []

    def add(self, metric: str, unit: str, value: float | None, is_int: bool, attributes: dict[str, str | None]) -> None:
        self.metric.append(metric)
        self.unit.append(unit)
        self.value.append(None if value is None else float(value))
        self.is_int.append(is_int)
        self.attributes.append(attributes)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            [
                pl.Series("metric", self.metric, dtype=pl.String),
                pl.Series("unit", self.unit, dtype=pl.String),
                pl.Series("value", self.value, dtype=pl.Float64),
                pl.Series("is_int", self.is_int, dtype=pl.Boolean),
                pl.Series("attributes", self.attributes, dtype=ATTRIBUTES),
            ]
        )


def _text(value: object) -> str | None:
    """An attribute value as polars casts it to a string (booleans as ``true``/``false``)."""
    if value is None or isinstance(value, str):
        return value
    return str(value).lower() if isinstance(value, bool) else str(value)


def _zeros(
    rows: list[dict[str, Any]], column: str, databases: Iterable[str], values: Iterable[Any], rest: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows of count 0 for every (database, value of ``column``) no row has: a gauge drawn at 0, not missing."""
    seen = {(r["database"], r[column]) for r in rows}
    return [{"database": d, column: v, "count": 0, **rest} for d in databases for v in values if (d, v) not in seen]


def gauge_points(window: Window) -> list[pl.DataFrame]:
    """Connections, locks and blocked sessions as last observed in the window (0s included)."""
    g = window.gauges
    if g is None:
        return []
    out = _Gauges()
    clients = [r for r in g.activity.iter_rows(named=True) if r["backend_type"] == "client backend"]
    clients += _zeros(clients, "state", g.databases, ZERO_CONNECTION_STATES, {"user": None, "wait_event_type": None})
    for r in clients:
        attrs = {
            "db.namespace": r["database"],
            "user.name": r["user"],
            "postgresql.connection.state": r["state"],
            "postgresql.wait_event.type": r["wait_event_type"],
        }
        out.add("postgresql.connection.count", "{connection}", r["count"], True, attrs)
    if g.max_connections is not None:
        out.add("postgresql.connection.max", "{connection}", g.max_connections, True, {})
    locks = list(g.locks.iter_rows(named=True))
    locks += _zeros(locks, "granted", g.databases, ZERO_LOCK_GRANTED, {"mode": None, "locktype": None})
    for r in locks:
        attrs = {
            "db.namespace": r["database"],
            "postgresql.lock.mode": r["mode"],
            "postgresql.lock.type": r["locktype"],
            "postgresql.lock.granted": _text(r["granted"]),
        }
        out.add("postgresql.lock.count", "{lock}", r["count"], True, attrs)
    if g.databases:
        by_database: dict[str, list[tuple[int | None, float | None]]] = {}
        for d, sessions, wait in g.blocked.select("database", "sessions", "max_wait_secs").iter_rows():
            if d is not None:  # a join never matches a null key
                by_database.setdefault(d, []).append((sessions, wait))
        blocked = [(d, s, w) for d in g.databases for s, w in (by_database.get(d, [(None, None)]) if d is not None else [(None, None)])]
        for d, sessions, _ in blocked:
            out.add("postgresql.blocked.count", "{session}", 0 if sessions is None else sessions, True, {"db.namespace": d})
        for d, _, wait in blocked:
            out.add("postgresql.blocked.wait.max", "s", 0.0 if wait is None else wait, False, {"db.namespace": d})
    if not out.metric:
        return []
    return [out.frame().select_seq(_columns(window, "gauge", g.observed_at, g.observed_at))]


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
            .with_columns_seq(attributes({}).alias("attributes"))
            .select_seq(_columns(window, "sum", window.start, window.end))
        )
    if not frames:
        return pl.DataFrame(schema=POINTS)
    return pl.concat(frames, how="vertical_relaxed").cast(POINTS)
