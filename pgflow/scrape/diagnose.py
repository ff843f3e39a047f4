"""`pgflow check`: can this instance be monitored, and how well? A short readable report."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from pgflow.config import InstanceConfig, redact_dsn
from pgflow.errors import ScrapeError
from pgflow.scrape.connection import classify, connect

_SETTINGS_SQL = """
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       current_setting('shared_preload_libraries'), current_setting('track_io_timing'),
       current_setting('pg_stat_statements.track_planning', true), current_setting('pg_stat_statements.track', true),
       current_setting('pg_stat_statements.max', true),
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
         OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
       current_user::text,
       (SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'),
       (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        WHERE e.extname = 'pg_stat_statements')
"""


@dataclass
class Finding:
    level: str  # "ok" | "warn" | "fail"
    name: str
    detail: str


@dataclass
class CheckReport:
    instance: str
    target: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not any(f.level == "fail" for f in self.findings)

    def add(self, level: str, name: str, detail: str) -> None:
        self.findings.append(Finding(level, name, detail))

    def render(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        lines = [f"{self.instance} ({self.target})"]
        lines += [f"  {mark[f.level]} {f.name}: {f.detail}" for f in self.findings]
        lines.append(f"  => {'usable' if self.usable else 'NOT usable'}")
        return "\n".join(lines)


def check(instance: InstanceConfig, *, connect_timeout: int = 5) -> CheckReport:
    """Run every diagnostic against one instance; never raises for an expected failure."""
    report = CheckReport(instance.name, redact_dsn(instance.dsn))
    try:
        conn = connect(instance.dsn, connect_timeout=connect_timeout)
    except ScrapeError as exc:
        report.add("fail", "connect", str(exc))
        return report
    try:
        with conn:
            _diagnose(conn, instance.dsn, report)
            health_groups(conn, report)  # issue 13
    except psycopg.Error as exc:
        report.add("fail", "query", str(classify(exc, instance.dsn)))
    return report


def _diagnose(conn: psycopg.Connection, dsn: str, report: CheckReport) -> None:
    (version, version_num, preload, io_timing, planning, track, pgss_max, can_read_all, user, ext_version,
     ext_schema) = conn.execute(_SETTINGS_SQL).fetchone()  # type: ignore[misc]
    conn.rollback()
    if version_num < 130000:
        report.add("fail", "server", f"PostgreSQL {version} is older than 13, which pgflow does not support")
    else:
        report.add("ok", "server", f"PostgreSQL {version}")
    loaded = "pg_stat_statements" in [p.strip() for p in preload.split(",")]
    if loaded:
        report.add("ok", "preload", "pg_stat_statements is in shared_preload_libraries")
    else:
        report.add("fail", "preload", "pg_stat_statements is not loaded: add it to shared_preload_libraries and restart")
    if ext_version is None:
        report.add("fail", "extension", "pg_stat_statements is not installed here: run CREATE EXTENSION pg_stat_statements")
        return
    report.add("ok", "extension", f"pg_stat_statements {ext_version}")
    if can_read_all:
        report.add("ok", "privileges", f"{user} can read every role's statements")
    else:
        report.add("warn", "privileges",
                   f"{user} sees only its own statements' text and ids: GRANT pg_read_all_stats TO {user} "
                   "(or GRANT pg_monitor)")
    report.add("ok" if io_timing == "on" else "warn", "track_io_timing",
               io_timing if io_timing == "on" else "off: block read/write times will be zero (SET track_io_timing = on)")
    report.add("ok" if planning == "on" else "warn", "track_planning",
               "on" if planning == "on" else "off: postgresql.query.plan.duration is not exported")
    if track is not None:
        report.add("ok" if track in ("top", "all") else "warn", "pg_stat_statements.track", track)
    if loaded:
        try:
            from psycopg import sql

            count = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.pg_stat_statements(false)").format(sql.Identifier(ext_schema))
            ).fetchone()[0]  # type: ignore[index]
            conn.rollback()
        except psycopg.Error as exc:
            conn.rollback()
            report.add("fail", "read", str(classify(exc, dsn)))
            return
        fill = int(count) / int(pgss_max) if pgss_max else 0.0
        level = "warn" if fill >= 0.9 else "ok"
        hint = ": entries are being evicted; raise pg_stat_statements.max" if level == "warn" else ""
        report.add(level, "pg_stat_statements.max", f"{count} of {pgss_max} entries used ({fill:.0%}){hint}")


def health_groups(conn: psycopg.Connection, report: CheckReport) -> None:
    """Issue 13: which health groups this server supports (found as the scraper finds them)."""
    from pgflow.schema import HEALTH_GROUPS
    from pgflow.scrape.health import DISCOVER_SQL, HealthSupport

    support = HealthSupport.of(conn.execute(DISCOVER_SQL).fetchone())  # type: ignore[arg-type]
    standby = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]  # type: ignore[index]
    conn.rollback()
    have = [g for g in HEALTH_GROUPS if support.supports(g)]
    lacking = [f"{g} ({support.why_not(g)})" for g in HEALTH_GROUPS if not support.supports(g)]
    role = "standby: replication lag is read from wal_receiver" if standby else "primary"
    report.add("ok", "health groups", f"{', '.join(have)} ({role})"
               + (f"; not on this server: {', '.join(lacking)}" if lacking else ""))
