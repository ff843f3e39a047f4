"""Load: N instances x M statements through the whole collector path in one process.

One real PostgreSQL holds M distinct statements; N Scrapers (one per "instance", as N
databases would be) scrape it each round, and every snapshot goes through the flow's own
per-instance step (operators, ledger, shipper, encoder) to a `pgflow receive` running in a
separate process. Windows are 1 s and a round is 1 s apart, so every round closes a window.

Reports CPU per scrape (this process: scrape client + operators + ledger + encode + send),
scrape-to-export lag (round start until every window of the round is acknowledged), and how
many instances one core serves at a 10 s interval. The peer, measured in the same run, is a
bare psycopg fetch of the same rows (`SELECT * FROM pg_stat_statements`): the least any
collector must do. Ends with: cpu_ms_per_scrape=<f> lag_s=<f> instances_per_core=<f> ratio_bare_fetch=<f>
Usage: python bench/load_bench.py [instances] [statements] [rounds]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import workload_shapes

from pgflow.config import Settings
from pgflow.pgserver import LocalPostgres, free_port
from pgflow.scrape import Scraper
from pgflow.stream.logic import CollectorLogic
from pgflow.stream.runtime import runtime


def make_statements(pg: LocalPostgres, n: int) -> None:
    """``n`` distinct statements in pg_stat_statements, on every version (bench/workload_shapes.py)."""
    workload_shapes.make_statements(pg.dsn(), n)


def main() -> None:
    instances = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    statements = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    work = Path(tempfile.mkdtemp(prefix="pgflow-load-"))
    with LocalPostgres(settings={"pg_stat_statements.max": str(statements + 1000)}) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements", "SELECT pg_stat_statements_reset()")
        make_statements(pg, statements)
        receiver = subprocess.Popen(
            [sys.executable, "-m", "pgflow", "receive", "--grpc-port", "0", "--http-port", "0"], stdout=subprocess.PIPE, text=True
        )
        http_port = int(re.findall(r"127\.0\.0\.1:(\d+)", receiver.stdout.readline())[1])  # type: ignore[union-attr]
        settings = Settings.load(
            database_url=pg.dsn(),
            otlp_endpoint=f"http://127.0.0.1:{http_port}",
            export_interval_secs=1,
            state_dir=work / "state",
            metrics_addr=f"127.0.0.1:{free_port()}",
        )
        rt = runtime(settings)
        scrapers = [Scraper(pg.dsn(), instance=f"db{i:02d}") for i in range(instances)]
        logics = [CollectorLogic(s.instance, rt.ops, rt.ledger(s.instance), rt.shipper, 30) for s in scrapers]

        bare_times = []
        with psycopg.connect(pg.dsn()) as conn:
            for _ in range(5):
                started = time.perf_counter()
                conn.execute("SELECT * FROM pg_stat_statements").fetchall()
                bare_times.append(time.perf_counter() - started)
        bare = min(bare_times)

        cpu_per_round, lags = [], []
        for n in range(rounds + 1):
            round_start = time.monotonic()
            cpu_start = time.process_time()
            for scraper, logic in zip(scrapers, logics):
                logic.on_item(scraper.scrape())
            while any(logic.record.outbox for logic in logics):  # every closed window acknowledged
                time.sleep(0.01)
                for logic in logics:
                    logic.on_notify()
            cpu = time.process_time() - cpu_start
            if n:  # the first round is the baseline: nothing to export yet
                cpu_per_round.append(cpu)
                lags.append(time.monotonic() - round_start)
            time.sleep(max(0.0, 1.05 - (time.monotonic() - round_start)))
        for logic in logics:
            logic.on_eof()
        rt.shipper.close()
        receiver.terminate()
        receiver.wait()
        rows = sum(s.stats.rows for s in scrapers) / max(1, sum(s.stats.scrapes for s in scrapers))

    cpu_ms = sorted(cpu_per_round)[len(cpu_per_round) // 2] / instances * 1000
    lag = sorted(lags)[len(lags) // 2]
    per_core = 10_000 / cpu_ms
    print(f"instances={instances} statements={statements} rows_per_scrape={rows:.0f} rounds={rounds} cpus={os.cpu_count()}")
    print(f"collector CPU per scrape (median round): {cpu_ms:8.2f} ms")
    print(f"bare fetch of the same rows            : {bare * 1000:8.2f} ms (wall, psycopg, same server)")
    print(f"scrape-to-export lag (median round)    : {lag:8.2f} s for all {instances} instances")
    print(f"cpu_ms_per_scrape={cpu_ms:.2f} lag_s={lag:.2f} instances_per_core={per_core:.0f} ratio_bare_fetch={cpu_ms / (bare * 1000):.2f}")


if __name__ == "__main__":
    main()
