"""Instance health groups: which a server has, which are due, and the SQL that reads them.

Each group (``schema.HEALTH_GROUPS``) has its own interval and can be disabled. What a
server supports is found once per connection, from its version and ``to_regclass`` (a fork
that reports its version out of step still gets only the views it has), so an unsupported
group is skipped rather than failing every scrape. Every query is a read of a statistics
view; none takes a lock on a user relation (sizes go through ``pg_database_size``, which
reads the file system). The scraper runs them in its own pipeline, under its
``statement_timeout`` and ``lock_timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from pgflow.schema import HEALTH_GROUPS

# Views whose presence decides a group, looked up with to_regclass.
_VIEWS = (
    "pg_stat_checkpointer",
    "pg_stat_wal",
    "pg_stat_io",
    "pg_stat_wal_receiver",
    "pg_replication_slots",
    "pg_stat_archiver",
    "pg_stat_replication",
    "pg_stat_bgwriter",
)
DISCOVER_SQL = "SELECT /*pgflow*/ current_setting('server_version_num')::int, " + ", ".join(
    f"to_regclass('pg_catalog.{v}') IS NOT NULL" for v in _VIEWS
)

DEFAULT_DB_SIZE_INTERVAL_SECS = 300.0


@dataclass(frozen=True)
class HealthSupport:
    """What one server offers; found once per connection."""

    version_num: int
    views: frozenset[str]

    @classmethod
    def of(cls, row: tuple) -> HealthSupport:
        version, *present = row
        return cls(int(version), frozenset(v for v, ok in zip(_VIEWS, present) if ok))

    def supports(self, group: str) -> bool:
        needs = {
            "db_size": None,
            "checkpointer": "pg_stat_checkpointer" if self.version_num >= 170000 else "pg_stat_bgwriter",
            "bgwriter": "pg_stat_bgwriter",
            "wal": "pg_stat_wal",
            "io": "pg_stat_io",
            "archiver": "pg_stat_archiver",
            "replication": "pg_stat_replication",
            "replication_slots": "pg_replication_slots",
            "wal_receiver": "pg_stat_wal_receiver",
        }[group]
        return needs is None or needs in self.views

    def why_not(self, group: str) -> str:
        since = {"wal": "14", "io": "16"}.get(group)
        return f"needs PostgreSQL {since}+" if since else "view missing on this server"

    def sql(self, group: str) -> str:
        """The query of ``group``; its columns follow the group's schema in ``pgflow.schema``."""
        return _SQL[group](self.version_num)


def _db_size(v: int) -> str:
    # Sizes only of databases the role may see (CONNECT or pg_read_all_stats), so a missing
    # privilege on one database yields null there instead of failing the whole scrape.
    return (
        "SELECT /*pgflow*/ oid::int8, datname::text, CASE WHEN has_database_privilege(oid, 'CONNECT') "
        "OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') THEN pg_database_size(oid)::int8 END "
        "FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY oid"
    )


def _checkpointer(v: int) -> str:
    if v >= 170000:
        done = "num_done::int8" if v >= 180000 else "NULL::int8"
        return (
            f"SELECT /*pgflow*/ stats_reset, num_timed::int8, num_requested::int8, {done}, restartpoints_timed::int8, "
            "restartpoints_req::int8, restartpoints_done::int8, buffers_written::int8, write_time::float8, "
            "sync_time::float8 FROM pg_stat_checkpointer"
        )
    return (
        "SELECT /*pgflow*/ stats_reset, checkpoints_timed::int8, checkpoints_req::int8, NULL::int8, NULL::int8, NULL::int8, "
        "NULL::int8, buffers_checkpoint::int8, checkpoint_write_time::float8, checkpoint_sync_time::float8 "
        "FROM pg_stat_bgwriter"
    )


def _bgwriter(v: int) -> str:
    backend = "NULL::int8, NULL::int8" if v >= 170000 else "buffers_backend::int8, buffers_backend_fsync::int8"
    return (
        f"SELECT /*pgflow*/ stats_reset, buffers_clean::int8, maxwritten_clean::int8, buffers_alloc::int8, {backend} FROM pg_stat_bgwriter"
    )


def _wal(v: int) -> str:
    # 18 moved write/sync counts and times to pg_stat_io (object 'wal'): read them from the io group.
    io = (
        "NULL::int8, NULL::int8, NULL::float8, NULL::float8"
        if v >= 180000
        else "wal_write::int8, wal_sync::int8, wal_write_time::float8, wal_sync_time::float8"
    )
    return (
        f"SELECT /*pgflow*/ stats_reset, wal_records::int8, wal_fpi::int8, wal_bytes::int8, wal_buffers_full::int8, {io} FROM pg_stat_wal"
    )


