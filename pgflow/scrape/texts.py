"""Statement texts that the monitoring connection cannot read, read another way (issue 19).

``pg_stat_statements(true)`` converts every stored text from the encoding of the database it
ran in to the encoding of the connected database, and one failed conversion fails the whole
call (a byte 0xe9 stored from a ``SQL_ASCII`` database, read from a UTF8 one): no WHERE clause
helps. A session in a ``SQL_ASCII`` database converts nothing: it receives every text as
stored. So the texts are read there, as bytes (``textsend``), and each is decoded here in the
encoding of the database it ran in (``SQL_ASCII``: UTF-8), any invalid byte replaced by
U+FFFD; normalization then goes on as usual. When no ``SQL_ASCII`` database of the instance has
pg_stat_statements, :func:`advice` says which database holds the unreadable text and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from pgflow.scrape import budget as budgets
from pgflow.scrape.budget import NoConnection
from pgflow.scrape.statements import MARK

SLOT_WAIT_SECS = 5.0  # on the scrape thread: wait this long at most for a budget slot (as explains do)

# Every database with its encoding, and whether pg_stat_statements has entries from it.
DATABASES_SQL = (
    f"SELECT {MARK} d.oid::int8, d.datname::text, pg_encoding_to_char(d.encoding)::text, "
    "d.datallowconn AND NOT d.datistemplate FROM pg_database d ORDER BY d.datname"
)
HAS_EXTENSION_SQL = (
    f"SELECT {MARK} n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
    "WHERE e.extname = 'pg_stat_statements'"
)


def raw_texts_sql(schema: str, has_toplevel: bool = True) -> sql.Composed:
    """Like :func:`~pgflow.scrape.statements.texts_sql`, the text as the bytes stored (``textsend``):
    read in a ``SQL_ASCII`` database, no conversion, no check, no failure."""
    toplevel = "toplevel" if has_toplevel else "NULL::bool"
    return sql.SQL(
        "SELECT /*pgflow*/ dbid::int8, userid::int8, queryid, " + toplevel + ", textsend(query) "
        "FROM {}.pg_stat_statements(true) WHERE queryid = ANY(%s)"
    ).format(sql.Identifier(schema))


def python_codec(pg_encoding: str | None) -> str:
    """Python's codec for a PostgreSQL encoding name; ``SQL_ASCII`` (no encoding) reads as UTF-8."""
    if not pg_encoding or pg_encoding == "SQL_ASCII":
        return "utf-8"
    try:
        from psycopg._encodings import pg2pyenc

        return pg2pyenc(pg_encoding.encode())
    except Exception:  # a codec Python lacks (MULE_INTERNAL): UTF-8, bytes it cannot read replaced
        return "utf-8"


def decode(raw: bytes | memoryview | None, pg_encoding: str | None) -> str | None:
    """The text of ``raw`` bytes stored from a database in ``pg_encoding``; invalid bytes become U+FFFD."""
    if raw is None:
        return None
    try:
        return bytes(raw).decode(python_codec(pg_encoding), "replace")
    except LookupError:
        return bytes(raw).decode("utf-8", "replace")


def suspects(databases: list[tuple[int, str, str, bool]], dbids: set[int], own_encoding: str) -> list[str]:
    """Databases that may hold the unreadable text, most likely first: ``SQL_ASCII`` ones with
    entries (their texts are stored unchecked), then others with entries in another encoding."""
    with_entries = [(name, enc) for oid, name, enc, _ in databases if oid in dbids]
    first = [name for name, enc in with_entries if enc == "SQL_ASCII"]
    return first or [name for name, enc in with_entries if enc != own_encoding]


def routes(databases: list[tuple[int, str, str, bool]], dbids: set[int]) -> list[str]:
    """``SQL_ASCII`` databases pgflow may read texts through, those with entries first."""
    ascii_dbs = [(oid in dbids, name) for oid, name, enc, connectable in databases if enc == "SQL_ASCII" and connectable]
    return [name for _, name in sorted(ascii_dbs, key=lambda t: (not t[0], t[1]))]


def advice(suspect: list[str], ascii_suspect: bool) -> tuple[str, str]:
    """(what is wrong, the fix), naming the database; no byte of any text."""
    where = ", ".join(suspect) if suspect else "another database"
    problem = (
        f"a statement text from database {where} cannot be converted to this database's encoding, "
        "so pg_stat_statements returns no text at all here"
    )
    if ascii_suspect:
        first = suspect[0]
        fix = (
            f"run CREATE EXTENSION pg_stat_statements in database {first} (pgflow then reads every text "
            f"through it), or point DATABASE_URL at {first}"
        )
    else:
        fix = (
            "point DATABASE_URL at a UTF8 database, or run CREATE EXTENSION pg_stat_statements in a "
            "SQL_ASCII database of this server (pgflow then reads every text through it)"
        )
    return problem, fix


def read_raw(
    conn: psycopg.Connection, schema: str, has_toplevel: bool, queryids: list[int], statement_timeout_ms: int, encodings: dict[int, str]
) -> list[tuple[int, int, int, bool | None, str | None]]:
    """Texts of ``queryids`` on a ``SQL_ASCII`` connection, each decoded in its own database's encoding."""
    from pgflow.scrape.connection import guarded

    cur = conn.cursor()
    with guarded(conn, statement_timeout_ms):
        cur.execute(raw_texts_sql(schema, has_toplevel), (queryids,))
    return [(dbid, userid, queryid, toplevel, decode(raw, encodings.get(dbid))) for dbid, userid, queryid, toplevel, raw in cur.fetchall()]


