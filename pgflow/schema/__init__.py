"""The polars schemas of every frame kind, and the Snapshot that carries one scrape.

Every stage speaks these schemas; a frame that does not match is a bug, so
:func:`conform` both casts and orders columns and fails loudly on a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from pgflow.schema.frames import (
    ACTIVITY,
    BLOCKED,
    DATABASE_COUNTERS,
    DATABASE_TIME_COUNTERS,
    DATABASES,
    LOCKS,
    STATEMENT_COUNTERS,
    STATEMENT_INT_COUNTERS,
    STATEMENT_KEY,
    STATEMENT_TIME_COUNTERS,
    STATEMENTS,
    UTC_TS,
)
from pgflow.schema.health import (
    ARCHIVER,
    BGWRITER,
    CHECKPOINTER,
    DATABASE_SIZES,
    HEALTH_FRAMES,
    HEALTH_GROUPS,
    IO,
    IO_INT_COUNTERS,
    IO_TIME_COUNTERS,
    REPLICATION,
    REPLICATION_SLOTS,
    TABLE_COUNTERS,
    TABLE_GAUGES,
    TABLE_TIMES,
    TABLES,
    WAL,
    WAL_RECEIVER,
)
from pgflow.schema.output import ATTRIBUTE_KEYS, ATTRIBUTES, EVENT_ATTRIBUTE_TYPES, EVENT_ATTRIBUTES, EVENTS, PLANS, POINTS, QUERY_SAMPLES
from pgflow.schema.sessions import SAMPLES, SESSION_STATS


def conform(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """Cast and order ``frame`` to ``schema``; columns it lacks become typed nulls."""
    if frame.width == 0:
        return pl.DataFrame(schema=schema)
    return frame.select(
        (pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype=dtype)).alias(name) for name, dtype in schema.items()
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
        if (
            self.system_identifier is not None
            and previous.system_identifier is not None
            and self.system_identifier != previous.system_identifier
        ):
            return "another cluster (system identifier)"
        if self.started_at == previous.started_at:
            return None
        for name in ("timeline", "in_recovery", "address"):
            if getattr(self, name) != getattr(previous, name):
                return f"another server ({name.replace('_', ' ')} changed and the postmaster restarted)"
        return None

    def describe(self) -> str:
        return (
            f"system {self.system_identifier}, timeline {self.timeline}, "
            f"{'standby' if self.in_recovery else 'primary'} at {self.address or 'an unknown address'}"
        )


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

    FRAMES = (
        "statements",
        "activity",
        "locks",
        "blocked",
        "databases",
        "plans",
        "samples",
        "session_stats",
        *HEALTH_FRAMES,
        "query_samples",
        "tables",
    )

    def equals(self, other: Snapshot) -> bool:
        """Frame-for-frame equality (for capture round trips and replay checks)."""
        scalars = (
            "instance",
            "scraped_at",
            "server_version_num",
            "stats_reset",
            "dealloc",
            "max_connections",
            "oldest_xact_age_secs",
            "oldest_query_age_secs",
            "server_address",
            "server_port",
            "hidden_statements",
            "identity",
            "health_scraped",
        )
        return all(getattr(self, s) == getattr(other, s) for s in scalars) and all(
            getattr(self, f).equals(getattr(other, f)) for f in self.FRAMES
        )


__all__ = [
    "ACTIVITY",
    "ARCHIVER",
    "ATTRIBUTES",
    "ATTRIBUTE_KEYS",
    "BGWRITER",
    "BLOCKED",
    "CHECKPOINTER",
    "DATABASES",
    "DATABASE_COUNTERS",
    "DATABASE_SIZES",
    "DATABASE_TIME_COUNTERS",
    "EVENTS",
    "EVENT_ATTRIBUTES",
    "EVENT_ATTRIBUTE_TYPES",
    "HEALTH_FRAMES",
    "HEALTH_GROUPS",
    "IO",
    "IO_INT_COUNTERS",
    "IO_TIME_COUNTERS",
    "LOCKS",
    "PLANS",
    "POINTS",
    "QUERY_SAMPLES",
    "REPLICATION",
    "REPLICATION_SLOTS",
    "SAMPLES",
    "SESSION_STATS",
    "STATEMENTS",
    "STATEMENT_COUNTERS",
    "STATEMENT_INT_COUNTERS",
    "STATEMENT_KEY",
    "STATEMENT_TIME_COUNTERS",
    "ServerIdentity",
    "Snapshot",
    "TABLES",
    "TABLE_COUNTERS",
    "TABLE_GAUGES",
    "TABLE_TIMES",
    "UTC_TS",
    "WAL",
    "WAL_RECEIVER",
    "conform",
    "empty",
]
