"""Every metric and event pgflow exports, declared once (the registry's data; see pgflow.metrics).

To add a metric: declare it here, build its points in an operator (pgflow/ops), make a test produce
it, and run ``scripts/gen-docs``. Units follow OpenTelemetry (``s``, ``By``, ``{thing}``); names
marked ``otel=True`` are the OpenTelemetry postgresqlreceiver's, unit and attributes included.
"""

from __future__ import annotations

from typing import Any

from pgflow.metrics import DB_SYSTEM, Attribute, Event, Group, Kind, Metric

A = Attribute

# Attributes --------------------------------------------------------------------------------------

DB = A("db.namespace", "Database name (`other` past `max_databases_tracked`).")
USER = A("user.name", "Role name (`other` past `max_users_tracked`).")
# Issue 20: the gauges, the per-database health and the events carry every name the server has
# (the values are the server's; the names are not capped). Per-table statistics read at most
# max_databases_tracked databases (the rest are not visited, said once in the log).
DB_EVERY = A("db.namespace", "Database name, every database of the server (not capped).")
USER_EVERY = A("user.name", "Role name, every role seen (not capped).")
DB_VISITED = A(
    "db.namespace", "Database name: the databases table statistics visit (at most `max_databases_tracked`; others are not read)."
)
OPERATION_NAME = A(
    "db.operation.name",
    "The statement's operation.",
    values=(
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "COPY",
        "CALL",
        "TRANSACTION",
        "MAINTENANCE",
        "SET",
        "SHOW",
        "EXPLAIN",
        "DDL",
        "OTHER",
    ),
)
SUMMARY = A("db.query.summary", "Operation and first relation, e.g. `UPDATE pgbench_branches`.")
FINGERPRINT = A(
    "postgresql.query.fingerprint",
    "The statement's fingerprint (hex); `other`: the rolled-up series; `unknown`: a statement pg_stat_statements does not hold.",
    examples=("other", "unknown"),
)
TEXT = A("db.query.text", "Normalized statement text: never a literal or comment, at most 4095 characters.")
TOPLEVEL = A(
    "postgresql.query.toplevel",
    "`false` for statements nested in functions (`track = all`); absent on PostgreSQL 13.",
    values=("true", "false"),
)
QUERY_SERIES = (DB, USER, OPERATION_NAME, SUMMARY, FINGERPRINT, TEXT, TOPLEVEL)
BLOCK_KIND = A(
    "postgresql.block.kind",
    "Which block counter of pg_stat_statements.",
    values=tuple(f"{s}_{o}" for s in ("shared", "local") for o in ("hit", "read", "dirtied", "written")) + ("temp_read", "temp_written"),
)
IO_DIRECTION = A("postgresql.io.direction", "Block read or write time.", values=("read", "write"))
CONNECTION_STATE = A("postgresql.connection.state", "`pg_stat_activity.state`.", examples=("active", "idle", "idle in transaction"))
WAIT_TYPE = A(
    "postgresql.wait_event.type",
    "Wait event type; `CPU` when active with no wait event.",
    examples=("CPU", "Lock", "LWLock", "IO", "Client"),
)
WAIT_NAME = A(
    "postgresql.wait_event.name", "Wait event; `CPU` when active with no wait event.", examples=("CPU", "ClientRead", "transactionid")
)
LOCK_MODE = A("postgresql.lock.mode", "`pg_locks.mode`.", examples=("AccessShareLock", "RowExclusiveLock"))
LOCK_TYPE = A("postgresql.lock.type", "`pg_locks.locktype`.", examples=("relation", "transactionid"))
LOCK_GRANTED = A("postgresql.lock.granted", "Whether the lock is held or waited for.", values=("true", "false"))
BACKEND_TYPE = A(
    "postgresql.backend.type",
    "`backend_type` of pg_stat_activity / pg_stat_io.",
    examples=("client backend", "autovacuum worker", "checkpointer"),
)
SESSION_STATE = A("postgresql.session.state", "`pg_stat_activity.state` of the session.", examples=("active", "idle in transaction"))
WAIT_SOURCE = A("postgresql.wait.source", "Where the waits were read.", values=("pg_stat_activity",))
ROOT_STATE = A(
    "postgresql.blocking.root.state",
    "State of the root blocker; `prepared transaction`, or `unknown` (a root outside the sample, a deadlock not yet broken).",
    examples=("idle in transaction", "active", "prepared transaction", "unknown"),
)
CONFLICT = A(
    "postgresql.conflict.type",
    "Recovery conflict kind (only non-zero ones).",
    values=("tablespace", "lock", "snapshot", "bufferpin", "deadlock"),
)
SESSION_END = A("postgresql.session.end", "How sessions ended (only non-zero ones).", values=("abandoned", "fatal", "killed"))
TYPE = A("type", "The receiver's `type` attribute.")
SOURCE = A("source", "The receiver's `source` attribute.")
IO_OBJECT = A("postgresql.io.object", "`pg_stat_io.object`.", examples=("relation", "temp relation", "wal"))
IO_CONTEXT = A("postgresql.io.context", "`pg_stat_io.context`.", examples=("normal", "vacuum", "bulkread"))
IO_OPERATION = A(
    "postgresql.io.operation",
    "The I/O operation (only non-zero ones).",
    values=("read", "write", "writeback", "extend", "hit", "eviction", "reuse", "fsync"),
)
IO_ATTRS = (BACKEND_TYPE, IO_OBJECT, IO_CONTEXT)
CLIENT = A("replication_client", "The standby's client address.")
APP = A("postgresql.replication.application_name", "The standby's `application_name`.")
WAL_OPERATION = A("operation", "Which lag of pg_stat_replication.", values=("write", "flush", "replay"))
SLOT_NAME = A("postgresql.replication_slot.name", "Slot name.")
SLOT_TYPE = A("postgresql.replication_slot.type", "Slot type.", values=("physical", "logical"))
SLOT = (SLOT_NAME, SLOT_TYPE)
TABLE = A("db.collection.name", "`schema.table` (partitions rolled into their root); `other` past `max_tables_tracked`.")
TABLE_OPERATION = A("postgresql.operation", "Row operation.", values=("ins", "upd", "del", "hot_upd"))
ROW_STATE = A("postgresql.row.state", "Live or dead tuples.", values=("live", "dead"))
PER_TABLE = (DB_VISITED, TABLE)

