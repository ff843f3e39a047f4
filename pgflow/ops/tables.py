"""Per-table statistics: exact deltas, the tables cap (activity and risk), and their points.

The scraper sends only the tables whose counters moved (and the risk candidates), so this
operator keeps the last row it saw of every table (``known``) and diffs each fetched row
against it. The rules, per ``(database, relid)``:

- a database seen for the first time: its rows are the baseline, nothing emitted;
- a table known: current − last seen (the last row seen is current for a table not fetched,
  since the scraper fetches every table of a bucket whose counters moved); a counter that went
  down (``pg_stat_reset()``, drop and re-create) means the row restarted: its current value is
  the delta;
- a table not known, in a bucket marked changed (or a database fetched whole): created
  since, its whole value is the delta; in a bucket read for the first time (``seed``: the
  scraper reads a new database whole, a slice per scrape) or elsewhere (a risk candidate whose
  counters did not move): baseline only;
- a known table missing from a bucket marked changed (or from a whole fetch) was dropped.

Per export window the deltas are summed; the cap names at most ``max_tables_tracked`` tables per
instance, chosen by activity in the window (scans + writes) first, then dead tuples, frozen-xid
age and size, through the same LRU as queries (:func:`pgflow.ops.cap.track`); the rest roll into
``db.collection.name = other`` per database, so the sum over all series equals the server's
totals. Gauges carry the time they were observed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

import polars as pl

from pgflow.ops.cap import OTHER, track
from pgflow.ops.window import Resource, Window
from pgflow.schema import POINTS, TABLE_COUNTERS, TABLES, UTC_TS

KEY = ["database", "relid"]
KNOWN = pl.Schema({c: t for c, t in TABLES.items() if c != "kind"})
_DELTAS = pl.Schema({"database": pl.String, "relid": pl.Int64, "table": pl.String, **{c: pl.Int64 for c in TABLE_COUNTERS}})
_ACTIVITY = ("seq_scan", "idx_scan", "n_tup_ins", "n_tup_upd", "n_tup_del")


@dataclass(frozen=True)
class TableWindow:
    """One export window's table deltas (frames, summed when it closes) and the last state seen."""

    deltas: tuple[pl.DataFrame, ...] = ()
    known: pl.DataFrame | None = None


@dataclass(frozen=True)
class TableState:
    """Last row seen per table, open windows, the tables LRU and what the last window did."""

    known: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=KNOWN))
    open: dict[datetime, TableWindow] = field(default_factory=dict)
    lru: tuple[str, ...] = ()
    evictions: int = 0
    seen: int = 0  # tables in the last closed window
    rolled_up: int = 0  # ... of which rolled into other


