"""Issue 20: a connection budget per instance, and the server's headroom respected.

A real server with 40 databases and ``max_connections = 30``, the real collector (a subprocess)
and the real receiver. Ground truth for the connections is the server's own ``pg_stat_activity``
(sampled every 100 ms by the test); for the statistics, the rows the test inserted.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import polars as pl
import psycopg
import pytest
from e2e import collector_env, start_collector

from pgflow.otlp.receiver import Receiver

DATABASES = 40
PGFLOW_SQL = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgflow'"


@pytest.fixture(scope="module")
def crowded(pg_factory):
    """A server with max_connections = 30 and 40 databases, each with one table."""
    server = pg_factory(settings={"max_connections": "30"})
    server.execute("CREATE EXTENSION pg_stat_statements")
    names = [f"tenant_{i:02d}" for i in range(DATABASES)]
    for name in names:
        server.execute(f"CREATE DATABASE {name}")
        server.execute("CREATE TABLE t (id serial PRIMARY KEY, v int)", dbname=name)
    return server, names


class ConnectionWatch:
    """Samples pgflow's connections from pg_stat_activity every 100 ms on one connection of its own."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="budget-watch")
        self.counts: list[int] = []
        self.crowded: list[list[tuple]] = []  # what pgflow held when it held the most
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            rows = self.conn.execute(
                "SELECT datname, state, left(query, 60) FROM pg_stat_activity WHERE application_name = 'pgflow'"
            ).fetchall()
            if self.counts and len(rows) > max(self.counts):
                self.crowded = rows
            self.counts.append(len(rows))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.conn.close()


