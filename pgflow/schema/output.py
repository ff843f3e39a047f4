"""What pgflow sends: the attributes and the points frame, events (plans, query samples) and the
frames they are made from (issue 12)."""

from __future__ import annotations

import polars as pl

from pgflow.schema.frames import UTC_TS

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