def observe(known: pl.DataFrame, frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Diff one scrape's table frame against ``known``; returns the new ``known`` and the deltas."""
    if frame.height == 0:
        return known, pl.DataFrame(schema=_DELTAS)
    rows = frame.filter(pl.col("kind") == "table").drop("kind")
    marks = frame.filter(pl.col("kind") != "table")
    whole = marks.filter(pl.col("kind") == "all").select("database").unique()
    changed = marks.filter(pl.col("kind").is_in(["bucket", "seed"])).select("database", "bucket").unique()
    seeding = marks.filter(pl.col("kind") == "seed").select("database", "bucket").unique()
    baseline_dbs = frame.select("database").unique().join(known.select("database").unique(), on="database", how="anti")

    prev = known.select(*KEY, *(pl.col(c).alias(f"{c}__prev") for c in (*TABLE_COUNTERS, "table_size", "index_size")))
    joined = rows.join(prev, on=KEY, how="left", maintain_order="left")
    has_prev = pl.col("seq_scan__prev").is_not_null()
    in_changed = pl.col("database").is_in(whole.get_column("database").implode()) | pl.struct("database", "bucket").is_in(
        changed.select(pl.struct("database", "bucket")).to_series().implode()
    )
    in_seed = pl.struct("database", "bucket").is_in(seeding.select(pl.struct("database", "bucket")).to_series().implode())
    new = ~has_prev & in_changed & ~in_seed & ~pl.col("database").is_in(baseline_dbs.get_column("database").implode())
    restarted = pl.any_horizontal([pl.col(c) < pl.col(f"{c}__prev") for c in TABLE_COUNTERS]).fill_null(False)
    deltas = joined.select(
        "database",
        "relid",
        "table",
        *(
            pl.when(has_prev & ~restarted).then(pl.col(c) - pl.col(f"{c}__prev")).when(has_prev | new).then(pl.col(c)).otherwise(0).alias(c)
            for c in TABLE_COUNTERS
        ),
    ).filter(pl.any_horizontal([pl.col(c) != 0 for c in TABLE_COUNTERS]))

    # Sizes not read (the table was locked ACCESS EXCLUSIVE) keep their last observation.
    current = joined.with_columns(
        pl.col("table_size").fill_null(pl.col("table_size__prev")), pl.col("index_size").fill_null(pl.col("index_size__prev"))
    ).select(KNOWN.names())
    dropped_scope = known.filter(  # each known row keeps the bucket the scraper put it in
        pl.col("database").is_in(whole.get_column("database").implode())
        | pl.struct("database", "bucket").is_in(changed.select(pl.struct("database", "bucket")).to_series().implode())
    )
    dropped = dropped_scope.join(rows.select(KEY), on=KEY, how="anti").select(KEY)
    kept = known.join(current.select(KEY), on=KEY, how="anti").join(dropped, on=KEY, how="anti")
    return pl.concat([kept, current]).cast(KNOWN), deltas.cast(_DELTAS)


def add(state: TableState, frame: pl.DataFrame, window_end: datetime) -> TableState:
    """Fold one snapshot's table frame into the window ending at ``window_end`` (empty frame: nothing)."""
    if frame.height == 0:
        return state
    known, deltas = observe(state.known, frame)
    current = state.open.get(window_end, TableWindow())
    updated = TableWindow(current.deltas + ((deltas,) if deltas.height else ()), known)
    return replace(state, known=known, open={**state.open, window_end: updated})


def _summed(window: TableWindow) -> pl.DataFrame:
    if not window.deltas:
        return pl.DataFrame(schema=_DELTAS)
    return (
        pl.concat(window.deltas)
        .group_by(KEY, maintain_order=True)
        .agg(pl.col("table").last(), *(pl.col(c).sum() for c in TABLE_COUNTERS))
        .cast(_DELTAS)
    )


def _ranking(frame: pl.DataFrame, column: str) -> list[str]:
    return frame.filter(pl.col(column).fill_null(0) > 0).sort([column, "name"], descending=[True, False]).get_column("name").to_list()


def choose(state: TableState, window: TableWindow, max_tables_tracked: int) -> tuple[TableState, pl.DataFrame]:
    """Every known table with its window deltas and whether it is named (``named``)."""
    known = window.known if window.known is not None else state.known
    sums = _summed(window)
    tables = known.join(sums.drop("table"), on=KEY, how="left", suffix="__delta").with_columns(
        pl.concat_str("database", pl.lit("\x1f"), "table").alias("name"),
        *(pl.col(f"{c}__delta").fill_null(0) for c in TABLE_COUNTERS),
        pl.sum_horizontal([pl.col(f"{c}__delta").fill_null(0) for c in _ACTIVITY]).alias("activity"),
    )
    # Deltas of tables dropped before the window closed still count (into other).
    gone = sums.join(known.select(KEY), on=KEY, how="anti")
    m = max_tables_tracked
    quotas = [max(1, m // 2), max(1, m // 6), max(1, m // 6), max(1, m - m // 2 - 2 * (m // 6))]
    rankings = [_ranking(tables, c) for c in ("activity", "n_dead_tup", "frozen_xid_age", "table_size")]
    alive = set(tables.get_column("name").to_list())  # a dropped table leaves the LRU: its place is free
    lru, evicted = track(tuple(n for n in state.lru if n in alive), rankings, quotas, m)
    tables = tables.with_columns(pl.col("name").is_in(pl.Series(lru, dtype=pl.String).implode()).alias("named"))
    if gone.height:
        tables = pl.concat(
            [tables, gone.rename({c: f"{c}__delta" for c in TABLE_COUNTERS}).with_columns(pl.lit(False).alias("named"))],
            how="diagonal_relaxed",
        )
    named = int(tables.get_column("named").sum())
    state = replace(state, lru=lru, evictions=state.evictions + evicted, seen=known.height, rolled_up=known.height - named)
    return state, tables


def _rollup(tables: pl.DataFrame) -> pl.DataFrame:
    """Named tables as they are, plus one ``other`` row per database summing the rest."""
    named = tables.filter(pl.col("named")).with_columns(pl.col("table").alias("collection"))
    rest = tables.filter(~pl.col("named"))
    if rest.height == 0:
        return named
    other = (
        rest.group_by("database", maintain_order=True)
        .agg(
            *(pl.col(f"{c}__delta").sum() for c in TABLE_COUNTERS),
            *(pl.col(c).sum() for c in ("n_live_tup", "n_dead_tup", "table_size", "index_size")),
            pl.col("frozen_xid_age").max(),
            pl.col("observed_at").max(),
        )
        .with_columns(pl.lit(OTHER).alias("collection"))
    )
    return pl.concat([named, other], how="diagonal_relaxed")


# (metric, unit, column, extra attribute key, value)
_SUMS = [
    *(("postgresql.operations", "1", f"n_tup_{op}", "postgresql.operation", op) for op in ("ins", "upd", "del", "hot_upd")),
    ("postgresql.sequential_scans", "{sequential_scan}", "seq_scan", None, None),
    ("postgresql.index.scans", "{scans}", "idx_scan", None, None),
    ("postgresql.table.vacuum.count", "{vacuum}", "vacuum_count", None, None),
    ("postgresql.table.autovacuum.count", "{vacuum}", "autovacuum_count", None, None),
    ("postgresql.table.analyze.count", "{analyze}", "analyze_count", None, None),
    ("postgresql.table.autoanalyze.count", "{analyze}", "autoanalyze_count", None, None),
    *(
        ("postgresql.blocks_read", "1", f"{scope}_blks_{kind}", "source", f"{scope}_{kind}")
        for scope in ("heap", "idx", "toast")
        for kind in ("read", "hit")
    ),
]
_GAUGES = [
    ("postgresql.rows", "1", "n_live_tup", "postgresql.row.state", "live"),
    ("postgresql.rows", "1", "n_dead_tup", "postgresql.row.state", "dead"),
    ("postgresql.table.size", "By", "table_size", None, None),
    ("postgresql.index.size", "By", "index_size", None, None),
    ("postgresql.table.frozen_xid.age", "{transaction}", "frozen_xid_age", None, None),
]
_AGES = [(f"postgresql.table.{what}.age", f"last_{what}") for what in ("vacuum", "autovacuum", "analyze", "autoanalyze")]


def _specs() -> pl.DataFrame:
    """One row per table metric (``spec`` names its value column in :func:`table_points`): what
    each point carries besides its value. The extra attribute columns are null where a metric has none."""
    rows = [(m, u, "sum", True, k, v) for m, u, _, k, v in _SUMS]
    rows += [(m, u, "gauge", True, k, v) for m, u, _, k, v in _GAUGES]
    rows += [(m, "s", "gauge", False, None, None) for m, _ in _AGES]
    extra = sorted({k for *_, k, _ in rows if k is not None})
    return pl.DataFrame(
        {
            "spec": [f"__v{i}" for i in range(len(rows))],
            "metric": [r[0] for r in rows],
            "unit": [r[1] for r in rows],
            "kind": [r[2] for r in rows],
            "is_int": [r[3] for r in rows],
            **{key: [r[5] if r[4] == key else None for r in rows] for key in extra},
        },
        schema_overrides={key: pl.String for key in extra},
    )


_SPECS = _specs()
_EXTRA_KEYS = tuple(c for c in _SPECS.columns if c not in ("spec", "metric", "unit", "kind", "is_int"))


def _values() -> list[pl.Expr]:
    """Each metric's value on a rolled-up row, in the order of ``_SPECS`` (null: no point there)."""
    c, observed = pl.col, pl.col("observed_at")
    values = [c(f"{column}__delta") for _, _, column, _, _ in _SUMS]
    values += [c(column) for _, _, column, _, _ in _GAUGES]  # a gauge not read is null: no point
    named = c("collection") != OTHER
    values += [pl.when(named).then((observed - c(column)).dt.total_microseconds() / 1e6) for _, column in _AGES]
    return [v.cast(pl.Float64).alias(f"__v{i}") for i, v in enumerate(values)]


def _points(frame: pl.DataFrame, resource: Resource, start: pl.Expr, end: pl.Expr, attrs: pl.Expr) -> pl.DataFrame:
    r, kind = resource, pl.col("kind")
    return frame.select(
        pl.lit(r.instance).alias("instance"),
        "metric",
        "kind",
        "unit",
        (kind == "sum").alias("monotonic"),
        pl.when(kind == "sum").then(start).otherwise(pl.col("observed_at")).cast(UTC_TS).alias("start"),
        pl.when(kind == "sum").then(end).otherwise(pl.col("observed_at")).cast(UTC_TS).alias("end"),
        pl.col("value").cast(pl.Float64),
        "is_int",
        attrs.alias("attributes"),
        pl.lit(r.server_address).alias("server_address"),
        pl.lit(r.server_port, pl.Int32).alias("server_port"),
        pl.lit(r.server_version_num, pl.Int32).alias("server_version_num"),
    )


def table_points(rows: pl.DataFrame, tables_per_db: pl.DataFrame, resource: Resource, start: datetime, end: datetime) -> pl.DataFrame:
    """The per-table points of one window from its rolled-up rows.

    One select computes every metric's value per row, ``unpivot`` lays them out one point per
    row (metric by metric, rows in order) and a join with ``_SPECS`` names them (issue 20: a
    select per metric, 26 of them, was most of a table window's cost). Sums are kept whatever
    their value; a gauge (or age) whose column was not read gives no point.
    """
    from pgflow.ops.points import attributes  # the one attributes builder

    window_start, window_end = pl.lit(start, UTC_TS), pl.lit(end, UTC_TS)
    base: dict[str, pl.Expr | str] = {
        "db.system.name": "postgresql",
        "db.namespace": pl.col("database"),
        "db.collection.name": pl.col("collection"),
    }
    frames = []
    if rows.height:
        long = (
            rows.select("database", "collection", "observed_at", *_values())
            .unpivot(index=["database", "collection", "observed_at"], variable_name="spec", value_name="value")
            .join(_SPECS, on="spec", how="left", maintain_order="left")
            .filter((pl.col("kind") == "sum") | pl.col("value").is_not_null())
        )
        attrs = attributes({**base, **{key: pl.col(key) for key in _EXTRA_KEYS}})
        frames.append(_points(long, resource, window_start, window_end, attrs))
    if tables_per_db.height:
        count = tables_per_db.select(
            "database",
            pl.lit(None, pl.String).alias("collection"),
            "observed_at",
            pl.col("tables").alias("value"),
            pl.lit("postgresql.table.count").alias("metric"),
            pl.lit("{table}").alias("unit"),
            pl.lit("gauge").alias("kind"),
            pl.lit(True).alias("is_int"),
        )
        frames.append(_points(count, resource, window_start, window_end, attributes(base)))
    out = [f for f in frames if f.height]
    return pl.concat(out).cast(POINTS) if out else pl.DataFrame(schema=POINTS)


def emit(state: TableState, window: Window, max_tables_tracked: int) -> tuple[TableState, pl.DataFrame]:
    """Close the table window that ends with ``window``: cap, roll up, points."""
    end = window.end
    period = window.period  # ``end`` is earlier when the window closed early
    table_window = state.open.get(period)
    if table_window is None:
        return state, pl.DataFrame(schema=POINTS)
    state = replace(state, open={e: w for e, w in state.open.items() if e != period})
    state, tables = choose(state, table_window, max_tables_tracked)
    # A table not re-read is unchanged since (its counters did not move): its gauges hold as of
    # its database's last scrape, which is when they are reported.
    tables = tables.with_columns(pl.col("observed_at").max().over("database"))
    rows = _rollup(tables)
    known = table_window.known if table_window.known is not None else state.known  # (not the dropped ones)
    per_db = known.group_by("database", maintain_order=True).agg(pl.len().alias("tables"), pl.col("observed_at").max())
    return state, table_points(rows, per_db, window.resource, window.start, end)


__all__ = ["TableState", "TableWindow", "add", "choose", "emit", "observe", "table_points"]
