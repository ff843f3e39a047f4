"""Issue 13: per-database metrics and instance health groups, against real servers.

Ground truth comes from the workload (pgbench's transactions, the rows a script inserts,
the CHECKPOINTs it runs, the WAL it writes, the server log's connections), never from the
code under test. Waits are on real events (backends gone, counters delivered), never fixed sleeps.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import polars as pl
import psycopg
import pytest

from pgflow import capture, ops, telemetry
from pgflow.config import Settings
from pgflow.ops.health import RECEIVER_METRICS
from pgflow.pgserver import LocalPostgres, standby_of
from pgflow.replay import as_received, replay, replay_flow
from pgflow.schema import HEALTH_GROUPS, IO_INT_COUNTERS
from pgflow.scrape import Scraper
from pgflow.scrape.health import HealthSchedule

TPCB = """\\set aid random(1, 100000)
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = 1;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, 1, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


def every_scrape() -> HealthSchedule:
    """Every health group on every scrape (the tests scrape a few times, not on a timer)."""
    return HealthSchedule.of(0.001, 0.001)


@pytest.fixture(scope="module")
def server(pg_factory) -> LocalPostgres:
    """A server whose counters only the tests move: no autovacuum; connections logged (ground truth)."""
    pg = pg_factory(settings={"autovacuum": "off", "log_connections": "on"})
    pg.execute("CREATE EXTENSION pg_stat_statements")
    return pg


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def quiet(pg: LocalPostgres, db: str) -> None:
    """Wait until no session is left in ``db``: a backend flushes its statistics before it leaves."""
    wait_for(lambda: pg.execute(f"SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = '{db}'")[0][0], f"sessions in {db} to end")


def one(pg: LocalPostgres, sql: str, db: str = "postgres"):
    return pg.execute(sql, dbname=db)[0][0]


def total(points: pl.DataFrame, metric: str, **attrs: str) -> float:
    frame = points.filter(pl.col("metric") == metric)
    for key, value in attrs.items():
        frame = frame.filter(pl.col("attributes").struct.field(key.replace("__", ".")) == value)
    return float(frame["value"].sum())


def last_gauge(points: pl.DataFrame, metric: str, **attrs: str) -> float | None:
    frame = points.filter(pl.col("metric") == metric)
    for key, value in attrs.items():
        frame = frame.filter(pl.col("attributes").struct.field(key.replace("__", ".")) == value)
    return None if frame.height == 0 else float(frame.sort("end")["value"][-1])


def db(name: str) -> dict[str, str]:
    return {"db__namespace": name}


def inserts(pg: LocalPostgres, dbname: str, n: int) -> None:
    """``n`` committed single-row INSERT transactions over one connection, then wait until it is gone."""
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
        for i in range(n):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
    quiet(pg, dbname)


def normalized(points: pl.DataFrame) -> pl.DataFrame:
    """Points in a canonical order (attributes as JSON), for equality between two paths."""
    frame = points.with_columns(pl.col("attributes").struct.json_encode())
    return frame.sort(frame.columns)


def no_negative_sums(points: pl.DataFrame) -> bool:
    return bool((points.filter(pl.col("kind") == "sum")["value"] >= 0).all())


# Per database -------------------------------------------------------------------------------


