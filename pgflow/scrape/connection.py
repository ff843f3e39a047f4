"""Connecting to PostgreSQL and turning driver errors into pgflow's own, one line each."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pgerr
from psycopg.adapt import Loader
from psycopg.pq import Format

from pgflow.config import redact_dsn
from pgflow.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    ExtensionMissing,
    ExtensionNotLoaded,
    InsufficientPrivilege,
    PoolerRefused,
    ScrapeError,
    ScrapeTimeout,
    ServerUnreachable,
    SslRefused,
    TextUnreadable,
)


def connect(dsn: str, *, connect_timeout: int = 5, cls: type[psycopg.Connection] = psycopg.Connection) -> psycopg.Connection:
    """Open the monitoring connection: no prepared statements (pgbouncer-safe), autocommit.

    ``prepare_threshold=None`` keeps psycopg from preparing statements, which breaks behind
    pgbouncer in transaction pooling. Autocommit: psycopg sends no ``BEGIN`` of its own; each
    unit of work is made read-only and time-limited by :func:`guarded` (issue 19).
    """
    try:
        conn = cls.connect(dsn, connect_timeout=connect_timeout, application_name="pgflow", prepare_threshold=None, autocommit=True)
    except psycopg.Error as exc:
        raise classify(exc, dsn) from None
    lenient_text(conn)
    return conn


@contextmanager
def guarded(conn: psycopg.Connection, statement_timeout_ms: int, lock_timeout_ms: int | None = None, **extra: str) -> Iterator[None]:
    """One unit of work in one implicit transaction, read-only and time-limited, no ``BEGIN``.

    A pipeline: the marked limits statement (:func:`~pgflow.scrape.statements.limits_sql`),
    then what the block executes; Sync only at the end, so all of it is one transaction (one
    snapshot where the isolation gives one). Results are fetched after the block: a fetch
    inside it would Sync and end the transaction early.
    """
    from pgflow.scrape.statements import limits_sql

    with conn.pipeline():
        conn.execute(limits_sql(statement_timeout_ms, lock_timeout_ms, **extra))  # type: ignore[arg-type]
        yield


class _LenientText(Loader):
    """Text of a ``SQL_ASCII`` connection: PostgreSQL checks no encoding there, so the bytes
    are decoded as UTF-8 and any invalid byte becomes U+FFFD instead of failing the scrape."""

    def load(self, data: bytes | bytearray | memoryview) -> str:
        return bytes(data).decode("utf-8", "replace")


class _LenientTextBinary(_LenientText):
    format = Format.BINARY


def lenient_text(conn: psycopg.Connection) -> None:
    """Make a ``SQL_ASCII`` connection return ``str`` for text columns (psycopg gives bytes).

    Other client encodings are converted by the server and decoded by psycopg as usual.
    """
    if conn.info.encoding != "ascii":  # psycopg's name for SQL_ASCII: no conversion, no check
        return
    for name in ("text", "varchar", "bpchar", "name", '"char"', "unknown"):
        try:
            conn.adapters.register_loader(name, _LenientText)
            conn.adapters.register_loader(name, _LenientTextBinary)
        except Exception:  # a type this server lacks: nothing to decode
            continue


def connected_address(conn: psycopg.Connection) -> tuple[str, int]:
    """The host and port this connection reached (the one that answered in a multi-host DSN).

    A Unix socket reads ``localhost``, like a DSN without a host.
    """
    host = conn.info.host or "localhost"
    if host.startswith("/") or host.startswith("@"):
        host = "localhost"
    return host, int(conn.info.port or 5432)


def _first_line(exc: BaseException, dsn: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def _role(dsn: str) -> str:
    try:
        return str(psycopg.conninfo.conninfo_to_dict(dsn).get("user") or "the monitoring role")
    except Exception:
        return "the monitoring role"


_TEXT_SQLSTATES = {"22021", "22P05"}  # invalid byte sequence, untranslatable character


def classify(exc: BaseException, dsn: str, statement_timeout_ms: int | None = None) -> ScrapeError:
    """Map a psycopg error to the ScrapeError subclass that says what to do.

    The SQLSTATE decides first; a message is read only where the error has none (libpq's own
    refusals, such as SSL) or where one SQLSTATE covers several causes.
    """
    target = redact_dsn(dsn)
    detail = _first_line(exc, dsn)
    sqlstate = getattr(exc, "sqlstate", None)
    lowered = detail.lower()
    role = _role(dsn)
    if isinstance(exc, pgerr.QueryCanceled):
        limit = f" ({statement_timeout_ms} ms)" if statement_timeout_ms else ""
        return ScrapeTimeout(
            f"scrape of {target} ran past statement_timeout{limit}", "raise PGFLOW_STATEMENT_TIMEOUT_MS or look at the server's load"
        )
    # insufficient_privilege: which privilege decides the advice (at connect time psycopg has no SQLSTATE)
    if sqlstate == "42501" or (sqlstate is None and "permission denied" in lowered):
        database = re.search(r'permission denied for database "?([^"\s]+)"?', detail)
        if database:
            return InsufficientPrivilege(
                f"{role} may not connect to database {database.group(1)} on {target}",
                f"GRANT CONNECT ON DATABASE {database.group(1)} TO {role}",
            )
        schema = re.search(r'permission denied for schema "?([^"\s]+)"?', detail)
        if schema:
            return InsufficientPrivilege(
                f"{role} may not use schema {schema.group(1)} on {target} ({detail})", f"GRANT USAGE ON SCHEMA {schema.group(1)} TO {role}"
            )
        if "examine" in lowered:  # a setting reserved to pg_read_all_settings
            return InsufficientPrivilege(
                f"{role} may not read a server setting on {target} ({detail})",
                f"GRANT pg_monitor TO {role} (it includes pg_read_all_settings)",
            )
        return InsufficientPrivilege(f"permission denied on {target} ({detail})", f"GRANT pg_monitor TO {role}")
    if sqlstate == "55000" and "shared_preload_libraries" in lowered:
        return ExtensionNotLoaded(
            f"pg_stat_statements is not loaded on {target}", "add pg_stat_statements to shared_preload_libraries and restart PostgreSQL"
        )
    if sqlstate in ("42P01", "42883") and "pg_stat_statements" in lowered:
        return ExtensionMissing(
            f"pg_stat_statements is not installed in {target}", "run CREATE EXTENSION pg_stat_statements in that database"
        )
    if sqlstate in _TEXT_SQLSTATES:
        # The server's message quotes bytes of the text (maybe of a literal): only the SQLSTATE is kept.
        return TextUnreadable(
            f"a statement text in pg_stat_statements on {target} cannot be converted to this database's encoding (SQLSTATE {sqlstate})",
            "pgflow reads texts through a SQL_ASCII database with pg_stat_statements; pgflow check names the database and the fix",
        )
    missing_role = re.search(r'role "([^"]+)" does not exist', detail)
    if missing_role and sqlstate in ("28000", None):  # invalid_authorization_specification (issue 19)
        name = missing_role.group(1)
        return AuthenticationFailed(
            f"PostgreSQL at {target} has no role {name}",
            f"fix the user in DATABASE_URL, or create it: CREATE ROLE {name} LOGIN PASSWORD '...'; GRANT pg_monitor TO {name}",
        )
    if sqlstate == "28P01" or "password authentication failed" in lowered or "no password supplied" in lowered:
        return AuthenticationFailed(f"PostgreSQL at {target} refused the credentials", "check the user and password in DATABASE_URL")
    if sqlstate in ("28000", None) and "pg_hba.conf" in lowered:  # a refused connection has no SQLSTATE in psycopg
        if "ssl off" in lowered or "no encryption" in lowered:
            return SslRefused(
                f"PostgreSQL at {target} accepts {role} only over SSL ({detail})", "set sslmode=require (or verify-full) in DATABASE_URL"
            )
        return AuthenticationFailed(
            f"pg_hba.conf of {target} does not admit this connection ({detail})",
            f"add a line for {role}, this database and pgflow's address to pg_hba.conf and reload PostgreSQL",
        )
    if sqlstate == "3D000" or ("database" in lowered and "does not exist" in lowered):
        return DatabaseMissing(f"the database of {target} does not exist", "fix the database name in DATABASE_URL")
    if "statement pooling" in lowered:  # PgBouncer pool_mode=statement (SQLSTATE 08P01)
        return PoolerRefused(
            f"the pooler at {target} is in statement pooling mode ({detail})",
            "pgflow reads each scrape in one read-only transaction: point it at a PgBouncer pool "
            "in transaction or session mode, or at PostgreSQL directly",
        )
    if sqlstate is None and (re.search(r"\bssl\b", lowered) or "certificate" in lowered) and "syscall" not in lowered:
        if "does not support ssl" in lowered:
            return SslRefused(
                f"PostgreSQL at {target} does not offer SSL but the DSN requires it ({detail})",
                "turn ssl on in the server's configuration, or lower sslmode in DATABASE_URL if the network is trusted",
            )
        return SslRefused(
            f"the SSL connection to {target} failed ({detail})", "check sslmode, sslrootcert and the server's certificate in DATABASE_URL"
        )
    if isinstance(exc, psycopg.OperationalError):
        return ServerUnreachable(
            f"cannot connect to PostgreSQL at {target} ({detail})", "check that the server is running and the host and port are right"
        )
    return ScrapeError(f"scrape of {target} failed ({detail})")
