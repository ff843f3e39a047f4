"""Active-session sampling (issue 11) against a real PostgreSQL, ground truth from the workload.

One workload runs once for the module (about 7 s): two sessions in ``pg_sleep(6)``, a
CPU-bound statement running for 3 s, and a lock chain A -> B -> C (A holds a row lock and
sits idle in its transaction; B waits on A, C on B) whose waits the client times. A sampler
(0.2 s period) and a scraper run beside it in-process; the operators (``pgflow.ops.run``)
turn the snapshots into points, the same way the flow and replay do.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import duckdb
import polars as pl
import psycopg
import pytest

from pgflow import capture, ops
from pgflow.config import Settings
from pgflow.schema import SAMPLES, SESSION_STATS
from pgflow.scrape import Scraper, sampling_sql
from pgflow.scrape.sampler import PREPARED, Sampler, with_samples

PERIOD = 0.2
SLEEP_SECS = 6
CPU_SECS = 3
HOLD_SECS = 3
CPU_SQL = (
    "SELECT count(*) FROM (SELECT 1 FROM generate_series(1, 20000) a CROSS JOIN generate_series(1, 20000) b "
    "WHERE clock_timestamp() > statement_timestamp() + interval '3 seconds' LIMIT 1) s"
)


@dataclass
class Workload:
    version: int
    snapshots: list = field(default_factory=list)
    sleep_secs: list[float] = field(default_factory=list)  # client-timed pg_sleep durations
    cpu_secs: float = 0.0
    blocked_secs: dict[str, float] = field(default_factory=dict)  # B and C: client-timed waits
    skipped: int = 0
    failed: int = 0


def _timed(dsn: str, sql: str, out: list[float] | dict, key: str | None = None) -> threading.Thread:
    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.monotonic()
            conn.execute(sql)
            took = time.monotonic() - started
        if key is None:
            out.append(took)  # type: ignore[union-attr]
        else:
            out[key] = took  # type: ignore[index]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for(pg, condition_sql: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg.execute(condition_sql)[0][0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {condition_sql}")


def _lock_waiters(pg) -> int:
    return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")[0][0]


@pytest.fixture(scope="module")
def workload(pg) -> Workload:
    pg.execute(
        "DROP TABLE IF EXISTS chain",
        "CREATE TABLE chain (id int PRIMARY KEY, v int)",
        "INSERT INTO chain VALUES (1, 0)",
        "SELECT pg_stat_statements_reset()",
    )
    dsn = pg.dsn()
    w = Workload(version=int(pg.execute("SHOW server_version_num")[0][0]))
    with Scraper(dsn) as scraper, Sampler(dsn, instance=scraper.instance, interval_secs=PERIOD) as sampler:
        w.snapshots.append(with_samples(scraper.scrape(), sampler))
        sampler.start()
        threads = [_timed(dsn, f"SELECT pg_sleep({SLEEP_SECS})", w.sleep_secs) for _ in range(2)]
        cpu: list[float] = []
        threads.append(_timed(dsn, CPU_SQL, cpu))
        holder = psycopg.connect(dsn)  # A: row lock, then idle in transaction
        holder.execute("SELECT v FROM chain WHERE id = 1 FOR UPDATE")
        threads.append(_timed(dsn, "UPDATE chain SET v = v + 1 WHERE id = 1", w.blocked_secs, "B"))
        _wait_for(pg, "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        threads.append(_timed(dsn, "UPDATE chain SET v = v + 2 WHERE id = 1", w.blocked_secs, "C"))
        _wait_for(pg, "SELECT count(*) = 2 FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        time.sleep(HOLD_SECS)  # the chain's known length: B and C wait until A commits
        holder.commit()
        holder.close()
        for t in threads:
            t.join()
        sampler.stop()
        w.cpu_secs = cpu[0]
        w.skipped, w.failed = sampler.stats.skipped, sampler.stats.failed
        w.snapshots.append(with_samples(scraper.scrape(), sampler))
    return w


def _metric(points: pl.DataFrame, name: str) -> pl.DataFrame:
    return points.filter(pl.col("metric") == name).with_columns(pl.col("attributes").struct.unnest())


def _fingerprint_of(points: pl.DataFrame, text: str) -> str:
    """The fingerprint the query metrics give the statement whose text is (or contains) ``text``."""
    texts = pl.col("db.query.text")
    calls = _metric(points, "postgresql.query.calls").filter((texts == text) | texts.str.contains(text, literal=True))
    assert calls.height == 1, f"no query series for {text!r}"
    return calls["postgresql.query.fingerprint"][0]


def _slack(w: Workload, sessions: int) -> float:
    """± 2 periods per session, plus any scheduled sample that was counted as not taken."""
    return sessions * (2 + w.skipped + w.failed) * PERIOD


def test_pg_sleep_sessions_sum_to_their_seconds_under_the_statement_fingerprint(workload):
    points = ops.run(workload.snapshots)
    act = _metric(points, "postgresql.activity.time")
    assert act["unit"].unique().to_list() == ["s"] and act["kind"].unique().to_list() == ["sum"]
    sleeping = act.filter(pl.col("postgresql.wait_event.name") == "PgSleep")
    truth = sum(workload.sleep_secs)  # two sessions, timed by the client
    assert abs(sleeping["value"].sum() - truth) <= _slack(workload, 2), (sleeping, truth)
    assert set(sleeping["postgresql.wait_event.type"]) == {"Timeout"}
    assert set(sleeping["postgresql.session.state"]) == {"active"}
    assert set(sleeping["postgresql.backend.type"]) == {"client backend"}
    assert set(sleeping["db.namespace"]) == {"postgres"} and set(sleeping["user.name"]) == {"postgres"}
    assert set(sleeping["postgresql.wait.source"]) == {"pg_stat_activity"}
    if workload.version >= 140000:  # lines up with the query metrics by fingerprint
        assert set(sleeping["postgresql.query.fingerprint"]) == {_fingerprint_of(points, "SELECT pg_sleep($1)")}
    else:  # PostgreSQL 13 has no query_id: unknown, never dropped
        assert set(sleeping["postgresql.query.fingerprint"]) == {"unknown"}


def test_cpu_bound_statement_is_reported_as_cpu(workload):
    points = ops.run(workload.snapshots)
    act = _metric(points, "postgresql.activity.time")
    cpu = act.filter(pl.col("postgresql.wait_event.type") == "CPU")
    assert set(cpu["postgresql.wait_event.name"]) == {"CPU"}
    if workload.version >= 140000:
        fp = _fingerprint_of(points, "generate_series")
        statement = act.filter(pl.col("postgresql.query.fingerprint") == fp)
        assert set(statement["postgresql.wait_event.type"]) == {"CPU"}
        assert abs(statement["value"].sum() - workload.cpu_secs) <= _slack(workload, 1)
    else:
        assert cpu["value"].sum() >= workload.cpu_secs - _slack(workload, 1)


def test_lock_chain_finds_the_idle_in_transaction_root(workload):
    points = ops.run(workload.snapshots)
    blocked = _metric(points, "postgresql.blocking.time")
    truth = workload.blocked_secs["B"] + workload.blocked_secs["C"]
    assert abs(blocked["value"].sum() - truth) <= _slack(workload, 2), (blocked, truth)
    assert set(blocked["postgresql.blocking.root.state"]) == {"idle in transaction"}
    assert set(blocked["db.namespace"]) == {"postgres"}
    if workload.version >= 140000:  # the root's last statement: its SELECT ... FOR UPDATE
        root_fp = _fingerprint_of(points, "SELECT v FROM chain WHERE id = $1 FOR UPDATE")
        assert set(blocked["postgresql.query.fingerprint"]) == {root_fp}
    else:
        assert set(blocked["postgresql.query.fingerprint"]) == {"unknown"}
    depth = _metric(points, "postgresql.blocking.chain.depth.max")
    assert dict(zip(depth["db.namespace"], depth["value"]))["postgres"] == 2  # A blocks B, B blocks C
    roots = _metric(points, "postgresql.blocking.root.count")
    assert dict(zip(roots["db.namespace"], roots["value"]))["postgres"] == 1
    assert roots["kind"].unique().to_list() == ["gauge"]
    # B and C waited on a Lock for the same seconds (activity and blocking agree)
    lock_wait = _metric(points, "postgresql.activity.time").filter(pl.col("postgresql.wait_event.type") == "Lock")
    assert abs(lock_wait["value"].sum() - truth) <= _slack(workload, 2)


def test_oldest_transaction_age_sees_the_idle_holder(workload):
    points = ops.run(workload.snapshots)
    ages = _metric(points, "postgresql.transaction.age.max")
    idle = ages.filter(pl.col("postgresql.session.state") == "idle in transaction")
    # A was idle in its transaction for at least HOLD_SECS before it committed
    assert idle["value"].max() >= HOLD_SECS - 2 * PERIOD
    assert set(ages["unit"]) == {"s"}
    assert _metric(points, "postgresql.backend_xmin.age.max").height >= 1


def test_totals_stay_exact_under_the_cap(workload):
    full = _metric(ops.run(workload.snapshots), "postgresql.activity.time")
    capped = _metric(ops.run(workload.snapshots, max_queries_tracked=1), "postgresql.activity.time")
    assert capped["value"].sum() == pytest.approx(full["value"].sum(), abs=1e-9)
    names = set(capped["postgresql.query.fingerprint"]) - {"other", "unknown"}
    assert len(names) <= 1
    if workload.version >= 140000:
        assert "other" in set(capped["postgresql.query.fingerprint"])
    blocked_full = _metric(ops.run(workload.snapshots), "postgresql.blocking.time")["value"].sum()
    blocked_capped = _metric(ops.run(workload.snapshots, max_queries_tracked=1), "postgresql.blocking.time")
    assert blocked_capped["value"].sum() == pytest.approx(blocked_full, abs=1e-9)


def test_capture_then_replay_gives_the_same_activity_points(workload, tmp_path):
    path = tmp_path / "activity.duckdb"
    capture.record(workload.snapshots, path)
    read = list(capture.read(path))
    assert len(read) == len(workload.snapshots)
    assert all(capture.as_stored(a).equals(b) for a, b in zip(workload.snapshots, read))
    assert read[-1].samples.height > 0
    live, replayed = ops.run(workload.snapshots), ops.run(read)
    assert live.filter(pl.col("metric").str.starts_with("postgresql.activity")).height > 0
    assert live.equals(replayed)


def test_capture_written_before_samples_still_reads(workload, tmp_path):
    path = tmp_path / "old.duckdb"
    capture.record(workload.snapshots, path)
    with duckdb.connect(str(path)) as con:  # what a capture of an older pgflow holds
        con.execute("DROP TABLE samples")
        con.execute("DROP TABLE session_stats")
    read = list(capture.read(path))
    assert len(read) == 2 and read[-1].samples.schema == SAMPLES and read[-1].samples.height == 0
    assert read[-1].session_stats.schema == SESSION_STATS
    assert ops.run(read).filter(pl.col("metric") == "postgresql.activity.time").height == 0


def test_sampling_off_means_no_sampler_connection_and_no_activity_points(pg):
    from pgflow.stream.source import ScrapePartition

    def run(interval: float, pgflow_backends: int) -> list:
        """Snapshots of a partition, once pg_stat_activity shows exactly ``pgflow_backends`` of ours
        (waiting lets connections closed by earlier tests go away; a sampler that should not be
        there makes the wait time out)."""
        settings = Settings.load(
            database_url=pg.dsn(), activity_sample_interval_secs=interval, collection_interval_secs=0.5, table_stats_enabled=False
        )  # tables: own connections
        part = ScrapePartition(settings.targets()[0], settings, None)
        try:
            snaps: list = []
            deadline = time.monotonic() + 30
            while len(snaps) < 2 and time.monotonic() < deadline:
                snaps += part.next_batch()
                time.sleep(0.02)
            _wait_for(pg, f"SELECT count(*) = {pgflow_backends} FROM pg_stat_activity WHERE application_name = 'pgflow'", timeout=10)
            return snaps
        finally:
            part.close()

    snaps = run(0, pgflow_backends=1)  # the scraper's connection only
    assert all(s.samples.height == 0 and s.session_stats.height == 0 for s in snaps)
    assert not ops.run(snaps)["metric"].str.starts_with("postgresql.activity").any()
    assert not ops.run(snaps)["metric"].str.starts_with("postgresql.blocking").any()
    snaps = run(0.2, pgflow_backends=2)  # scraper and sampler
    taken = sum(s.session_stats.filter(pl.col("stat") == "samples_taken")["value"].sum() for s in snaps)
    assert taken >= 1


def test_sampler_recovers_after_a_restart_and_counts_the_gap(pg_factory):
    server = pg_factory()
    dsn = server.dsn()
    with Sampler(dsn, instance="restart", interval_secs=PERIOD, connect_timeout_secs=1) as sampler:
        sampler.start()
        deadline = time.monotonic() + 20
        while sampler.stats.taken < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = sampler.stats.taken
        server.stop()
        while sampler.stats.failed < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.start()
        while sampler.stats.taken <= before and time.monotonic() < deadline:  # reconnected on its own
            time.sleep(0.05)
        slept: list[float] = []
        _timed(dsn, "SELECT pg_sleep(1)", slept).join()
        sampler.stop()
        samples, stats = sampler.drain()
    counts = dict(zip(stats["stat"], stats["value"]))
    assert counts["samples_failed"] >= 2  # the gap is counted ...
    assert counts["samples_taken"] > before  # ... and sampling came back on its own
    # ... and not guessed: no row holds more samples than were taken
    assert samples["count"].max() <= counts["samples_taken"]
    seen = samples.filter(pl.col("wait_event") == "PgSleep")["count"].sum() * PERIOD
    assert abs(seen - slept[0]) <= (2 + sampler.stats.skipped) * PERIOD, (seen, slept)


def test_blocked_by_a_prepared_transaction_names_it(pg_factory):
    server = pg_factory(settings={"max_prepared_transactions": "5"})
    server.execute("CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    dsn = server.dsn()
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM t WHERE id = 1 FOR UPDATE")
        holder.execute("PREPARE TRANSACTION 'pgflow_test'")

    def wait() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                conn.execute("SET lock_timeout = '3s'")
                conn.execute("UPDATE t SET id = 1 WHERE id = 1")
            except psycopg.errors.LockNotAvailable:
                pass  # expected: the prepared transaction never lets go

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        _wait_for(server, "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        sampler = Sampler(dsn, instance="prepared", interval_secs=PERIOD)
        assert sampler.sample()
        sampler.close()
    finally:
        waiter.join()
        server.execute("ROLLBACK PREPARED 'pgflow_test'")
    _, stats = sampler.drain()
    blocked = stats.filter(pl.col("stat") == "blocked_secs")
    assert blocked["state"].to_list() == [PREPARED]
    assert dict(zip(stats["stat"], stats["value"]))["chain_depth_max"] == 1


def test_check_reports_sampling_privileges_source_and_cost(pg):
    from pgflow.config import InstanceConfig
    from pgflow.scrape.diagnose import check

    pg.execute("DROP ROLE IF EXISTS sampling_mon", "CREATE ROLE sampling_mon LOGIN PASSWORD 'pw'")
    with psycopg.connect(pg.dsn()) as busy:  # another role's session, idle in its transaction
        busy.execute("SELECT 1")
        full = check(InstanceConfig(name="a", database_url=pg.dsn())).findings
        limited = check(InstanceConfig(name="b", database_url=pg.dsn(user="sampling_mon", password="pw"))).findings
        off = check(InstanceConfig(name="c", database_url=pg.dsn()), sample_interval_secs=0).findings
    by_name = {f.name: f for f in full}
    assert by_name["sampling privileges"].level == "ok"
    assert by_name["wait source"].detail.startswith("pg_stat_activity")
    assert by_name["activity sampling"].level == "ok" and "one sample took" in by_name["activity sampling"].detail
    assert "1 sessions seen" in by_name["activity sampling"].detail  # the idle-in-transaction session
    limited_by_name = {f.name: f for f in limited}
    assert limited_by_name["sampling privileges"].level == "warn"
    assert "pg_read_all_stats" in limited_by_name["sampling privileges"].detail
    assert "hidden" in limited_by_name["activity sampling"].detail  # postgres' session: counted, not sampled
    assert [f.detail for f in off if f.name == "activity sampling"] == ["off (activity_sample_interval_secs = 0)"]


WAIT_SAMPLING_BINDIR = "/usr/lib/postgresql/15/bin"  # Debian's postgresql-15-pg-wait-sampling installs here


def test_check_detects_pg_wait_sampling(pg_factory):
    import os

    if not os.path.exists("/usr/lib/postgresql/15/lib/pg_wait_sampling.so"):
        pytest.skip("pg_wait_sampling is not installed (apt-get install postgresql-15-pg-wait-sampling)")
    from pgflow.config import InstanceConfig
    from pgflow.pgserver import LocalPostgres
    from pgflow.scrape.diagnose import check

    server = LocalPostgres(WAIT_SAMPLING_BINDIR, settings={"shared_preload_libraries": "pg_stat_statements,pg_wait_sampling"}).start()
    try:
        server.execute("CREATE EXTENSION pg_stat_statements", "CREATE EXTENSION pg_wait_sampling")
        findings = {f.name: f for f in check(InstanceConfig(name="ws", database_url=server.dsn())).findings}
        # detected and named, and honest about which source the metrics use
        assert "pg_wait_sampling 1.1 is installed" in findings["wait source"].detail
        assert findings["wait source"].detail.startswith("pg_stat_activity")
        with Sampler(server.dsn(), instance="ws", interval_secs=PERIOD) as sampler:
            assert sampler.sample()
            samples, _ = sampler.drain()
        assert set(samples["source"]) <= {"pg_stat_activity"}
    finally:
        server.cleanup()


def test_collector_exports_activity_end_to_end(pg, tmp_path):
    """The one end-to-end test: the real collector (bytewax flow, sampler thread) to a real receiver."""
    import urllib.request

    from e2e import collector_env, settle, start_collector, wait_for_baseline

    from pgflow.otlp.receiver import Receiver

    with Receiver() as receiver:
        env = collector_env(pg.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS=str(PERIOD))
        proc = start_collector(env, log=tmp_path / "log")
        try:
            wait_for_baseline(tmp_path / "state")
            slept: list[float] = []
            _timed(pg.dsn(), "SELECT pg_sleep(2)", slept).join()
            settle(state_dir=tmp_path / "state")
            with urllib.request.urlopen(f"http://{env['PGFLOW_METRICS_ADDR']}/metrics", timeout=10) as r:
                metrics = r.read().decode()
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0
        points = receiver.points()
    act = points.filter(pl.col("metric") == "postgresql.activity.time").with_columns(
        wait=pl.col("attributes").str.json_path_match("$['postgresql.wait_event.name']")
    )
    assert act["kind"].unique().to_list() == ["sum"] and act["monotonic"].all()

    def samples(outcome: str) -> float:
        lines = [
            line for line in metrics.splitlines() if line.startswith("pgflow_activity_samples_total") and f'outcome="{outcome}"' in line
        ]
        return float(lines[0].split()[-1]) if lines else 0.0

    sleeping = act.filter(pl.col("wait") == "PgSleep")["value"].sum()
    slack = (2 + samples("skipped") + samples("failed")) * PERIOD
    assert abs(sleeping - slept[0]) <= slack, (sleeping, slept, slack)
    assert samples("taken") >= 1
    assert "pgflow_activity_sample_duration_seconds_count" in metrics


def test_sample_interval_setting_is_validated(monkeypatch):
    from pgflow.errors import ConfigError

    assert Settings.load().activity_sample_interval_secs == 1.0
    assert Settings.load(activity_sample_interval_secs=0).activity_sample_interval_secs == 0  # off
    monkeypatch.setenv("PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS", "0.5")
    assert Settings.load().activity_sample_interval_secs == 0.5
    for bad in (0.05, -1, "often"):
        with pytest.raises(ConfigError) as info:
            Settings.load(activity_sample_interval_secs=bad)
        message = str(info.value)
        assert "activity_sample_interval_secs" in message and "PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS" in message
        assert "\n" not in message and info.value.exit_code == 2


def test_pgflow_capture_cli_stores_samples(pg, tmp_path):
    import os
    import subprocess
    import sys

    from e2e import ROOT

    out = tmp_path / "cli.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_")}
    env.update({"DATABASE_URL": pg.dsn(), "PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS": str(PERIOD), "PYTHONPATH": str(ROOT)})
    with psycopg.connect(pg.dsn()) as idle_in_xact:  # a session to be sampled the whole time
        idle_in_xact.execute("SELECT 1")
        proc = subprocess.run(
            [sys.executable, "-m", "pgflow", "capture", "--out", str(out), "--scrapes", "3", "--interval", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert proc.returncode == 0, proc.stderr
    snaps = list(capture.read(out))
    taken = sum(s.session_stats.filter(pl.col("stat") == "samples_taken")["value"].sum() for s in snaps)
    assert len(snaps) == 3 and taken >= 2
    idle = pl.concat([s.samples for s in snaps]).filter(pl.col("state") == "idle in transaction")
    assert idle["count"].sum() >= 2


def _sessions(dsn: str) -> tuple[list[psycopg.Connection], dict[str, set[int]]]:
    """Sessions in every state the prefilter must tell apart; pids by what the sampler must report.

    20 idle (their last statement a long one), 3 idle in transaction, 1 idle in an aborted
    transaction, 2 active in pg_sleep, 1 active in COPY FROM STDIN (waiting on ClientRead, like
    an idle session, but inside a transaction).
    """
    conns: list[psycopg.Connection] = []
    expect: dict[str, set[int]] = defaultdict(set)
    for _ in range(20):
        c = psycopg.connect(dsn, autocommit=True)
        c.execute("SELECT " + ", ".join(f"{i} AS c{i}" for i in range(60)))
        conns.append(c)
    for _ in range(3):
        c = psycopg.connect(dsn)
        c.execute("SELECT txid_current()")
        conns.append(c)
        expect["idle in transaction"].add(c.info.backend_pid)
    c = psycopg.connect(dsn)
    with pytest.raises(psycopg.errors.DivisionByZero):
        c.execute("SELECT 1 / 0")
    conns.append(c)
    expect["idle in transaction (aborted)"].add(c.info.backend_pid)
    for _ in range(2):
        c = psycopg.connect(dsn, autocommit=True)
        c.pgconn.send_query(b"SELECT pg_sleep(60)")
        conns.append(c)
        expect["active"].add(c.info.backend_pid)
    c = psycopg.connect(dsn, autocommit=True)
    c.pgconn.send_query(b"COPY copy_target FROM STDIN")
    conns.append(c)
    expect["active"].add(c.info.backend_pid)
    return conns, expect


@pytest.mark.parametrize("path", ["per-session", "whole"])
def test_the_prefilter_reads_every_session_the_whole_read_would(pg, monkeypatch, path):
    """Both ways of reading (the text-free prefilter then one call per candidate, or one read of
    every backend) report exactly the non-idle sessions, in their true states."""
    pg.execute("DROP TABLE IF EXISTS copy_target", "CREATE TABLE copy_target (v int)")
    conns, expect = _sessions(pg.dsn())
    try:
        pids = set().union(*expect.values())
        _wait_for(pg, f"SELECT count(*) = 3 FROM pg_stat_activity WHERE state = 'active' AND pid IN ({','.join(map(str, pids))})")
        monkeypatch.setattr(sampling_sql, "WHOLE_READ_RATIO", 1000 if path == "whole" else 0)
        version = int(pg.execute("SHOW server_version_num")[0][0])
        sql = sampling_sql.sample_sql(version)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            first = conn.execute(sampling_sql.with_known_idle(sql, {})).fetchall()
            # the idle sessions come back once, flagged with their last statement's start: passed
            # back as known, they are not read again
            known = {row[0]: row[18] for row in first if row[18] is not None}
            rows = conn.execute(sampling_sql.with_known_idle(sql, known)).fetchall()
            plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sampling_sql.with_known_idle(sql, known)).fetchone()[0]
        idle = {c.info.backend_pid for c in conns} - pids
        assert idle <= set(known)  # every idle session was learned ...
        assert {row[6] for row in first if row[18] is not None} == {"idle"}  # ... as idle, and only those
        assert not idle & {row[0] for row in rows}  # ... and then never read again
        for sample in (first, rows):
            seen: dict[str, set[int]] = defaultdict(set)
            for row in sample:
                if row[0] in pids and row[18] is None:
                    seen[row[6]].add(row[0])
            assert seen == expect

        def scans(node: dict) -> list[dict]:
            found = [node] if node.get("Function Name") == "pg_stat_get_activity" else []
            return found + [s for child in node.get("Plans", []) for s in scans(child)]

        loops = [(s["Alias"], s["Actual Loops"]) for s in scans(plan[0]["Plan"])]
        whole = [n for alias, n in loops if alias == "pg_stat_get_activity"]
        per_session = [n for alias, n in loops if alias != "pg_stat_get_activity"]
        if path == "whole":  # only the branch the one-time filter chose runs
            assert whole == [1] and per_session == [0]
        else:  # one read per candidate: the sessions in the workload, not the idle ones
            assert whole == [0] and len(pids) <= per_session[0] < len(pids) + 10
    finally:
        for c in conns:
            c.close()


def test_sampling_plans_once_per_connection_and_survives_a_lost_prepared_statement(pg):
    """The sampling query is prepared once per connection; if the server forgets it (a pooler in
    transaction mode hands another server connection), the sample is not lost: the query is sent
    whole from then on."""
    with Sampler(pg.dsn(), instance="prepared-statement", interval_secs=PERIOD) as sampler:
        assert sampler.sample()
        assert sampler._statement.startswith("EXECUTE")
        sampler._conn.execute("DEALLOCATE pgflow_sample")  # as a pooler's other server connection would
        assert sampler.sample()
        assert sampler._statement == sampler._sql
        assert sampler.sample()
        assert sampler.stats.failed == 0 and sampler.stats.taken == 3


def test_a_known_idle_session_whose_next_statement_fails_is_sampled_idle_in_an_aborted_transaction(pg):
    """Idle and idle in an aborted transaction look alike to the text-free prefilter; a new
    statement makes the session unknown again, so the sampler reads it and sees the abort."""
    dsn = pg.dsn()
    with psycopg.connect(dsn) as session, Sampler(dsn, instance="aborted", interval_secs=PERIOD) as sampler:
        session.execute("SELECT 1")
        session.commit()  # idle
        assert sampler.sample()
        assert session.info.backend_pid in sampler._known_idle  # learned idle
        with pytest.raises(psycopg.errors.DivisionByZero):
            session.execute("SELECT 1 / 0")  # now idle in an aborted transaction
        assert sampler.sample() and sampler.sample()
        samples, _ = sampler.drain()
        session.rollback()
        assert sampler.sample()  # idle again: learned again, not sampled
        after, _ = sampler.drain()
    aborted = samples.filter(pl.col("state") == "idle in transaction (aborted)")
    assert aborted["count"].sum() == 2
    assert after.filter(pl.col("state").str.starts_with("idle in transaction (aborted)")).height == 0
