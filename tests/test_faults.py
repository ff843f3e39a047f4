"""Faults, each end to end: the real collector, the real server, the real receiver, pgbench truth.

Every test states what may be lost (usually nothing) and checks exactly that.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import psycopg
import pytest
from e2e import calls_by_summary, collector_env, settle, start_collector, wait_for_baseline

from pgflow.otlp.receiver import Receiver, parse_script

PGBENCH = (
    "UPDATE pgbench_branches",
    "UPDATE pgbench_tellers",
    "UPDATE pgbench_accounts",
    "SELECT pgbench_accounts",
    "INSERT pgbench_history",
)

pytestmark = pytest.mark.slow


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def pgbench_calls(points, instance=None) -> dict[str, float | None]:
    calls = calls_by_summary(points, instance)
    return {s: calls.get(s) for s in PGBENCH}


def exact(n: int) -> dict[str, int]:
    return {s: n for s in PGBENCH}


class Run:
    """A collector against ``server`` exporting to a receiver, as a context manager."""

    def __init__(self, server, tmp_path, script: str = "", protocol: str = "grpc", **env: str) -> None:
        self.server, self.tmp_path = server, tmp_path
        self.receiver = Receiver(script=parse_script(script))
        self.protocol, self.env = protocol, env
        self.log = tmp_path / "collector.log"

    def __enter__(self) -> Run:
        self.receiver.start()
        endpoint = self.receiver.grpc_endpoint if self.protocol == "grpc" else self.receiver.http_endpoint
        env = collector_env(self.server.dsn(), endpoint, self.tmp_path / "state", PGFLOW_OTLP_PROTOCOL=self.protocol, **self.env)
        self.proc = start_collector(env, log=self.log)
        wait_for_baseline(self.tmp_path / "state")
        return self

    def scraped_since(self, count: int = 2) -> None:
        """Wait until ``count`` more scrapes have been saved to the ledger."""
        state = next((self.tmp_path / "state").glob("instances/*/state.pkl"))
        for _ in range(count):
            before = state.stat().st_mtime_ns
            deadline = time.monotonic() + 30
            while state.stat().st_mtime_ns == before and time.monotonic() < deadline:
                time.sleep(0.05)

    def finish(self):  # type: ignore[no-untyped-def]
        settle(1.5, state_dir=self.tmp_path / "state")
        assert stop(self.proc) == 0
        return self.receiver.points()

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.receiver.stop()

    @property
    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def server_version(server) -> int:  # type: ignore[no-untyped-def]
    return int(server.execute("SHOW server_version_num")[0][0])


def test_whole_reset_during_the_run(fresh_stats, tmp_path):
    # 14+ report the reset (pg_stat_statements_info.stats_reset): any amounts are exact. 13
    # cannot: there a reset shows only as counters going down, so less work follows it.
    before, after = (125, 125) if server_version(fresh_stats) >= 140000 else (150, 100)
    with Run(fresh_stats, tmp_path) as run:
        fresh_stats.pgbench("-n", "-c", "4", "-t", str(before))
        run.scraped_since(2)  # everything before the reset has been seen
        fresh_stats.execute("SELECT pg_stat_statements_reset()")
        fresh_stats.pgbench("-n", "-c", "4", "-t", str(after))
        points = run.finish()
    assert pgbench_calls(points) == exact(1000)
    assert (points.filter(points["kind"] == "sum")["value"] >= 0).all()


def test_single_statement_reset_during_the_run(fresh_stats, tmp_path):
    with Run(fresh_stats, tmp_path) as run:
        fresh_stats.pgbench("-n", "-c", "4", "-t", "150")  # 600
        run.scraped_since(2)
        fresh_stats.execute(
            "SELECT pg_stat_statements_reset(0, 0, queryid) FROM pg_stat_statements WHERE query LIKE 'UPDATE pgbench_branches%'"
        )
        # Fewer calls after the reset than before it: before PostgreSQL 17 (no stats_since) a
        # re-created entry is recognised by its counters going down; see README, Guarantees.
        fresh_stats.pgbench("-n", "-c", "4", "-t", "100")  # 400
        points = run.finish()
    assert pgbench_calls(points) == exact(1000)


def test_deallocation_under_a_small_pg_stat_statements_max(pgbench_server, tmp_path):
    server = pgbench_server(settings={"pg_stat_statements.max": "100"})
    server.execute("CREATE TABLE churn (id int, v int)", "SELECT pg_stat_statements_reset()")

    def churn() -> None:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            for i in range(330):  # 330 shapes (target lists of 1 to 330 columns): distinct query ids on 13-18
                cols = ", ".join(f"v + {j} AS c{j}" for j in range(i + 1))
                conn.execute(f"SELECT {cols} FROM churn WHERE id = {i} AND v > {i % 11}")  # type: ignore[arg-type]
                conn.execute(f"SELECT count(*) FROM churn c{i} WHERE c{i}.id = 1")  # type: ignore[arg-type]

    with Run(server, tmp_path) as run:
        worker = threading.Thread(target=churn)
        worker.start()
        server.pgbench("-n", "-c", "4", "-t", "250")
        worker.join()
        points = run.finish()
    assert pgbench_calls(points) == exact(1000)
    deallocated = points.filter(points["metric"] == "postgresql.statements.deallocated")["value"].sum()
    if server_version(server) >= 140000:  # 13 has no pg_stat_statements_info.dealloc
        assert deallocated > 0
    assert (points.filter(points["kind"] == "sum")["value"] >= 0).all()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_mid_run(pgbench_server, tmp_path, mode):
    server = pgbench_server()
    with Run(server, tmp_path, PGFLOW_CONNECT_TIMEOUT_SECS="1") as run:
        server.pgbench("-n", "-c", "4", "-t", "125")
        run.scraped_since(2)  # what ran before the restart has been scraped: nothing is lost
        server.restart(mode)
        server.pgbench("-n", "-c", "4", "-t", "125")
        points = run.finish()
    assert pgbench_calls(points) == exact(1000)
    assert (points.filter(points["kind"] == "sum")["value"] >= 0).all()


def test_postgres_unreachable_for_several_intervals(pgbench_server, tmp_path):
    server = pgbench_server()
    with Run(server, tmp_path, PGFLOW_CONNECT_TIMEOUT_SECS="1") as run:
        server.pgbench("-n", "-c", "4", "-t", "125")
        run.scraped_since(2)
        server.stop("fast")
        time.sleep(2)  # about six intervals without a server
        server.start()
        server.pgbench("-n", "-c", "4", "-t", "125")
        points = run.finish()
        assert run.proc.returncode == 0
    assert pgbench_calls(points) == exact(1000)
    assert "scrape failed" in run.log_text


def test_endpoint_answers_503_and_429_with_retry_after(fresh_stats, tmp_path):
    script = ",".join(["503", "429:1", "503", "503", "429:1", "503", "503", "503"])
    with Run(fresh_stats, tmp_path, script=script, protocol="http") as run:
        fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
        settle(3)
        points = run.finish()
        outcomes = [o for _, o in run.receiver.attempts]
    assert outcomes[:8] == ["503", "429", "503", "503", "429", "503", "503", "503"]
    assert pgbench_calls(points) == exact(1000)


@pytest.mark.parametrize(
    "code, message", [("400", "rejected the payload as invalid (400)"), ("403", "rejected the license key (403): check NEW_RELIC_API_KEY")]
)
def test_endpoint_rejects_without_retry_storm(fresh_stats, tmp_path, code, message):
    with Run(fresh_stats, tmp_path, script=",".join([code] * 1000), protocol="http", PGFLOW_SHUTDOWN_TIMEOUT_SECS="2") as run:
        fresh_stats.pgbench("-n", "-c", "2", "-t", "50")
        settle(2, state_dir=tmp_path / "state")
        assert run.proc.poll() is None
        assert stop(run.proc) == 3  # the refused windows are kept, not reported as flushed
        attempts = len(run.receiver.attempts)
    # A refused entry waits refused_retry_secs (60) before its next try; a refused key (403)
    # pauses the whole endpoint: at most one request per window here, never a retry storm.
    assert 0 < attempts <= 15
    if code == "403":
        assert attempts == 1
    assert message in run.log_text and "flushed" not in run.log_text


def test_scrape_past_statement_timeout_is_covered_by_the_next(fresh_stats, tmp_path):
    with Run(fresh_stats, tmp_path, PGFLOW_STATEMENT_TIMEOUT_MS="200") as run:
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        with psycopg.connect(fresh_stats.dsn()) as holder:
            holder.execute("LOCK TABLE pg_database IN ACCESS EXCLUSIVE MODE")  # every scrape joins pg_database
            # Held until a scrape has run into it (not a fixed time: the headroom probe shares the
            # scrape's connection and, blocked by the same lock, can hold it for up to its 1 s lock_timeout).
            deadline = time.monotonic() + 30
            while "ran past statement_timeout (200 ms)" not in run.log_text and time.monotonic() < deadline:
                time.sleep(0.1)
            holder.rollback()
        fresh_stats.pgbench("-n", "-c", "4", "-t", "125")
        points = run.finish()
    assert "ran past statement_timeout (200 ms)" in run.log_text
    # The probe of the server's free connections is blocked too: if that held optional work back,
    # the log says the count could not be read, never that too few connections were free (90 are).
    assert "too few connections left free" not in run.log_text
    assert pgbench_calls(points) == exact(1000)
