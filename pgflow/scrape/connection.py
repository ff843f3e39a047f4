"""Connecting to PostgreSQL and turning driver errors into pgflow's own, one line each."""

from __future__ import annotations

import psycopg
from psycopg import errors as pgerr

from pgflow.config import redact_dsn
from pgflow.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    ExtensionMissing,
    ExtensionNotLoaded,
    InsufficientPrivilege,
    ScrapeError,
    ScrapeTimeout,
    ServerUnreachable,
)


def connect(dsn: str, *, connect_timeout: int = 5) -> psycopg.Connection:
    """Open the monitoring connection: no prepared statements (pgbouncer-safe), read-only work.

    ``prepare_threshold=None`` keeps psycopg from preparing statements, which breaks behind
    pgbouncer in transaction pooling.
    """
    try:
        return psycopg.connect(
            dsn,
            connect_timeout=connect_timeout,
            application_name="pgflow",
            prepare_threshold=None,
            autocommit=False,
        )
    except psycopg.Error as exc:
        raise classify(exc, dsn) from None


def _first_line(exc: BaseException, dsn: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def classify(exc: BaseException, dsn: str, statement_timeout_ms: int | None = None) -> ScrapeError:
    """Map a psycopg error to the ScrapeError subclass that says what to do."""
    target = redact_dsn(dsn)
    detail = _first_line(exc, dsn)
    sqlstate = getattr(exc, "sqlstate", None)
    lowered = detail.lower()
    if isinstance(exc, pgerr.QueryCanceled):
        limit = f" ({statement_timeout_ms} ms)" if statement_timeout_ms else ""
        return ScrapeTimeout(f"scrape of {target} ran past statement_timeout{limit}",
                             "raise PGFLOW_STATEMENT_TIMEOUT_MS or look at the server's load")
    if isinstance(exc, pgerr.ObjectNotInPrerequisiteState) or "shared_preload_libraries" in lowered:
        return ExtensionNotLoaded(f"pg_stat_statements is not loaded on {target}",
                                  "add pg_stat_statements to shared_preload_libraries and restart PostgreSQL")
    if isinstance(exc, (pgerr.UndefinedTable, pgerr.UndefinedFunction)) and "pg_stat_statements" in lowered:
        return ExtensionMissing(f"pg_stat_statements is not installed in {target}",
                                "run CREATE EXTENSION pg_stat_statements in that database")
    if isinstance(exc, pgerr.InsufficientPrivilege):
        return InsufficientPrivilege(f"permission denied on {target} ({detail})",
                                     "GRANT pg_monitor TO the monitoring role")
    if sqlstate == "28P01" or "password authentication failed" in lowered or "no password supplied" in lowered:
        return AuthenticationFailed(f"PostgreSQL at {target} refused the credentials",
                                    "check the user and password in DATABASE_URL")
    if sqlstate == "3D000" or ("database" in lowered and "does not exist" in lowered):
        return DatabaseMissing(f"the database of {target} does not exist",
                               "fix the database name in DATABASE_URL")
    if isinstance(exc, psycopg.OperationalError):
        return ServerUnreachable(f"cannot connect to PostgreSQL at {target} ({detail})",
                                 "check that the server is running and the host and port are right")
    return ScrapeError(f"scrape of {target} failed ({detail})")
