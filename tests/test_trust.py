"""Issue 19, items 2 and 3, end to end: the real collector, real servers, the real receiver.

Item 2: one non-UTF-8 text must not blind the instance: pgbench's statements in another
database are exported under their texts with exactly pgbench's calls.
Item 3: nothing pgflow sends is exported as workload: a database where only pgflow runs
exports 0 calls, with ``pg_stat_statements.track = all`` and ``track_utility = on``.
"""

from __future__ import annotations

import signal
import subprocess

import polars as pl
import psycopg
from conftest import PGBENCH_STATEMENTS
from e2e import collector_env, settle, start_collector, wait_for_baseline

from pgflow.otlp.receiver import Receiver

# Stored from a SQL_ASCII database: not valid UTF-8. The byte is in a relation's name, which the
# canonical text keeps (a column alias would be dropped by it: issue 19 item 6).
BAD_BYTE_TABLE = b'CREATE TABLE "caf\xe9" (x int)'
BAD_BYTE_STATEMENT = b'SELECT x FROM "caf\xe9"'


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def _calls(points: pl.DataFrame) -> pl.DataFrame:
    """(database, text, calls) summed over every exported window."""
    calls = points.filter(pl.col("metric") == "postgresql.query.calls")
    keyed = calls.with_columns(
        database=pl.col("attributes").str.json_path_match("$['db.namespace']"),
        text=pl.col("attributes").str.json_path_match("$['db.query.text']"),
    )
    return keyed.group_by("database", "text").agg(pl.col("value").sum().alias("calls"))


def test_pgbench_text_exported_beside_an_unreadable_one(pg_factory, tmp_path):
    """Item 2: a SQL_ASCII database holds a 0xe9 text and has pg_stat_statements; pgbench runs
    in another database: its UPDATE is exported under its text with exactly pgbench's calls,
    and the bad statement under its normalized text with U+FFFD."""
    server = pg_factory()
    server.execute(
        "CREATE EXTENSION pg_stat_statements", "CREATE DATABASE sqlascii ENCODING 'SQL_ASCII' TEMPLATE template0", "CREATE DATABASE bench"
    )
    server.execute("CREATE EXTENSION pg_stat_statements", dbname="sqlascii")
    server.pgbench_init(dbname="bench")
    with psycopg.connect(server.dsn("sqlascii"), autocommit=True) as conn:
        conn.execute(BAD_BYTE_TABLE)
        conn.execute(BAD_BYTE_STATEMENT)
    with Receiver() as receiver:
        state = tmp_path / "state"
        proc = start_collector(collector_env(server.dsn(), receiver.http_endpoint, state), log=tmp_path / "log")
        try:
            wait_for_baseline(state)
            server.pgbench("-n", "-c", "2", "-t", "150", dbname="bench")
            with psycopg.connect(server.dsn("sqlascii"), autocommit=True) as conn:
                for _ in range(4):
                    conn.execute(BAD_BYTE_STATEMENT)
            settle(state_dir=state)
        finally:
            assert _stop(proc) == 0
        calls = {(d, t): c for d, t, c in _calls(receiver.points()).iter_rows()}
    log = (tmp_path / "log").read_text()
    assert calls.get(("bench", PGBENCH_STATEMENTS["UPDATE pgbench_branches"])) == 300, {k: v for k, v in calls.items() if k[0] == "bench"}
    bad = {t: c for (d, t), c in calls.items() if d == "sqlascii" and t and t.startswith("SELECT") and "caf\ufffd" in t}
    assert list(bad.values()) == [4], bad  # one series, the byte replaced
    assert "Traceback" not in log and "caf" not in log


