"""The streaming job end to end: real PostgreSQL, pgbench ground truth, the real receiver."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from e2e import ROOT, calls_by_summary, collector_env, settle, start_collector, wait_for_baseline, write_config

from pgflow.otlp.receiver import Receiver, parse_script
from pgflow.pgserver import free_port

PGBENCH = (
    "UPDATE pgbench_branches",
    "UPDATE pgbench_tellers",
    "UPDATE pgbench_accounts",
    "SELECT pgbench_accounts",
    "INSERT pgbench_history",
)

pytestmark = pytest.mark.slow


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def assert_pgbench_exact(calls: dict[str, float], expected: int) -> None:
    assert {s: calls.get(s) for s in PGBENCH} == {s: expected for s in PGBENCH}


def test_end_to_end_exact_and_sigterm_exits_zero(fresh_stats, tmp_path):
    with Receiver() as receiver:
        proc = start_collector(collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state"), log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        settle(state_dir=tmp_path / "state")
        started = time.monotonic()
        assert stop(proc) == 0
        assert time.monotonic() - started < 30  # bounded shutdown
        assert_pgbench_exact(calls_by_summary(receiver.points()), 1000)
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "flushed" in log


def test_a_text_cache_smaller_than_the_statements_loses_no_text(fresh_stats, tmp_path):
    """Issue 20: ``text_cache_size`` below the number of statements one scrape reads once
    emptied that scrape's texts (every series lost its summary) and read them again at every
    scrape. The setting no longer bounds anything: every pgbench statement is exported under its
    own summary, exactly, and the log says the setting can go."""
    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_TEXT_CACHE_SIZE="2")
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        settle(state_dir=tmp_path / "state")
        assert stop(proc) == 0
        assert_pgbench_exact(calls_by_summary(receiver.points()), 1000)
    log = (tmp_path / "log").read_text()
    assert "no longer has an effect" in log and "setting=text_cache_size" in log


def test_http_protocol_end_to_end(fresh_stats, tmp_path):
    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_OTLP_PROTOCOL="http")
        proc = start_collector(env)
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        settle(state_dir=tmp_path / "state")
        assert stop(proc) == 0
        assert_pgbench_exact(calls_by_summary(receiver.points()), 1000)
        assert {p.split("/")[0] for p, _ in receiver.attempts} == {"http"}  # metrics, and plans as http/logs


def test_endpoint_unavailable_for_several_windows_still_exact(fresh_stats, tmp_path):
    with Receiver(script=parse_script(",".join(["UNAVAILABLE"] * 12))) as receiver:
        proc = start_collector(collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state"), log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        settle(5, state_dir=tmp_path / "state")
        assert stop(proc) == 0
        outcomes = [o for _, o in receiver.attempts]
        assert outcomes[:12] == ["503"] * 12 and "OK" in outcomes  # UNAVAILABLE, as OTLP/HTTP says it
        assert_pgbench_exact(calls_by_summary(receiver.points()), 1000)
    assert "endpoint unreachable" in (tmp_path / "log").read_text()


def test_rejecting_endpoint_keeps_windows_without_retry_storm(fresh_stats, tmp_path):
    with Receiver(script=parse_script(",".join(["403"] * 1000))) as receiver:
        env = collector_env(
            fresh_stats.dsn(),
            receiver.http_endpoint,
            tmp_path / "state",
            NEW_RELIC_API_KEY="NRAK-WRONG-KEY-123",
            PGFLOW_SHUTDOWN_TIMEOUT_SECS="2",
        )
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "2", "-t", "50")
        settle(3)
        assert proc.poll() is None  # still running and scraping
        assert stop(proc) == 3  # refused windows are kept in the ledger, not acknowledged
        windows = len(receiver.attempts)
        assert 0 < windows <= 12  # the endpoint is paused after a refusal: no retry storm
    log = (tmp_path / "log").read_text()
    assert "rejected the license key (403): check NEW_RELIC_API_KEY" in log
    assert "flushed" not in log
    assert "NRAK-WRONG-KEY-123" not in log


def test_kill_9_and_restart_is_exact(fresh_stats, tmp_path):
    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state")
        first = start_collector(env)
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        settle(1.5, state_dir=tmp_path / "state")
        first.kill()  # SIGKILL: no flush, no goodbye
        first.wait()
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")  # while nobody watches
        second = start_collector(env)
        settle(1, state_dir=tmp_path / "state")
        assert stop(second) == 0
        assert_pgbench_exact(calls_by_summary(receiver.points()), 1000)


def test_two_instances_one_stopped(fresh_stats, pgbench_server, tmp_path):
    other = pgbench_server()
    config = write_config(
        tmp_path / "c.json", instances=[{"name": "a", "database_url": fresh_stats.dsn()}, {"name": "b", "database_url": other.dsn()}]
    )
    with Receiver() as receiver:
        env = collector_env(None, receiver.http_endpoint, tmp_path / "state", PGFLOW_CONFIG=str(config), PGFLOW_CONNECT_TIMEOUT_SECS="1")
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state", instances=2)
        other.stop("immediate")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        settle(3, state_dir=tmp_path / "state", instance="a")
        assert stop(proc) == 0
        assert_pgbench_exact(calls_by_summary(receiver.points(), instance="a"), 1000)
    assert "scrape failed" in (tmp_path / "log").read_text()


def test_two_process_bytewax_cluster(fresh_stats, pgbench_server, tmp_path):
    other = pgbench_server()
    config = write_config(
        tmp_path / "c.json", instances=[{"name": "a", "database_url": fresh_stats.dsn()}, {"name": "b", "database_url": other.dsn()}]
    )
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with Receiver() as receiver:
        procs = []
        for i in range(2):
            env = collector_env(None, receiver.http_endpoint, tmp_path / f"state{i}", PGFLOW_CONFIG=str(config))
            args = [sys.executable, "-m", "bytewax.run", "flows.collector:flow", "-i", str(i), "-a", ";".join(addresses)]
            procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(tmp_path / f"log{i}", "wb"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("state*/instances/*/state.pkl"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        other.pgbench("-n", "-c", "2", "-t", "300")
        settle(3)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
        points = receiver.points()
        assert_pgbench_exact(calls_by_summary(points, instance="a"), 1000)
        assert_pgbench_exact(calls_by_summary(points, instance="b"), 600)
    # each instance lives in exactly one process's ledger: scraped once per interval, not twice
    ledgers = sorted(p.name for p in tmp_path.glob("state*/instances/*"))
    assert ledgers == ["a", "b"]


def test_scrapes_n_flushes_and_exits_zero(fresh_stats, tmp_path):
    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state")
        proc = start_collector(env, "--scrapes", "3")
        assert proc.wait(timeout=60) == 0
        assert receiver.points().height > 0  # the last windows were flushed on the way out


def test_metrics_and_healthz(fresh_stats, tmp_path):
    with Receiver() as receiver:
        port = free_port()
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_METRICS_ADDR=f"127.0.0.1:{port}")
        proc = start_collector(env)
        wait_for_baseline(tmp_path / "state")

        def metric(name: str) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))

        first = metric("pgflow_rows_scraped_total")
        fresh_stats.pgbench("-n", "-c", "2", "-t", "50")
        settle(2.5)
        assert metric("pgflow_rows_scraped_total") > first > 0
        assert metric("pgflow_points_exported_total") > 0
        assert metric("pgflow_scrape_duration_seconds_count") >= 2
        assert metric("pgflow_series_tracked") > 0 and metric("pgflow_last_successful_export_timestamp_seconds") > 0
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
        assert stop(proc) == 0


def _context_switches(tid: int) -> int:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)


def test_metrics_server_sleeps_until_asked_and_answers_at_once():
    # Issue 20: the /metrics thread of every pgflow process waited in 0.5 s polls, two wake-ups a
    # second for nothing; it now waits for a request, and a request is still answered at once.
    from pgflow import telemetry

    port = free_port()
    earlier = set(threading.enumerate())  # an earlier test's runtime may have its own /metrics thread
    server = telemetry.serve(f"127.0.0.1:{port}", telemetry.Health(30))
    try:
        thread = next(t for t in threading.enumerate() if t.name == "pgflow-metrics" and t not in earlier and t.native_id is not None)
        time.sleep(0.3)  # started and waiting
        before = _context_switches(thread.native_id)  # type: ignore[arg-type]
        time.sleep(3)
        idle = _context_switches(thread.native_id) - before  # type: ignore[arg-type]
        started = time.monotonic()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        answered_in = time.monotonic() - started
        started = time.monotonic()
        server.shutdown()  # a test's server is shut down: at once, not after the loop's hour-long wait
        shut_in = time.monotonic() - started
    finally:
        server.server_close()
    assert idle <= 1, f"the /metrics thread woke {idle} times in 3 s with nothing to do"
    assert "pgflow_rows_scraped_total" in body and answered_in < 2
    assert shut_in < 2 and not thread.is_alive()


def test_two_collectors_cannot_share_a_ledger(tmp_path):
    from pgflow.errors import PgflowError
    from pgflow.stream.ledger import Ledger

    held = Ledger(tmp_path, "db1")
    probe = subprocess.run(
        [sys.executable, "-c", f"from pgflow.stream.ledger import Ledger; import sys; Ledger({str(tmp_path)!r}, 'db1')"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert probe.returncode != 0 and "in use by another pgflow process" in probe.stderr
    assert held.load() is None
    with pytest.raises(PgflowError):  # nor two ledgers of one instance in one process
        Ledger(tmp_path, "db1")
    Ledger(tmp_path, "db2")  # other instances are free


def test_acknowledgements_applied_again_after_a_lost_log_truncation_change_nothing(tmp_path):
    """The save truncates the ack log without syncing it (issue 20): should the truncation be
    lost in a crash, the old lines are applied again on load, to an outbox that already lacks
    those rows, while the acknowledgements that came after the save still apply."""
    import polars as pl

    from pgflow.stream.ledger import ROW, Ledger, Record

    ledger = Ledger(tmp_path, "db1")
    record = Record(
        None, {1: pl.DataFrame({"value": [1.0, 2.0, 3.0]}).with_row_index(ROW), 2: pl.DataFrame({"value": [4.0]}).with_row_index(ROW)}, 3
    )
    ledger.record_ack(1, [0])
    old_lines = (ledger.dir / "acks.log").read_text()
    ledger.save(record)  # row 0 of entry 1 leaves the saved outbox; the log restarts
    ledger.record_ack(1, [1])  # acknowledged after the save
    with open(ledger.dir / "acks.log", "a", encoding="ascii") as fh:
        fh.write(old_lines)  # the truncation lost: the old line is back
    ledger.close()
    loaded = Ledger(tmp_path, "db1").load()
    assert loaded is not None and sorted(loaded.outbox) == [1, 2]
    assert loaded.outbox[1]["value"].to_list() == [3.0] and loaded.outbox[2]["value"].to_list() == [4.0]


def test_a_ledger_of_an_older_state_format_keeps_its_unsent_points(tmp_path):
    """Operator state of another format starts a new baseline; queued points still go out."""
    import pickle

    import polars as pl

    from pgflow.stream.ledger import Ledger, Record

    outbox = {3: pl.DataFrame({"value": [1.0, 2.0]})}
    ledger = Ledger(tmp_path, "db1")
    with open(ledger.dir / "state.pkl", "wb") as fh:
        pickle.dump((Ledger.VERSION - 1, Record({"an": "old state"}, outbox, 4)), fh)  # type: ignore[arg-type]
    record = ledger.load()
    assert record is not None and record.state is None and record.next_seq == 4
    assert list(record.outbox) == [3] and record.outbox[3]["value"].to_list() == [1.0, 2.0]


def test_a_window_waiting_in_the_ledger_is_small_on_disk_and_read_back_whole(pg, tmp_path):
    """A closed window waits in the ledger until it is acknowledged, and the ledger is written at
    every window: its points are kept as compressed Arrow IPC, not pickled frames (issue 20: a
    window of ~4,900 points pickled was ~3.3 MB written and fsynced a minute, per instance). What
    is read back is the window as it was, attributes and timestamps included."""
    import pickle

    import polars as pl
    from polars.testing import assert_frame_equal

    from pgflow import ops
    from pgflow.scrape import Scraper
    from pgflow.stream.ledger import ROW, Ledger, Record

    pg.execute("DROP DATABASE IF EXISTS ledger_window", "CREATE DATABASE ledger_window")
    names = [f"t{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(40)]  # letters: a name with digits may share a fingerprint
    pg.execute(*[f"CREATE TABLE {name} (id int)" for name in names], dbname="ledger_window")
    with Scraper(pg.dsn(), instance="db1") as scraper:  # pg_stat_statements is server-wide
        snapshots = [scraper.scrape()]
        pg.execute(*[f"SELECT count(*) FROM {name}" for name in names], dbname="ledger_window")
        pg.pgbench("-n", "-t", "20")
        snapshots.append(scraper.scrape())
    window = ops.run(snapshots, export_interval_secs=0.001).with_row_index(ROW)
    queries = window.filter(pl.col("metric") == "postgresql.query.calls")
    assert queries.height >= 40, queries.height  # the forty statements (and pgbench's) are in it
    ledger = Ledger(tmp_path, "db1")
    ledger.save(Record(None, {7: window}, 8))
    ledger.close()
    on_disk = (ledger.dir / "state.pkl").stat().st_size
    loaded = Ledger(tmp_path, "db1").load()
    assert loaded is not None and list(loaded.outbox) == [7] and loaded.next_seq == 8
    assert_frame_equal(loaded.outbox[7], window)
    assert on_disk * 4 < len(pickle.dumps(window)), (on_disk, len(pickle.dumps(window)), window.height)