def test_pgbench_database_counters_are_exact(server, tmp_path):
    pg = server
    pg.execute("CREATE DATABASE bench")
    pg.pgbench_init(dbname="bench")
    quiet(pg, "bench")
    script = tmp_path / "tpcb.sql"
    script.write_text(TPCB)
    log_from = pg.logfile.stat().st_size
    # pgflow connects to database postgres: none of its own transactions run in bench.
    with Scraper(pg.dsn(), health=every_scrape()) as scraper:
        before = scraper.scrape()
        pg.pgbench("-n", "-c", "4", "-t", "250", "-f", str(script), dbname="bench")
        quiet(pg, "bench")
        wait_for(
            lambda: (
                one(pg, "SELECT tup_updated FROM pg_stat_database WHERE datname = 'bench'")
                >= 3000 + before.databases.filter(pl.col("database") == "bench")["tup_updated"][0]
            ),
            "pgbench's statistics to be delivered",
        )
        after = scraper.scrape()
    size, frozen_age = pg.execute("SELECT pg_database_size('bench'), age(datfrozenxid)::int8 FROM pg_database WHERE datname = 'bench'")[0]
    with open(pg.logfile, "rb") as fh:
        fh.seek(log_from)
        log = fh.read().decode(errors="replace")
    # Every session's start-up runs one transaction of its own: 4 clients and pgbench's setup connection.
    sessions = len(re.findall(r"connection authorized: user=\S+ database=bench\b", log))
    assert sessions >= 5

    points = ops.run([before, after], export_interval_secs=60)
    assert total(points, "postgresql.commits", **db("bench")) == 1000 + sessions
    assert total(points, "postgresql.tup_updated", **db("bench")) == 3 * 1000
    assert total(points, "postgresql.tup_inserted", **db("bench")) == 1000
    assert total(points, "postgresql.rollbacks", **db("bench")) == 0
    assert total(points, "postgresql.deadlocks", **db("bench")) == 0
    assert total(points, "postgresql.temp_files", **db("bench")) == 0
    assert total(points, "postgresql.blks_hit", **db("bench")) > 0
    assert last_gauge(points, "postgresql.db_size", **db("bench")) == size
    assert last_gauge(points, "postgresql.database.frozen_xid.age", **db("bench")) == frozen_age
    assert last_gauge(points, "postgresql.database.min_mxid.age", **db("bench")) is not None
    assert last_gauge(points, "postgresql.backends", **db("bench")) == 0
    assert last_gauge(points, "postgresql.backends", **db("postgres")) >= 1  # pgflow itself
    if after.server_version_num >= 140000:
        assert total(points, "postgresql.session.count", **db("bench")) == sessions
        assert total(points, "postgresql.session.time", **db("bench")) > 0
        assert total(points, "postgresql.sessions", **db("bench")) == 0  # none abandoned, fatal or killed
    else:
        assert points.filter(pl.col("metric").str.starts_with("postgresql.session")).height == 0
    assert no_negative_sums(points)
    units = dict(points.select("metric", "unit").unique().iter_rows())
    assert units["postgresql.commits"] == "1" and units["postgresql.db_size"] == "By"
    assert units["postgresql.temp.io"] == "By" and units["postgresql.tup_updated"] == "{tup_updated}"


def test_pg_stat_reset_nothing_negative_nothing_twice(server):
    pg = server
    pg.execute("CREATE DATABASE resets")
    pg.execute("CREATE TABLE t (i int)", dbname="resets")
    quiet(pg, "resets")
    inserted = "SELECT tup_inserted FROM pg_stat_database WHERE datname = 'resets'"

    def reset() -> None:
        before = one(pg, "SELECT stats_reset FROM pg_stat_database WHERE datname = 'resets'")
        pg.execute("SELECT pg_stat_reset()", dbname="resets")
        quiet(pg, "resets")
        wait_for(lambda: one(pg, "SELECT stats_reset FROM pg_stat_database WHERE datname = 'resets'") != before, "the reset to be applied")

    reset()  # small counters at the baseline, so every counter ends higher after the second reset
    inserts(pg, "resets", 20)
    wait_for(lambda: one(pg, inserted) == 20, "the first inserts to be counted")
    with Scraper(pg.dsn(), health=every_scrape()) as scraper:
        s0 = scraper.scrape()
        inserts(pg, "resets", 50)  # between the baseline and the reset: erased by it, seen by no one
        wait_for(lambda: one(pg, inserted) == 70, "the second inserts to be counted")
        reset()
        # Every counter ends above its baseline value: only stats_reset tells that 300, not 280, were inserted.
        inserts(pg, "resets", 300)
        wait_for(lambda: one(pg, inserted) == 300, "the third inserts to be counted")
        s1 = scraper.scrape()
        s2 = scraper.scrape()
    two = ops.run([s0, s1], export_interval_secs=60)
    three = ops.run([s0, s1, s2], export_interval_secs=60)
    assert total(two, "postgresql.tup_inserted", **db("resets")) == 300
    # 300 inserts, the session's start-up transaction, and at most the reset's own session.
    assert 301 <= total(two, "postgresql.commits", **db("resets")) <= 303
    for metric in ("postgresql.commits", "postgresql.tup_inserted", "postgresql.blks_hit"):
        assert total(three, metric, **db("resets")) == total(two, metric, **db("resets"))
    assert no_negative_sums(three)


# Instance groups -----------------------------------------------------------------------------


def _requested_checkpoints(pg: LocalPostgres) -> int:
    view, column = ("pg_stat_checkpointer", "num_requested") if pg_version(pg) >= 170000 else ("pg_stat_bgwriter", "checkpoints_req")
    return one(pg, f"SELECT {column} FROM {view}")