RESOURCE_ATTRIBUTES = (
    A("service.name", "`service_name`, else `OTEL_SERVICE_NAME`, else `pgflow`."),
    A("service.instance.id", "The instance's name; `@<hostname>` appended for a loopback or socket address."),
    A("server.address", "The host that answered."),
    A("server.port", "Its port."),
    DB_SYSTEM,
    A("db.system.version", "`major.minor` of the server."),
    A("postgresql.instance.name", "The instance's name (`name` of an entry in `instances`, or `host:port`)."),
    A("host.name", "This machine's hostname, when the address is loopback or a socket."),
)

# Groups ------------------------------------------------------------------------------------------

GROUPS = (
    Group(
        "queries",
        "Query statistics",
        "From pg_stat_statements, every scrape: one series per database, user "
        "and fingerprint (capped by `max_queries_tracked`; the rest roll into `other`).",
    ),
    Group(
        "connections",
        "Connections and locks",
        "From pg_stat_activity and pg_locks, every scrape. Connection states, lock states and blocked sessions read 0 rather than vanish.",
    ),
    Group(
        "activity",
        "Active sessions",
        "From the active-session sampler (`activity_sample_interval_secs`). "
        "Average active sessions (AAS) = `postgresql.activity.time` of `postgresql.session.state = active` / "
        "window length.",
    ),
    Group("databases", "Databases", "From pg_stat_database, every scrape, per database (not capped)."),
    Group("db_size", "Database size", "`pg_database_size`, every `db_size_interval_secs`.", True),
    Group("checkpointer", "Checkpointer", "pg_stat_bgwriter (13–16), pg_stat_checkpointer (17+).", True),
    Group("bgwriter", "Background writer", "pg_stat_bgwriter.", True),
    Group("wal", "WAL", "pg_stat_wal (14+); on 18 writes and syncs come from pg_stat_io (group `io`).", True),
    Group("io", "I/O", "pg_stat_io (16+).", True),
    Group("archiver", "Archiver", "pg_stat_archiver.", True),
    Group("replication", "Replication", "pg_stat_replication, on a primary.", True),
    Group("replication_slots", "Replication slots", "pg_replication_slots.", True),
    Group("wal_receiver", "WAL receiver", "pg_stat_wal_receiver, on a standby.", True),
    Group(
        "tables",
        "Tables",
        "Each database's own catalog, every `table_stats_interval_secs`; at most "
        "`max_tables_tracked` tables, the rest roll into `other` per database.",
    ),
    Group("events", "Events", "OTLP log records, through the same ledger as the metrics."),
)

