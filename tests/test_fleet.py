"""Many instances over a bytewax cluster (issue 20): an even split, every window once, exact totals.

Twelve instances are twelve databases of one real server (each reads the server's whole
pg_stat_statements, as a fleet of servers would); two `python -m bytewax.run` processes form
a cluster. Ground truth is pgbench's transaction count, the split is read from what each
process holds (its ledgers), scrapes (its /metrics) and says (its log).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from conftest import PGBENCH_STATEMENTS
from e2e import ROOT, calls_by_summary, collector_env, settle, write_config

from pgflow.otlp.receiver import Receiver
from pgflow.pgserver import free_port
from pgflow.stream.routing import placement, routing_key, worker_of
from pgflow.stream.runtime import TIMER_SLACK_NS

pytestmark = pytest.mark.slow

# Left to bytewax's hash, these names split 8/4 over two workers (see test_routing_key_balances_names_a_hash_would_not).
NAMES = [f"db{i}" for i in range(12)]


def test_routing_key_balances_names_a_hash_would_not():
    assert sorted(worker_of(n, 2) for n in NAMES).count(0) == 4  # the uneven split the keys correct
    for workers in (1, 2, 3, 4):
        where = placement(NAMES, workers)
        counts = [list(where.values()).count(w) for w in range(workers)]
        assert max(counts) - min(counts) <= 1
        for name, worker in where.items():
            key = routing_key(name, worker, workers)
            assert worker_of(key, workers) == worker and key.split("#")[0] == name


def test_placement_is_even_and_moves_few_instances_when_one_is_added():
    fleet = [f"server-{i:03d}" for i in range(200)]
    for workers in (2, 3, 4):
        before = placement(fleet, workers)
        counts = [list(before.values()).count(w) for w in range(workers)]
        assert max(counts) - min(counts) <= 1
        after = placement([*fleet, "server-new"], workers)
        assert sum(before[n] != after[n] for n in fleet) <= 3  # not a reshuffle: the others keep their ledgers


def scraped_instances(metrics_addr: str) -> set[str]:
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    return set(re.findall(r'^pgflow_last_successful_scrape_timestamp_seconds\{instance="([^"]+)"\}', text, re.M))


def thread_slacks(pid: int) -> dict[int, int]:
    """Each thread's timer slack (ns), read from /proc."""
    return {int(t.name): int(Path(f"/proc/{t.name}/timerslack_ns").read_text()) for t in Path(f"/proc/{pid}/task").iterdir()}


def wait_for_ledgers(tmp_path: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list(tmp_path.glob("state*/instances/*/state.pkl"))) < n:
        assert time.monotonic() < deadline, "not every instance recorded its baseline"
        time.sleep(0.05)


def test_a_fleets_first_table_rounds_are_spread_over_the_table_interval():
    """Issue 20: 200 instances reading their tables at start put every table row in the first
    export window (the heaviest points on the operators' thread: that window left late)."""
    from datetime import timedelta

    from pgflow.config import Settings
    from pgflow.stream.source import table_start

    settings = Settings.load(table_stats_interval_secs=300)
    starts = [table_start(settings, i, 200) for i in range(200)]
    assert starts[0] == timedelta(0)  # one instance (or the first) reads its tables at once
    assert all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < timedelta(seconds=300)
    per_minute = [sum(1 for s in starts if m * 60 <= s.total_seconds() < (m + 1) * 60) for m in range(5)]
    assert per_minute == [40] * 5  # each export window of the first interval takes a fifth


def test_two_process_cluster_splits_instances_evenly_and_exports_each_window_once(pgbench_server, tmp_path):
    server = pgbench_server()
    server.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname="template1")
    for name in NAMES:
        server.execute(f"CREATE DATABASE {name}")
    server.execute("SELECT pg_stat_statements_reset()")
    config = write_config(tmp_path / "c.json", instances=[{"name": n, "database_url": server.dsn(n)} for n in NAMES])
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    with Receiver() as receiver:
        procs, metrics = [], []
        for i in range(2):
            env = collector_env(None, receiver.http_endpoint, tmp_path / f"state{i}", PGFLOW_CONFIG=str(config))
            metrics.append(env["PGFLOW_METRICS_ADDR"])
            args = [sys.executable, "-m", "bytewax.run", "flows.collector:flow", "-i", str(i), "-a", addresses]
            procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(tmp_path / f"log{i}", "wb"), stderr=subprocess.STDOUT))
        try:
            wait_for_ledgers(tmp_path, len(NAMES))
            slack = [thread_slacks(p.pid) for p in procs]
            server.pgbench("-n", "-c", "2", "-t", "150")
            for i in range(2):
                settle(0, state_dir=tmp_path / f"state{i}", scrapes=4)
            scraped = [scraped_instances(addr) for addr in metrics]
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0]
        points = receiver.points()

    # an idle flow sleeps: the flow's thread and the threads it started (bytewax's worker, the
    # scrape, table and sampler threads) may end their 1 ms waits up to TIMER_SLACK_NS late
    for pid, slacks in zip((p.pid for p in procs), slack, strict=True):
        assert slacks[pid] == TIMER_SLACK_NS and sum(s == TIMER_SLACK_NS for s in slacks.values()) >= 3, slacks

    # the split: each process holds (ledgers) and scrapes (/metrics) the same half of the instances
    held = [{p.name for p in (tmp_path / f"state{i}" / "instances").iterdir()} for i in range(2)]
    assert held[0] | held[1] == set(NAMES) and not held[0] & held[1]
    assert sorted(len(h) for h in held) == [6, 6]
    assert scraped == held  # no snapshot left the process that scraped it
    for i in range(2):
        assert "instances on this worker" in (log := (tmp_path / f"log{i}").read_text()) and "instances=6" in log, log[-2000:]
        assert "Traceback" not in log

    # every instance: the whole workload, exactly; each series once per window, windows never overlapping
    for name in NAMES:
        assert {s: calls_by_summary(points, instance=name).get(s) for s in PGBENCH_STATEMENTS} == dict.fromkeys(
            PGBENCH_STATEMENTS, 300.0
        ), name
    calls = points.filter(pl.col("metric") == "postgresql.query.calls").with_columns(
        instance=pl.col("resource").str.json_path_match("$['postgresql.instance.name']")
    )
    assert set(calls["instance"]) == set(NAMES)
    assert calls.group_by("instance", "attributes", "start").len()["len"].max() == 1
    ordered = calls.sort("instance", "attributes", "start")
    overlap = ordered.with_columns(prev_end=pl.col("end").shift(1).over("instance", "attributes")).filter(
        pl.col("prev_end").is_not_null() & (pl.col("start") < pl.col("prev_end"))
    )
    assert overlap.height == 0