def _io(v: int) -> str:
    return (
        "SELECT /*pgflow*/ backend_type::text, object::text, context::text, stats_reset, reads::int8, writes::int8, "
        "writebacks::int8, extends::int8, hits::int8, evictions::int8, reuses::int8, fsyncs::int8, "
        "read_time::float8, write_time::float8, writeback_time::float8, extend_time::float8, fsync_time::float8 "
        "FROM pg_stat_io ORDER BY backend_type, object, context"
    )


def _archiver(v: int) -> str:
    return (
        "SELECT /*pgflow*/ stats_reset, archived_count::int8, failed_count::int8, "
        "extract(epoch FROM clock_timestamp() - last_archived_time)::float8, "
        "extract(epoch FROM clock_timestamp() - last_failed_time)::float8 FROM pg_stat_archiver"
    )


_HEAD_LSN = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END"


def _replication(v: int) -> str:
    return (
        "SELECT /*pgflow*/ pid::int8, application_name::text, coalesce(host(client_addr), 'unix'), state::text, "
        f"sync_state::text, pg_wal_lsn_diff({_HEAD_LSN}, replay_lsn)::int8, "
        "extract(epoch FROM write_lag)::float8, extract(epoch FROM flush_lag)::float8, "
        "extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication ORDER BY pid"
    )


def _replication_slots(v: int) -> str:
    head = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END"
    return (
        f"SELECT /*pgflow*/ slot_name::text, slot_type::text, active, pg_wal_lsn_diff({head}, restart_lsn)::int8, "
        "age(xmin)::int8, age(catalog_xmin)::int8, wal_status::text FROM pg_replication_slots ORDER BY slot_name"
    )


def _wal_receiver(v: int) -> str:
    # One row on a standby (status null when its receiver is not running), none on a primary.
    return (
        "SELECT /*pgflow*/ r.status::text, extract(epoch FROM clock_timestamp() - r.last_msg_receipt_time)::float8, "
        "pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::int8, "
        "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 "
        "FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver r ON true WHERE pg_is_in_recovery()"
    )


_SQL = {
    "db_size": _db_size,
    "checkpointer": _checkpointer,
    "bgwriter": _bgwriter,
    "wal": _wal,
    "io": _io,
    "archiver": _archiver,
    "replication": _replication,
    "replication_slots": _replication_slots,
    "wal_receiver": _wal_receiver,
}
assert set(_SQL) == set(HEALTH_GROUPS)


class HealthSchedule:
    """Which groups are due on a scrape: each its own interval, disabled ones never."""

    def __init__(self, intervals: dict[str, float], disabled: Iterable[str] = (), clock: callable = time.monotonic) -> None:  # type: ignore[valid-type]
        self.intervals = {g: float(intervals[g]) for g in HEALTH_GROUPS}
        self.disabled = frozenset(disabled)
        self._clock = clock
        self._next: dict[str, float] = {}

    @classmethod
    def of(
        cls,
        interval_secs: float = 60.0,
        db_size_interval_secs: float = DEFAULT_DB_SIZE_INTERVAL_SECS,
        group_intervals: dict[str, float] | None = None,
        disabled: Iterable[str] = (),
    ) -> HealthSchedule:
        intervals = {g: interval_secs for g in HEALTH_GROUPS} | {"db_size": db_size_interval_secs}
        return cls(intervals | dict(group_intervals or {}), disabled)

    @classmethod
    def from_settings(cls, settings: object) -> HealthSchedule:
        """The schedule ``pgflow.config.Settings`` describes (its issue 13 block)."""
        return cls.of(
            settings.health_interval_secs,
            settings.db_size_interval_secs,  # type: ignore[attr-defined]
            settings.health_group_intervals,
            settings.health_groups_disabled,
        )  # type: ignore[attr-defined]

    def due(self, support: HealthSupport) -> list[str]:
        now = self._clock()
        # A little slack, so a group due every interval is not pushed back a whole scrape by jitter.
        return [
            g
            for g in HEALTH_GROUPS
            if g not in self.disabled and support.supports(g) and self._next.get(g, now) <= now + min(1.0, 0.1 * self.intervals[g])
        ]

    def done(self, groups: Iterable[str], started: float) -> None:
        """Groups read successfully by a scrape that started at ``started`` (the clock's time)."""
        for g in groups:
            self._next[g] = started + self.intervals[g]

    def now(self) -> float:
        return self._clock()
