"""Issue 19, item 6: one statement, one series, one join key.

- Canonical text: two collectors fed the same statements in different orders and databases
  (two real servers, the variants run in opposite orders) export identical attribute sets.
- Multi-statement strings: a sample of ``begin; update ...; select pg_sleep(2); commit;`` and a
  session blocked by it (a real row lock) carry the fingerprint of the statement the query id
  names, the one the metrics carry, and events and metrics name the same root.
- Every fingerprint is 16 hex digits, truncated and unparsable texts included.
"""

from __future__ import annotations

import re
import threading
import time

import polars as pl
import psycopg
import pytest

from pgflow import ops
from pgflow.ops.fingerprint import query_info
from pgflow.ops.query_samples import sample_text
from pgflow.scrape import Scraper
from pgflow.scrape.sampler import Sampler, with_samples

PERIOD = 0.2
HEX16 = re.compile(r"[0-9a-f]{16}")

# The same statements in two spellings each (pgbench's END against a client's commit, aliases, IN lists).
VARIANT_A = ["BEGIN", "SELECT 1", "END", "SELECT 1 AS s, 2 AS b", "SELECT * FROM pg_class WHERE oid IN (1, 2, 3)"]
VARIANT_B = ["begin", "select 2", "commit", "select 1 as x, 2 as y", "select * from pg_catalog.pg_class where oid in (7)"]


