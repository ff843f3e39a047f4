"""What one scrape reads: pg_stat_statements' counters mapped onto one set for PostgreSQL 13 to 18,
activity, locks and pg_stat_database."""

from __future__ import annotations

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

LOCKS = pl.Schema({"database": pl.String, "mode": pl.String, "locktype": pl.String, "granted": pl.Boolean, "count": pl.Int64})

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
    # issue 13: PostgreSQL 14+ session counters, and pg_stat_database_conflicts (standbys); null where absent.
    "sessions",
    "sessions_abandoned",
    "sessions_fatal",
    "sessions_killed",
    "confl_tablespace",
    "confl_lock",
    "confl_snapshot",
    "confl_bufferpin",
    "confl_deadlock",
)
DATABASE_TIME_COUNTERS = ("session_time", "active_time", "idle_in_transaction_time")  # issue 13: ms, 14+
DATABASES = pl.Schema(
    {
        "datid": pl.Int64,
        "database": pl.String,
        "numbackends": pl.Int64,
        "stats_reset": UTC_TS,
        **{c: pl.Int64 for c in DATABASE_COUNTERS},
        # issue 13: gauges (how close each database is to wraparound) and the session times.
        "frozen_xid_age": pl.Int64,
        "min_mxid_age": pl.Int64,
        **{c: pl.Float64 for c in DATABASE_TIME_COUNTERS},
    }
)
