"""Many instances in one process (issue 20): is every instance's every window exported on time?

A few real PostgreSQL servers (``servers``), each with ``instances / servers`` databases and
about ``statements`` distinct statements in pg_stat_statements (fleet_bench's shapes), and a
light workload on each (so that deltas are not zero). One ``pgflow run`` (a subprocess, every
default interval: statements every 30 s, export windows of 60 s) watches every database as an
instance (each reads its server's whole pg_stat_statements: the work of as many servers), and
exports to a ``pgflow receive`` in its own process, storing into DuckDB.

For every instance and every export window that ends within the measured period: the lag
(when the window's last point reached the receiver, ``received_at``, minus the window's end:
the freshness a dashboard shows), and whether it was late (lag >= the collection interval) or
missing; and the scrape-to-export lag (the same arrival minus the due time of the scrape that
closes the window: its end plus the instance's slot, 1 to 15 s at the defaults; a scrape that
started late counts against it);
each window's median and longest lag on a line of its own (the first windows after a start
carry the start's work: every instance's first fingerprints and plans).
Over the measured period: the collector's CPU (all threads, /proc) and its resident memory at
the end, and the host's load average.

One deviation from the defaults: ``PGFLOW_TABLE_STATS_DATABASES=postgres``, so each instance
reads one database's tables (as one server of a fleet would), not every database of the
bench's shared servers.

Last line: instances=<n> lag_p50_s=<f> lag_max_s=<f> late_windows=<n> missing_windows=<n>
cpu_pct=<f> rss_mb=<f> instances_per_core=<f> scrape_lag_p50_s=<f> scrape_lag_max_s=<f>
scrape_late_windows=<n>   (instances_per_core = instances / (cpu_pct / 100))

Usage: python bench/many_bench.py [instances=20] [servers=2] [duration_secs=180] [warmup_secs=45] [statements=2000]
PGFLOW_BENCH_PG_BINDIR picks the PostgreSQL binaries; PGFLOW_BENCH_WORKERS=N runs ``pgflow run --workers N``
(bytewax worker threads in the one process; default 1); PGFLOW_BENCH_PROCESSES=N runs a bytewax cluster
of N processes instead (``python -m bytewax.run flows.collector:flow -i k -a ...``, each with its own
state directory): CPU and RSS are then the sum over the processes, and the line before the last
says how many instances each process took. Run it under ``nice -n 5`` on a shared machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
from fleet_bench import cpu_secs, make_statements, rss_mb
from workload_shapes import statement

from pgflow.config import Settings
from pgflow.otlp.store import read_points
from pgflow.pgserver import LocalPostgres, free_port
from pgflow.stream.source import slot_of

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = Settings.model_fields["collection_interval_secs"].default
EXPORT = Settings.model_fields["export_interval_secs"].default


def workload(dsns: list[str], stop: threading.Event) -> None:
    """A light load on each server: a few of its statements, twenty times a second."""
    conns = [psycopg.connect(dsn, autocommit=True, application_name="many-bench") for dsn in dsns]
    i = 0
    while not stop.wait(0.05):
        for conn in conns:
            conn.execute(statement(i % 50, literal=i))  # type: ignore[arg-type]
        i += 1
    for conn in conns:
        conn.close()


def start_server(stack: ExitStack, bindir: str | None, databases: list[str], statements: int) -> LocalPostgres:
    settings = {"pg_stat_statements.max": str(statements + 1000), "max_connections": str(4 * len(databases) + 50)}
    pg = stack.enter_context(LocalPostgres(bindir, settings=settings))
    pg.execute("CREATE EXTENSION pg_stat_statements", dbname="template1")
    pg.execute("CREATE EXTENSION pg_stat_statements")
    for name in databases:
        pg.execute(f"CREATE DATABASE {name}")
    make_statements(pg, statements)
    return pg


def slots(names: list[str]) -> dict[str, float]:
    """Each instance's slot (seconds after each grid point): a window's closing scrape is due at
    its end plus the slot (pgflow.stream.source.slot_of, instances ranked by name)."""
    interval = timedelta(seconds=COLLECTION)
    return {n: slot_of(interval, i, len(names))[0].total_seconds() for i, n in enumerate(sorted(names))}


def window_lags(points: pl.DataFrame, names: list[str], first_end: datetime, last_end: datetime) -> tuple[pl.DataFrame, int]:
    """One row per (instance, window ending in [first_end, last_end]) received, with its lag (from
    the window's end) and its scrape lag (from its closing scrape's due time); and the missing count."""
    got = (
        points.with_columns(instance=pl.col("resource").str.json_path_match("$['postgresql.instance.name']"))
        .filter(pl.col("metric") == "postgresql.query.calls", pl.col("end").is_between(first_end, last_end))
        .group_by("instance", "end")
        .agg(arrived=pl.col("received_at").max())
        .with_columns(lag=(pl.col("arrived") - pl.col("end")).dt.total_microseconds() / 1e6)
        .with_columns(scrape_lag=pl.col("lag") - pl.col("instance").replace_strict(slots(names), return_dtype=pl.Float64))
    )
    ends = int((last_end - first_end) / timedelta(seconds=EXPORT)) + 1
    return got, len(names) * ends - got.height


def start_collectors(env: dict[str, str], work: Path) -> list[subprocess.Popen]:
    """``pgflow run`` (one process), or a bytewax cluster of PGFLOW_BENCH_PROCESSES processes."""
    processes = int(os.environ.get("PGFLOW_BENCH_PROCESSES") or 1)
    if processes == 1:
        workers = ["--workers", os.environ["PGFLOW_BENCH_WORKERS"]] if os.environ.get("PGFLOW_BENCH_WORKERS") else []
        log = open(work / "collector-0.log", "ab")
        return [
            subprocess.Popen([sys.executable, "-m", "pgflow", "run", *workers], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        ]
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    procs = []
    for k in range(processes):
        own = env | {"PGFLOW_STATE_DIR": f"{env['PGFLOW_STATE_DIR']}-{k}", "PGFLOW_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
        log = open(work / f"collector-{k}.log", "ab")
        command = [sys.executable, "-m", "bytewax.run", "flows.collector:flow", "-i", str(k), "-a", addresses]
        procs.append(subprocess.Popen(command, env=own, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    instances, servers, duration, warmup, statements = (args + [20, 2, 180, 45, 2000][len(args) :])[:5]
    work = Path(tempfile.mkdtemp(prefix="pgflow-many-"))
    bindir = os.environ.get("PGFLOW_BENCH_PG_BINDIR") or None
    names = [f"i{i:03d}" for i in range(instances)]
    stop = threading.Event()
    with ExitStack() as stack:
        started = time.monotonic()
        pgs = [start_server(stack, bindir, names[s::servers], statements) for s in range(servers)]
        dsn_of = {name: pgs[i % servers].dsn(name) for i, name in enumerate(names)}
        print(
            f"{servers} servers, {instances} databases, {statements} statements each: ready in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        load = threading.Thread(target=workload, args=([pg.dsn() for pg in pgs], stop), daemon=True)
        load.start()
        out = work / "received.duckdb"
        receiver = subprocess.Popen(
            [sys.executable, "-m", "pgflow", "receive", "--grpc-port", "0", "--http-port", "0", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        http_port = int(re.findall(r"127\.0\.0\.1:(\d+)", receiver.stdout.readline())[1])  # type: ignore[union-attr]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGFLOW_", "OTEL_"))}
        env.pop("DATABASE_URL", None)
        env |= {
            "PGFLOW_INSTANCES": json.dumps([{"name": n, "database_url": dsn_of[n]} for n in names]),
            "PGFLOW_OTLP_ENDPOINT": f"http://127.0.0.1:{http_port}",
            "PGFLOW_STATE_DIR": str(work / "state"),
            "PGFLOW_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            "PGFLOW_TABLE_STATS_DATABASES": json.dumps(["postgres"]),
            "PYTHONPATH": str(ROOT),
        }
        procs = start_collectors(env, work)
        try:
            time.sleep(warmup)
            for proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(f"pgflow run exited ({proc.returncode}): see {work}")
            t0 = datetime.now(UTC)
            cpu0, r0, m0 = sum(cpu_secs(p.pid) for p in procs), cpu_secs(receiver.pid), time.monotonic()
            time.sleep(duration)
            cpu1, r1, m1 = sum(cpu_secs(p.pid) for p in procs), cpu_secs(receiver.pid), time.monotonic()
            t1 = datetime.now(UTC)
            rss, load_avg = sum(rss_mb(p.pid) for p in procs), os.getloadavg()
            time.sleep(COLLECTION + 5)  # the windows ending before t1 have their interval to arrive
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            stop.set()
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(timeout=60)
    export = timedelta(seconds=EXPORT)
    first_end = datetime.fromtimestamp(-(-t0.timestamp() // EXPORT) * EXPORT, UTC)  # the first window end at or after t0
    last_end = first_end + ((t1 - first_end) // export) * export
    got, missing = window_lags(read_points(out), names, first_end, last_end)
    cpu = 100 * (cpu1 - cpu0) / (m1 - m0)
    lags = got["lag"]
    late = int((lags >= COLLECTION).sum())
    scrape_lags = got["scrape_lag"]
    print(
        f"windows ending {first_end:%H:%M:%S}..{last_end:%H:%M:%S}: {got.height} received; "
        f"lag p90 {lags.quantile(0.9):.2f} s; receiver cpu {100 * (r1 - r0) / (m1 - m0):.1f}%; "
        f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}; logs in {work}",
        flush=True,
    )
    for row in (
        got.group_by("end")
        .agg(
            pl.len().alias("n"),
            pl.col("lag").median().alias("p50"),
            pl.col("lag").max().alias("max"),
            pl.col("scrape_lag").median().alias("s50"),
            pl.col("scrape_lag").max().alias("smax"),
        )
        .sort("end")
        .iter_rows()
    ):
        print(
            f"  window ending {row[0]:%H:%M:%S}: {row[1]} instances, lag p50 {row[2]:.2f} s, max {row[3]:.2f} s; "
            f"scrape lag p50 {row[4]:.2f} s, max {row[5]:.2f} s",
            flush=True,
        )
    if len(procs) > 1:
        split = [
            re.findall(r"instances on this worker.*?instances=(\d+)", (work / f"collector-{k}.log").read_text()) for k in range(len(procs))
        ]
        print(f"processes={len(procs)} instances_per_process={','.join(found[0] if found else '?' for found in split)}")
    print(
        f"instances={instances} lag_p50_s={lags.median():.2f} lag_max_s={lags.max():.2f} late_windows={late} "
        f"missing_windows={missing} cpu_pct={cpu:.2f} rss_mb={rss:.1f} instances_per_core={instances / (cpu / 100):.0f} "
        f"scrape_lag_p50_s={scrape_lags.median():.2f} scrape_lag_max_s={scrape_lags.max():.2f} "
        f"scrape_late_windows={int((scrape_lags >= COLLECTION).sum())}"
    )


if __name__ == "__main__":
    main()