def _run(dsn: str, statements: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


def _series(server, order: list[tuple[str, list[str]]]) -> pl.DataFrame:
    """The query series one collector exports when ``order``'s (database, statements) run in turn."""
    for db, _ in order:
        server.execute(f"CREATE DATABASE {db}")
    server.execute("SELECT pg_stat_statements_reset()")
    snapshots = []
    with Scraper(server.dsn()) as scraper:
        snapshots.append(scraper.scrape())
        for db, statements in order:
            _run(server.dsn(db), statements)
            time.sleep(0.05)
            snapshots.append(scraper.scrape())
    points = ops.run(snapshots, export_interval_secs=1)
    calls = points.filter(pl.col("metric") == "postgresql.query.calls").with_columns(pl.col("attributes").struct.unnest())
    ours = calls.filter(pl.col("db.namespace").is_in([db for db, _ in order]))
    return ours.select("db.query.text", "postgresql.query.fingerprint", "db.query.summary", "db.operation.name", "value")


def test_two_collectors_fed_the_same_statements_in_other_orders_and_databases_export_the_same_series(pg_factory):
    one, two = pg_factory(), pg_factory()
    for server in (one, two):
        server.execute("CREATE EXTENSION pg_stat_statements")
    first = _series(one, [("i19_a", VARIANT_A), ("i19_b", VARIANT_B)])
    second = _series(two, [("i19_a", VARIANT_B), ("i19_b", VARIANT_A)])

    def attribute_sets(frame: pl.DataFrame) -> set[tuple]:
        return set(frame.drop("value").iter_rows())

    assert attribute_sets(first) == attribute_sets(second), (first, second)
    for frame in (first, second):
        by_fp = frame.group_by("postgresql.query.fingerprint").agg(pl.col("db.query.text").n_unique().alias("n"))
        assert by_fp["n"].max() == 1  # one text per fingerprint: no statement split into two series
        texts = set(frame["db.query.text"])
        assert "COMMIT" in texts and not {"END", "commit"} & texts
        commits = frame.filter(pl.col("db.query.text") == "COMMIT")["value"].sum()
        assert commits == 2  # END in one database, commit in the other: one series each, one call each
        assert all(HEX16.fullmatch(fp) for fp in frame["postgresql.query.fingerprint"])
    # the alias variants are one statement, shown without the aliases, in both databases
    aliased = {query_info(v).text for v in (VARIANT_A[3], VARIANT_B[3])}
    assert aliased == {"SELECT $1, $2"}


def test_texts_are_a_function_of_the_statement_whatever_the_spelling():
    variants = [
        ("END", "commit", "COMMIT AND NO CHAIN"),
        ("select $1 as s, $2 as b", "SELECT $1 AS x, $2 AS y"),
        ("select * from t where id in (1, 2, 3)", "SELECT * FROM t WHERE id IN ($1 /*, ... */)", "select * from t where id in ($1,$2)"),
        ("insert into t values (1, 2), (3, 4)", "INSERT INTO t VALUES ($1, $2)"),
        ("savepoint a", "SAVEPOINT b"),
        ("select * from s1.t where a = $2 and b = $1", "select * from s2.t where a = $1 and b = $2"),
    ]
    for group in variants:
        infos = {(query_info(v).fingerprint, query_info(v).text) for v in group}
        assert len(infos) == 1, infos


def test_every_fingerprint_has_one_format():
    for raw in ["SELECT 1", "SELEC * FORM nowhere", "<insufficient privilege>", "SELECT * FROM t WHERE id IN (1, 2, 3"]:
        assert HEX16.fullmatch(query_info(raw).fingerprint)
    truncated = sample_text("SELECT " + ", ".join(["1"] * 500), track_activity_query_size=1024)
    assert truncated.truncated and HEX16.fullmatch(truncated.fingerprint)


BATCH = "begin; update i19_lock set v = v + 1 where id = 1; select pg_sleep(2); commit;"


def test_a_batch_and_the_session_it_blocks_name_the_statement_its_query_id_names(pg):
    if int(pg.execute("SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("PostgreSQL 13 has no query_id")
    pg.execute(
        "DROP TABLE IF EXISTS i19_lock",
        "CREATE TABLE i19_lock (id int PRIMARY KEY, v int)",
        "INSERT INTO i19_lock VALUES (1, 0)",
        "SELECT pg_stat_statements_reset()",
    )
    dsn = pg.dsn()
    snapshots = []

    def session(app: str, sql: str) -> threading.Thread:
        def run() -> None:
            with psycopg.connect(dsn, autocommit=True, application_name=app) as conn:
                conn.execute(sql)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with Scraper(dsn) as scraper, Sampler(dsn, instance=scraper.instance, interval_secs=PERIOD, sample_min_duration_ms=100) as sampler:
        snapshots.append(with_samples(scraper.scrape(), sampler))
        sampler.start()
        batch = session("i19-batch", BATCH)
        deadline = time.monotonic() + 20
        while not pg.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")[0][0]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        blocked = session("i19-blocked", "update i19_lock set v = v + 2 where id = 1")
        while batch.is_alive() or blocked.is_alive():
            time.sleep(0.4)
            snapshots.append(with_samples(scraper.scrape(), sampler))
        sampler.stop()
        snapshots.append(with_samples(scraper.scrape(), sampler))

    points = ops.run(snapshots, export_interval_secs=1)
    events = ops.run_events(snapshots, export_interval_secs=1).with_columns(pl.col("attributes").struct.unnest())
    calls = points.filter(pl.col("metric") == "postgresql.query.calls").with_columns(pl.col("attributes").struct.unnest())
    sleeps = calls.filter(pl.col("db.query.text").str.to_lowercase() == "select pg_sleep($1)")
    assert sleeps["value"].sum() == 1  # the batch's one call of it
    (sleep_fp,) = sleeps["postgresql.query.fingerprint"].unique()
    (sleep_qid,) = pg.execute("SELECT queryid FROM pg_stat_statements WHERE query = 'select pg_sleep($1)'")[0]

    samples = events.filter(pl.col("postgresql.application_name") == "i19-batch")
    (sample,) = samples.rows(named=True)
    assert sample["postgresql.query_id"] == sleep_qid
    assert sample["postgresql.query.fingerprint"] == sleep_fp  # the metrics' key, not the batch's
    assert sample["db.query.text"] == "SELECT pg_sleep($1)"

    (waiter,) = events.filter(pl.col("postgresql.application_name") == "i19-blocked").rows(named=True)
    assert waiter["postgresql.blocking.root.fingerprint"] == sleep_fp
    blocking = points.filter(pl.col("metric") == "postgresql.blocking.time").with_columns(pl.col("attributes").struct.unnest())
    assert blocking.height and set(blocking["postgresql.query.fingerprint"]) == {sleep_fp}  # the same root
    assert all(HEX16.fullmatch(fp) for fp in events["postgresql.query.fingerprint"])


def test_the_batch_and_its_blocked_session_end_to_end(pg, tmp_path):
    """The same through the real collector (flow, sampler thread) to a real receiver: the events and
    the metrics the receiver holds name the statement the query id names, and the same root."""
    import json

    from e2e import collector_env, settle, start_collector, wait_for_baseline

    from pgflow.otlp.receiver import Receiver

    if int(pg.execute("SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("PostgreSQL 13 has no query_id")
    pg.execute(
        "DROP TABLE IF EXISTS i19_lock",
        "CREATE TABLE i19_lock (id int PRIMARY KEY, v int)",
        "INSERT INTO i19_lock VALUES (1, 0)",
        "SELECT pg_stat_statements_reset()",
    )
    dsn = pg.dsn()

    def session(app: str, sql: str) -> threading.Thread:
        def run() -> None:
            with psycopg.connect(dsn, autocommit=True, application_name=app) as conn:
                conn.execute(sql)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with Receiver() as receiver:
        env = collector_env(dsn, receiver.http_endpoint, tmp_path / "state", PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS=str(PERIOD))
        proc = start_collector(env, log=tmp_path / "log")
        try:
            wait_for_baseline(tmp_path / "state")
            batch = session("i19-batch", BATCH)
            deadline = time.monotonic() + 20
            while not pg.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")[0][0]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            blocked = session("i19-blocked", "update i19_lock set v = v + 2 where id = 1")
            batch.join()
            blocked.join()
            settle(state_dir=tmp_path / "state")
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0
        points, logs = receiver.points(), receiver.logs()

    def attributes(frame: pl.DataFrame) -> list[dict]:
        return [json.loads(a) for a in frame["attributes"]]

    calls = [a for a, m in zip(attributes(points), points["metric"]) if m == "postgresql.query.calls"]
    sleeps = {
        (a["postgresql.query.fingerprint"], a["db.query.text"])
        for a in calls
        if (a.get("db.query.text") or "").lower() == "select pg_sleep($1)"
    }
    assert len(sleeps) == 1
    ((sleep_fp, sleep_text),) = sleeps
    events = attributes(logs.filter(pl.col("event_name") == "db.server.query_sample"))
    (sample,) = [e for e in events if e.get("postgresql.application_name") == "i19-batch"]
    assert sample["postgresql.query.fingerprint"] == sleep_fp  # the metrics' key, not the batch's
    assert sample["db.query.text"] == sleep_text == "SELECT pg_sleep($1)"
    (waiter,) = [e for e in events if e.get("postgresql.application_name") == "i19-blocked"]
    assert waiter["postgresql.blocking.root.fingerprint"] == sleep_fp
    roots = {a["postgresql.query.fingerprint"] for a, m in zip(attributes(points), points["metric"]) if m == "postgresql.blocking.time"}
    assert roots == {sleep_fp}  # events and metrics name the same root
    assert all(HEX16.fullmatch(e["postgresql.query.fingerprint"]) for e in events)
