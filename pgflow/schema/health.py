"""Instance health groups and per-table statistics (issue 13): one frame each, empty when not due."""

from __future__ import annotations

import polars as pl

from pgflow.schema.frames import UTC_TS

# --- issue 13: instance health groups (one frame each; empty when the group was not due) ---
# Counters are cumulative as PostgreSQL reports them (times in ms); ``stats_reset`` is the
# view's own reset time, so the delta operator can tell a pg_stat_reset_shared() from work.
DATABASE_SIZES = pl.Schema({"datid": pl.Int64, "database": pl.String, "size_bytes": pl.Int64})
CHECKPOINTER = pl.Schema(
    {
        "stats_reset": UTC_TS,
        **{
            c: pl.Int64
            for c in (
                "num_timed",
                "num_requested",
                "num_done",
                "restartpoints_timed",
                "restartpoints_req",
                "restartpoints_done",
                "buffers_written",
            )
        },
        "write_time": pl.Float64,
        "sync_time": pl.Float64,
    }
)
BGWRITER = pl.Schema(
    {
        "stats_reset": UTC_TS,
        **{c: pl.Int64 for c in ("buffers_clean", "maxwritten_clean", "buffers_alloc", "buffers_backend", "buffers_backend_fsync")},
    }
)
WAL = pl.Schema(
    {
        "stats_reset": UTC_TS,
        **{c: pl.Int64 for c in ("wal_records", "wal_fpi", "wal_bytes", "wal_buffers_full", "wal_write", "wal_sync")},
        "wal_write_time": pl.Float64,
        "wal_sync_time": pl.Float64,
    }
)
IO_INT_COUNTERS = ("reads", "writes", "writebacks", "extends", "hits", "evictions", "reuses", "fsyncs")
IO_TIME_COUNTERS = ("read_time", "write_time", "writeback_time", "extend_time", "fsync_time")
IO = pl.Schema(
    {
        "backend_type": pl.String,
        "object": pl.String,
        "context": pl.String,
        "stats_reset": UTC_TS,
        **{c: pl.Int64 for c in IO_INT_COUNTERS},
        **{c: pl.Float64 for c in IO_TIME_COUNTERS},
    }
)
ARCHIVER = pl.Schema(
    {
        "stats_reset": UTC_TS,
        "archived_count": pl.Int64,
        "failed_count": pl.Int64,
        "last_archived_age_secs": pl.Float64,
        "last_failed_age_secs": pl.Float64,
    }
)
REPLICATION = pl.Schema(
    {
        "pid": pl.Int64,
        "application_name": pl.String,
        "client_addr": pl.String,
        "state": pl.String,
        "sync_state": pl.String,
        "data_delay_bytes": pl.Int64,
        "write_lag": pl.Float64,  # seconds
        "flush_lag": pl.Float64,
        "replay_lag": pl.Float64,
    }
)
REPLICATION_SLOTS = pl.Schema(
    {
        "slot_name": pl.String,
        "slot_type": pl.String,
        "active": pl.Boolean,
        "retained_wal_bytes": pl.Int64,
        "xmin_age": pl.Int64,
        "catalog_xmin_age": pl.Int64,
        "wal_status": pl.String,
    }
)
WAL_RECEIVER = pl.Schema(
    {
        "status": pl.String,  # null: the standby's WAL receiver is not running
        "last_msg_receipt_age_secs": pl.Float64,
        "replay_delay_bytes": pl.Int64,  # received but not yet replayed
        "replay_lag_secs": pl.Float64,  # since the last replayed transaction committed on the primary
    }
)
HEALTH_FRAMES = {
    "database_sizes": DATABASE_SIZES,
    "checkpointer": CHECKPOINTER,
    "bgwriter": BGWRITER,
    "wal": WAL,
    "io": IO,
    "archiver": ARCHIVER,
    "replication": REPLICATION,
    "replication_slots": REPLICATION_SLOTS,
    "wal_receiver": WAL_RECEIVER,
}
# The groups a setting can name, and the Snapshot frame each fills.
HEALTH_GROUPS = {"db_size": "database_sizes", **{name: name for name in HEALTH_FRAMES if name != "database_sizes"}}
# --- end issue 13 ---

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