def pg_version(pg: LocalPostgres) -> int:
    return int(one(pg, "SELECT current_setting('server_version_num')"))


def test_shared_resets_nothing_negative_nothing_twice(server):
    pg = server
    version = pg_version(pg)
    targets = (
        ["bgwriter", "archiver"]
        + (["wal"] if version >= 140000 else [])
        + (["io"] if version >= 160000 else [])
        + (["checkpointer"] if version >= 170000 else [])
    )
    pg.execute("CREATE TABLE IF NOT EXISTS shared_t (i int)")

    def reset() -> None:
        pg.execute(*(f"SELECT pg_stat_reset_shared('{t}')" for t in targets))
        wait_for(lambda: _requested_checkpoints(pg) == 0, "the shared reset to be applied")

    reset()  # small counters at the baseline, so every counter ends higher after the second reset
    pg.execute("CHECKPOINT")
    wait_for(lambda: _requested_checkpoints(pg) == 1, "a checkpoint to be counted")
    with Scraper(pg.dsn(), health=every_scrape()) as scraper:
        s0 = scraper.scrape()
        for _ in range(2):
            pg.execute("CHECKPOINT")
        wait_for(lambda: _requested_checkpoints(pg) == 3, "two checkpoints to be counted")
        reset()
        for i in range(3):
            pg.execute(f"INSERT INTO shared_t SELECT generate_series(1, {1000 * (i + 1)})", "CHECKPOINT")
        wait_for(lambda: _requested_checkpoints(pg) == 3, "three checkpoints to be counted")
        s1 = scraper.scrape()
        pg.execute("INSERT INTO shared_t SELECT generate_series(1, 100)")
        s2 = scraper.scrape()
    points = ops.run([s0, s1, s2], export_interval_secs=60)
    assert set(s1.health_scraped) == {
        g for g in HEALTH_GROUPS if g not in ({"wal"} if version < 140000 else set()) | ({"io"} if version < 160000 else set())
    }
    # Exactly the three CHECKPOINTs after the reset; the two before it were erased by it.
    assert total(points, "postgresql.bgwriter.checkpoint.count", type="requested") == 3
    assert points.filter(pl.col("metric") == "postgresql.bgwriter.checkpoint.count").height >= 2
    assert total(points, "postgresql.bgwriter.buffers.writes", source="checkpoints") > 0
    assert no_negative_sums(points)
    if version >= 140000:
        # A reset between two scrapes: the delta is the counter since the reset; after it, what it grew by.
        assert total(points, "postgresql.wal.bytes") == s2.wal["wal_bytes"][0] > 0
        assert total(points, "postgresql.wal.records") == s2.wal["wal_records"][0]
    else:
        assert points.filter(pl.col("metric").str.starts_with("postgresql.wal.")).height == 0
    if version >= 160000:
        io_total = sum(int(s2.io[c].fill_null(0).sum()) for c in IO_INT_COUNTERS)
        assert total(points, "postgresql.io.operations") == io_total > 0
    else:
        assert points.filter(pl.col("metric") == "postgresql.io.operations").height == 0
    if version >= 170000:  # the checkpointer split: restartpoints only in pg_stat_checkpointer
        restartpoints = points.filter(pl.col("metric") == "postgresql.checkpointer.restartpoint.count")
        assert set(restartpoints["attributes"].struct.field("type")) == {"scheduled", "requested", "done"}
    # WAL writes and syncs: pg_stat_wal up to 17, pg_stat_io (object 'wal') from 18.
    if version >= 140000:
        assert total(points, "postgresql.wal.writes") > 0
    assert points.filter(pl.col("metric") == "postgresql.archiver.archived").height >= 1
    assert points.filter(pl.col("metric") == "postgresql.wal.age").height == 0  # never archived