def test_pgflow_alone_exports_nothing(pg_factory, tmp_path):
    """Item 3: with every statement tracked (utility ones too), a database where only pgflow runs
    (its scrape, sampler, table scrape; `check` too) exports 0 calls for several windows, and the
    database where pgbench runs (explained there by pgflow, tables scraped there) exports no
    transaction control or setting of pgflow's: no BEGIN READ ONLY, no ROLLBACK."""
    server = pg_factory(settings={"pg_stat_statements.track": "all", "pg_stat_statements.track_utility": "on"})
    server.execute("CREATE EXTENSION pg_stat_statements", "CREATE DATABASE quiet")
    server.execute("CREATE EXTENSION pg_stat_statements", "CREATE TABLE t (id int PRIMARY KEY)", dbname="quiet")
    server.pgbench_init()
    server.execute("SELECT pg_stat_statements_reset()")
    with Receiver() as receiver:
        state = tmp_path / "state"
        env = collector_env(server.dsn("quiet"), receiver.http_endpoint, state, PGFLOW_TABLE_STATS_INTERVAL_SECS="0.3")
        proc = start_collector(env, log=tmp_path / "log")
        try:
            wait_for_baseline(state)
            for _ in range(3):  # pgbench in postgres: something to explain there, windows apart
                server.pgbench("-n", "-c", "2", "-t", "50")
                settle(state_dir=state, scrapes=4)
        finally:
            assert _stop(proc) == 0
        frame = _calls(receiver.points())
        plans = receiver.logs()
    quiet = frame.filter(pl.col("database") == "quiet")
    assert quiet["calls"].sum() == 0, quiet.rows()
    postgres = {t: c for d, t, c in frame.iter_rows() if d == "postgres"}
    assert postgres.get(PGBENCH_STATEMENTS["UPDATE pgbench_branches"]) == 300, postgres  # exported at all
    pgflows = {
        t: c
        for t, c in postgres.items()
        if t and any(w in t.lower() for w in ("rollback", "read only", "set_config", "statement_timeout", "pgflow"))
    }
    assert pgflows == {}, pgflows
    assert plans.height > 0  # pgflow did explain in postgres (so its explain statements were sent there)
    entries = server.execute(
        "SELECT d.datname, s.query, s.calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'quiet'"
    )
    assert entries and all("/*pgflow*/" in q for _, q, _ in entries), [q for _, q, _ in entries][:20]
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_a_text_that_cannot_be_explained_as_read_is_skipped_quietly(pg_factory, caplog):
    """The explain side of item 2 (seen in a run of the test above on PostgreSQL 18: one line
    "explaining failed unexpectedly" carrying the whole EXPLAIN text): a text whose bytes were
    replaced on reading is not the server's statement and is not explained; a text the database's
    encoding cannot carry (any non-ASCII character in a SQL_ASCII database) is one counted
    failure. Neither puts the text in a log line."""
    import logging

    from pgflow.ops.fingerprint import query_info
    from pgflow.scrape.explain import PlanSource, database_connector

    server = pg_factory()
    server.execute("CREATE DATABASE sqlascii ENCODING 'SQL_ASCII' TEMPLATE template0")
    with psycopg.connect(server.dsn("sqlascii"), autocommit=True) as conn:
        conn.execute(BAD_BYTE_TABLE)
    version = int(server.execute("SHOW server_version_num")[0][0])
    texts = ['SELECT x FROM "caf\ufffd"', 'SELECT x FROM "café" WHERE x = $1']
    candidates = pl.DataFrame(
        {
            "database": ["sqlascii"] * 2,
            "user": ["app"] * 2,
            "queryid": [1, 2],
            "query": texts,
            "exec_time": [2.0, 1.0],
            "fingerprint": [query_info(t).fingerprint for t in texts],
        }
    )
    source = PlanSource(database_connector(server.dsn()), instance="t")
    with caplog.at_level(logging.DEBUG, logger="pgflow"):
        plans = source.run(candidates, version)
    assert plans.height == 0
    assert source.stats.skipped == {"not_explainable": 1}
    assert source.stats.failed == {"text_unencodable": 1}
    lines = " ".join(r.getMessage() + str(getattr(r, "kv", "")) for r in caplog.records)
    assert "caf" not in lines and "explaining failed unexpectedly" not in lines
