"""Closed windows to the points frame: one row per data point, names and units of DESIGN.md.

Durations leave in seconds (pg_stat_statements reports milliseconds). Sums are deltas over
the window ``[start, end)``; gauges carry the time they were observed. ``attributes`` is a
struct with one field per known attribute key (null: absent), which costs nothing to build.
This frame is the only input of the OTLP encoder, the local receiver's store and the tuning tools.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from typing import Any

import numpy as np
import polars as pl

from pgflow.ops.aggregate import SeriesTable
from pgflow.ops.window import Resource, Window
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
        if value is None:
            fields.append(_null_field(key))
        elif isinstance(value, str):
            fields.append(_constant_field(key, value))
        else:
            fields.append(value.cast(pl.String).alias(key))
    return pl.struct(fields)


@cache
def _null_field(key: str) -> pl.Expr:
    """A key's null field, built once (issue 20): most of the ~30 keys are null in any struct,
    and each ``pl.lit`` costs ~40 us, a millisecond per struct."""
    return pl.lit(None, pl.String).alias(key)


@lru_cache(maxsize=1024)
def _constant_field(key: str, value: str) -> pl.Expr:
    """A key's constant field (an instance's name, a metric's kind), remembered (bounded)."""
    return pl.lit(value, pl.String).alias(key)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _constant(name: str, value: object, dtype: pl.DataType, n: int) -> pl.Series:
    return _one(name, value, dtype).new_from_index(0, n)


@lru_cache(maxsize=256, typed=True)
def _one(name: str, value: object, dtype: pl.DataType) -> pl.Series:
    """A one-row column of ``value``, remembered (bounded): a window's constants (the resource's,
    the kinds) are the same every window, and building one from a list costs ~20 us."""
    return pl.Series(name, [value], dtype=dtype)