def test_groups_follow_their_schedule_and_settings(server):
    ticks = [0.0]
    schedule = HealthSchedule.of(
        **{"interval_secs": 10, "db_size_interval_secs": 100, "group_intervals": {"archiver": 1000}, "disabled": ["io", "bgwriter"]}
    )
    schedule._clock = lambda: ticks[0]
    settings = Settings.load(
        health_interval_secs=10, db_size_interval_secs=100, health_group_intervals={"archiver": 1000}, health_groups_disabled="io,bgwriter"
    )
    assert HealthSchedule.from_settings(settings).intervals == schedule.intervals
    with Scraper(server.dsn(), instance="sched", health=schedule) as scraper:
        first = scraper.scrape()
        ticks[0] = 10.0
        second = scraper.scrape()
        ticks[0] = 100.0
        third = scraper.scrape()
    assert "io" not in first.health_scraped and "bgwriter" not in first.health_scraped
    assert {"db_size", "checkpointer", "archiver"} <= set(first.health_scraped)
    assert "db_size" not in second.health_scraped and "archiver" not in second.health_scraped
    assert "checkpointer" in second.health_scraped
    assert second.database_sizes.height == 0 and second.archiver.height == 0  # not due: empty frames
    assert "db_size" in third.health_scraped and third.database_sizes.height > 0
    assert telemetry.REGISTRY.get_sample_value("pgflow_health_queries_total", {"instance": "sched", "group": "checkpointer"}) == 3
    assert telemetry.REGISTRY.get_sample_value("pgflow_health_queries_total", {"instance": "sched", "group": "db_size"}) == 2
    # A group not due says nothing: db_size is exported from the scrapes that read it only.
    points = ops.run([first, second], export_interval_secs=60)
    assert points.filter(pl.col("metric") == "postgresql.db_size").height > 0


def test_capture_and_replay_keep_every_health_point(server, tmp_path):
    pg = server
    pg.execute("CREATE TABLE IF NOT EXISTS replay_t (i int)")
    with Scraper(pg.dsn(), health=every_scrape()) as scraper:
        snaps = [scraper.scrape()]
        for _ in range(2):
            pg.execute("INSERT INTO replay_t SELECT generate_series(1, 500)", "CHECKPOINT")
            snaps.append(scraper.scrape())
    path = tmp_path / "health.duckdb"
    capture.record(snaps, path)
    back = list(capture.read(path))
    assert len(back) == len(snaps) and all(a.equals(capture.as_stored(b)) for a, b in zip(back, snaps))
    direct = ops.run(snaps, export_interval_secs=10)
    replayed = replay(path, export_interval_secs=10)
    health = pl.col("metric").is_in(sorted(RECEIVER_METRICS)) | pl.col("metric").str.starts_with("postgresql.wal")
    assert replayed.filter(health).height == direct.filter(health).height > 0
    assert normalized(replayed).equals(normalized(direct))
    # The bytewax flow gives the same points as polars alone, health points included.
    from pgflow.otlp.store import read_points

    stored = replay_flow(path, Settings.load(export_interval_secs=10), out=tmp_path / "points.duckdb")
    flow_points = read_points(tmp_path / "points.duckdb")
    polars_points = as_received(replayed)
    assert stored == flow_points.height == polars_points.height
    cols = [c for c in flow_points.columns if c != "received_at"]
    norm = [
        f.select(cols).with_columns(pl.col("start", "end").cast(pl.Datetime("us", "UTC"))).sort(cols) for f in (flow_points, polars_points)
    ]
    assert norm[0].equals(norm[1])
    assert flow_points.filter(pl.col("metric") == "postgresql.commits").height > 0

    # A capture written before the health frames existed is still read, and can be appended to.
    import shutil
    from pathlib import Path

    old = tmp_path / "old.duckdb"
    shutil.copy(Path(__file__).parent.parent / "datasets" / "pgbench.duckdb", old)
    count = len(list(capture.read(old)))
    capture.record(snaps[-1:], old)
    again = list(capture.read(old))
    assert len(again) == count + 1
    assert [s for s in again if s.instance == snaps[-1].instance and s.scraped_at == snaps[-1].scraped_at][0].equals(
        capture.as_stored(snaps[-1])
    )


# Replication ---------------------------------------------------------------------------------


