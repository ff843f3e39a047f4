"""The Scraper: one connection, one round trip per scrape, a whole Snapshot or an error."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import polars as pl
import psycopg
from psycopg import sql

from pgflow import telemetry
from pgflow.config import dsn_host_port, dsn_instance_name, redact_dsn
from pgflow.errors import ExtensionMissing, ScrapeError
from pgflow.logs import kv
from pgflow.schema import ACTIVITY, BLOCKED, DATABASES, HEALTH_FRAMES, HEALTH_GROUPS, LOCKS, ServerIdentity, Snapshot
from pgflow.scrape import texts
from pgflow.scrape.activity import ACTIVITY_SQL, AGES_SQL
from pgflow.scrape.budget import close_and_wait
from pgflow.scrape.columnar import NULL_BOOL, Last, columnar, columnar_row, empty_frames, positions, toplevel_series
from pgflow.scrape.columnar import frame as _frame
from pgflow.scrape.connection import classify, connect, connected_address, guarded
from pgflow.scrape.databases import databases_sql
from pgflow.scrape.health import DISCOVER_SQL, HealthSchedule, HealthSupport
from pgflow.scrape.locks import LOCKS_SQL, blocked_sql
from pgflow.scrape.statements import EXTENSION_SQL, MARK, info_sql, is_own, statements_columnar_sql, texts_sql

log = logging.getLogger("pgflow.scrape")

_DISCOVER_SQL = (
    f"SELECT {MARK} current_setting('server_version_num')::int, current_user::text, "
    "has_function_privilege('pg_control_system()', 'EXECUTE'), "
    "has_function_privilege('pg_control_checkpoint()', 'EXECUTE')"
)
Key = tuple[int, int, int, bool | None]  # a statement's counters: dbid, userid, queryid, toplevel
TEXT_RETRY_SECS = 300.0  # texts unreadable and no way round: the way round is looked for again this late


def meta_sql(server: ServerInfo) -> str:
    """The scrape's clock and settings, and who answered: the server's identity (issue 14).

    The system identifier and the checkpoint's timeline need EXECUTE on pg_control_*();
    without it they are NULL and the other parts decide. A primary's current timeline is
    read from its WAL file name: the checkpoint's lags a promotion until the next checkpoint.
    """
    sysid = "(SELECT system_identifier FROM pg_control_system())" if server.can_read_control else "NULL::int8"
    standby_tli = "(SELECT timeline_id FROM pg_control_checkpoint())::int8" if server.can_read_checkpoint else "NULL::int8"
    return (
        f"SELECT {MARK} clock_timestamp(), current_setting('server_version_num')::int, "
        "current_setting('max_connections')::int, "
        f"{sysid}, CASE WHEN pg_is_in_recovery() THEN {standby_tli} "
        "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END, "
        "pg_postmaster_start_time(), pg_is_in_recovery(), host(inet_server_addr()), inet_server_port()"
    )


@dataclass(frozen=True)
class ServerInfo:
    """What the scraper learned about a server when it connected."""

    version_num: int
    extension_version: str
    extension_schema: str
    columns: frozenset[str]
    role: str = ""
    can_read_control: bool = False  # EXECUTE on pg_control_system()
    can_read_checkpoint: bool = False  # EXECUTE on pg_control_checkpoint()
    health: HealthSupport | None = None  # issue 13: the health groups this server has

    @property
    def has_info_view(self) -> bool:  # pg_stat_statements_info: extension 1.9+
        major, _, minor = self.extension_version.partition(".")
        return (int(major), int(minor or 0)) >= (1, 9)


@dataclass
class ScrapeStats:
    """Counters the collector exports about its own scraping."""

    scrapes: int = 0
    text_fetches: int = 0  # round trips that fetched query text
    texts_fetched: int = 0  # statement texts received
    texts_reused: int = 0  # statement texts taken from the previous scrape (none transferred)
    rows: int = 0
    hidden: int = 0
    text_failures: int = 0  # text fetches that failed (encodings): counters went on, texts fell back
    own: int = 0  # rows of pgflow's own statements left out
    health_group_scrapes: dict[str, int] = field(default_factory=dict)  # issue 13: reads per health group


class Scraper:
    """Scrapes one PostgreSQL instance. A context manager; reconnects after a failure.

    ``scrape()`` returns a complete :class:`Snapshot` or raises a :class:`ScrapeError`;
    it never returns half a snapshot, and it never filters rows (deltas need every row).
    """

    def __init__(
        self,
        dsn: str,
        *,
        instance: str | None = None,
        statement_timeout_ms: int = 5000,
        connect_timeout_secs: int = 5,
        health: HealthSchedule | None = None,
    ) -> None:
        self._dsn = dsn
        self.server_address, self.server_port = dsn_host_port(dsn)
        self.instance = instance or dsn_instance_name(dsn)
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout_secs = connect_timeout_secs
        self.stats = ScrapeStats()
        self.health = health if health is not None else HealthSchedule.of()  # issue 13
        self.server: ServerInfo | None = None
        self._conn: psycopg.Connection | None = None
        self.identity: ServerIdentity | None = None  # of the last snapshot
        # Issue 19: texts another database's encoding keeps from this connection (pgflow.scrape.texts).
        self._route: texts.Route | None = None  # the SQL_ASCII database texts are read through
        self._blocked: set[tuple] | None = None  # the keys present when the texts failed here
        self._probe_after = 0.0  # monotonic time before which no way round is looked for again
        self._text_advice: tuple[str, str] | None = None  # said once per advice
        self._warned_hidden = False
        self._fixed: tuple[ServerInfo, list[object]] | None = None  # the scrape's queries, composed for this server
        self._last: Last | None = None  # the previous scrape's statements, reused while the keys stay

    def __repr__(self) -> str:
        return f"Scraper(instance={self.instance!r})"

    @property
    def texts_held(self) -> int:
        """Statement texts held: the last scrape's column, one per entry the server held then."""
        return 0 if self._last is None else self._last.query.len() - self._last.query.null_count()

    def __enter__(self) -> Scraper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # Connection -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self._dsn, connect_timeout=self.connect_timeout_secs)
            try:
                self.server = self._discover(conn)
            except BaseException:
                conn.close()
                raise
            # Label by the host that answered: the second of ``host=a,b`` when the first is down.
            self.server_address, self.server_port = connected_address(conn)
            self._conn = conn
            if self.server.health is not None:  # issue 13: say once per connection what the server has
                for g in HEALTH_GROUPS:
                    telemetry.health_groups_supported.labels(self.instance, g).set(int(self.server.health.supports(g)))
        return self._conn

    def _discover(self, conn: psycopg.Connection) -> ServerInfo:
        try:
            cursors = [conn.cursor() for _ in range(3)]
            with guarded(conn, self.statement_timeout_ms):
                for cur, query in zip(cursors, (_DISCOVER_SQL, EXTENSION_SQL, DISCOVER_SQL)):
                    cur.execute(query)  # type: ignore[arg-type]
            version, role, control, checkpoint = cursors[0].fetchone()  # type: ignore[misc]
            row = cursors[1].fetchone()
            health = HealthSupport.of(cursors[2].fetchone())  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise classify(exc, self._dsn, self.statement_timeout_ms) from None
        if row is None:
            raise ExtensionMissing(
                f"pg_stat_statements is not installed in {redact_dsn(self._dsn)}",
                "run CREATE EXTENSION pg_stat_statements in that database",
            )
        return ServerInfo(version, row[0], row[1], frozenset(row[2]), role, bool(control), bool(checkpoint), health)

    # Scrape -----------------------------------------------------------------------

    def scrape(self) -> Snapshot:
        """One scrape: every statistics source in a single pipelined round trip."""
        try:
            conn = self._connection()
            assert self.server is not None
            snap = self._scrape(conn, self.server)
        except ScrapeError:
            self.close()
            raise
        except psycopg.Error as exc:
            self.close()
            raise classify(exc, self._dsn, self.statement_timeout_ms) from None
        self.stats.scrapes += 1
        self.stats.rows += snap.statements.height
        self._observe(snap)
        return snap

    def _observe(self, snap: Snapshot) -> None:
        """Log (once per event) what a person must act on: another server, hidden statements."""
        previous, self.identity = self.identity, snap.identity
        if previous is not None and snap.identity is not None:
            reason = snap.identity.same_history(previous)
            if reason:
                log.warning(
                    "the server behind this instance changed: new baseline, nothing exported for this interval",
                    extra=kv(instance=self.instance, reason=reason, before=previous.describe(), now=snap.identity.describe()),
                )
        telemetry.hidden_statements.labels(self.instance).set(snap.hidden_statements)
        if snap.hidden_statements and not self._warned_hidden:
            self._warned_hidden = True
            role = self.server.role if self.server is not None and self.server.role else "the monitoring role"
            log.warning(
                f"statements of other roles are hidden from {role} and not exported: GRANT pg_read_all_stats TO {role}",
                extra=kv(instance=self.instance, hidden_statements=snap.hidden_statements),
            )

    def _fixed_queries(self, conn: psycopg.Connection, server: ServerInfo) -> list[object]:
        """The queries every scrape sends, composed once per connection (composing costs ~1 ms)."""
        if self._fixed is None or self._fixed[0] is not server:
            queries: list[object] = [
                meta_sql(server),
                statements_columnar_sql(server.extension_schema, set(server.columns)),
                ACTIVITY_SQL,
                AGES_SQL,
                LOCKS_SQL,
                blocked_sql(server.version_num),
                databases_sql(server.version_num),
            ]
            if server.has_info_view:
                queries.append(info_sql(server.extension_schema))
            self._fixed = (server, [q.as_string(conn) if isinstance(q, sql.Composable) else q for q in queries])
        return list(self._fixed[1])

    def _scrape(self, conn: psycopg.Connection, server: ServerInfo) -> Snapshot:
        queries = self._fixed_queries(conn, server)
        # issue 13: the health groups that are due ride at the end of the same round trip.
        health_started = self.health.now()
        groups = self.health.due(server.health) if server.health is not None else []
        first_group = len(queries)
        queries += [server.health.sql(g) for g in groups]  # type: ignore[union-attr]
        cursors = [conn.cursor(binary=True) for _ in queries]
        with guarded(conn, self.statement_timeout_ms):  # one implicit read-only transaction, no BEGIN
            for cur, query in zip(cursors, queries):
                cur.execute(query)  # type: ignore[arg-type]
        results = [cur.fetchall() for cur in cursors]

        ((scraped_at, version, max_connections, sysid, timeline, started_at, in_recovery, addr, port),) = results[0]
        identity = ServerIdentity(
            system_identifier=sysid,
            timeline=timeline,
            started_at=started_at,
            in_recovery=in_recovery,
            address=f"{addr}:{port}" if addr else f"{self.server_address}:{self.server_port}",
        )
        statements, hidden = self._statements(conn, server, columnar_row(results[1]))
        dealloc, stats_reset = results[7][0] if server.has_info_view else (None, None)
        ages = results[3][0] if results[3] else (None, None)
        self.stats.hidden += hidden
        health = {HEALTH_GROUPS[g]: _frame(rows, HEALTH_FRAMES[HEALTH_GROUPS[g]]) for g, rows in zip(groups, results[first_group:])}
        self.health.done(groups, health_started)
        for g in groups:
            self.stats.health_group_scrapes[g] = self.stats.health_group_scrapes.get(g, 0) + 1
            telemetry.health_queries.labels(self.instance, g).inc()
        return Snapshot(
            instance=self.instance,
            scraped_at=scraped_at,
            server_version_num=version,
            stats_reset=stats_reset,
            dealloc=dealloc,
            statements=statements,
            activity=_frame(results[2], ACTIVITY),
            locks=_frame(results[4], LOCKS),
            blocked=_frame(results[5], BLOCKED),
            databases=_frame(results[6], DATABASES),
            max_connections=max_connections,
            oldest_xact_age_secs=ages[0],
            oldest_query_age_secs=ages[1],
            server_address=self.server_address,
            server_port=self.server_port,
            hidden_statements=hidden,
            identity=identity,
            health_scraped=tuple(groups),
            **{**empty_frames(), **health},
        )

    def _statements(self, conn: psycopg.Connection, server: ServerInfo, row: tuple) -> tuple[pl.DataFrame, int]:
        """The statements frame from the columnar row (:func:`statements_columnar_sql`).

        Rows of other roles' statements come without a queryid when the monitoring role lacks
        pg_read_all_stats: they cannot be diffed, so they are counted (``hidden``) and left out.
        In the steady state the server returns the same entries in the same order: the texts,
        the own-statement mask and the names of the previous scrape are reused, with no Python
        work per row (issue 20).
        """
        cols = columnar(row)
        keys = (cols.dbid, cols.userid, cols.queryid, cols.toplevel)
        last = self._last
        if last is not None and last.complete and all(np.array_equal(a, b) for a, b in zip(keys, last.keys)):
            query, own, pending = last.query, last.own, None
            self.stats.texts_reused += cols.n
        else:
            query, own, pending = self._texts_of(conn, server, keys)
        if last is not None and query is last.query and cols.names == last.names:
            database, user = last.database, last.user
        else:
            database = pl.Series("database", cols.dbid).replace_strict(*cols.names[0:2], default=None, return_dtype=pl.String)
            user = pl.Series("user", cols.userid).replace_strict(*cols.names[2:4], default=None, return_dtype=pl.String)
        # Issue 20: the texts live in this column until the keys change (held twice, they cost ~0.7 MB an instance).
        self._last = Last(keys, query, own, cols.names, database, user, pending)
        frame = pl.DataFrame(
            [
                pl.Series("dbid", cols.dbid),
                pl.Series("userid", cols.userid),
                pl.Series("queryid", cols.queryid),
                toplevel_series(cols.toplevel),
                database,
                user,
                query,
                cols.since,
                *cols.counters,
            ]
        )
        if own is not None:
            # pgflow's own statements (marked): left out for their whole life, so deltas stay exact.
            self.stats.own += int(own.sum())
            frame = frame.filter(pl.Series(~own))
        return frame, cols.hidden

    def _texts_of(
        self, conn: psycopg.Connection, server: ServerInfo, arrays: tuple[np.ndarray, ...]
    ) -> tuple[pl.Series, np.ndarray | None, np.ndarray | None]:
        """The texts of the scrape's keys, the mask of pgflow's own, and the mask of the keys whose
        text is not decided yet (None: all decided; else tried again at the next scrape).

        A key the previous scrape had takes its text (or own mark) from that scrape's column, by
        position (:func:`~pgflow.scrape.columnar.positions`); only new keys, and those not decided
        last time, are fetched. So texts are held once, in the column, and only for the keys the
        server holds now (issue 20): an entry that comes back is a new entry, read again.
        """
        n = len(arrays[0])
        last = self._last
        at = positions(arrays, last.keys) if last is not None else np.full(n, -1, np.int64)
        known = at >= 0
        if last is not None and last.pending is not None:
            known &= ~last.pending[np.maximum(at, 0)]
        new = np.flatnonzero(~known)
        self.stats.texts_reused += n - len(new)
        keys = _key_tuples(tuple(a[new] for a in arrays))
        fetched, mine = self._fetch_texts(conn, server, set(keys), cache(lambda: _key_tuples(arrays))) if keys else ({}, set())
        new_texts = [fetched.get(k) for k in keys]
        new_own = [k in mine for k in keys]
        undecided = [k not in fetched and k not in mine for k in keys]
        if last is None or not known.any():
            query = pl.Series("query", new_texts, dtype=pl.String)
        else:
            query = last.query.gather(np.maximum(at, 0))
            if len(new):
                query = query.scatter(new, pl.Series(new_texts, dtype=pl.String))
        own = np.zeros(n, bool)
        if last is not None and last.own is not None:
            own[known] = last.own[at[known]]
        own[new] = new_own
        pending = None
        if any(undecided):
            pending = np.zeros(n, bool)
            pending[new] = undecided
        return query.alias("query"), (own if own.any() else None), pending

    def _fetch_texts(
        self, conn: psycopg.Connection, server: ServerInfo, keys: set[Key], present: Callable[[], list[tuple]]
    ) -> tuple[dict[Key, str | None], set[Key]]:
        """Texts of ``keys`` and which of them are pgflow's own, in one query; a text that cannot
        be read never stops the counters (its key is in neither: read again next scrape).
        ``present``: every key of the scrape (made only on the way round a text that cannot be read).

        Every text fetched is returned, however many: they go into the scrape's column, which
        holds one per entry the server holds (issue 20: a cache smaller than one fetch lost every
        text of that fetch and read them all again at each scrape).

        ``pg_stat_statements(true)`` converts every stored text to this database's encoding
        and fails as a whole on one it cannot convert (a byte 0xe9 stored from a SQL_ASCII
        database, read from a UTF8 one). Then the texts are read through a SQL_ASCII database
        that has pg_stat_statements (:mod:`pgflow.scrape.texts`). When there is none, the keys
        keep the queryid label and the warning says once which database and what to do; the
        main connection is tried again only when an entry present at the failure has left (the
        unreadable one may have), and the way out (the extension created) is looked for every
        :data:`TEXT_RETRY_SECS`.
        """
        queryids = sorted({k[2] for k in keys})
        has_toplevel = "toplevel" in server.columns
        rows: list[tuple] | None = None
        if self._blocked is None or not self._blocked <= set(present()):  # never failed, or an entry has left since
            try:
                rows = self._read_here(conn, server, queryids, has_toplevel)
                if self._blocked is not None:
                    log.info("statement texts are readable here again", extra=kv(instance=self.instance))
                self._blocked, self._route, self._text_advice = None, None, None
            except (psycopg.errors.CharacterNotInRepertoire, psycopg.errors.UntranslatableCharacter):
                self.stats.text_failures += 1
                telemetry.text_failures.labels(self.instance).inc()
                self._blocked = set(present())
                if self._route is None:
                    self._probe_after = 0.0  # look for a way round now
        if rows is None and self._blocked is not None:
            rows = self._read_elsewhere(conn, server, queryids, has_toplevel, present())
        if rows is None:
            return {}, set()
        self.stats.text_fetches += 1
        fetched: dict[Key, str | None] = {}
        mine: set[Key] = set()
        for dbid, userid, queryid, toplevel, query in rows:
            key = (dbid, userid, queryid, toplevel)
            if key in keys:
                if is_own(query):
                    mine.add(key)
                    continue
                fetched[key] = query
                self.stats.texts_fetched += 1
        # An entry deallocated between the two queries has no text; remember that, so it
        # is not asked for again every scrape (the fingerprint falls back on the queryid).
        for key in keys - fetched.keys() - mine:
            fetched[key] = None
        return fetched, mine

    def _read_here(self, conn: psycopg.Connection, server: ServerInfo, queryids: list[int], has_toplevel: bool) -> list[tuple]:
        """On the scrape's connection. In a SQL_ASCII database the texts arrive as stored: each is
        decoded in the encoding of the database it ran in (a LATIN1 text stays right)."""
        if conn.info.encoding == "ascii":
            encodings = {oid: enc for oid, _, enc, _ in texts.databases(conn, self.statement_timeout_ms)}
            return texts.read_raw(conn, server.extension_schema, has_toplevel, queryids, self.statement_timeout_ms, encodings)
        cur = conn.cursor(binary=True)
        with guarded(conn, self.statement_timeout_ms):
            cur.execute(texts_sql(server.extension_schema, has_toplevel), (queryids,))
        return cur.fetchall()

    def _read_elsewhere(
        self, conn: psycopg.Connection, server: ServerInfo, queryids: list[int], has_toplevel: bool, present: list[tuple]
    ) -> list[tuple] | None:
        """Through the SQL_ASCII database found (looked for again every TEXT_RETRY_SECS), or None.

        The other database's connection takes a per-database slot of the connection budget. When
        the budget has none (``max_connections_per_instance`` = 2) or the server's headroom is
        short, the scrape's own connection makes room: it is closed (and gone from the server)
        before the other is opened, and opened again at the next scrape. pgflow holds no more
        than before, and the texts are read: without them every new statement would lose its
        name, and pgflow's own could not be told from the user's (issue 20).
        """
        if self._route is None and time.monotonic() < self._probe_after:
            return None
        found, own_database = texts.databases(conn, self.statement_timeout_ms), conn.info.dbname
        try:
            return self._read_through(found, own_database, queryids, has_toplevel, present, direct=False)
        except texts.NoConnection as exc:
            if exc.reason == "busy":  # a table round holds the slot: the next scrape (counted)
                if self._route is None:
                    self._probe_after = 0.0
                return None
        close_and_wait(conn)
        self._conn = None  # the next scrape connects again
        return self._read_through(found, own_database, queryids, has_toplevel, present, direct=True)

    def _elsewhere(self, direct: bool) -> dict[str, Any]:
        """The limits and the way of connecting of a read in another database."""
        return {
            "statement_timeout_ms": self.statement_timeout_ms,
            "connect_timeout": self.connect_timeout_secs,
            "instance": self.instance,
            "direct": direct,
        }

    def _read_through(
        self,
        found: list[tuple[int, str, str, bool]],
        own_database: str,
        queryids: list[int],
        has_toplevel: bool,
        present: list[tuple],
        *,
        direct: bool,
    ) -> list[tuple] | None:
        """Find the way round (once) and read the texts there; raises NoConnection unless ``direct``."""
        if self._route is None:
            self._probe_after = time.monotonic() + TEXT_RETRY_SECS
            try:
                route = texts.find_route(found, own_database, self._dsn, {k[0] for k in present}, **self._elsewhere(direct))
            except texts.NoConnection:
                self._probe_after = 0.0
                raise
            if route.database is None:
                problem, fix = route.advice()
                if self._text_advice != (problem, fix):
                    self._text_advice = (problem, fix)
                    log.warning(
                        f"statement texts cannot be read: {problem}; counters go on and new statements are labelled by queryid: {fix}",
                        extra=kv(instance=self.instance),
                    )
                return None
            self._route = route
            log.info(
                "statement texts are read through a SQL_ASCII database: another database's text cannot be converted to this one's encoding",
                extra=kv(instance=self.instance, database=route.database),
            )
        try:
            encodings = {oid: enc for oid, _, enc, _ in found}
            return texts.read_through(self._route, self._dsn, has_toplevel, queryids, encodings, **self._elsewhere(direct))
        except (psycopg.Error, ScrapeError) as exc:  # gone, or the extension dropped: look again later
            log.warning(
                "statement texts could not be read through the SQL_ASCII database; looked for again later",
                extra=kv(instance=self.instance, database=self._route.database, error=type(exc).__name__),
            )
            self._route = None
            self._blocked = set(present)
            self._probe_after = time.monotonic() + TEXT_RETRY_SECS
            return None


def scrape_once(dsn: str, **kwargs: object) -> Snapshot:
    """Convenience for notebooks: connect, scrape once, close."""
    with Scraper(dsn, **kwargs) as scraper:  # type: ignore[arg-type]
        return scraper.scrape()


def _key_tuples(arrays: tuple[np.ndarray, ...]) -> list[Key]:
    """The counters' keys (dbid, userid, queryid, toplevel) as tuples, from the scrape's arrays."""
    toplevel = [None if t == NULL_BOOL else bool(t) for t in arrays[3].tolist()]
    return list(zip(arrays[0].tolist(), arrays[1].tolist(), arrays[2].tolist(), toplevel))
