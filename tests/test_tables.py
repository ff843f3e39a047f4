"""Per-table statistics (issue 13): exact deltas, the tables cap, locks, refused databases, resets.

Real server, real workload; ground truth is what the test did (or what the server's own views
say right after), never the code under test.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from itertools import count

import polars as pl
import psycopg

from pgflow import capture, ops
from pgflow.scrape import Scraper
from pgflow.scrape.tables import TableScraper

_names = count()


def _database(pg, prefix: str) -> str:
    name = f"{prefix}_{next(_names)}_{int(time.time() * 1000) % 100000}"
    pg.execute(f"CREATE DATABASE {name}")
    return name


def _wait(pg, db: str, sql: str, expected, timeout: float = 20.0):
    """Wait until the server's own statistics show what the workload did (stats flush asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pg.execute(sql, dbname=db)[0][0]
        if got == expected or time.monotonic() > deadline:
            assert got == expected, f"{sql}: server shows {got}, workload did {expected}"
            return got
        time.sleep(0.05)


def _settled(pg, db: str, sql: str, timeout: float = 20.0) -> None:
    """Wait until the server's statistics stop moving (PostgreSQL 13/14 apply them asynchronously)."""
    deadline = time.monotonic() + timeout
    last, still = pg.execute(sql, dbname=db)[0][0], 0
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = pg.execute(sql, dbname=db)[0][0]
        still = still + 1 if now == last else 0
        if still == 3:  # a second without a move (13's collector applies a backlog in bursts)
            return
        last = now


class Collector:
    """The scrape pair the collector runs: a Snapshot with the table frame attached."""

    def __init__(self, pg, db: str, **kwargs) -> None:
        self.scraper = Scraper(pg.dsn())
        self.tables = TableScraper(pg.dsn(db), instance="t", include=[db], **kwargs)
        self.snapshots = []

    def scrape(self):
        snapshot = replace(self.scraper.scrape(), tables=self.tables.scrape())
        self.snapshots.append(snapshot)
        return snapshot

    def points(self, **settings) -> pl.DataFrame:
        # Every scrape in its own window: windows of a millisecond.
        return ops.run(self.snapshots, export_interval_secs=0.001, **settings)

    def close(self) -> None:
        self.scraper.close()
        self.tables.close()


def _table_points(points: pl.DataFrame) -> pl.DataFrame:
    return points.filter(pl.col("attributes").struct.field("db.collection.name").is_not_null()).with_columns(
        pl.col("attributes").struct.field("db.collection.name").alias("collection"),
        pl.col("attributes").struct.field("db.namespace").alias("database"),
        pl.col("attributes").struct.field("postgresql.operation").alias("operation"),
        pl.col("attributes").struct.field("postgresql.row.state").alias("state"),
    )


def _value(points: pl.DataFrame, metric: str, collection: str, end=None, **attrs) -> float:
    rows = points.filter((pl.col("metric") == metric) & (pl.col("collection") == collection))
    for key, value in attrs.items():
        rows = rows.filter(pl.col(key) == value)
    if end is not None:
        rows = rows.filter(pl.col("end") == end) if rows.get_column("kind").first() == "sum" else rows
    return rows


def _windows(points: pl.DataFrame) -> list:
    return sorted(points.filter(pl.col("kind") == "sum").get_column("end").unique().to_list())