def test_streaming_standby_lag_receiver_and_a_slot_that_retains_wal(pg_factory):
    primary = pg_factory()
    primary.execute("CREATE EXTENSION pg_stat_statements", "CREATE TABLE r (i int)")
    # No waiting on conflicts: a query that stands in replay's way is cancelled at once.
    standby = standby_of(primary, slot="standby_slot", settings={"max_standby_streaming_delay": "0"})
    try:
        application = f"standby_{standby.port}"
        wait_for(
            lambda: one(
                primary,
                f"SELECT coalesce(bool_or(state = 'streaming'), false) FROM pg_stat_replication WHERE application_name = '{application}'",
            ),
            "the standby to stream",
        )
        primary.execute("INSERT INTO r SELECT generate_series(1, 5000)")

        def scrape_showing_lag():  # lags read null once the standby has caught up and is idle: keep it busy
            primary.execute("INSERT INTO r VALUES (0)")
            snap = scraper.scrape()
            row = snap.replication.filter(pl.col("application_name") == application)
            lags = row.select("write_lag", "flush_lag", "replay_lag")
            return snap if row.height and lags.null_count().sum_horizontal()[0] == 0 else None

        with Scraper(primary.dsn(), health=every_scrape()) as scraper:
            on_primary = [wait_for(scrape_showing_lag, "a scrape that sees the standby's lag")]
        points = ops.run(on_primary, export_interval_secs=60)
        who = {"replication_client": "127.0.0.1", "postgresql__replication__application_name": application}
        assert last_gauge(points, "postgresql.replication.data_delay", **who) >= 0
        for op in ("write", "flush", "replay"):
            assert last_gauge(points, "postgresql.wal.delay", operation=op, **who) >= 0
        slot = {"postgresql__replication_slot__name": "standby_slot"}
        assert last_gauge(points, "postgresql.replication_slot.active", **slot) == 1

        rows = one(primary, "SELECT count(*) FROM r")
        wait_for(lambda: one(standby, "SELECT count(*) FROM r") == rows, "the rows to reach the standby")
        with Scraper(standby.dsn(), health=every_scrape()) as scraper:
            on_standby = scraper.scrape()
        points = ops.run([on_standby], export_interval_secs=60)
        assert last_gauge(points, "postgresql.wal_receiver.connected") == 1
        assert last_gauge(points, "postgresql.wal_receiver.replay.delay") >= 0
        assert last_gauge(points, "postgresql.wal_receiver.last_msg_receipt.age") >= 0
        assert points.filter(pl.col("metric") == "postgresql.replication.data_delay").height == 0

        # A recovery conflict: a snapshot on the standby still sees rows the primary deletes and vacuums away.
        conflicts = "SELECT confl_snapshot FROM pg_stat_database_conflicts WHERE datname = 'postgres'"
        with Scraper(standby.dsn(), health=every_scrape()) as scraper:
            before = scraper.scrape()
            holder = psycopg.connect(standby.dsn())
            try:
                holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                holder.execute("SELECT count(*) FROM r").fetchone()
                primary.execute("DELETE FROM r WHERE i > 100", "VACUUM r")
                wait_for(lambda: one(standby, conflicts) >= 1, "the standby to cancel the conflicting snapshot")
            finally:
                holder.close()
            after = scraper.scrape()
        points = ops.run([before, after], export_interval_secs=60)
        assert total(points, "postgresql.query.conflicts", postgresql__conflict__type="snapshot", **db("postgres")) == 1
        assert points.filter(pl.col("metric") == "postgresql.query.conflicts").height >= 1

        # The standby stops: its slot holds the WAL the primary writes from then on.
        standby.stop()
        wait_for(
            lambda: one(primary, "SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'standby_slot'"),
            "the slot to become inactive",
        )
        with Scraper(primary.dsn(), health=every_scrape()) as scraper:
            first = scraper.scrape()
            lsn_before = one(primary, "SELECT pg_current_wal_lsn()::text")
            primary.execute("INSERT INTO r SELECT generate_series(1, 20000)")
            lsn_after = one(primary, "SELECT pg_current_wal_lsn()::text")
            second = scraper.scrape()
        written = one(primary, f"SELECT pg_wal_lsn_diff('{lsn_after}', '{lsn_before}')::int8")
        assert written > 0
        a = ops.run([first], export_interval_secs=60)
        b = ops.run([second], export_interval_secs=60)
        retained = [last_gauge(p, "postgresql.replication_slot.retained_wal", **slot) for p in (a, b)]
        assert retained[1] - retained[0] >= written
        assert last_gauge(b, "postgresql.replication_slot.active", **slot) == 0
        assert isinstance(second.scraped_at, datetime)
    finally:
        standby.cleanup()


def test_check_lists_the_groups_the_server_supports(server):
    from pgflow.config import InstanceConfig
    from pgflow.scrape.diagnose import check

    report = check(InstanceConfig(name="h", database_url=server.dsn()))
    finding = next(f for f in report.findings if f.name == "health groups")
    version = pg_version(server)
    supported, _, lacking = finding.detail.partition("; not on this server: ")
    assert "checkpointer" in supported and "replication_slots" in supported and "(primary)" in supported
    assert ("wal," in supported) == (version >= 140000) and ("io," in supported) == (version >= 160000)
    assert ("io (needs PostgreSQL 16+)" in lacking) == (version < 160000)


