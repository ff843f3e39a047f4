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

# issue 11: active-session samples taken since the previous scrape (pgflow/scrape/sampler.py).
# One row per distinct (database, user, backend_type, state, wait_event_type, wait_event,
# query_id) seen by the samples; ``count`` samples of ``period_secs`` each (session-seconds =
# count x period). ``dbid``/``userid`` (datid, usesysid) pair query_id with pg_stat_statements'
# key; ``query_id`` is null on PostgreSQL 13 and for statements without one. ``source`` is
# ``pg_stat_activity`` or ``pg_wait_sampling``.
SAMPLES = pl.Schema(
    {
        "dbid": pl.Int64,
        "userid": pl.Int64,
        "database": pl.String,
        "user": pl.String,
        "backend_type": pl.String,
        "state": pl.String,
        "wait_event_type": pl.String,
        "wait_event": pl.String,
        "query_id": pl.Int64,
        "source": pl.String,
        "count": pl.Int64,
        "period_secs": pl.Float64,
    }
)

# issue 11: what the samples since the previous scrape found beyond waits, in long form.
# ``stat`` is one of:
#   blocked_secs      session-seconds spent blocked (samples x period), by the ROOT blocker:
#                     database, state = root's state, query_id/dbid/userid = root's statement
#   root_count        max number of root blockers in one sample, by database (gauge)
#   chain_depth_max   max blocking chain depth (root = 0), by database (gauge)
#   xact_age_max      oldest open transaction in seconds, by database and state (gauge)
#   xmin_age_max      oldest backend_xmin in transactions, by database and state (gauge)
#   hidden_sessions   max sessions in one sample the role may not see (no pg_read_all_stats)
#   samples_taken / samples_failed / samples_skipped / period_secs   the sampler's own counts
SESSION_STATS = pl.Schema(
    {
        "stat": pl.String,
        "database": pl.String,
        "state": pl.String,
        "query_id": pl.Int64,
        "dbid": pl.Int64,
        "userid": pl.Int64,
        "value": pl.Float64,
    }
)