def timestamps(name: str, values: list[datetime | None]) -> pl.Series:
    """``values`` (datetimes, naive ones in UTC as polars takes them, or None) as a UTC_TS column,
    built from their microseconds since the epoch: converting each datetime costs more than the
    few distinct ones."""
    micros = {v: ((v if v.tzinfo else v.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND for v in set(values) if v is not None}
    return pl.Series(name, [micros.get(v) if v is not None else None for v in values], dtype=pl.Int64).cast(UTC_TS)


def attribute_struct(given: Mapping[str, pl.Series], n: int) -> pl.Series:
    """The ``attributes`` column of ``n`` points: ``given`` (cast to strings, as :func:`attributes`
    casts), every other key null; built from the columns, no expression evaluated."""
    nulls = _constant("", None, pl.String(), n)  # one column, shared by every absent key (no pl.repeat: a select)
    fields = [given[k].cast(pl.String).alias(k) if k in given else nulls.alias(k) for k in ATTRIBUTE_KEYS]
    return pl.DataFrame(fields).to_struct("attributes")


def points_frame(
    resource: Resource, kind: str, start: datetime | pl.Series, end: datetime | pl.Series, columns: Mapping[str, pl.Series]
) -> pl.DataFrame:
    """A POINTS frame from ``columns`` (``metric``, ``unit``, ``value``, ``is_int``, ``attributes``;
    ``monotonic`` when ``kind`` is not one for all) and the window's resource: what
    a ``select`` of the columns and literals gave, built from the columns (issue 20: a select of literals costs
    ~0.3 ms a frame)."""
    r, n = resource, len(columns["value"])
    if isinstance(start, datetime):
        start = timestamps("start", [start]).new_from_index(0, n)
    if isinstance(end, datetime):
        end = timestamps("end", [end]).new_from_index(0, n)
    return pl.DataFrame(
        [
            _constant("instance", r.instance, pl.String(), n),
            columns["metric"].cast(pl.String).alias("metric"),
            columns["kind"].alias("kind") if "kind" in columns else _constant("kind", kind, pl.String(), n),
            columns["unit"].cast(pl.String).alias("unit"),
            columns["monotonic"].alias("monotonic") if "monotonic" in columns else _constant("monotonic", kind == "sum", pl.Boolean(), n),
            start.alias("start"),
            end.alias("end"),
            columns["value"].cast(pl.Float64).alias("value"),
            columns["is_int"].cast(pl.Boolean).alias("is_int"),
            columns["attributes"].alias("attributes"),
            _constant("server_address", r.server_address, pl.String(), n),
            _constant("server_port", r.server_port, pl.Int32(), n),
            _constant("server_version_num", r.server_version_num, pl.Int32(), n),
        ]
    )


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
    specs = _SPEC_TABLE[spec]
    m = len(values)
    given = {
        "db.system.name": _constant("", "postgresql", pl.String(), m),
        "db.namespace": labels.get_column("database"),
        "user.name": labels.get_column("user"),
        "db.operation.name": labels.get_column("operation"),
        "db.query.summary": labels.get_column("summary"),
        "postgresql.query.fingerprint": labels.get_column("fingerprint"),
        "db.query.text": labels.get_column("text"),
        "postgresql.query.toplevel": labels.get_column("toplevel"),  # cast: "true" / "false"
        "postgresql.block.kind": specs.get_column("block_kind"),
        "postgresql.io.direction": specs.get_column("io_direction"),
    }
    if 0 < window.resource.server_version_num < 140000:
        # PostgreSQL 13 keys statements without ``toplevel``: one entry holds top-level and
        # nested executions alike, so the attribute is left out rather than guessed.
        del given["postgresql.query.toplevel"]
    # Issue 20: built from the columns (the attributes struct of _QUERY_ATTRIBUTES evaluated ~1 ms a window)
    columns = {
        "metric": specs.get_column("metric"),
        "unit": specs.get_column("unit"),
        "is_int": specs.get_column("is_int"),
        "value": pl.Series("value", values, dtype=pl.Float64),
        "attributes": attribute_struct(given, m),
    }
    return points_frame(window.resource, "sum", window.start, window.end, columns)


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

    def columns(self) -> dict[str, pl.Series]:
        return {
            "metric": pl.Series("metric", self.metric, dtype=pl.String),
            "unit": pl.Series("unit", self.unit, dtype=pl.String),
            "value": pl.Series("value", self.value, dtype=pl.Float64),
            "is_int": pl.Series("is_int", self.is_int, dtype=pl.Boolean),
            "attributes": pl.Series("attributes", self.attributes, dtype=ATTRIBUTES),
        }


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
        for d, sessions, wait in zip(*(g.blocked.get_column(c).to_list() for c in ("database", "sessions", "max_wait_secs"))):
            if d is not None:  # a join never matches a null key
                by_database.setdefault(d, []).append((sessions, wait))
        blocked = [(d, s, w) for d in g.databases for s, w in (by_database.get(d, [(None, None)]) if d is not None else [(None, None)])]
        for d, sessions, _ in blocked:
            out.add("postgresql.blocked.count", "{session}", 0 if sessions is None else sessions, True, {"db.namespace": d})
        for d, _, wait in blocked:
            out.add("postgresql.blocked.wait.max", "s", 0.0 if wait is None else wait, False, {"db.namespace": d})
    if not out.metric:
        return []
    return [points_frame(window.resource, "gauge", g.observed_at, g.observed_at, out.columns())]


def points(window: Window, series: SeriesTable) -> pl.DataFrame:
    """Every data point of one closed window, in the POINTS schema."""
    frames = [f for f in [query_points(window, series)] if f is not None] + gauge_points(window)
    if window.deallocated:
        deallocated = {
            "metric": pl.Series(["postgresql.statements.deallocated"]),
            "unit": pl.Series(["{statement}"]),
            "value": pl.Series([float(window.deallocated)]),
            "is_int": pl.Series([True]),
            "attributes": attribute_struct({}, 1),
        }
        frames.append(points_frame(window.resource, "sum", window.start, window.end, deallocated))
    if not frames:
        return pl.DataFrame(schema=POINTS)
    return frames[0] if len(frames) == 1 else pl.concat(frames)  # every part is in the POINTS schema
