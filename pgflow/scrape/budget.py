"""Issue 20: the connections one instance may hold, and the server's headroom for everyone else.

An instance never holds more than ``max_connections_per_instance`` connections at any moment.
Two are *fixed* and always held: the scrape's and the active-session sampler's (one when
sampling is off). The rest are *slots* shared by every piece of per-database work (per-table
statistics, explains in a statement's own database, texts read through another database):
each takes a slot, connects, works, disconnects and gives the slot back
(:meth:`ConnectionBudget.connection`). Nothing per database stays open between visits. Texts
read through another database never wait for a slot: without one (or without headroom) the
scrape closes its own connection and reads them in its place (``Scraper._read_elsewhere``).

Before an optional connection is opened, the server's free connections are read (one cheap
``/*pgflow*/`` query on the scrape's own connection): ``max_connections`` minus
``superuser_reserved_connections`` minus ``reserved_connections`` (16+) minus the client
backends in use. Below ``reserved_connections_headroom`` the optional work waits (table
statistics) or is skipped this time (explains, texts): counted in ``/metrics``, said once in
the log, and said again when it resumes. The scrape and the sampler keep their connections.

Other modules reach an instance's budget with :func:`for_instance_name` (or are handed it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import psycopg.conninfo

from pgflow import telemetry
from pgflow.logs import kv
from pgflow.scrape.connection import connect, guarded

log = logging.getLogger("pgflow.budget")

# max_connections minus the slots reserved for superusers (and, 16+, for pg_use_reserved_connections)
# minus the client backends in use: what is left for everyone else. Any role may count
# pg_stat_activity's rows (other users' rows are listed, only their details hidden).
FREE_SQL = (
    "SELECT /*pgflow*/ current_setting('max_connections')::int, "
    "current_setting('superuser_reserved_connections')::int, "
    "coalesce(current_setting('reserved_connections', true)::int, 0), "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
)
_TIMEOUT_SQL = "SELECT /*pgflow*/ set_config('statement_timeout', '2000', true), set_config('lock_timeout', '1000', true)"


class NoConnection(Exception):
    """An optional connection was not opened: ``reason`` is ``headroom``, ``busy`` or ``no_slot``."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


def read_free(conn: psycopg.Connection) -> tuple[int, int, int, int]:
    """(max_connections, superuser_reserved, reserved, client backends in use) on ``conn``'s server.

    On an autocommit connection (pgflow's own) it is one implicit transaction under a 2 s
    statement timeout, no transaction control sent. Else it runs in its own short transaction
    (rolled back) under that timeout; inside a
    transaction already open on ``conn`` (a caller in the middle of a scrape) it runs in it,
    under that transaction's limits, and leaves it open.
    """
    if conn.autocommit:  # pgflow's connections (issue 19): one implicit transaction, no BEGIN/ROLLBACK
        with guarded(conn, 2000, 1000):
            cur = conn.execute(FREE_SQL)
        return tuple(int(v) for v in cur.fetchone())  # type: ignore[return-value,union-attr]
    own = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    try:
        if own:
            conn.execute(_TIMEOUT_SQL)
        row = conn.execute(FREE_SQL).fetchone()
    finally:
        if own:
            conn.rollback()
    return tuple(int(v) for v in row)  # type: ignore[return-value,union-attr]


def free_of(row: tuple[int, int, int, int]) -> int:
    """Connections left free for others (ordinary roles) from :func:`read_free`'s row."""
    total, superuser, reserved, used = row
    return total - superuser - reserved - used


def close_and_wait(conn: psycopg.Connection, timeout: float = 2.0) -> None:
    """Close ``conn`` and wait (at most ``timeout``) until its server process has exited.

    libpq returns as soon as it has sent its goodbye; the backend still holds its slot (and
    its row in ``pg_stat_activity``) for a moment. The budget counts it until the server closes
    the socket (which it does only after giving the slot back), seen on a duplicate of it.
    """
    try:
        fd = os.dup(conn.fileno())
    except Exception:  # already closed or broken: nothing to wait for
        conn.close()
        return
    conn.close()
    sock = socket.socket(fileno=fd)
    try:
        sock.settimeout(timeout)
        while sock.recv(4096):
            pass
    except OSError:  # timed out or reset: gone or going
        pass
    finally:
        sock.close()


