"""The polars schemas of every frame kind, and the Snapshot that carries one scrape.

Every stage speaks these schemas; a frame that does not match is a bug, so
:func:`conform` both casts and orders columns and fails loudly on a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

UTC_TS = pl.Datetime("us", "UTC")

# Counters of pg_stat_statements, mapped onto one stable set for PostgreSQL 13 to 18.
STATEMENT_INT_COUNTERS = (
    "calls",
    "plans",
    "rows",
    "shared_blks_hit",
    "shared_blks_read",
    "shared_blks_dirtied",
    "shared_blks_written",
    "local_blks_hit",
    "local_blks_read",
    "local_blks_dirtied",
    "local_blks_written",
    "temp_blks_read",
    "temp_blks_written",
    "wal_records",
    "wal_fpi",
    "wal_bytes",
)
STATEMENT_TIME_COUNTERS = (  # milliseconds, as PostgreSQL reports them
    "total_exec_time",
    "total_plan_time",
    "shared_blk_read_time",
    "shared_blk_write_time",
    "local_blk_read_time",
    "local_blk_write_time",
    "temp_blk_read_time",
    "temp_blk_write_time",
)
STATEMENT_COUNTERS = STATEMENT_INT_COUNTERS + STATEMENT_TIME_COUNTERS
STATEMENT_KEY = ("dbid", "userid", "queryid", "toplevel")

STATEMENTS = pl.Schema(
    {
        "dbid": pl.Int64,
        "userid": pl.Int64,
        "queryid": pl.Int64,
        "toplevel": pl.Boolean,
        "database": pl.String,
        "user": pl.String,
        "query": pl.String,
        "stats_since": UTC_TS,
        **{c: pl.Int64 for c in STATEMENT_INT_COUNTERS},
        **{c: pl.Float64 for c in STATEMENT_TIME_COUNTERS},
    }
)

ACTIVITY = pl.Schema(
    {
        "database": pl.String,
        "user": pl.String,
        "state": pl.String,
        "wait_event_type": pl.String,
        "backend_type": pl.String,
        "count": pl.Int64,
    }
)

LOCKS = pl.Schema(
    {
        "database": pl.String,
        "mode": pl.String,
        "locktype": pl.String,
        "granted": pl.Boolean,
        "count": pl.Int64,
    }
)

BLOCKED = pl.Schema({"database": pl.String, "sessions": pl.Int64, "max_wait_secs": pl.Float64})

DATABASE_COUNTERS = (
    "xact_commit",
    "xact_rollback",
    "blks_read",
    "blks_hit",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "conflicts",
    "temp_files",
    "temp_bytes",
    "deadlocks",
)
DATABASES = pl.Schema(
    {
        "datid": pl.Int64,
        "database": pl.String,
        "numbackends": pl.Int64,
        "stats_reset": UTC_TS,
        **{c: pl.Int64 for c in DATABASE_COUNTERS},
    }
)

# Per-table statistics (issue 13), one row per table (partitions rolled into their root), scraped
# from each database's own catalog every table_stats_interval_secs. ``kind`` says what a row is:
# "table" (a table's cumulative counters and gauges), "bucket" (every table of bucket ``bucket``
# was fetched: a table of it missing from the frame was dropped), "seed" (the same, read for the
# first time: its tables are a baseline) or "all" (every table of the database was fetched). Counters are cumulative; the operator diffs them (pgflow.ops.tables).
TABLE_COUNTERS = (
    "seq_scan",
    "idx_scan",
    "n_tup_ins",
    "n_tup_upd",
    "n_tup_del",
    "n_tup_hot_upd",
    "vacuum_count",
    "autovacuum_count",
    "analyze_count",
    "autoanalyze_count",
    "heap_blks_read",
    "heap_blks_hit",
    "idx_blks_read",
    "idx_blks_hit",
    "toast_blks_read",
    "toast_blks_hit",
)
TABLE_GAUGES = ("n_live_tup", "n_dead_tup", "table_size", "index_size", "frozen_xid_age")
TABLE_TIMES = ("last_vacuum", "last_autovacuum", "last_analyze", "last_autoanalyze")
TABLES = pl.Schema(
    {
        "database": pl.String,
        "kind": pl.String,
        "bucket": pl.Int64,
        "relid": pl.Int64,
        "table": pl.String,
        "observed_at": UTC_TS,
        **{c: pl.Int64 for c in TABLE_COUNTERS},
        **{c: pl.Int64 for c in TABLE_GAUGES},
        **{c: UTC_TS for c in TABLE_TIMES},
    }
)

# Every point attribute pgflow exports; in a points frame, a null field is an absent attribute.
ATTRIBUTE_KEYS = (
    "db.system.name",
    "db.namespace",
    "user.name",
    "db.operation.name",
    "db.query.summary",
    "postgresql.query.fingerprint",
    "db.query.text",
    "postgresql.block.kind",
    "postgresql.io.direction",
    "postgresql.connection.state",
    "postgresql.wait_event.type",
    "postgresql.lock.mode",
    "postgresql.lock.type",
    "postgresql.lock.granted",
    # issue 13, per table
    "db.collection.name",
    "postgresql.operation",
    "postgresql.row.state",
    "source",
)
ATTRIBUTES = pl.Struct({key: pl.String for key in ATTRIBUTE_KEYS})

POINTS = pl.Schema(
    {
        "instance": pl.String,
        "metric": pl.String,
        "kind": pl.String,  # "sum" | "gauge"
        "unit": pl.String,
        "monotonic": pl.Boolean,
        "start": UTC_TS,
        "end": UTC_TS,
        "value": pl.Float64,
        "is_int": pl.Boolean,  # encode as as_int (counts) rather than as_double (durations)
        "attributes": ATTRIBUTES,
        # The instance's resource, repeated per point so that a points frame stands alone.
        "server_address": pl.String,
        "server_port": pl.Int32,
        "server_version_num": pl.Int32,
    }
)


def conform(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """Cast and order ``frame`` to ``schema``; columns it lacks become typed nulls."""
    if frame.width == 0:
        return pl.DataFrame(schema=schema)
    return frame.select(
        (pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype=dtype)).alias(name)
        for name, dtype in schema.items()
    )


def empty(schema: pl.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass(frozen=True)
class Snapshot:
    """One scrape of one PostgreSQL instance: metadata plus polars frames.

    ``scraped_at`` is the server's clock. ``stats_reset`` and ``dealloc`` come from
    ``pg_stat_statements_info`` (PostgreSQL 14+; None before).
    """

    instance: str
    scraped_at: datetime
    server_version_num: int
    stats_reset: datetime | None
    dealloc: int | None
    statements: pl.DataFrame
    activity: pl.DataFrame = field(default_factory=lambda: empty(ACTIVITY))
    locks: pl.DataFrame = field(default_factory=lambda: empty(LOCKS))
    blocked: pl.DataFrame = field(default_factory=lambda: empty(BLOCKED))
    databases: pl.DataFrame = field(default_factory=lambda: empty(DATABASES))
    max_connections: int | None = None
    oldest_xact_age_secs: float | None = None
    oldest_query_age_secs: float | None = None
    server_address: str = ""
    server_port: int = 0
    hidden_statements: int = 0  # rows whose queryid the role may not see
    tables: pl.DataFrame = field(default_factory=lambda: empty(TABLES))  # issue 13: empty when not due

    FRAMES = ("statements", "activity", "locks", "blocked", "databases", "tables")

    def equals(self, other: Snapshot) -> bool:
        """Frame-for-frame equality (for capture round trips and replay checks)."""
        scalars = ("instance", "scraped_at", "server_version_num", "stats_reset", "dealloc", "max_connections",
                   "oldest_xact_age_secs", "oldest_query_age_secs", "server_address", "server_port", "hidden_statements")
        return all(getattr(self, s) == getattr(other, s) for s in scalars) and all(
            getattr(self, f).equals(getattr(other, f)) for f in self.FRAMES
        )