class Writer:
    """Inserts one row into every database in turn, one short connection at a time (its exit
    flushes its statistics), so that every database moves between two table rounds."""

    def __init__(self, server, names: list[str]) -> None:
        self.server, self.names = server, names
        self.inserted = dict.fromkeys(names, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for name in self.names:
                with psycopg.connect(self.server.dsn(name), autocommit=True, application_name="budget-writer") as conn:
                    conn.execute("INSERT INTO t (v) VALUES (1)")
                self.inserted[name] += 1
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _inserts(receiver: Receiver) -> pl.DataFrame:
    """The table points of inserts: (database, window end, value)."""
    points = receiver.points().filter(pl.col("metric") == "postgresql.operations")
    return points.with_columns(
        database=pl.col("attributes").str.json_path_match("$['db.namespace']"),
        collection=pl.col("attributes").str.json_path_match("$['db.collection.name']"),
        operation=pl.col("attributes").str.json_path_match("$['postgresql.operation']"),
    ).filter((pl.col("collection") == "public.t") & (pl.col("operation") == "ins") & (pl.col("value") > 0))


def _metrics(env: dict[str, str]) -> str:
    try:
        return urllib.request.urlopen(f"http://{env['PGFLOW_METRICS_ADDR']}/metrics", timeout=5).read().decode()
    except OSError:  # not listening yet
        return ""


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_forty_databases_never_exceed_the_budget_and_each_gets_its_statistics(crowded, tmp_path):
    server, names = crowded
    watch = ConnectionWatch(server.dsn())
    writer = Writer(server, names)
    log = tmp_path / "log"
    try:
        with Receiver() as receiver:
            env = collector_env(server.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_TABLE_STATS_INTERVAL_SECS="5")
            proc = start_collector(env, log=log)
            try:

                def rounds_seen() -> int:  # rounds after the baseline in which every database was exported
                    windows = _inserts(receiver).group_by("database").agg(pl.col("end").n_unique())
                    return 0 if windows.height < DATABASES else int(windows.get_column("end").min())

                _until(lambda: rounds_seen() >= 2, 240, "not every database's table statistics were exported twice")
                metrics = _metrics(env)
            finally:
                _stop(proc)
            inserts = _inserts(receiver)
    finally:
        writer.close()
        watch.close()
    # Never above the budget (3: the scrape, the sampler, one for per-database work) at any sample.
    assert watch.counts and max(watch.counts) <= 3, f"pgflow held {watch.crowded}"
    assert max(watch.counts) >= 2  # the scrape's and the sampler's were seen: the watch sees pgflow
    # Every table round's frame reaches the endpoint whole: each window with table statistics has every database.
    windows = inserts.group_by("end").agg(pl.col("database").n_unique().alias("databases"))
    assert windows.height >= 2
    assert windows.get_column("databases").to_list() == [DATABASES] * windows.height
    for name in names:  # and no more than the test inserted
        assert inserts.filter(pl.col("database") == name).get_column("value").sum() <= writer.inserted[name]
    text = log.read_text()
    assert "too many clients" not in text and "Traceback" not in text
    assert "pgflow_optional_connections_open" in metrics


def test_too_little_headroom_opens_nothing_optional_says_so_once_and_resumes(crowded, tmp_path):
    server, names = crowded
    watch = ConnectionWatch(server.dsn())
    # max_connections 30 - 3 superuser-reserved = 27 for everyone; the watch, pgflow's scrape and
    # sampler and these 21 sessions leave 3 free: fewer than the headroom of 5.
    held = [psycopg.connect(server.dsn(), autocommit=True, application_name="budget-held") for _ in range(21)]
    log = tmp_path / "log"
    try:
        with Receiver() as receiver:
            env = collector_env(
                server.dsn(),
                receiver.http_endpoint,
                tmp_path / "state",
                PGFLOW_TABLE_STATS_INTERVAL_SECS="1",
                PGFLOW_TABLE_STATS_DATABASES=json.dumps(names[:3]),
                PGFLOW_RESERVED_CONNECTIONS_HEADROOM="5",
            )
            proc = start_collector(env, log=log)
            try:
                _until(
                    lambda: "pgflow_optional_work_waiting{instance=" in _metrics(env) and _waiting(_metrics(env)) == 1.0,
                    120,
                    "the optional work never waited",
                )
                time.sleep(12)  # several table intervals and headroom re-reads while held
                waiting_counts = list(watch.counts)
                waited = _metrics(env)
                assert (
                    _inserts(receiver).height == 0 and receiver.points().filter(pl.col("metric") == "postgresql.table.size").height == 0
                )  # no table statistics meanwhile
                for conn in held:
                    conn.close()
                held = []
                for name in names[:3]:
                    server.execute("INSERT INTO t (v) VALUES (1)", dbname=name)
                _until(
                    lambda: receiver.points().filter(pl.col("metric") == "postgresql.table.size").height > 0,
                    120,
                    "table statistics did not resume once connections were freed",
                )
                _until(lambda: _waiting(_metrics(env)) == 0.0, 30, "still waiting")
            finally:
                _stop(proc)
    finally:
        for conn in held:
            conn.close()
        watch.close()
    assert waiting_counts and max(waiting_counts) <= 2, "an optional connection was opened without headroom"
    assert "pgflow_optional_connections_deferred_total{instance=" in waited and 'reason="headroom"' in waited
    lines = log.read_text().splitlines()
    assert sum("optional work waits" in line for line in lines) == 1
    assert sum("optional work resumed" in line for line in lines) == 1
    assert "Traceback" not in "\n".join(lines)


def _waiting(metrics: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith("pgflow_optional_work_waiting{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_check_reports_the_budget_and_the_headroom(crowded):
    from pgflow.config import Settings
    from pgflow.scrape.diagnose import check

    server, _ = crowded
    settings = Settings.load(database_url=server.dsn())
    report = check(settings.targets()[0], settings=settings)
    [finding] = [f for f in report.findings if f.name == "connection budget"]
    assert finding.level == "ok"
    assert "at most 3 connections" in finding.detail and "max_connections 30" in finding.detail
    assert "3 superuser-reserved" in finding.detail


def test_an_interval_too_short_for_every_database_is_counted_and_said_once(crowded, tmp_path):
    """40 databases cannot all be visited in 0.1 s: every round is late, counted in /metrics, said
    once; each database is still read every round (the round ends later, never skips one)."""
    server, names = crowded
    writer = Writer(server, names)
    log = tmp_path / "log"
    try:
        with Receiver() as receiver:
            env = collector_env(server.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_TABLE_STATS_INTERVAL_SECS="0.1")
            proc = start_collector(env, log=log)
            try:

                def late_rounds() -> float:
                    for line in _metrics(env).splitlines():
                        if line.startswith("pgflow_table_stats_rounds_late_total{"):
                            return float(line.rsplit(" ", 1)[1])
                    return 0.0

                _until(lambda: late_rounds() >= 3, 240, "late rounds were not counted")
                metrics = _metrics(env)
            finally:
                _stop(proc)
            inserts = _inserts(receiver)
    finally:
        writer.close()
    assert "pgflow_table_stats_databases_late_total{" in metrics
    assert set(inserts.get_column("database")) == set(names)  # late, never skipped
    lines = log.read_text().splitlines()
    assert sum("could not all be visited within table_stats_interval_secs" in line for line in lines) == 1


def test_check_warns_when_the_budget_leaves_no_slot_or_the_server_no_headroom(crowded):
    from pgflow.config import Settings
    from pgflow.scrape.diagnose import check

    server, _ = crowded
    tight = Settings.load(database_url=server.dsn(), max_connections_per_instance=2)
    [finding] = [f for f in check(tight.targets()[0], settings=tight).findings if f.name == "connection budget"]
    assert finding.level == "warn" and "no slot left" in finding.detail
    held = [psycopg.connect(server.dsn(), autocommit=True) for _ in range(22)]  # 27 - 22 - check's own < 5
    try:
        settings = Settings.load(database_url=server.dsn())
        [finding] = [f for f in check(settings.targets()[0], settings=settings).findings if f.name == "connection budget"]
    finally:
        for conn in held:
            conn.close()
    assert finding.level == "warn" and "optional work would wait" in finding.detail


def test_a_budget_of_two_still_reads_texts_through_another_database(pg_factory, tmp_path):
    """Issue 20 with issue 19: one statement text this database cannot convert is read through the
    SQL_ASCII database that has pg_stat_statements. With ``max_connections_per_instance`` = 2
    there is no slot for that connection: the texts were never read, every new statement lost its
    name and pgflow's own statements were exported as the user's. The scrape's own connection now
    makes room for the read (closed first, opened again at the next scrape): every pgbench
    statement is exported under its own summary, exactly; nothing of pgflow's; never more than
    two connections (pg_stat_activity every 100 ms)."""
    from e2e import calls_by_summary, settle, wait_for_baseline

    server = pg_factory()
    server.execute("CREATE EXTENSION pg_stat_statements", "CREATE DATABASE sqlascii ENCODING 'SQL_ASCII' TEMPLATE template0")
    server.execute("CREATE EXTENSION pg_stat_statements", dbname="sqlascii")
    server.pgbench_init()
    watch = ConnectionWatch(server.dsn())
    log = tmp_path / "log"
    try:
        with Receiver() as receiver:
            env = collector_env(server.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_MAX_CONNECTIONS_PER_INSTANCE="2")
            proc = start_collector(env, log=log)
            try:
                wait_for_baseline(tmp_path / "state")
                with psycopg.connect(server.dsn("sqlascii"), autocommit=True) as conn:
                    conn.execute(b'SELECT 1 AS "caf\xe9"')  # stored as is: not valid UTF-8
                server.pgbench("-n", "-c", "4", "-t", "100")
                settle(state_dir=tmp_path / "state")
            finally:
                _stop(proc)
            points = receiver.points()
    finally:
        watch.close()
    calls = calls_by_summary(points)
    expected = [
        "UPDATE pgbench_branches",
        "UPDATE pgbench_tellers",
        "UPDATE pgbench_accounts",
        "SELECT pgbench_accounts",
        "INSERT pgbench_history",
    ]
    assert {s: calls.get(s) for s in expected} == dict.fromkeys(expected, 400.0)
    texts = points.filter(pl.col("metric") == "postgresql.query.calls").get_column("attributes").str.json_path_match("$['db.query.text']")
    assert texts.null_count() == 0 and not texts.str.contains("pgflow").any()  # every series named, none of pgflow's
    assert watch.counts and max(watch.counts) <= 2, f"pgflow held {watch.crowded}"
    text = log.read_text()
    assert "read through a SQL_ASCII database" in text and "Traceback" not in text