class ConnectionBudget:
    """The per-instance budget: ``slots`` optional connections, each opened only with headroom.

    ``probe`` returns the server's free connections (None: unknown, treated as too few); it
    runs on the scrape's own connection. Without a probe (a tool used alone) the headroom is
    not checked. :meth:`close` (the instance is done) ends any wait.
    """

    def __init__(
        self,
        dsn: str,
        *,
        instance: str,
        max_connections: int = 3,
        fixed: int = 2,
        headroom: int = 5,
        connect_timeout: int = 5,
        probe: Callable[[], int | None] | None = None,
        recheck_secs: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.instance = instance
        self.max_connections = max_connections
        self.fixed = fixed
        self.slots = max(0, max_connections - fixed)
        self.headroom = headroom
        self.connect_timeout = connect_timeout
        self.probe = probe
        self.stop = threading.Event()
        self.recheck_secs = recheck_secs
        self._sem = threading.BoundedSemaphore(self.slots) if self.slots else None
        self._lock = threading.Lock()
        self.open = 0  # optional connections open now
        self.peak = 0  # the most ever open at once
        self.waiting = False  # the optional work is held back by the headroom
        self.last_free: int | None = None
        self._said_no_slot = False

    @classmethod
    def from_settings(
        cls, instance: object, settings: object, *, sampler: bool, probe: Callable[[], int | None] | None = None
    ) -> ConnectionBudget:
        """The budget ``pgflow.config.Settings`` gives one instance (``sampler``: sampling is on)."""
        s = settings
        budget = cls(
            instance.dsn,
            instance=instance.name,  # type: ignore[attr-defined]
            max_connections=s.max_connections_per_instance,
            fixed=2 if sampler else 1,  # type: ignore[attr-defined]
            headroom=s.reserved_connections_headroom,
            connect_timeout=s.connect_timeout_secs,  # type: ignore[attr-defined]
            probe=probe,
        )
        register(budget)
        return budget

    def close(self) -> None:
        """The instance is done: every wait ends (with :class:`NoConnection`), nothing more opens."""
        self.stop.set()
        if _BUDGETS.get(self.instance) is self:
            _BUDGETS.pop(self.instance, None)

    def __repr__(self) -> str:
        return f"ConnectionBudget(instance={self.instance!r}, slots={self.slots})"

    def dsn_for(self, dbname: str | None) -> str:
        """The instance's DSN for another database (None: its own): TLS and every other parameter kept."""
        return self._dsn if dbname is None else psycopg.conninfo.make_conninfo(self._dsn, dbname=dbname)

    # Headroom -----------------------------------------------------------------------

    def _free(self) -> int | None:
        try:
            free = self.probe() if self.probe is not None else None
        except Exception as exc:  # unknown: treated as too few (the scrape says why it fails)
            log.debug("reading the server's free connections failed", extra=kv(instance=self.instance, error=repr(exc)[:200]))
            free = None
        if free is not None:
            self.last_free = free
            telemetry.server_free_connections.labels(self.instance).set(free)
        return free

    def has_headroom(self) -> bool:
        """True when optional work may open a connection now (said once when it changes)."""
        if self.probe is None:
            return True
        free = self._free()
        enough = free is not None and free >= self.headroom
        with self._lock:  # table statistics and explains may ask at once: one line per change
            return self._note(enough, free)

    def _note(self, enough: bool, free: int | None) -> bool:
        if not enough:
            telemetry.optional_connections_deferred.labels(self.instance, "headroom").inc()
            if not self.waiting:
                self.waiting = True
                telemetry.optional_work_waiting.labels(self.instance).set(1)
                if free is None:  # the probe failed (the scrape's own error says why): not "too few"
                    log.warning(
                        "optional work waits: the server's free connections could not be read",
                        extra=kv(instance=self.instance, headroom=self.headroom, hint="it resumes by itself once they can be read"),
                    )
                else:
                    log.warning(
                        "optional work waits: too few connections left free on the server for others",
                        extra=kv(
                            instance=self.instance,
                            free=free,
                            headroom=self.headroom,
                            hint="it resumes by itself; lower PGFLOW_RESERVED_CONNECTIONS_HEADROOM or raise max_connections to change this",
                        ),
                    )
        elif self.waiting:
            self.waiting = False
            telemetry.optional_work_waiting.labels(self.instance).set(0)
            log.info("optional work resumed: connections are free again", extra=kv(instance=self.instance, free=free))
        return enough

    def wait_for_headroom(self) -> bool:
        """Block until there is headroom (re-read every ``recheck_secs``); False if stopped first."""
        while not self.has_headroom():
            if self.stop.wait(self.recheck_secs):
                return False
        return not self.stop.is_set()

    # Connections --------------------------------------------------------------------

    @contextmanager
    def connection(self, dbname: str | None, *, wait: bool = False, slot_wait_secs: float | None = None) -> Iterator[psycopg.Connection]:
        """One optional connection to ``dbname`` (None: the DSN's own) for the block, then closed.

        ``wait``: wait for the headroom (table statistics) instead of raising; a slot is
        waited for at most ``slot_wait_secs`` (None: as long as it takes). Raises
        :class:`NoConnection` when nothing may be opened, a ``ScrapeError`` when connecting
        fails. ``application_name=pgflow``, no prepared statements, autocommit (the work guards itself).
        """
        if self._sem is None:
            if not self._said_no_slot:
                self._said_no_slot = True
                log.warning(
                    "no connection left for per-database work",
                    extra=kv(
                        instance=self.instance,
                        max_connections_per_instance=self.max_connections,
                        fixed=self.fixed,
                        hint="raise PGFLOW_MAX_CONNECTIONS_PER_INSTANCE to at least 3 for table statistics and explains",
                    ),
                )
            telemetry.optional_connections_deferred.labels(self.instance, "no_slot").inc()
            raise NoConnection("no_slot", f"max_connections_per_instance={self.max_connections} leaves no slot")
        # The headroom first, then the slot: the probe needs the scrape's connection, which may be
        # busy with a scrape that itself waits for a slot (explains): never hold one waiting for the other.
        if not (self.wait_for_headroom() if wait else self.has_headroom()):
            raise NoConnection("headroom", f"fewer than {self.headroom} connections free on the server")
        if not self._acquire(slot_wait_secs):
            telemetry.optional_connections_deferred.labels(self.instance, "busy").inc()
            raise NoConnection("busy", "every per-database connection slot is in use")
        try:
            conn = connect(self.dsn_for(dbname), connect_timeout=self.connect_timeout)
            with self._lock:
                self.open += 1
                self.peak = max(self.peak, self.open)
                telemetry.optional_connections_open.labels(self.instance).set(self.open)
            try:
                conn.autocommit = True  # each unit of work is one implicit, read-only transaction (guarded)
                yield conn
            finally:
                try:
                    close_and_wait(conn)
                finally:
                    with self._lock:
                        self.open -= 1
                        telemetry.optional_connections_open.labels(self.instance).set(self.open)
        finally:
            self._sem.release()  # type: ignore[union-attr]

    def _acquire(self, timeout: float | None) -> bool:
        assert self._sem is not None
        if timeout is not None:
            return self._sem.acquire(timeout=timeout)
        while not self._sem.acquire(timeout=0.5):
            if self.stop.is_set():
                return False
        return True

    def describe(self) -> str:
        """One line for ``pgflow check`` and the log."""
        fixed = "the scrape and the sampler" if self.fixed == 2 else "the scrape"
        return (
            f"at most {self.max_connections} connections: {fixed} held, {self.slots} shared by per-database work "
            f"(table statistics, explains, texts), opened only while at least {self.headroom} "
            "connections stay free for others"
        )


# Instance name -> its budget, for modules that open per-database connections without being handed one.
_BUDGETS: dict[str, ConnectionBudget] = {}


def register(budget: ConnectionBudget) -> None:
    _BUDGETS[budget.instance] = budget


def for_instance_name(name: str) -> ConnectionBudget | None:
    """The budget of a running instance (None outside the collector)."""
    return _BUDGETS.get(name)


def check_budget(conn: psycopg.Connection, settings: object) -> tuple[str, str, str]:
    """``pgflow check``: (level, name, detail) for the budget and the server's headroom now."""
    s = settings
    sampler = s.activity_sample_interval_secs > 0  # type: ignore[attr-defined]
    budget = ConnectionBudget(
        "",
        instance="check",
        max_connections=s.max_connections_per_instance,  # type: ignore[attr-defined]
        fixed=2 if sampler else 1,
        headroom=s.reserved_connections_headroom,
    )  # type: ignore[attr-defined]
    try:
        row = read_free(conn)
    except psycopg.Error as exc:
        return ("warn", "connection budget", f"{budget.describe()}; free connections unreadable ({str(exc).strip()[:120]})")
    total, superuser, reserved, used = row
    free = free_of(row)
    detail = (
        f"{budget.describe()}; the server has {free} free of max_connections {total} "
        f"({superuser} superuser-reserved, {reserved} reserved, {used} in use)"
    )
    if budget.slots == 0:
        return (
            "warn",
            "connection budget",
            detail + "; no slot left for per-database work: table statistics and "
            "explains are off (raise PGFLOW_MAX_CONNECTIONS_PER_INSTANCE)",
        )
    if free < budget.headroom:
        return "warn", "connection budget", detail + f"; fewer than {budget.headroom} free: optional work would wait"
    return "ok", "connection budget", detail