# --- issue 13: instance health groups (one frame each; empty when the group was not due) ---
# Counters are cumulative as PostgreSQL reports them (times in ms); ``stats_reset`` is the
# view's own reset time, so the delta operator can tell a pg_stat_reset_shared() from work.
DATABASE_SIZES = pl.Schema({"datid": pl.Int64, "database": pl.String, "size_bytes": pl.Int64})
CHECKPOINTER = pl.Schema({
    "stats_reset": UTC_TS,
    **{c: pl.Int64 for c in ("num_timed", "num_requested", "num_done", "restartpoints_timed", "restartpoints_req",
                             "restartpoints_done", "buffers_written")},
    "write_time": pl.Float64,
    "sync_time": pl.Float64,
})
BGWRITER = pl.Schema({
    "stats_reset": UTC_TS,
    **{c: pl.Int64 for c in ("buffers_clean", "maxwritten_clean", "buffers_alloc", "buffers_backend",
                             "buffers_backend_fsync")},
})
WAL = pl.Schema({
    "stats_reset": UTC_TS,
    **{c: pl.Int64 for c in ("wal_records", "wal_fpi", "wal_bytes", "wal_buffers_full", "wal_write", "wal_sync")},
    "wal_write_time": pl.Float64,
    "wal_sync_time": pl.Float64,
})
IO_INT_COUNTERS = ("reads", "writes", "writebacks", "extends", "hits", "evictions", "reuses", "fsyncs")
IO_TIME_COUNTERS = ("read_time", "write_time", "writeback_time", "extend_time", "fsync_time")
IO = pl.Schema({
    "backend_type": pl.String,
    "object": pl.String,
    "context": pl.String,
    "stats_reset": UTC_TS,
    **{c: pl.Int64 for c in IO_INT_COUNTERS},
    **{c: pl.Float64 for c in IO_TIME_COUNTERS},
})
ARCHIVER = pl.Schema({
    "stats_reset": UTC_TS,
    "archived_count": pl.Int64,
    "failed_count": pl.Int64,
    "last_archived_age_secs": pl.Float64,
    "last_failed_age_secs": pl.Float64,
})
REPLICATION = pl.Schema({
    "pid": pl.Int64,
    "application_name": pl.String,
    "client_addr": pl.String,
    "state": pl.String,
    "sync_state": pl.String,
    "data_delay_bytes": pl.Int64,
    "write_lag": pl.Float64,  # seconds
    "flush_lag": pl.Float64,
    "replay_lag": pl.Float64,
})
REPLICATION_SLOTS = pl.Schema({
    "slot_name": pl.String,
    "slot_type": pl.String,
    "active": pl.Boolean,
    "retained_wal_bytes": pl.Int64,
    "xmin_age": pl.Int64,
    "catalog_xmin_age": pl.Int64,
    "wal_status": pl.String,
})
WAL_RECEIVER = pl.Schema({
    "status": pl.String,  # null: the standby's WAL receiver is not running
    "last_msg_receipt_age_secs": pl.Float64,
    "replay_delay_bytes": pl.Int64,  # received but not yet replayed
    "replay_lag_secs": pl.Float64,  # since the last replayed transaction committed on the primary
})
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
    "postgresql.query.toplevel",  # issue 14: "false" for nested statements (track = all)
    # issue 11: active-session sampling
    "postgresql.backend.type",
    "postgresql.session.state",
    "postgresql.wait_event.name",
    "postgresql.blocking.root.state",
    "postgresql.wait.source",
)
# issue 13: health attributes (the OTel postgresqlreceiver's bare names where it has them).
ATTRIBUTE_KEYS += (
    "type",
    "source",
    "operation",
    "replication_client",
    "postgresql.replication.application_name",
    "postgresql.conflict.type",
    "postgresql.session.end",
    "postgresql.io.object",
    "postgresql.io.context",
    "postgresql.io.operation",
    "postgresql.replication_slot.name",
    "postgresql.replication_slot.type",
    # issue 13, per table
    "db.collection.name",
    "postgresql.operation",
    "postgresql.row.state",
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


# Issue 12: events (OTLP log records: query samples, plans), one row per event.
# Every attribute an event may carry, typed; a null field is an absent attribute.
EVENT_ATTRIBUTE_TYPES = {
    "db.system.name": pl.String,
    "db.namespace": pl.String,
    "user.name": pl.String,
    "db.operation.name": pl.String,
    "db.query.summary": pl.String,
    "db.query.text": pl.String,  # normalized: never a literal, never a comment
    "postgresql.query.fingerprint": pl.String,
    "postgresql.query_id": pl.Int64,
    "postgresql.pid": pl.Int64,
    "postgresql.state": pl.String,
    "postgresql.wait_event": pl.String,
    "postgresql.wait_event_type": pl.String,
    "postgresql.application_name": pl.String,
    "postgresql.query_start": pl.String,  # ISO 8601
    "postgresql.query.duration": pl.Float64,  # seconds it had run when seen
    "postgresql.query.truncated": pl.Boolean,
    "postgresql.query.unparsable": pl.Boolean,
    "postgresql.blocking.root.pid": pl.Int64,
    "postgresql.blocking.root.state": pl.String,
    "postgresql.blocking.root.fingerprint": pl.String,
    "network.peer.address": pl.String,
    "postgresql.plan.hash": pl.String,
    "postgresql.plan.generic": pl.Boolean,  # a generic plan (GENERIC_PLAN or PREPARE), not a literal one
}
EVENT_ATTRIBUTES = pl.Struct(EVENT_ATTRIBUTE_TYPES)
# Issue 12: plans explained beside the scrape source, riding on the next Snapshot; obfuscated at
# the source (pgflow.ops.plans), so no constant is ever held, captured or sent.
PLANS = pl.Schema(
    {
        "database": pl.String,
        "fingerprint": pl.String,
        "queryid": pl.Int64,
        "plan_hash": pl.String,
        "body": pl.String,  # the obfuscated plan, JSON, at most 128 KB
        "method": pl.String,  # generic_plan | prepare | helper
        "explained_at": UTC_TS,
    }
)
# Issue 12: query samples, one row per execution (pid, query_start) the sampler read the text of
# (pgflow/scrape/sampler.py), riding on the next Snapshot. The text is normalized (or a marker)
# the moment it is read: a raw text is never held in a frame, a capture, the ledger or a log.
QUERY_SAMPLES = pl.Schema(
    {
        "seen_at": UTC_TS,  # the sample that saw it (the server's clock)
        "database": pl.String,
        "user": pl.String,
        "pid": pl.Int64,
        "query_start": UTC_TS,
        "duration_secs": pl.Float64,  # how long it had run when seen
        "state": pl.String,
        "wait_event_type": pl.String,
        "wait_event": pl.String,
        "query_id": pl.Int64,  # PostgreSQL 14+ (null on 13, or compute_query_id off)
        "application_name": pl.String,
        "client_addr": pl.String,  # null over a Unix socket
        "fingerprint": pl.String,  # pgflow.ops.query_samples.sample_text: the statement metrics' key
        "text": pl.String,  # normalized, or <truncated> / <unparsable>
        "truncated": pl.Boolean,
        "unparsable": pl.Boolean,
        "blocking_root_pid": pl.Int64,  # a blocked session's root blocker (0: a prepared transaction)
        "blocking_root_state": pl.String,
        "blocking_root_fingerprint": pl.String,
        "blocking_root_query_id": pl.Int64,  # issue 19: the root's statement as the metrics name it
    }
)
EVENTS = pl.Schema(
    {
        "instance": pl.String,
        "event_name": pl.String,  # db.server.query_sample | db.server.query_plan
        "time": UTC_TS,
        "severity": pl.String,  # TRACE | DEBUG | INFO | WARN | ERROR | FATAL
        "body": pl.String,  # e.g. the normalized plan JSON; null: no body
        "attributes": EVENT_ATTRIBUTES,
        # The instance's resource, as in POINTS, so that an events frame stands alone.
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
class ServerIdentity:
    """Which server, and which run of it, a snapshot came from (issue 14).

    A DSN can reach another server (failover, a VIP or DNS move, PgBouncer retargeted, the
    next host of ``host=a,b``); its counters are another history and must start a new
    baseline. A restart of the same server keeps pg_stat_statements' counters and must not.
    """

    system_identifier: int | None = None  # pg_control_system(): same for a primary and its standbys
    timeline: int | None = None  # a promoted standby moves to a new timeline
    started_at: datetime | None = None  # pg_postmaster_start_time()
    in_recovery: bool | None = None
    address: str = ""  # inet_server_addr():port, or the host:port connected over a socket

    def same_history(self, previous: ServerIdentity) -> str | None:
        """None when the counters continue ``previous``'s; else why they do not.

        Another cluster (system identifier) never continues. The same postmaster always does.
        A new postmaster continues only as a restart of the same server: same timeline, same
        recovery state, same address; a promoted standby, a replica behind the same VIP at
        another address, or a server that is not the one before starts a new baseline.
        """
        if (self.system_identifier is not None and previous.system_identifier is not None
                and self.system_identifier != previous.system_identifier):
            return "another cluster (system identifier)"
        if self.started_at == previous.started_at:
            return None
        for name in ("timeline", "in_recovery", "address"):
            if getattr(self, name) != getattr(previous, name):
                return f"another server ({name.replace('_', ' ')} changed and the postmaster restarted)"
        return None

    def describe(self) -> str:
        return (f"system {self.system_identifier}, timeline {self.timeline}, "
                f"{'standby' if self.in_recovery else 'primary'} at {self.address or 'an unknown address'}")


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
    plans: pl.DataFrame = field(default_factory=lambda: empty(PLANS))  # issue 12
    identity: ServerIdentity | None = None  # which server answered (issue 14); None in old captures
    # issue 11: active-session samples since the previous scrape (empty when sampling is off)
    samples: pl.DataFrame = field(default_factory=lambda: empty(SAMPLES))
    session_stats: pl.DataFrame = field(default_factory=lambda: empty(SESSION_STATS))

    # issue 13: instance health groups; ``health_scraped`` names the groups this scrape read
    # (a group not in it was not due: its frame is empty and says nothing).
    database_sizes: pl.DataFrame = field(default_factory=lambda: empty(DATABASE_SIZES))
    checkpointer: pl.DataFrame = field(default_factory=lambda: empty(CHECKPOINTER))
    bgwriter: pl.DataFrame = field(default_factory=lambda: empty(BGWRITER))
    wal: pl.DataFrame = field(default_factory=lambda: empty(WAL))
    io: pl.DataFrame = field(default_factory=lambda: empty(IO))
    archiver: pl.DataFrame = field(default_factory=lambda: empty(ARCHIVER))
    replication: pl.DataFrame = field(default_factory=lambda: empty(REPLICATION))
    replication_slots: pl.DataFrame = field(default_factory=lambda: empty(REPLICATION_SLOTS))
    wal_receiver: pl.DataFrame = field(default_factory=lambda: empty(WAL_RECEIVER))
    health_scraped: tuple[str, ...] = ()
    # issue 12: query samples taken since the previous scrape (normalized texts only)
    query_samples: pl.DataFrame = field(default_factory=lambda: empty(QUERY_SAMPLES))

    tables: pl.DataFrame = field(default_factory=lambda: empty(TABLES))  # issue 13: empty when not due

    FRAMES = ("statements", "activity", "locks", "blocked", "databases", "plans", "samples", "session_stats",
              *HEALTH_FRAMES, "query_samples", "tables")

    def equals(self, other: Snapshot) -> bool:
        """Frame-for-frame equality (for capture round trips and replay checks)."""
        scalars = ("instance", "scraped_at", "server_version_num", "stats_reset", "dealloc", "max_connections",
                   "oldest_xact_age_secs", "oldest_query_age_secs", "server_address", "server_port", "hidden_statements",
                   "identity", "health_scraped")
        return all(getattr(self, s) == getattr(other, s) for s in scalars) and all(
            getattr(self, f).equals(getattr(other, f)) for f in self.FRAMES
        )
