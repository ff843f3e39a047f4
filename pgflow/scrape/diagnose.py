"""`pgflow check`: can this instance be monitored, and how well? A short readable report."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
import psycopg.conninfo
from psycopg import sql

from pgflow.config import InstanceConfig, redact_dsn
from pgflow.errors import ExtensionNotLoaded, ScrapeError, TextUnreadable
from pgflow.scrape.budget import check_budget
from pgflow.scrape.connection import classify, connect, guarded
from pgflow.scrape.explain import explain_helper_finding
from pgflow.scrape.statements import MARK

_LIMIT_MS = 10_000

_SERVER_SQL = f"""
SELECT {MARK} current_setting('server_version'), current_setting('server_version_num')::int, current_user::text,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
         OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
       (SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'),
       (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        WHERE e.extname = 'pg_stat_statements')
"""
# pg_settings lists only what this role may read: shared_preload_libraries needs
# pg_read_all_settings, and current_setting() would fail (42501) where this just has no row.
_SETTINGS_SQL = f"SELECT {MARK} name, setting FROM pg_settings WHERE name = ANY(%s)"
_SETTINGS = [
    "shared_preload_libraries",
    "track_io_timing",
    "pg_stat_statements.track_planning",
    "pg_stat_statements.track",
    "pg_stat_statements.max",
]


def certificate_advice(message: str, dsn: str) -> str | None:
    """Issue 21: what a PostgreSQL TLS failure means and the DSN parameter to set, or None."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    root = params.get("sslrootcert") or "~/.postgresql/root.crt"
    host = params.get("host") or "localhost"
    t = message.lower()
    if "does not match host name" in t:
        return (
            f"the server's certificate does not name the host {host!r} (hostname mismatch): connect by a name "
            f"the certificate lists (host= in DATABASE_URL), or use sslmode=verify-ca to check only the CA"
        )
    if "root certificate file" in t and "does not exist" in t:
        return f"sslrootcert {root} does not exist: set sslrootcert= in DATABASE_URL to the CA file that signed the server's certificate"
    if "certificate verify failed" in t or "unable to get local issuer" in t or "self-signed" in t:
        return (
            f"the server's certificate is not signed by a CA in sslrootcert {root} (unknown CA, or expired): "
            f"set sslrootcert= in DATABASE_URL to the CA that signed it"
        )
    if "requires a valid client certificate" in t or "certificate required" in t:
        return (
            "the server requires a client certificate (pg_hba.conf cert / clientcert): set sslcert= and "
            "sslkey= in DATABASE_URL to a certificate signed by the server's ssl_ca_file"
        )
    if "certificate authentication failed" in t:
        return (
            "the server refused the client certificate (sslcert): its CN must be the role's name "
            "(or map it in pg_ident.conf), signed by the server's ssl_ca_file"
        )
    if ("sslcert" in t or "sslkey" in t or "private key file" in t or "certificate file" in t) and (
        "could not" in t or "does not exist" in t or "permissions" in t
    ):
        return "pgflow cannot use sslcert / sslkey: check the paths in DATABASE_URL and that the key is mode 0600"
    return None


def preloaded(setting: str) -> bool:
    """pg_stat_statements among ``shared_preload_libraries`` (also as ``$libdir/pg_stat_statements``)."""
    for entry in setting.split(","):
        name = entry.strip().strip("\"'").strip()
        name = name.rsplit("/", 1)[-1]
        if name.endswith(".so"):
            name = name[:-3]
        if name == "pg_stat_statements":
            return True
    return False


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


def check(
    instance: InstanceConfig, *, connect_timeout: int = 5, sample_interval_secs: float = 1.0, settings: object | None = None
) -> CheckReport:
    """Run every diagnostic against one instance; never raises for an expected failure."""
    report = CheckReport(instance.name, redact_dsn(instance.dsn))
    try:
        conn = connect(instance.dsn, connect_timeout=connect_timeout)
    except ScrapeError as exc:
        report.add("fail", "connect", str(exc))
        advice = certificate_advice(str(exc), instance.dsn)  # issue 21
        if advice:
            report.add("fail", "tls", advice)
        return report
    try:
        with conn:
            _diagnose(conn, instance.dsn, report)
            report.add(*explain_helper_finding(conn))  # issue 12
            if settings is None or getattr(settings, "explains_per_window", 1) > 0:
                plan_databases(conn, instance.dsn, report, connect_timeout)  # issue 19
            health_groups(conn, report)  # issue 13
            if settings is not None:
                table_databases(conn, report, settings)  # issue 13
                report.add(*check_budget(conn, settings))  # issue 20
    except psycopg.Error as exc:
        report.add("fail", "query", str(classify(exc, instance.dsn)))
    _check_sampling(instance, report, connect_timeout, sample_interval_secs)
    return report


def _probe(conn: psycopg.Connection, query: sql.Composable) -> tuple[object, psycopg.Error | None]:
    """Run one read under the scrape's limits; the error instead of raising."""
    try:
        row = _read(conn, query)
        return (row[0][0] if row else None), None
    except psycopg.Error as exc:
        return None, exc


def _read(conn: psycopg.Connection, query: object, params: object = None) -> list[tuple]:
    """Rows of one read in its own read-only, time-limited implicit transaction (no BEGIN: issue 19)."""
    cur = conn.cursor()
    with guarded(conn, _LIMIT_MS):
        cur.execute(query, params)  # type: ignore[arg-type]
    return cur.fetchall()


def _check_sampling(instance: InstanceConfig, report: CheckReport, connect_timeout: int, interval: float) -> None:
    """issue 11: active-session sampling (privileges, wait source, measured cost of one sample)."""
    from pgflow.scrape.sampler import check_sampling

    for level, name, detail in check_sampling(instance.dsn, interval, connect_timeout=connect_timeout):
        report.add(level, name, detail)


def _diagnose(conn: psycopg.Connection, dsn: str, report: CheckReport) -> None:
    ((version, version_num, user, can_read_all, ext_version, ext_schema),) = _read(conn, _SERVER_SQL)
    settings = dict(_read(conn, _SETTINGS_SQL, (_SETTINGS,)))  # type: ignore[arg-type]
    if version_num < 130000:
        report.add("fail", "server", f"PostgreSQL {version} is older than 13, which pgflow does not support")
    else:
        report.add("ok", "server", f"PostgreSQL {version}")
    if ext_version is None:
        report.add("fail", "extension", "pg_stat_statements is not installed here: run CREATE EXTENSION pg_stat_statements")
        return
    report.add("ok", "extension", f"pg_stat_statements {ext_version} in schema {ext_schema}")
    usage_sql = f"SELECT {MARK} has_schema_privilege(%s, 'USAGE')"
    usage = _read(conn, usage_sql, (ext_schema,))[0][0]
    if not usage:
        report.add(
            "fail",
            "schema",
            f"{user} may not use schema {ext_schema}, where pg_stat_statements lives: GRANT USAGE ON SCHEMA {ext_schema} TO {user}",
        )
        return
    # Whether the library is loaded is what pg_stat_statements itself answers; the setting is
    # only read where this role may read it.
    count, error = _probe(conn, sql.SQL(f"SELECT {MARK} count(*) FROM {{}}.pg_stat_statements(false)").format(sql.Identifier(ext_schema)))
    preload = settings.get("shared_preload_libraries")
    if error is not None:
        failure = classify(error, dsn)
        if isinstance(failure, ExtensionNotLoaded):
            report.add("fail", "preload", "pg_stat_statements is not loaded: add it to shared_preload_libraries and restart PostgreSQL")
        else:
            report.add("fail", "read", str(failure))
        return
    if preload is None:
        report.add("ok", "preload", f"pg_stat_statements answers (shared_preload_libraries is not readable by {user})")
    elif preloaded(preload):
        report.add("ok", "preload", "pg_stat_statements is in shared_preload_libraries")
    else:  # answers although the setting does not name it: loaded some other way (e.g. a managed service)
        report.add("ok", "preload", f"pg_stat_statements answers (shared_preload_libraries = {preload!r})")
    _texts(conn, dsn, ext_schema, report)
    if can_read_all:
        report.add("ok", "privileges", f"{user} can read every role's statements")
    else:
        report.add(
            "warn",
            "privileges",
            f"{user} sees only its own statements' text and ids; other roles' are hidden and not exported "
            f"(pgflow_hidden_statements): GRANT pg_read_all_stats TO {user} (or GRANT pg_monitor)",
        )
    io_timing = settings.get("track_io_timing")
    if io_timing == "on":
        report.add("ok", "track_io_timing", "on")
    else:
        report.add(
            "warn",
            "track_io_timing",
            f"{io_timing or 'unknown'}: block read/write times are zero. As a superuser: "
            "ALTER SYSTEM SET track_io_timing = on; SELECT pg_reload_conf(); "
            "(or set it in postgresql.conf or the provider's parameter group)",
        )
    planning = settings.get("pg_stat_statements.track_planning")
    report.add(
        "ok" if planning == "on" else "warn",
        "track_planning",
        "on"
        if planning == "on"
        else "off: postgresql.query.plan.duration is not exported "
        "(ALTER SYSTEM SET pg_stat_statements.track_planning = on; SELECT pg_reload_conf();)",
    )
    track = settings.get("pg_stat_statements.track")
    if track is not None:
        report.add("ok" if track in ("top", "all") else "warn", "pg_stat_statements.track", track)
    pgss_max = settings.get("pg_stat_statements.max")
    fill = int(count) / int(pgss_max) if pgss_max else 0.0  # type: ignore[call-overload]
    level = "warn" if fill >= 0.9 else "ok"
    hint = ": entries are being evicted; raise pg_stat_statements.max" if level == "warn" else ""
    report.add(level, "pg_stat_statements.max", f"{count} of {pgss_max} entries used ({fill:.0%}){hint}")


def _texts(conn: psycopg.Connection, dsn: str, schema: str, report: CheckReport) -> None:
    """The text path, as the scraper walks it: every stored text converted to this database's encoding."""
    _, error = _probe(conn, sql.SQL(f"SELECT {MARK} count(query) FROM {{}}.pg_stat_statements(true)").format(sql.Identifier(schema)))
    if error is None:
        report.add("ok", "texts", "statement texts are readable")
        return
    failure = classify(error, dsn)
    if not isinstance(failure, TextUnreadable):
        report.add("fail", "texts", str(failure))
        return
    # The scraper's way round (issue 19): a SQL_ASCII database with pg_stat_statements.
    from pgflow.scrape import texts

    try:
        found = texts.databases(conn, _LIMIT_MS)
        route = texts.find_route(found, conn.info.dbname, dsn, texts.entry_dbids(conn, schema, _LIMIT_MS), statement_timeout_ms=_LIMIT_MS)
    except psycopg.Error as exc:
        report.add("warn", "texts", f"{failure.message}; where it comes from could not be found ({str(classify(exc, dsn))})")
        return
    problem, fix = route.advice()
    if route.database is not None:
        report.add(
            "ok",
            "texts",
            f"{problem}: texts are read through database {route.database} (SQL_ASCII, "
            "pg_stat_statements installed), each decoded in its own database's encoding",
        )
    else:
        report.add("warn", "texts", f"{problem}: counters are still exported but new statements are labelled by queryid; {fix}")


_PLANNABLE_SQL = f"""
SELECT {MARK} current_user::text, count(*), count(*) FILTER (WHERE NOT has_table_privilege(c.oid, 'SELECT'))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'
"""
_MAX_PLAN_DATABASES = 20


def plan_databases(conn: psycopg.Connection, dsn: str, report: CheckReport, connect_timeout: int = 5) -> None:
    """Issue 19: per database where ``run`` will explain (those pg_stat_statements holds statements
    of, and the DSN's), whether plans will work: the helper usable there, or the role may read the
    tables; else a warning with the fix. Each database on a short-lived connection."""
    from pgflow.scrape.explain import Explainer, ExplainFailed, _helper

    row = _read(
        conn,
        f"SELECT {MARK} n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_stat_statements'",
    )
    if not row:
        return
    try:
        names = [
            r[0]
            for r in _read(
                conn,
                sql.SQL(
                    f"SELECT {MARK} d.datname::text FROM pg_database d WHERE d.datallowconn AND NOT d.datistemplate "
                    "AND (d.datname = current_database() OR d.oid IN (SELECT dbid FROM {}.pg_stat_statements(false))) "
                    "ORDER BY d.datname"
                ).format(sql.Identifier(row[0][0])),
            )
        ]
    except psycopg.Error:
        return  # the statements themselves are unreadable: said by the other lines
    for name in names[:_MAX_PLAN_DATABASES]:
        try:
            with connect(psycopg.conninfo.make_conninfo(dsn, dbname=name), connect_timeout=connect_timeout) as other:
                user, tables, denied = _read(other, _PLANNABLE_SQL)[0]
                installed, callable_ = _helper(other)
                usable = False
                if callable_:
                    try:
                        Explainer()._run(other, "SELECT 1", "helper")
                        usable = True
                    except ExplainFailed:
                        pass
        except (ScrapeError, psycopg.Error) as exc:
            report.add("warn", f"plans in {name}", f"not checked ({exc if isinstance(exc, ScrapeError) else classify(exc, dsn)})")
            continue
        helper_fix = (
            f"install the explain helper there as the tables' owner (psql -d {name} -f "
            f"pgflow/sql/explain_helper.sql) and GRANT USAGE ON SCHEMA pgflow, EXECUTE ON FUNCTION "
            f"pgflow.explain_generic(text) TO {user}"
        )
        if usable:
            report.add("ok", f"plans in {name}", "explain helper installed and usable")
        elif installed:
            report.add(
                "warn",
                f"plans in {name}",
                f"explain helper installed but {user} may not call it: "
                f"GRANT USAGE ON SCHEMA pgflow TO {user}; GRANT EXECUTE ON FUNCTION pgflow.explain_generic(text) "
                f"TO {user}" + (f" ({denied} of {tables} tables cannot be planned until then)" if denied else ""),
            )
        elif denied:
            report.add(
                "warn",
                f"plans in {name}",
                f"{user} may not read {denied} of {tables} tables, so their "
                f"statements cannot be explained (permission denied): {helper_fix}, or GRANT SELECT on them "
                f"to {user} (statements that write need that privilege too)",
            )
        else:
            report.add("ok", f"plans in {name}", f"{user} may read all {tables} tables")


def health_groups(conn: psycopg.Connection, report: CheckReport) -> None:
    """Issue 13: which health groups this server supports (found as the scraper finds them)."""
    from pgflow.schema import HEALTH_GROUPS
    from pgflow.scrape.health import DISCOVER_SQL, HealthSupport

    support = HealthSupport.of(_read(conn, DISCOVER_SQL)[0])  # type: ignore[arg-type]
    standby = _read(conn, f"SELECT {MARK} pg_is_in_recovery()")[0][0]
    have = [g for g in HEALTH_GROUPS if support.supports(g)]
    lacking = [f"{g} ({support.why_not(g)})" for g in HEALTH_GROUPS if not support.supports(g)]
    role = "standby: replication lag is read from wal_receiver" if standby else "primary"
    report.add("ok", "health groups", f"{', '.join(have)} ({role})" + (f"; not on this server: {', '.join(lacking)}" if lacking else ""))


def table_databases(conn: psycopg.Connection, report: CheckReport, settings: object) -> None:
    """Issue 13: which databases per-table statistics would be read from, and why not the others."""
    from pgflow.scrape.discovery import discover

    if not settings.table_stats_enabled:  # type: ignore[attr-defined]
        report.add("ok", "table statistics", "off (table_stats_enabled = false)")
        return
    found = discover(
        conn,
        include=settings.table_stats_databases,  # type: ignore[attr-defined]
        exclude=settings.table_stats_exclude_databases,  # type: ignore[attr-defined]
        limit=settings.max_databases_tracked,
    )  # type: ignore[attr-defined]
    skipped = "; ".join(f"{name} ({why})" for name, why in found.skipped.items() if why != "template")
    report.add(
        "ok" if found.chosen else "warn",
        "table statistics",
        f"databases {', '.join(found.chosen) or 'none'}, every "
        f"{settings.table_stats_interval_secs:g} s, at most {settings.max_tables_tracked} tables named"  # type: ignore[attr-defined]
        + (f"; skipped: {skipped}" if skipped else ""),
    )