# Metrics -----------------------------------------------------------------------------------------

M = Metric
PGSS = "pg_stat_statements"
PGSD = "pg_stat_database"
SAMPLER = "active-session sampler"
CKPT = "pg_stat_bgwriter (13–16), pg_stat_checkpointer (17+)"
WALIO = "pg_stat_wal (14–17), pg_stat_io object `wal` (18+)"


def _db(name: str, unit: str, description: str, **kw: Any) -> Metric:
    kw.setdefault("otel", True)
    return M(
        name,
        kw.pop("kind", "sum"),
        unit,
        kw.pop("value_type", "int"),
        description,
        kw.pop("source", PGSD),
        kw.pop("group", "databases"),
        kw.pop("attributes", (DB_EVERY,)),
        **kw,
    )


def _table(name: str, kind: Kind, unit: str, description: str, *extra: Attribute, **kw: Any) -> Metric:
    return M(
        name,
        kind,
        unit,
        kw.pop("value_type", "int"),
        description,
        kw.pop("source", "pg_stat_user_tables"),
        "tables",
        PER_TABLE + extra,
        **kw,
    )


METRICS = (
    # Query statistics
    M("postgresql.query.calls", "sum", "{call}", "int", "Executions.", PGSS, "queries", QUERY_SERIES),
    M("postgresql.query.duration", "sum", "s", "double", "Execution time.", PGSS, "queries", QUERY_SERIES),
    M(
        "postgresql.query.plan.duration",
        "sum",
        "s",
        "double",
        "Planning time (only non-zero).",
        "pg_stat_statements (`track_planning`)",
        "queries",
        QUERY_SERIES,
    ),
    M("postgresql.query.rows", "sum", "{row}", "int", "Rows returned or affected.", PGSS, "queries", QUERY_SERIES),
    M("postgresql.query.blocks", "sum", "{block}", "int", "Blocks by kind (only non-zero).", PGSS, "queries", QUERY_SERIES + (BLOCK_KIND,)),
    M(
        "postgresql.query.io.duration",
        "sum",
        "s",
        "double",
        "Block read and write time (only non-zero).",
        "pg_stat_statements (`track_io_timing`)",
        "queries",
        QUERY_SERIES + (IO_DIRECTION,),
    ),
    M("postgresql.query.wal.bytes", "sum", "By", "int", "WAL generated (only non-zero).", PGSS, "queries", QUERY_SERIES),
    M(
        "postgresql.statements.deallocated",
        "sum",
        "{statement}",
        "int",
        "Entries pg_stat_statements evicted (raise `pg_stat_statements.max` when it grows).",
        "pg_stat_statements_info",
        "queries",
        min_version=140000,
    ),
    # Connections and locks
    M(
        "postgresql.connection.count",
        "gauge",
        "{connection}",
        "int",
        "Client connections.",
        "pg_stat_activity",
        "connections",
        (DB_EVERY, USER_EVERY, CONNECTION_STATE, WAIT_TYPE),
    ),
    M("postgresql.connection.max", "gauge", "{connection}", "int", "`max_connections`.", "`max_connections`", "connections"),
    M(
        "postgresql.lock.count",
        "gauge",
        "{lock}",
        "int",
        "Locks held or awaited.",
        "pg_locks",
        "connections",
        (DB_EVERY, LOCK_MODE, LOCK_TYPE, LOCK_GRANTED),
    ),
    M("postgresql.blocked.count", "gauge", "{session}", "int", "Sessions waiting on a lock.", "pg_locks", "connections", (DB_EVERY,)),
    M("postgresql.blocked.wait.max", "gauge", "s", "double", "Longest current lock wait.", "pg_stat_activity", "connections", (DB_EVERY,)),
    # Active sessions
    M(
        "postgresql.activity.time",
        "sum",
        "s",
        "double",
        "Session-seconds observed (samples x period).",
        SAMPLER,
        "activity",
        (DB, USER, BACKEND_TYPE, SESSION_STATE, WAIT_TYPE, WAIT_NAME, FINGERPRINT, WAIT_SOURCE),
    ),
    M(
        "postgresql.blocking.time",
        "sum",
        "s",
        "double",
        "Seconds sessions spent blocked, by their root blocker (fingerprint: the root's statement).",
        "sampler, blocking trees",
        "activity",
        (DB, ROOT_STATE, FINGERPRINT),
    ),
    M(
        "postgresql.blocking.root.count",
        "gauge",
        "{session}",
        "int",
        "Most root blockers seen at once in the window.",
        SAMPLER,
        "activity",
        (DB,),
    ),
    M(
        "postgresql.blocking.chain.depth.max",
        "gauge",
        "{session}",
        "int",
        "Longest blocking chain (A blocks B blocks C: 2).",
        SAMPLER,
        "activity",
        (DB,),
    ),
    M(
        "postgresql.transaction.age.max",
        "gauge",
        "s",
        "double",
        "Oldest open transaction seen in the window.",
        SAMPLER,
        "activity",
        (DB, SESSION_STATE),
    ),
    M(
        "postgresql.backend_xmin.age.max",
        "gauge",
        "{transaction}",
        "int",
        "Oldest xmin horizon held by a backend (what stops vacuum).",
        SAMPLER,
        "activity",
        (DB, SESSION_STATE),
    ),
    # Databases
    _db("postgresql.commits", "1", "Transactions committed."),
    _db("postgresql.rollbacks", "1", "Transactions rolled back."),
    _db("postgresql.blks_hit", "{blks_hit}", "Blocks found in shared buffers."),
    _db("postgresql.blks_read", "{blks_read}", "Blocks read from disk (or the OS cache)."),
    _db("postgresql.tup_returned", "{tup_returned}", "Rows returned by scans."),
    _db("postgresql.tup_fetched", "{tup_fetched}", "Rows fetched by index scans."),
    _db("postgresql.tup_inserted", "{tup_inserted}", "Rows inserted."),
    _db("postgresql.tup_updated", "{tup_updated}", "Rows updated."),
    _db("postgresql.tup_deleted", "{tup_deleted}", "Rows deleted."),
    _db("postgresql.deadlocks", "{deadlock}", "Deadlocks detected."),
    _db("postgresql.temp_files", "{temp_file}", "Temporary files created."),
    _db("postgresql.temp.io", "By", "Bytes written to temporary files."),
    _db(
        "postgresql.query.conflicts",
        "{query}",
        "Queries cancelled by recovery conflicts (standbys).",
        source="pg_stat_database_conflicts",
        attributes=(DB_EVERY, CONFLICT),
    ),
    _db("postgresql.session.time", "s", "Time sessions spent connected.", value_type="double", otel=False, min_version=140000),
    _db(
        "postgresql.session.active.time",
        "s",
        "Time sessions spent executing statements.",
        value_type="double",
        otel=False,
        min_version=140000,
    ),
    _db(
        "postgresql.session.idle_in_transaction.time",
        "s",
        "Time sessions spent idle in a transaction.",
        value_type="double",
        otel=False,
        min_version=140000,
    ),
    _db("postgresql.session.count", "{session}", "Sessions established.", otel=False, min_version=140000),
    _db(
        "postgresql.sessions",
        "{session}",
        "Sessions that ended abnormally, by how.",
        otel=False,
        min_version=140000,
        attributes=(DB_EVERY, SESSION_END),
    ),
    _db("postgresql.backends", "1", "Backends connected (a gauge here).", kind="gauge"),
    _db(
        "postgresql.database.frozen_xid.age",
        "{transaction}",
        "`age(datfrozenxid)`: distance to wraparound.",
        kind="gauge",
        otel=False,
        source="pg_database",
    ),
    _db("postgresql.database.min_mxid.age", "{multixact}", "`mxid_age(datminmxid)`.", kind="gauge", otel=False, source="pg_database"),
    _db("postgresql.db_size", "By", "Database size (a gauge here).", kind="gauge", source="`pg_database_size`", group="db_size"),
    # Checkpointer and background writer
    M(
        "postgresql.bgwriter.checkpoint.count",
        "sum",
        "{checkpoints}",
        "int",
        "Checkpoints.",
        CKPT,
        "checkpointer",
        (TYPE.only("scheduled", "requested"),),
        otel=True,
    ),
    M(
        "postgresql.bgwriter.duration",
        "sum",
        "ms",
        "double",
        "Checkpoint write and sync time (the receiver's unit).",
        CKPT,
        "checkpointer",
        (TYPE.only("write", "sync"),),
        otel=True,
    ),
    M(
        "postgresql.bgwriter.buffers.writes",
        "sum",
        "{buffers}",
        "int",
        "Buffers written, by writer (`bgwriter`, `backend`, `backend_fsync` from group bgwriter; the last two up to 16).",
        CKPT,
        "checkpointer",
        (SOURCE.only("checkpoints", "bgwriter", "backend", "backend_fsync"),),
        otel=True,
    ),
    M(
        "postgresql.checkpointer.restartpoint.count",
        "sum",
        "{restartpoints}",
        "int",
        "Restartpoints (standbys).",
        "pg_stat_checkpointer",
        "checkpointer",
        (TYPE.only("scheduled", "requested", "done"),),
        min_version=170000,
    ),
    M("postgresql.bgwriter.buffers.allocated", "sum", "{buffers}", "int", "Buffers allocated.", "pg_stat_bgwriter", "bgwriter", otel=True),
    M(
        "postgresql.bgwriter.maxwritten",
        "sum",
        "1",
        "int",
        "Background writer stops: too many buffers written.",
        "pg_stat_bgwriter",
        "bgwriter",
        otel=True,
    ),
    # WAL
    M("postgresql.wal.records", "sum", "{record}", "int", "WAL records.", "pg_stat_wal", "wal", min_version=140000),
    M("postgresql.wal.fpi", "sum", "{record}", "int", "Full-page images.", "pg_stat_wal", "wal", min_version=140000),
    M("postgresql.wal.bytes", "sum", "By", "int", "WAL bytes.", "pg_stat_wal", "wal", min_version=140000),
    M(
        "postgresql.wal.buffers_full",
        "sum",
        "{event}",
        "int",
        "WAL writes because the buffers were full.",
        "pg_stat_wal",
        "wal",
        min_version=140000,
    ),
    M("postgresql.wal.writes", "sum", "{write}", "int", "WAL writes.", WALIO, "wal", min_version=140000),
    M("postgresql.wal.syncs", "sum", "{sync}", "int", "WAL syncs.", WALIO, "wal", min_version=140000),
    M("postgresql.wal.write.time", "sum", "s", "double", "WAL write time.", WALIO, "wal", min_version=140000),
    M("postgresql.wal.sync.time", "sum", "s", "double", "WAL sync time.", WALIO, "wal", min_version=140000),
    # I/O
    M(
        "postgresql.io.operations",
        "sum",
        "{operation}",
        "int",
        "I/O operations (only non-zero).",
        "pg_stat_io",
        "io",
        IO_ATTRS + (IO_OPERATION,),
        min_version=160000,
    ),
    M(
        "postgresql.io.duration",
        "sum",
        "s",
        "double",
        "I/O time (only non-zero).",
        "pg_stat_io",
        "io",
        IO_ATTRS + (IO_OPERATION.only("read", "write", "writeback", "extend", "fsync"),),
        min_version=160000,
    ),
    # Archiver
    M("postgresql.archiver.archived", "sum", "{file}", "int", "WAL files archived.", "pg_stat_archiver", "archiver"),
    M("postgresql.archiver.failed", "sum", "{file}", "int", "Failed archive attempts.", "pg_stat_archiver", "archiver"),
    M(
        "postgresql.wal.age",
        "gauge",
        "s",
        "double",
        "Since the last WAL file was archived (absent if none was).",
        "pg_stat_archiver",
        "archiver",
        otel=True,
    ),
    # Replication
    M(
        "postgresql.replication.data_delay",
        "gauge",
        "By",
        "int",
        "WAL sent but not replayed by a standby.",
        "pg_stat_replication",
        "replication",
        (CLIENT, APP),
        otel=True,
    ),
    M(
        "postgresql.wal.delay",
        "gauge",
        "s",
        "double",
        "A standby's write, flush and replay lag (absent while null).",
        "pg_stat_replication",
        "replication",
        (CLIENT, APP, WAL_OPERATION),
        otel=True,
    ),
    M(
        "postgresql.replication.standbys",
        "gauge",
        "{standby}",
        "int",
        "Standbys connected to this primary (0 when none).",
        "pg_stat_replication",
        "replication",
    ),
    M(
        "postgresql.replication_slot.retained_wal",
        "gauge",
        "By",
        "int",
        "WAL the slot keeps from removal.",
        "pg_replication_slots",
        "replication_slots",
        SLOT,
    ),
    M(
        "postgresql.replication_slot.active",
        "gauge",
        "1",
        "int",
        "1 while a consumer is connected.",
        "pg_replication_slots",
        "replication_slots",
        SLOT,
    ),
    M(
        "postgresql.replication_slot.xmin.age",
        "gauge",
        "{transaction}",
        "int",
        "Age of the slot's xmin.",
        "pg_replication_slots",
        "replication_slots",
        SLOT,
    ),
    M(
        "postgresql.replication_slot.catalog_xmin.age",
        "gauge",
        "{transaction}",
        "int",
        "Age of the slot's catalog_xmin.",
        "pg_replication_slots",
        "replication_slots",
        SLOT,
    ),
    M(
        "postgresql.wal_receiver.connected",
        "gauge",
        "1",
        "int",
        "1 while the standby's WAL receiver streams.",
        "pg_stat_wal_receiver",
        "wal_receiver",
    ),
    M(
        "postgresql.wal_receiver.last_msg_receipt.age",
        "gauge",
        "s",
        "double",
        "Since the last message from the primary.",
        "pg_stat_wal_receiver",
        "wal_receiver",
    ),
    M(
        "postgresql.wal_receiver.replay.delay",
        "gauge",
        "By",
        "int",
        "WAL received but not yet replayed.",
        "pg_stat_wal_receiver",
        "wal_receiver",
    ),
    M(
        "postgresql.wal_receiver.replay.lag",
        "gauge",
        "s",
        "double",
        "Since the last replayed transaction committed on the primary.",
        "`pg_last_xact_replay_timestamp()`",
        "wal_receiver",
    ),
    # Tables
    _table("postgresql.operations", "sum", "1", "Rows inserted, updated, deleted, HOT-updated.", TABLE_OPERATION, otel=True),
    _table("postgresql.sequential_scans", "sum", "{sequential_scan}", "Sequential scans.", otel=True),
    _table("postgresql.index.scans", "sum", "{scans}", "Index scans, the table's indexes summed.", otel=True),
    _table(
        "postgresql.blocks_read",
        "sum",
        "1",
        "Blocks read and hit, heap, index and TOAST.",
        SOURCE.only(*(f"{o}_{k}" for o in ("heap", "idx", "toast") for k in ("read", "hit"))),
        source="pg_statio_user_tables",
        otel=True,
    ),
    _table("postgresql.table.vacuum.count", "sum", "{vacuum}", "Manual vacuums.", otel=True),
    _table("postgresql.table.autovacuum.count", "sum", "{vacuum}", "Autovacuums."),
    _table("postgresql.table.analyze.count", "sum", "{analyze}", "Manual analyzes."),
    _table("postgresql.table.autoanalyze.count", "sum", "{analyze}", "Autoanalyzes."),
    _table("postgresql.rows", "gauge", "1", "Live and dead tuples.", ROW_STATE, otel=True),
    _table("postgresql.table.size", "gauge", "By", "Table size (heap and TOAST).", source="`pg_table_size`", otel=True),
    _table("postgresql.index.size", "gauge", "By", "Size of the table's indexes.", source="`pg_indexes_size`", otel=True),
    _table("postgresql.table.frozen_xid.age", "gauge", "{transaction}", "`age(relfrozenxid)`.", source="pg_class"),
    *(
        _table(f"postgresql.table.{w}.age", "gauge", "s", f"Since the last {w} (named tables only).", value_type="double")
        for w in ("vacuum", "autovacuum", "analyze", "autoanalyze")
    ),
    M("postgresql.table.count", "gauge", "{table}", "int", "Tables in the database.", "pg_class", "tables", (DB_VISITED,), otel=True),
)

