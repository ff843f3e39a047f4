"""Issue 20: every instance's sampler shares one thread, and a hung server cannot take the others' samples.

Ground truth from the workload: sessions in ``pg_sleep`` timed by the client on a healthy
server, while another server of the same collector is frozen (SIGSTOP of its postmaster and
every backend: it accepts connections in the kernel and never answers, as a hung host does).
Before the shared thread had its round-trip deadlines and its side lane, one frozen server
stalled every instance's sampling (a sample waiting for ever, then reconnects hanging for
``connect_timeout_secs`` each tick).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.request
from pathlib import Path

import polars as pl
from e2e import timed_sleep, wait_until

from pgflow.scrape.sampler import Sampler
from pgflow.scrape.sampler_loop import THREAD_NAME, sampler_loop

PERIOD = 0.25
SLEEP_SECS = 4
SESSIONS = 2


def _server_pids(datadir: Path) -> list[int]:
    """The postmaster and every process it started (backends, background workers)."""
    postmaster = int((datadir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(entry))
    return pids


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _samples(metrics_addr: str, instance: str, outcome: str) -> float:
    """``pgflow_activity_samples_total`` for ``instance`` from the collector's /metrics."""
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
    found = re.search(rf'pgflow_activity_samples_total{{instance="{instance}",outcome="{outcome}"}} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_hung_server_does_not_cost_the_other_instances_their_sampled_seconds(pg_factory, tmp_path):
    """The real collector with two instances (two servers) to the real receiver: one server frozen
    mid-run; the other's pg_sleep sessions are exported at their client-timed seconds."""
    from e2e import collector_env, settle, start_collector, wait_for_baseline

    from pgflow.otlp.receiver import Receiver

    healthy, hung = pg_factory(), pg_factory()
    for server in (healthy, hung):
        server.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    instances = [{"name": "healthy", "database_url": healthy.dsn()}, {"name": "hung", "database_url": hung.dsn()}]
    slept: list[float] = []
    frozen: list[int] = []
    with Receiver() as rx:
        state = tmp_path / "state"
        env = collector_env(
            None,
            rx.http_endpoint,
            state,
            PGFLOW_INSTANCES=json.dumps(instances),
            PGFLOW_EXPORT_INTERVAL_SECS="2",
            PGFLOW_COLLECTION_INTERVAL_SECS="0.5",
            PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS=str(PERIOD),
            PGFLOW_CONNECT_TIMEOUT_SECS="2",
            PGFLOW_TABLE_STATS_ENABLED="false",
        )
        addr = env["PGFLOW_METRICS_ADDR"]
        proc = start_collector(env, log=tmp_path / "collector.log")
        try:
            wait_for_baseline(state, instances=2)
            wait_until(lambda: _samples(addr, "hung", "taken") >= 2, "the second server's first samples")
            frozen = _server_pids(hung.datadir)
            _signal_all(frozen, signal.SIGSTOP)
            wait_until(lambda: _samples(addr, "hung", "failed") >= 1, "the frozen server's sample to fail")
            failed_before = _samples(addr, "healthy", "failed")
            threads = [timed_sleep(healthy.dsn(), SLEEP_SECS, slept) for _ in range(SESSIONS)]
            for t in threads:
                t.join()
            hung_failed = _samples(addr, "hung", "failed")
            assert _samples(addr, "healthy", "failed") == failed_before  # the healthy server never failed
            hung_taken = _samples(addr, "hung", "taken")
            _signal_all(frozen, signal.SIGCONT)
            frozen = []
            wait_until(lambda: _samples(addr, "hung", "taken") > hung_taken, "the thawed server to be sampled again")
            settle(4.5, state_dir=state, scrapes=6, instance="healthy")
        finally:
            _signal_all(frozen, signal.SIGCONT)
            proc.terminate()
            assert proc.wait(timeout=60) == 0
        points = rx.points()
    assert hung_failed >= 1  # the outage was real and counted ...
    activity = points.filter(pl.col("metric") == "postgresql.activity.time").with_columns(
        instance=pl.col("resource").str.json_path_match("$['postgresql.instance.name']"),
        wait=pl.col("attributes").str.json_path_match("$['postgresql.wait_event.name']"),
    )
    sleeping = activity.filter((pl.col("instance") == "healthy") & (pl.col("wait") == "PgSleep"))
    truth = sum(slept)
    # ... and the healthy server's sessions lost nothing to it: ± 2 periods per session
    assert abs(sleeping["value"].sum() - truth) <= SESSIONS * 2 * PERIOD, (sleeping, truth)


def test_every_started_sampler_of_the_process_shares_one_thread(pg):
    """Five instances (five samplers of one server): one sampling thread, gone once they stop."""
    samplers = [Sampler(pg.dsn(), instance=f"loop-{i}", interval_secs=0.2) for i in range(5)]
    try:
        for s in samplers:
            s.start()
        wait_until(lambda: all(s.stats.taken >= 3 for s in samplers), "three samples each", timeout=30)
        names = [t.name for t in threading.enumerate()]
        assert names.count(THREAD_NAME) == 1, names
        assert not [n for n in names if n.startswith("sampler-")], names  # no thread per instance
    finally:
        for s in samplers:
            s.stop()
    wait_until(lambda: sampler_loop().threads() == 0, "the sampling thread to end")
    assert all(s._conn is None for s in samplers)  # their connections are closed


def test_a_frozen_server_costs_the_shared_thread_one_deadline_then_is_sampled_aside(pg_factory):
    """In-process, two samplers: the healthy one's pg_sleep seconds are whole while the other
    server is frozen (its sample times out on the client, its reconnects hang aside)."""
    healthy_server, frozen_server = pg_factory(), pg_factory()
    healthy = Sampler(healthy_server.dsn(), instance="loop-healthy", interval_secs=PERIOD, statement_timeout_ms=200)
    frozen = Sampler(frozen_server.dsn(), instance="loop-frozen", interval_secs=PERIOD, statement_timeout_ms=200, connect_timeout_secs=2)
    pids: list[int] = []
    slept: list[float] = []
    try:
        healthy.start(), frozen.start()
        wait_until(lambda: healthy.stats.taken >= 2 and frozen.stats.taken >= 2, "both sampled")
        pids = _server_pids(frozen_server.datadir)
        _signal_all(pids, signal.SIGSTOP)
        wait_until(lambda: frozen.stats.failed >= 1, "the frozen sample to time out")
        assert "no answer from the server within 0.7 s" in frozen.stats.last_error
        healthy.drain()
        failed_before = healthy.stats.failed
        for t in [timed_sleep(healthy_server.dsn(), SLEEP_SECS, slept) for _ in range(SESSIONS)]:
            t.join()
        samples, _ = healthy.drain()
        assert frozen.stats.failed >= 2  # still frozen throughout: reconnects failing aside
    finally:
        _signal_all(pids, signal.SIGCONT)
        healthy.stop(), frozen.stop()
    assert healthy.stats.failed == failed_before
    seen = samples.filter(pl.col("wait_event") == "PgSleep")["count"].sum() * PERIOD
    assert abs(seen - sum(slept)) <= SESSIONS * 2 * PERIOD, (seen, slept)
