"""The collector's life as a process, end to end (issue 14): a restart inside an export window,
refused exports kept, a bounded shutdown, SIGHUP, exit codes, a taken port, an unwritable state dir.

Real PostgreSQL, pgbench as ground truth, the real receiver (in-process or ``pgflow receive``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import duckdb
import polars as pl
import pytest
from e2e import ROOT, calls_by_summary, collector_env, settle, start_collector, wait_for_baseline

from pgflow.otlp.receiver import Receiver, parse_script
from pgflow.otlp.store import read_points
from pgflow.pgserver import free_port

PGBENCH = (
    "UPDATE pgbench_branches",
    "UPDATE pgbench_tellers",
    "UPDATE pgbench_accounts",
    "SELECT pgbench_accounts",
    "INSERT pgbench_history",
)

pytestmark = pytest.mark.slow


def stop(proc: subprocess.Popen, timeout: float = 90) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def pgbench_calls(points: pl.DataFrame) -> dict[str, float | None]:
    calls = calls_by_summary(points)
    return {s: calls.get(s) for s in PGBENCH}


def wait_for_log(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout} s")


def queued_windows(state_dir: Path) -> int:
    """Windows waiting in the (single) ledger under ``state_dir``, read as the next start would."""
    from pgflow.stream.ledger import Ledger

    (instance_dir,) = list((state_dir / "instances").iterdir())
    ledger = Ledger(state_dir, instance_dir.name)
    try:
        record = ledger.load()
        return len(record.outbox) if record else 0
    finally:
        ledger.close()


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused


# 4. A restart inside an export window ---------------------------------------------------------


def test_restart_inside_a_window_neither_overlaps_nor_duplicates(fresh_stats, tmp_path):
    """Points of one series never overlap and never end after they were received; a restart in
    the middle of a window neither loses nor repeats any of its work."""
    length = 4.0
    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_EXPORT_INTERVAL_SECS=str(length))
        first = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        settle(0, state_dir=tmp_path / "state", scrapes=2)  # the work is scraped, its window still open
        while not 0.3 < time.time() % length < 1.5:  # early in a window: the restart lands inside it
            time.sleep(0.02)
        assert stop(first) == 0
        second = start_collector(env, log=tmp_path / "log")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        settle(0, state_dir=tmp_path / "state", scrapes=3)
        assert stop(second) == 0
        points = receiver.points()
    assert pgbench_calls(points) == {s: 1000 for s in PGBENCH}
    assert (points["end"] <= points["received_at"]).all(), "a point ended after it was received"
    sums = points.filter(pl.col("kind") == "sum").sort("start")
    for (_, _, _), series in sums.group_by("metric", "attributes", "resource"):
        starts, ends = series["start"].to_list(), series["end"].to_list()
        assert all(s < e for s, e in zip(starts, ends))
        assert all(ends[i] <= starts[i + 1] for i in range(len(starts) - 1)), "intervals of a series overlap"
    assert "Traceback" not in (tmp_path / "log").read_text()


# 6. Refused exports ---------------------------------------------------------------------------------


def test_refused_windows_are_kept_and_sent_once_accepted(fresh_stats, tmp_path):
    """`pgflow receive --script 403,403,403,OK`: refused windows stay in the ledger and every count
    arrives once; the endpoint is paused between tries, never stormed; "flushed" only when true."""
    port, out = free_port(), tmp_path / "received.duckdb"
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgflow",
            "receive",
            "--out",
            str(out),
            "--grpc-port",
            str(port),
            "--http-port",
            "0",
            "--script",
            "403,403,403,OK",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "pgflow receive: grpc on" in receiver.stdout.readline()
        env = collector_env(
            fresh_stats.dsn(), f"http://127.0.0.1:{port}", tmp_path / "state", PGFLOW_REFUSED_RETRY_SECS="0.3", PGFLOW_OTLP_PROTOCOL="grpc"
        )
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        wait_for_log(tmp_path / "log", "endpoint refused the window; it stays in the ledger")
        settle(3, state_dir=tmp_path / "state")
        assert stop(proc) == 0
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=30)
    assert pgbench_calls(read_points(out)) == {s: 500 for s in PGBENCH}
    with duckdb.connect(str(out), read_only=True) as con:
        outcomes = [r[0] for r in con.sql("SELECT outcome FROM requests ORDER BY received_at").fetchall()]
    assert outcomes[:4] == ["PERMISSION_DENIED"] * 3 + ["OK"]
    log = (tmp_path / "log").read_text()
    assert "rejected the license key (PERMISSION_DENIED)" in log and "flushed" in log


def test_endpoint_refusing_until_shutdown_keeps_windows_and_exits_3(fresh_stats, tmp_path):
    with Receiver(script=parse_script(",".join(["403"] * 1000))) as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state", PGFLOW_SHUTDOWN_TIMEOUT_SECS="2")
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        fresh_stats.pgbench("-n", "-c", "2", "-t", "50")
        settle(2, state_dir=tmp_path / "state")
        assert stop(proc) == 3
        assert 0 < len(receiver.attempts) <= 3  # paused for refused_retry_secs (60) after the first refusal
    log = (tmp_path / "log").read_text()
    assert "flushed" not in log and "refused=http_403" in log
    assert queued_windows(tmp_path / "state") > 0


@pytest.mark.parametrize("command", [["run"], ["replay", "datasets/pgbench.duckdb"]])
def test_new_relic_without_an_api_key_refuses_to_start(tmp_path, command):
    env = collector_env("postgresql://mon@127.0.0.1:1/db", "unused", tmp_path / "state")
    del env["PGFLOW_OTLP_ENDPOINT"]
    env.pop("NEW_RELIC_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "pgflow", *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "NEW_RELIC_API_KEY is not set" in proc.stderr


# 13. Exit codes ----------------------------------------------------------------------------------------------


def test_run_scrapes_with_the_server_down_exits_4(tmp_path):
    env = collector_env(
        f"postgresql://mon@127.0.0.1:{free_port()}/db", dead_endpoint(), tmp_path / "state", PGFLOW_CONNECT_TIMEOUT_SECS="1"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow", "run", "--scrapes", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 4, proc.stderr
    assert "no successful scrape of this instance" in proc.stderr and "Traceback" not in proc.stderr


def test_run_scrapes_with_the_endpoint_down_exits_3_and_keeps_windows(fresh_stats, tmp_path):
    env = collector_env(fresh_stats.dsn(), dead_endpoint(), tmp_path / "state", PGFLOW_SHUTDOWN_TIMEOUT_SECS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow", "run", "--scrapes", "6"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 3, proc.stderr
    assert "stopping with windows not acknowledged" in proc.stderr and "flushed" not in proc.stderr
    assert queued_windows(tmp_path / "state") > 0


def test_replay_with_the_endpoint_down_exits_3_cleans_up_and_logs_alike(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = collector_env(None, dead_endpoint(), tmp_path / "state", PGFLOW_SHUTDOWN_TIMEOUT_SECS="2", TMPDIR=str(tmp))
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow", "replay", "datasets/pgbench.duckdb"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert list(tmp.iterdir()) == []  # no temporary ledger left behind
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("ts=") and " level=" in line for line in lines), lines[:5]
    assert "replay not delivered" in proc.stderr


# 14. SIGHUP -----------------------------------------------------------------------------------------------


def test_sighup_is_logged_and_ignored(fresh_stats, tmp_path):
    with Receiver() as receiver:
        proc = start_collector(collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state"), log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(tmp_path / "log", "SIGHUP ignored")
        fresh_stats.pgbench("-n", "-c", "2", "-t", "50")
        settle(1.5, state_dir=tmp_path / "state", scrapes=3)  # still scraping
        assert proc.poll() is None
        assert stop(proc) == 0
        assert pgbench_calls(receiver.points()) == {s: 100 for s in PGBENCH}
    log = (tmp_path / "log").read_text()
    assert sum("SIGHUP" in line for line in log.splitlines()) == 1 and "Traceback" not in log


# 15. A bounded shutdown ------------------------------------------------------------------------------


def test_shutdown_during_an_outage_is_bounded_and_keeps_windows(fresh_stats, tmp_path):
    """The endpoint accepts connections but never answers (export_timeout_secs 12); SIGTERM must end
    the process within shutdown_timeout_secs (3, plus the process's own start-up/tear-down margin),
    and the unsent windows arrive exactly once on the next start."""
    shutdown_timeout = 3.0
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel accepts; nobody answers
    state = tmp_path / "state"
    try:
        env = collector_env(
            fresh_stats.dsn(),
            f"http://127.0.0.1:{hole.getsockname()[1]}",
            state,
            PGFLOW_EXPORT_TIMEOUT_SECS="12",
            PGFLOW_SHUTDOWN_TIMEOUT_SECS=str(shutdown_timeout),
        )
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(state)
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        settle(1.5, state_dir=state, scrapes=3)
        started = time.monotonic()
        code = stop(proc)
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert elapsed < shutdown_timeout + 7, f"shutdown took {elapsed:.1f} s"
    assert code == 3
    assert queued_windows(state) > 0
    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, state)
        again = start_collector(env, log=tmp_path / "log")
        settle(1.5, state_dir=state, scrapes=3)
        assert stop(again) == 0
        assert pgbench_calls(receiver.points()) == {s: 500 for s in PGBENCH}


# 16. A taken metrics port, an unwritable state dir -------------------------------------------------------


def test_metrics_addr_in_use_exits_2(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        env = collector_env(
            f"postgresql://mon@127.0.0.1:{free_port()}/db",
            dead_endpoint(),
            tmp_path / "state",
            PGFLOW_METRICS_ADDR=f"127.0.0.1:{taken.getsockname()[1]}",
        )
        proc = subprocess.run(
            [sys.executable, "-m", "pgflow", "run", "--scrapes", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "PGFLOW_METRICS_ADDR" in proc.stderr


@pytest.mark.parametrize("given", [True, False])
def test_unwritable_state_dir_exits_2(tmp_path, given):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # works as root too, unlike permissions
    env = collector_env(f"postgresql://mon@127.0.0.1:{free_port()}/db", dead_endpoint(), blocker / "state")
    if not given:  # the default: $XDG_DATA_HOME/pgflow
        del env["PGFLOW_STATE_DIR"]
        env["XDG_DATA_HOME"] = str(blocker)
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow", "run", "--scrapes", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "PGFLOW_STATE_DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_a_window_closed_early_ends_at_its_last_scrape_and_the_next_continues_from_there():
    """The operators' half of the restart guarantee, without a server: ``finish`` then more scrapes
    of the same period (what a restart with the same ledger does) give contiguous points."""
    from datetime import datetime, timedelta

    from test_ops import snap

    from pgflow.ops.fingerprint import Fingerprinter
    from pgflow.ops.pipeline import OpsSettings, finish, initial_state, step

    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    ops = OpsSettings.of(export_interval_secs=60)
    fp = Fingerprinter(100, 100)
    state, frames = initial_state(ops), []
    for second, calls in [(1, 0), (10, 5), (20, 9)]:  # baseline, then two scrapes in [0, 60)
        state, out = step(state, snap(t0 + timedelta(seconds=second), [{"queryid": 1, "query": "SELECT 1", "calls": calls}]), fp, ops)
        frames.append(out)
    state, out = finish(state, ops)  # shutdown at 20 s
    frames.append(out)
    for second, calls in [(30, 12), (70, 20)]:  # restarted: the same period, then the next
        state, out = step(state, snap(t0 + timedelta(seconds=second), [{"queryid": 1, "query": "SELECT 1", "calls": calls}]), fp, ops)
        frames.append(out)
    calls = pl.concat([f for f in frames if f.height]).filter(pl.col("metric") == "postgresql.query.calls")
    s = timedelta(seconds=1)
    assert calls.select("start", "end", "value").rows() == [(t0, t0 + 20 * s, 9.0), (t0 + 20 * s, t0 + 60 * s, 3.0)]


@pytest.mark.parametrize("code, pauses_all", [("403", True), ("400", False)])
def test_a_refused_key_pauses_the_endpoint_a_refused_payload_only_its_window(tmp_path, code, pauses_all):
    """The shipper against the real receiver: after a 403 nothing is sent until the pause is over;
    after a 400 the other windows keep flowing. Neither is acknowledged (dropped) in the ledger."""
    from test_ops import _pipeline_snaps

    from pgflow import ops
    from pgflow.config import Settings
    from pgflow.otlp.exporter import Exporter
    from pgflow.stream.ledger import ROW, Ledger
    from pgflow.stream.shipper import Outgoing, Shipper

    points = ops.run(_pipeline_snaps(3), export_interval_secs=30).with_row_index(ROW)
    with Receiver(script=parse_script(code)) as receiver:
        settings = Settings.load(otlp_endpoint=receiver.http_endpoint, otlp_protocol="http", state_dir=tmp_path)
        shipper = Shipper(Exporter(settings), retry_after_secs=1, refused_retry_secs=60)
        ledger = Ledger(tmp_path, "db1")
        try:
            for seq in (0, 1):
                if shipper.retry_due("db1", seq):
                    shipper.submit(Outgoing("db1", seq, points), ledger)
                deadline = time.monotonic() + 10
                while shipper.busy("db1", seq) and time.monotonic() < deadline:
                    time.sleep(0.01)
            acked = ledger.take_acks()
        finally:
            shipper.close(deadline=time.monotonic() + 5)
            ledger.close()
        outcomes = [o for _, o in receiver.attempts]
    assert outcomes == ([code] if pauses_all else [code, "OK"])
    assert 0 not in acked  # the refused window is kept, not acknowledged
    assert (1 in acked) is not pauses_all
    assert not shipper.retry_due("db1", 0)  # its next try waits refused_retry_secs


def test_an_entry_acknowledged_while_the_operator_reads_its_outbox_is_not_sent_again(tmp_path):
    """The race behind a duplicate seen under load: the operator read its outbox (and took the
    acknowledgements, none yet), the shipper then sent the entry, recorded its acknowledgement and
    let go of it; the operator, still holding the stale frame, finds the entry not in flight and
    resubmits it. The receiver must get the window's points once."""
    from test_ops import _pipeline_snaps

    from pgflow import ops
    from pgflow.config import Settings
    from pgflow.otlp.exporter import Exporter
    from pgflow.stream.ledger import ROW, Ledger
    from pgflow.stream.shipper import Outgoing, Shipper

    points = ops.run(_pipeline_snaps(3), export_interval_secs=30).with_row_index(ROW)
    with Receiver() as receiver:
        settings = Settings.load(otlp_endpoint=receiver.http_endpoint, otlp_protocol="http", state_dir=tmp_path)
        shipper = Shipper(Exporter(settings), retry_after_secs=1, refused_retry_secs=60)
        ledger = Ledger(tmp_path, "db1")
        try:
            stale = Outgoing("db1", 0, points)
            shipper.submit(stale, ledger)
            deadline = time.monotonic() + 10
            while shipper.busy("db1", 0) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not shipper.busy("db1", 0)
            if shipper.retry_due("db1", 0):  # the operator's check, before it took the new acks
                shipper.submit(stale, ledger)
            time.sleep(0.5)
            acked = ledger.take_acks()
        finally:
            shipper.close(deadline=time.monotonic() + 5)
            ledger.close()
        received = receiver.points()
        attempts = list(receiver.attempts)
    assert [o for _, o in attempts] == ["OK"]
    assert received.height == points.height
    assert 0 in acked


def test_run_computes_on_one_polars_thread_without_thread_caches_unless_told_otherwise(fresh_stats, tmp_path):
    """Issue 20: the collector's frames are small; polars' pool of one thread per core cost CPU
    and memory for nothing, and so did its allocator's per-thread caches. `pgflow run` sets
    POLARS_MAX_THREADS=1 and jemalloc's tcache off, unless the user chose them. (jemalloc itself
    says what it runs with: ``stats_print`` at exit.)"""

    def polars_threads(pid: int) -> int:
        names = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                names.append((task / "comm").read_text().strip())
            except FileNotFoundError:
                continue
        return sum(1 for n in names if n.startswith("polars-") and n.removeprefix("polars-").isdigit())

    with Receiver() as receiver:
        for given, expected, conf, tcache in ((None, 1, "stats_print:true", "false"), ("3", 3, "stats_print:true,tcache:true", "true")):
            state, log = tmp_path / f"state-{given}", tmp_path / f"log-{given}"
            env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, state, _RJEM_MALLOC_CONF=conf)
            env.pop("POLARS_MAX_THREADS", None)
            if given:
                env["POLARS_MAX_THREADS"] = given
            proc = start_collector(env, log=log)
            try:
                wait_for_baseline(state)
                assert polars_threads(proc.pid) == expected
            finally:
                assert stop(proc) == 0
            assert f"opt.tcache: {tcache}" in log.read_text(errors="replace")