# Events ------------------------------------------------------------------------------------------

_EVENT_COMMON = (
    A("event.name", "The event's name, also as an attribute (added by the OTLP encoder)."),
    DB_SYSTEM,
    DB_EVERY,
    FINGERPRINT,
    A("postgresql.query_id", "pg_stat_statements' queryid (14+)."),
)
EVENTS = (
    Event(
        "db.server.query_sample",
        "One execution running longer than `sample_min_duration_ms`, as the sampler saw it (limited per fingerprint and per window).",
        _EVENT_COMMON
        + (
            USER_EVERY,
            A("db.query.text", "Normalized text, or `<truncated>` / `<unparsable>`."),
            A("postgresql.pid", "Backend pid."),
            A("postgresql.state", "`pg_stat_activity.state`."),
            A("postgresql.wait_event", "Wait event."),
            A("postgresql.wait_event_type", "Wait event type."),
            A("postgresql.application_name", "`application_name`."),
            A("postgresql.query_start", "Start of the execution, ISO 8601."),
            A("postgresql.query.duration", "Seconds it had run when seen."),
            A("postgresql.query.truncated", "The text was cut by `track_activity_query_size`.", values=("true",)),
            A("postgresql.query.unparsable", "The text could not be parsed.", values=("true",)),
            A("postgresql.blocking.root.pid", "A blocked session's root blocker (0: a prepared transaction)."),
            A("postgresql.blocking.root.state", "The root blocker's state."),
            A("postgresql.blocking.root.fingerprint", "The root blocker's statement fingerprint."),
            A("network.peer.address", "Client address (absent over a Unix socket)."),
        ),
        None,
        "pg_stat_activity (query samples)",
        "events",
    ),
    Event(
        "db.server.query_plan",
        "A generic plan of a tracked statement, at most `explains_per_window` per window, each fingerprint once per `explain_ttl_secs`.",
        _EVENT_COMMON
        + (
            A("postgresql.plan.hash", "Hash of the plan's shape."),
            A("postgresql.plan.generic", "A generic plan (never a literal one).", values=("true",)),
        ),
        "The obfuscated plan, `EXPLAIN (FORMAT JSON)`, at most 128 KB.",
        "`EXPLAIN (GENERIC_PLAN)` (16+), `PREPARE` + `EXPLAIN EXECUTE` (13–15), or the optional helper",
        "events",
    ),
)