def test_archiver_counts_archived_segments_and_their_age(pg_factory):
    pg = pg_factory(settings={"archive_mode": "on", "archive_command": "true"})  # archiving that always succeeds
    pg.execute("CREATE EXTENSION pg_stat_statements", "CREATE TABLE a (i int)")
    archived = "SELECT archived_count FROM pg_stat_archiver"
    with Scraper(pg.dsn(), health=every_scrape()) as scraper:
        before = scraper.scrape()
        base = before.archiver["archived_count"][0]
        for _ in range(3):  # three WAL segments switched out, each archived once
            pg.execute("INSERT INTO a VALUES (1)", "SELECT pg_switch_wal()")
        wait_for(lambda: one(pg, archived) == base + 3, "three segments to be archived")
        after = scraper.scrape()
    points = ops.run([before, after], export_interval_secs=60)
    assert total(points, "postgresql.archiver.archived") == 3
    assert total(points, "postgresql.archiver.failed") == 0
    assert last_gauge(points, "postgresql.wal.age") >= 0


def test_standby_count_goes_to_zero_when_the_standby_stops_while_its_lag_stops(pg_factory, tmp_path):
    """Issue 19 item 7, as New Relic receives it from `pgflow run`: while a standby streams, the primary's
    `postgresql.replication.standbys` is 1 and its lag series are there; once it stops, the count is 0
    (a point, not silence) and the lag series stop (nothing after the standby left)."""
    import signal

    from e2e import collector_env, settle, start_collector, wait_for_baseline

    from pgflow.otlp.receiver import Receiver

    primary = pg_factory()
    primary.execute("CREATE EXTENSION pg_stat_statements", "CREATE TABLE r (i int)")
    standby = standby_of(primary)
    try:
        application = f"standby_{standby.port}"
        streaming = f"SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND application_name = '{application}'"
        wait_for(lambda: one(primary, streaming) == 1, "the standby to stream")
        state = tmp_path / "state"
        with Receiver() as receiver:
            env = collector_env(primary.dsn(), receiver.http_endpoint, state, PGFLOW_HEALTH_INTERVAL_SECS="0.3")
            proc = start_collector(env, log=tmp_path / "collector.log")
            try:
                wait_for_baseline(state)

                def seen(metric: str, value: float | None = None) -> bool:
                    rows = receiver.points().filter(pl.col("metric") == metric)
                    return rows.height > 0 and (value is None or (rows["value"] == value).any())

                def delay() -> bool:  # lags read null once the standby is idle: keep it busy
                    primary.execute("INSERT INTO r VALUES (0)")
                    return seen("postgresql.replication.data_delay")

                wait_for(lambda: seen("postgresql.replication.standbys", 1), "a standby count of 1")
                wait_for(delay, "the standby's replication lag")
                standby.stop()
                wait_for(lambda: one(primary, "SELECT count(*) = 0 FROM pg_stat_replication"), "the primary to see the standby gone")
                left = one(primary, "SELECT clock_timestamp()").astimezone(UTC)
                settle(3, state_dir=state, scrapes=6)
                wait_for(lambda: seen("postgresql.replication.standbys", 0), "a standby count of 0")
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0, (tmp_path / "collector.log").read_text()[-3000:]
            points = receiver.points()
    finally:
        standby.cleanup()
    standbys = points.filter(pl.col("metric") == "postgresql.replication.standbys").sort("end")
    assert set(standbys["unit"]) == {"{standby}"} and set(standbys["kind"]) == {"gauge"}
    assert 1.0 in standbys["value"].to_list()
    after = standbys.filter(pl.col("end") > left)
    assert after.height >= 1 and set(after["value"]) == {0.0}, standbys.select("end", "value")
    assert standbys["value"][-1] == 0.0
    assert points.filter((pl.col("metric") == "postgresql.replication.data_delay") & (pl.col("end") <= left)).height
    for metric in ("postgresql.replication.data_delay", "postgresql.wal.delay"):  # these stop: no point, no zero
        assert points.filter((pl.col("metric") == metric) & (pl.col("end") > left)).height == 0, metric