def test_updates_vacuum_and_size(pg):
    db = _database(pg, "tu")
    pg.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int) WITH (autovacuum_enabled = false)",
        "INSERT INTO t SELECT g, 0 FROM generate_series(1, 100) g",
        dbname=db,
    )
    _wait(pg, db, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 't'", 100)
    c = Collector(pg, db)
    try:
        c.scrape()  # baseline
        n = 37
        with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
            for i in range(n):
                conn.execute("UPDATE t SET v = v + 1 WHERE id = %s", (i % 100 + 1,))
        _wait(pg, db, "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 't'", n)
        c.scrape()
        dead_before = pg.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 't'", dbname=db)[0][0]
        pg.execute("VACUUM t", dbname=db)
        _wait(pg, db, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 't'", 1)
        c.scrape()
        size = pg.execute("SELECT pg_table_size('t'), pg_indexes_size('t')", dbname=db)[0]
        points = _table_points(c.points())
    finally:
        c.close()
    w0, w1, w2 = _windows(points)

    def ops_at(end, op):
        return _value(points, "postgresql.operations", "public.t", operation=op).filter(pl.col("end") == end).get_column("value").to_list()

    assert ops_at(w0, "upd") == [0.0]  # the baseline
    assert ops_at(w1, "upd") == [float(n)]
    assert ops_at(w2, "upd") == [0.0]
    vac = _value(points, "postgresql.table.vacuum.count", "public.t")
    assert vac.filter(pl.col("end") == w1).get_column("value").to_list() == [0.0]
    assert vac.filter(pl.col("end") == w2).get_column("value").to_list() == [1.0]
    dead = _value(points, "postgresql.rows", "public.t", state="dead").sort("end").get_column("value").to_list()
    assert dead[1] == dead_before > 0 and dead[2] < dead[1]
    sizes = _value(points, "postgresql.table.size", "public.t").sort("end").get_column("value").to_list()
    assert sizes[-1] == size[0]
    assert _value(points, "postgresql.index.size", "public.t").sort("end").get_column("value").to_list()[-1] == size[1]
    ages = _value(points, "postgresql.table.vacuum.age", "public.t")
    assert ages.height == 1 and 0 <= ages.get_column("value")[0] < 600  # only after the VACUUM


def test_partitions_roll_up_to_their_parent(pg):
    db = _database(pg, "tp")
    pg.execute(
        "CREATE TABLE p (id int, v int) PARTITION BY RANGE (id)",
        "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (50)",
        "CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (50) TO (100)",
        dbname=db,
    )
    c = Collector(pg, db)
    try:
        c.scrape()
        pg.execute("INSERT INTO p SELECT g, g FROM generate_series(0, 99) g", dbname=db)
        _wait(pg, db, "SELECT sum(n_tup_ins)::int FROM pg_stat_user_tables WHERE relname IN ('p1', 'p2')", 100)
        c.scrape()
        size = pg.execute("SELECT pg_table_size('p1') + pg_table_size('p2')", dbname=db)[0][0]
        points = _table_points(c.points())
    finally:
        c.close()
    assert set(points.get_column("collection").unique()) == {"public.p"}
    ins = _value(points, "postgresql.operations", "public.p", operation="ins").sort("end").get_column("value")
    assert ins.to_list()[-1] == 100.0
    assert _value(points, "postgresql.table.size", "public.p").sort("end").get_column("value")[-1] == size


def _totals(pg, db: str) -> tuple[int, int, int, int]:
    return pg.execute(
        "SELECT sum(n_tup_ins)::int8, sum(n_tup_upd)::int8, sum(seq_scan)::int8, "
        "(SELECT sum(pg_table_size(relid))::int8 FROM pg_stat_user_tables) FROM pg_stat_user_tables",
        dbname=db,
    )[0]


def test_cap_names_by_activity_and_keeps_totals_exact(pg):
    db = _database(pg, "many")
    pg.execute(
        *(
            f"""DO $$ BEGIN FOR i IN {lo}..{lo + 499} LOOP
        EXECUTE format('CREATE TABLE t%s (id int, pad text) WITH (autovacuum_enabled = false)', i);
        EXECUTE format('INSERT INTO t%s SELECT g, repeat(''x'', 100) FROM generate_series(1, %s) g',
                       i, CASE WHEN i <= 200 THEN 400 ELSE 2 END);
        END LOOP; END $$"""
            for lo in range(1, 5001, 500)
        ),  # one transaction per 500: lock table
        "CREATE TABLE hot (id int) WITH (autovacuum_enabled = false)",
        dbname=db,
    )
    _wait(pg, db, "SELECT count(*) FROM pg_stat_user_tables", 5001)
    _settled(pg, db, "SELECT sum(n_tup_ins) FROM pg_stat_user_tables")  # (before 15 the statistics collector lags)
    c = Collector(pg, db, top_k=50)
    truth = []
    fetched = []
    try:
        c.scrape()
        fetched.append(c.tables.stats.rows)
        truth.append(_totals(pg, db))
        for round_ in range(2):
            # Waits are for this round's own increments: on 13 the statistics collector may have
            # dropped some of the creation's messages (UDP), so absolute counts can fall short.
            last = f"t{1099 + round_ * 100}"
            upd_before, ins_before = (
                pg.execute(f"SELECT coalesce(sum({column}), 0) FROM pg_stat_user_tables WHERE relname = '{t}'", dbname=db)[0][0]
                for column, t in (("n_tup_upd", "hot"), ("n_tup_ins", last))
            )
            with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
                if round_ == 0:
                    conn.execute("INSERT INTO hot VALUES (1)")
                for _ in range(100):  # 201 row versions fit in one page, pruned or not: hot stays the smallest
                    conn.execute("UPDATE hot SET id = id + 1")
                for i in range(1000 + round_ * 100, 1100 + round_ * 100):  # a little elsewhere: other is not empty
                    conn.execute(f"INSERT INTO t{i} VALUES (1, 'y')")
            _wait(pg, db, "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'hot'", upd_before + 100)
            _wait(pg, db, f"SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = '{last}'", ins_before + 1)
            c.scrape()
            fetched.append(c.tables.stats.rows - sum(fetched))
            truth.append(_totals(pg, db))
        points = _table_points(c.points(max_tables_tracked=50))
    finally:
        c.close()
    # One whole fetch, then only the buckets of the 101 tables written (about ten tables each) and
    # the 10 oldest frozen xids: bounded by the activity, not by the 5,001 tables.
    assert fetched[0] == 5001 and all(n <= 1500 for n in fetched[1:]), fetched
    ends = _windows(points)
    assert len(ends) == 3
    hot_size = pg.execute(
        "SELECT pg_table_size('hot'), (SELECT min(pg_table_size(relid)) FROM pg_stat_user_tables "
        "WHERE relname <> 'hot') FROM pg_stat_user_tables LIMIT 1",
        dbname=db,
    )[0]
    assert hot_size[0] <= hot_size[1]  # the smallest table (size would never name it)
    for k, end in enumerate(ends):
        window = points.filter(pl.col("end") == end)
        sizes = points.filter(pl.col("metric") == "postgresql.table.size")
        named = set(window.get_column("collection").unique()) - {"other"}
        assert len(named) == 50, (k, len(named))
        assert "other" in set(window.get_column("collection"))
        if k > 0:
            assert "public.hot" in named
            ins, upd, scans, _ = (truth[k][i] - truth[k - 1][i] for i in range(4))
            op = window.filter(pl.col("metric") == "postgresql.operations")
            assert op.filter(pl.col("operation") == "ins").get_column("value").sum() == ins
            assert op.filter(pl.col("operation") == "upd").get_column("value").sum() == upd == 100
            assert window.filter(pl.col("metric") == "postgresql.sequential_scans").get_column("value").sum() == scans
        assert sizes.filter(pl.col("start") == sizes.sort("start").get_column("start").unique()[k]).get_column("value").sum() == truth[k][3]
        assert (window.get_column("value") >= 0).all()


def test_access_exclusive_lock_never_stalls_the_scrape(pg):
    db = _database(pg, "lk")
    pg.execute(
        "CREATE TABLE locked (id int PRIMARY KEY)",
        "CREATE TABLE free (id int)",
        "INSERT INTO locked VALUES (1)",
        "INSERT INTO free VALUES (1)",
        dbname=db,
    )
    c = Collector(pg, db, lock_timeout_ms=200, statement_timeout_ms=5000)
    holder = psycopg.connect(pg.dsn(db))
    try:
        c.scrape()
        pg.execute("INSERT INTO free VALUES (2)", "INSERT INTO locked VALUES (2)", dbname=db)  # both are re-read
        _wait(pg, db, "SELECT sum(n_tup_ins)::int FROM pg_stat_user_tables", 4)
        holder.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")  # held until rollback
        frame = c.scrape().tables
        assert c.tables.stats.outcomes.get("lock_timeout") == 1  # the size query hit lock_timeout ...
        assert c.tables.stats.outcomes.get("ok") == 2  # ... and the scrape went on without that size
        rows = frame.filter(pl.col("kind") == "table")
        assert rows.filter(pl.col("table") == "public.free").get_column("n_tup_ins").to_list() == [2]
        holder.rollback()
        c.scrape()
        points = _table_points(c.points())
    finally:
        holder.close()
        c.close()
    sizes = _value(points, "postgresql.table.size", "public.locked")
    assert sizes.height == 3 and (sizes.get_column("value") > 0).all()  # kept from the last observation


def test_databases_refusing_connections_are_skipped_once(pg, caplog):
    db = _database(pg, "ok")
    closed = _database(pg, "closed")
    private = _database(pg, "private")
    pg.execute(
        f"ALTER DATABASE {closed} ALLOW_CONNECTIONS false",
        f"REVOKE CONNECT ON DATABASE {private} FROM PUBLIC",
        "DROP ROLE IF EXISTS tables_monitor",
        "CREATE ROLE tables_monitor LOGIN PASSWORD 'pw'",
        "GRANT pg_monitor TO tables_monitor",
    )
    pg.execute("CREATE TABLE t (id int)", dbname=db)
    caplog.set_level(logging.INFO, logger="pgflow.scrape.tables")
    with TableScraper(pg.dsn(db, user="tables_monitor", password="pw"), instance="t", include=[db, closed, private]) as ts:
        frames = [ts.scrape() for _ in range(3)]
    for frame in frames:
        assert set(frame.get_column("database")) == {db}
    skipped = [r for r in caplog.records if r.getMessage() == "table statistics skipped for a database"]
    assert sorted(r.kv["database"] for r in skipped) == sorted([closed, private])
    assert "may not connect" in next(r.kv["reason"] for r in skipped if r.kv["database"] == private)
    assert ts.stats.outcomes.get("connect_failed") == 3


def test_stat_reset_gives_nothing_negative(pg):
    db = _database(pg, "rs")
    pg.execute("CREATE TABLE t (id int)", "INSERT INTO t SELECT generate_series(1, 50)", dbname=db)
    _wait(pg, db, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 't'", 50)
    c = Collector(pg, db)
    try:
        c.scrape()
        pg.execute("INSERT INTO t VALUES (1), (2), (3)", dbname=db)
        _wait(pg, db, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 't'", 53)
        c.scrape()
        pg.execute("SELECT pg_stat_reset()", dbname=db)
        pg.execute("INSERT INTO t VALUES (4), (5)", dbname=db)
        _wait(pg, db, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 't'", 2)
        c.scrape()
        points = _table_points(c.points())
    finally:
        c.close()
    sums = points.filter(pl.col("kind") == "sum")
    assert (sums.get_column("value") >= 0).all()
    ins = _value(points, "postgresql.operations", "public.t", operation="ins").sort("end").get_column("value")
    assert ins.to_list() == [0.0, 3.0, 2.0]  # after the reset: what ran since, never the old totals again


def test_capture_round_trip_keeps_the_tables_frame(pg, tmp_path):
    db = _database(pg, "cap")
    pg.execute("CREATE TABLE t (id int)", "INSERT INTO t VALUES (1)", dbname=db)
    c = Collector(pg, db)
    try:
        c.scrape()
        pg.execute("INSERT INTO t VALUES (2)", dbname=db)
        _wait(pg, db, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 't'", 2)
        c.scrape()
        c.snapshots.append(c.scraper.scrape())  # a scrape whose table statistics were not due
    finally:
        c.close()
    path = tmp_path / "c.duckdb"
    capture.record(c.snapshots, path)
    back = list(capture.read(path))
    assert [s.tables.height for s in back] == [s.tables.height for s in c.snapshots]
    assert back[2].tables.height == 0 and back[0].tables.height > 0
    assert all(capture.as_stored(a).equals(b) for a, b in zip(c.snapshots, back))
    assert ops.run(back, export_interval_secs=0.001).equals(ops.run(c.snapshots, export_interval_secs=0.001))


def test_collector_exports_table_statistics_on_their_own_thread(pg, tmp_path):
    """The real collector (a subprocess) with the real receiver: the table thread's frames reach the endpoint."""
    import json
    import signal
    import urllib.request

    from e2e import collector_env, start_collector

    from pgflow.otlp.receiver import Receiver

    db = _database(pg, "e2e")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g", dbname=db)

    def table_points(receiver, metric):
        points = receiver.points().filter(pl.col("metric") == metric)
        return points.with_columns(
            collection=pl.col("attributes").str.json_path_match("$['db.collection.name']"),
            operation=pl.col("attributes").str.json_path_match("$['postgresql.operation']"),
        ).filter(pl.col("collection") == "public.t")

    def until(condition, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the collector did not export table statistics in time"
            time.sleep(0.1)

    with Receiver() as receiver:
        env = collector_env(
            pg.dsn(),
            receiver.http_endpoint,
            tmp_path / "state",
            PGFLOW_TABLE_STATS_INTERVAL_SECS="0.5",
            PGFLOW_TABLE_STATS_DATABASES=json.dumps([db]),
        )
        proc = start_collector(env, log=tmp_path / "log")
        try:
            until(lambda: table_points(receiver, "postgresql.table.size").height > 0)  # the baseline was exported
            n = 25
            with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
                for i in range(n):
                    conn.execute("UPDATE t SET v = v + 1 WHERE id = %s", (i % 10 + 1,))

            def updates():
                return table_points(receiver, "postgresql.operations").filter(pl.col("operation") == "upd").get_column("value").sum()

            until(lambda: updates() >= n)
            time.sleep(1.5)  # a few more windows: nothing more may arrive
            assert updates() == n
            metrics = urllib.request.urlopen(f"http://{env['PGFLOW_METRICS_ADDR']}/metrics", timeout=5).read().decode()
            assert "pgflow_tables_seen{instance=" in metrics and "pgflow_table_scrapes_total" in metrics
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_discovery_rules():
    from pgflow.scrape.discovery import choose

    rows = [
        ("template1", True, True),
        ("postgres", True, False),
        ("rdsadmin", True, False),
        ("closed", False, False),
        ("app_1", True, False),
        ("app_2", True, False),
        ("logs", True, False),
        ("app_3", True, False),
    ]
    found = choose(rows, include=["app_*", "postgres"], exclude=["app_2"], limit=2)
    assert found.chosen == ("postgres", "app_1")
    assert found.skipped == {
        "template1": "template",
        "rdsadmin": "provider maintenance database",
        "closed": "refuses connections (datallowconn = false)",
        "app_2": "in table_stats_exclude_databases",
        "logs": "not in table_stats_databases",
        "app_3": "over max_databases_tracked",
    }


def test_a_large_database_is_seeded_in_slices_then_exact(pg, monkeypatch):
    from pgflow.scrape import tables as scrape_tables

    monkeypatch.setattr(scrape_tables, "SEED_TABLES", 20)  # 100 tables: five slices
    db = _database(pg, "seed")
    pg.execute("DO $$ BEGIN FOR i IN 1..100 LOOP EXECUTE format('CREATE TABLE s%s (id int)', i); END LOOP; END $$", dbname=db)
    c = Collector(pg, db)

    def write_everywhere(round_: int) -> None:
        pg.execute("DO $$ BEGIN FOR i IN 1..100 LOOP EXECUTE format('INSERT INTO s%s VALUES (1)', i); END LOOP; END $$", dbname=db)
        _wait(pg, db, "SELECT sum(n_tup_ins)::int FROM pg_stat_user_tables", 100 * round_)

    try:
        rows = []
        for round_ in range(1, 20):
            before = c.tables.stats.rows
            c.scrape()
            rows.append(c.tables.stats.rows - before)
            write_everywhere(round_)
            digests, _, seeded = c.tables._buckets[db]
            if seeded == len(digests):
                break
        c.scrape()
        points = _table_points(c.points(max_tables_tracked=1000))
    finally:
        c.close()
    assert len(rows) >= 4 and rows[0] < 100, rows  # seeded over several scrapes, not read whole at once
    ends = _windows(points)
    ops_ = points.filter((pl.col("metric") == "postgresql.operations") & (pl.col("operation") == "ins"))
    assert ops_.filter(pl.col("end") == ends[-1]).get_column("value").sum() == 100  # seeded: every insert counted
    assert (ops_.get_column("value") >= 0).all()
    assert ops_.filter(pl.col("end") == ends[-1]).height == 100  # every table named, each with its one insert


def test_capture_cli_records_table_statistics(pg, tmp_path):
    """`pgflow capture` records what `pgflow run --capture` does: the tables frame, on its interval."""
    import os
    import subprocess
    import sys

    db = _database(pg, "cap")
    pg.execute("CREATE TABLE captured (id int)", "INSERT INTO captured SELECT generate_series(1, 10)", dbname=db)
    out = tmp_path / "tables.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_")}
    env |= {
        "DATABASE_URL": pg.dsn(),
        "PGFLOW_TABLE_STATS_DATABASES": f'["{db}"]',
        "PGFLOW_TABLE_STATS_INTERVAL_SECS": "600",
        "PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS": "0",
    }
    subprocess.run(
        [sys.executable, "-m", "pgflow", "capture", "--out", str(out), "--scrapes", "3", "--interval", "0.2"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    snapshots = list(capture.read(out))
    assert len(snapshots) == 3
    assert "public.captured" in set(snapshots[0].tables.get_column("table").drop_nulls())
    assert snapshots[1].tables.height == snapshots[2].tables.height == 0  # not due again within 600 s


def test_check_lists_the_databases_table_statistics_read(pg):
    from pgflow.config import Settings
    from pgflow.scrape.diagnose import check

    closed = _database(pg, "nocheck")
    pg.execute(f"ALTER DATABASE {closed} ALLOW_CONNECTIONS false")
    settings = Settings.load(database_url=pg.dsn())
    report = check(settings.targets()[0], settings=settings)
    [line] = [f.detail for f in report.findings if f.name == "table statistics"]
    assert "postgres" in line and f"{closed} (refuses connections" in line
    off = Settings.load(database_url=pg.dsn(), table_stats_enabled=False)
    assert [f.detail for f in check(off.targets()[0], settings=off).findings if f.name == "table statistics"] == [
        "off (table_stats_enabled = false)"
    ]


def _scrape_rows(scraper: TableScraper, table: str) -> pl.DataFrame:
    return scraper.scrape().filter((pl.col("kind") == "table") & (pl.col("table") == table))


def test_every_kind_of_use_alone_is_seen_the_next_scrape(pg):
    """The bucket digests read a handful of counters per table (and the scans of its indexes):
    each use on its own, with nothing else moving on that table, must change its bucket."""
    db = _database(pg, "use")
    pg.execute(
        "DO $$ BEGIN FOR i IN 1..300 LOOP "  # 300 tables: 256 buckets, mostly alone
        "EXECUTE format('CREATE TABLE f%s (id int) WITH (autovacuum_enabled = false)', i); END LOOP; END $$",
        *(f"CREATE TABLE {t} (id int) WITH (autovacuum_enabled = false)" for t in ("e_seq", "e_vac", "e_an", "e_ins")),
        "CREATE TABLE ios (id int PRIMARY KEY) WITH (autovacuum_enabled = false)",
        "INSERT INTO ios SELECT generate_series(1, 1000)",
        "CREATE TABLE pt (id int) PARTITION BY RANGE (id)",
        "CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (-100000) TO (100000) WITH (autovacuum_enabled = false)",
        "CREATE INDEX ON pt (id)",
        "INSERT INTO pt SELECT generate_series(1, 1000)",
        "CREATE TABLE tr (id int) WITH (autovacuum_enabled = false)",
        "INSERT INTO tr SELECT generate_series(1, 1000)",
        "VACUUM ios",
        "VACUUM pt1",
        dbname=db,
    )  # all visible: index-only scans read no heap block
    _settled(pg, db, "SELECT sum(n_tup_ins) + sum(vacuum_count) FROM pg_stat_user_tables")
    stat = "SELECT {} FROM pg_stat_user_tables WHERE relname = '{}'"
    # an index scan finding nothing reads no heap block (not even the visibility map): only its index moves
    no_heap = "SET enable_seqscan = off; SET enable_bitmapscan = off; "
    uses = [  # (table reported, the use, counter, the server's own view of it)
        ("public.e_seq", "SELECT * FROM e_seq", "seq_scan", ("seq_scan", "e_seq")),
        ("public.e_vac", "VACUUM e_vac", "vacuum_count", ("vacuum_count", "e_vac")),
        ("public.e_an", "ANALYZE e_an", "analyze_count", ("analyze_count", "e_an")),
        ("public.e_ins", "INSERT INTO e_ins VALUES (1)", "n_tup_ins", ("n_tup_ins", "e_ins")),
        ("public.ios", no_heap + "SELECT id FROM ios WHERE id = -7", "idx_scan", ("idx_scan", "ios")),
        ("public.pt", no_heap + "SELECT id FROM pt WHERE id = -7", "idx_scan", ("idx_scan", "pt1")),  # rolled into pt
    ]
    scraper = TableScraper(pg.dsn(db), instance="t", include=[db])
    try:
        scraper.scrape()  # baseline
        for table, use, counter, (column, relname) in uses:
            before = pg.execute(stat.format(f"coalesce({column}, 0)", relname), dbname=db)[0][0]
            with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
                for sql in use.split("; "):
                    conn.execute(sql)
            _wait(pg, db, stat.format(f"coalesce({column}, 0)", relname), before + 1)
            rows = _scrape_rows(scraper, table)
            assert rows.height == 1, (table, use)
            assert rows.get_column(counter)[0] == before + 1, (table, use)
        # A TRUNCATE moves no counter: only the file (relfilenode), the live tuples and the size.
        pg.execute("TRUNCATE tr", dbname=db)
        _wait(pg, db, stat.format("n_live_tup", "tr"), 0)
        rows = _scrape_rows(scraper, "public.tr")
        assert rows.select("n_live_tup", "table_size").rows() == [(0, 0)]
    finally:
        scraper.close()


def test_the_oldest_frozen_xids_are_the_servers_own_ties_included(pg):
    """The k oldest frozen xids are looked for in the buckets whose oldest age could hold them;
    many tables share an age (one per creating transaction): ties go to the lowest oid."""
    db = _database(pg, "aged")
    pg.execute(
        *(
            f"DO $$ BEGIN FOR i IN {lo}..{lo + 49} LOOP "
            "EXECUTE format('CREATE TABLE a%s (id int) WITH (autovacuum_enabled = false)', i); END LOOP; END $$"
            for lo in range(1, 401, 50)
        ),
        dbname=db,
    )  # 8 transactions: 8 ages, 50 tables each
    truth = {
        r[0]
        for r in pg.execute(
            "SELECT oid::int8 FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' "
            "ORDER BY age(relfrozenxid) DESC, oid LIMIT 10",
            dbname=db,
        )
    }
    scraper = TableScraper(pg.dsn(db), instance="t", include=[db], top_k=60)  # the 10 oldest
    try:
        scraper.scrape()  # baseline: every table
        frame = scraper.scrape()  # nothing moved: only the oldest frozen xids
    finally:
        scraper.close()
    assert frame.filter(pl.col("kind") != "table").height == 0  # no bucket changed
    assert set(frame.filter(pl.col("kind") == "table").get_column("relid").to_list()) == truth


def test_a_database_visited_holds_two_of_pgflows_statements(pg):
    """pgflow's statements in a database it only visits for table statistics take two
    pg_stat_statements entries (the settings statement, the table statement), first visit and
    later ones alike: the first visit's table count rides in the settings statement. Entries are
    the user's budget (``pg_stat_statements.max``): a third per database, on a server of hundreds
    of databases, would push hundreds of the user's statements out."""
    db = _database(pg, "entries")
    pg.execute("CREATE TABLE a (id int)", "CREATE TABLE b (id int)", dbname=db)
    with TableScraper(pg.dsn(), instance="t", include=[db]) as ts:  # its home is postgres; it visits db
        for i in range(3):
            pg.execute(f"INSERT INTO a SELECT generate_series(1, {i + 1})", dbname=db)
            ts.scrape()
        assert ts.stats.outcomes.get("ok") == 3
    rows = pg.execute(
        "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        f"WHERE d.datname = '{db}' AND s.query LIKE '%/*pgflow*/%'"
    )
    assert len(rows) == 2, "\n".join(f"{c} {q[:50]} ... {q[-50:]}" for q, c in rows)
    by_calls = sorted(c for _, c in rows)
    assert by_calls == [3, 4], rows  # the table statement three times; the settings statement once more (the first count)