def extension_schema(conn: psycopg.Connection, statement_timeout_ms: int) -> str | None:
    """Where pg_stat_statements is installed in ``conn``'s database, or None."""
    from pgflow.scrape.connection import guarded

    cur = conn.cursor()
    with guarded(conn, statement_timeout_ms):
        cur.execute(HAS_EXTENSION_SQL)  # type: ignore[arg-type]
    row = cur.fetchone()
    return str(row[0]) if row else None


def databases(conn: psycopg.Connection, statement_timeout_ms: int) -> list[tuple[int, str, str, bool]]:
    """(oid, name, encoding, connectable) of every database, from ``conn``."""
    from pgflow.scrape.connection import guarded

    cur = conn.cursor()
    with guarded(conn, statement_timeout_ms):
        cur.execute(DATABASES_SQL)  # type: ignore[arg-type]
    return [tuple(r) for r in cur.fetchall()]  # type: ignore[misc]


def entry_dbids(conn: psycopg.Connection, schema: str, statement_timeout_ms: int) -> set[int]:
    """The databases pg_stat_statements holds entries from (no text read)."""
    from pgflow.scrape.connection import guarded

    cur = conn.cursor()
    with guarded(conn, statement_timeout_ms):
        cur.execute(sql.SQL("SELECT /*pgflow*/ DISTINCT dbid::int8 FROM {}.pg_stat_statements(false)").format(sql.Identifier(schema)))
    return {int(r[0]) for r in cur.fetchall()}


class Route:
    """Where the texts can be read: a ``SQL_ASCII`` database with pg_stat_statements, or the advice."""

    def __init__(self, database: str | None, schema: str | None, suspect: list[str], ascii_suspect: bool) -> None:
        self.database = database
        self.schema = schema
        self.suspect = suspect
        self.ascii_suspect = ascii_suspect

    def advice(self) -> tuple[str, str]:
        return advice(self.suspect, self.ascii_suspect)


@contextmanager
def short_lived(dsn: str, dbname: str, instance: str | None, connect_timeout: int, *, direct: bool = False) -> Iterator[psycopg.Connection]:
    """A connection to another database of the instance for one read, then closed: inside the
    collector through the instance's connection budget (issue 20: it may raise NoConnection),
    elsewhere (``pgflow check``, a tool used alone) opened directly. ``direct``: opened directly in
    the collector too, in the place of a connection its caller has just closed (the scrape's own)."""
    from pgflow.scrape.connection import connect

    budget = budgets.for_instance_name(instance) if instance and not direct else None
    if budget is not None:
        with budget.connection(dbname, slot_wait_secs=SLOT_WAIT_SECS) as conn:
            yield conn
        return
    with connect(psycopg.conninfo.make_conninfo(dsn, dbname=dbname), connect_timeout=connect_timeout) as conn:
        yield conn


def find_route(
    found: list[tuple[int, str, str, bool]],
    own_database: str,
    dsn: str,
    dbids: set[int],
    *,
    statement_timeout_ms: int,
    connect_timeout: int = 5,
    instance: str | None = None,
    direct: bool = False,
) -> Route:
    """Look for a ``SQL_ASCII`` database with pg_stat_statements, the ones holding entries first.

    ``found``: the server's databases (:func:`databases`), read on the caller's connection to
    ``own_database``. Each candidate is looked at on a short-lived connection (connect, read,
    close) with the DSN's other parameters (TLS included) and ``application_name=pgflow``
    (``direct``: see :func:`short_lived`).
    """
    own_encoding = next((enc for _, name, enc, _ in found if name == own_database), "")
    suspect = suspects(found, dbids, own_encoding)
    ascii_names = {name for _, name, enc, _ in found if enc == "SQL_ASCII"}
    ascii_suspect = bool(suspect) and suspect[0] in ascii_names
    for name in routes(found, dbids):
        try:
            with short_lived(dsn, name, instance, connect_timeout, direct=direct) as other:
                schema = extension_schema(other, statement_timeout_ms)
        except NoConnection:  # the budget or the server's headroom says not now: look again later
            raise
        except Exception:  # unreachable or refused: the next candidate, else the advice
            continue
        if schema is not None:
            return Route(name, schema, suspect, ascii_suspect)
    return Route(None, None, suspect, ascii_suspect)


def read_through(
    route: Route,
    dsn: str,
    has_toplevel: bool,
    queryids: list[int],
    encodings: dict[int, str],
    *,
    statement_timeout_ms: int,
    connect_timeout: int = 5,
    instance: str | None = None,
    direct: bool = False,
) -> list[tuple]:
    """The texts of ``queryids`` read in ``route``'s database on a short-lived connection
    (``direct``: see :func:`short_lived`)."""
    assert route.database is not None and route.schema is not None
    with short_lived(dsn, route.database, instance, connect_timeout, direct=direct) as other:
        return read_raw(other, route.schema, has_toplevel, queryids, statement_timeout_ms, encodings)
