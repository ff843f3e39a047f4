"""The README's first command: pgflow end to end on an embedded PostgreSQL, no account needed."""

from __future__ import annotations

import polars as pl

from pgflow import ops
from pgflow.schema import Snapshot

from pgflow.config import InstanceConfig
from pgflow.pgserver import LocalPostgres
from pgflow.scrape import Scraper
from pgflow.scrape.diagnose import check


def run_demo(bindir: str | None = None, clients: int = 4, transactions: int = 250) -> int:
    """Start PostgreSQL, run pgbench between two scrapes and print what changed."""
    print("starting an embedded PostgreSQL with pg_stat_statements ...", flush=True)
    with LocalPostgres(bindir) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        pg.pgbench_init()
        report = check(InstanceConfig(name="demo", database_url=pg.dsn()))
        print(report.render(), flush=True)
        with Scraper(pg.dsn(), instance="demo") as scraper:
            before = scraper.scrape()
            print(f"running pgbench -c {clients} -t {transactions} ...", flush=True)
            pg.pgbench("-n", "-c", str(clients), "-t", str(transactions))
            after = scraper.scrape()
        _print_top(before, after)
    return 0 if report.usable else 1


def _print_top(before: Snapshot, after: Snapshot) -> None:
    points = ops.run([before, after])
    by_series = (
        points.filter(pl.col("metric").is_in(["postgresql.query.calls", "postgresql.query.duration"]))
        .with_columns(pl.col("attributes").struct.field("db.query.summary").alias("summary"),
                      pl.col("attributes").struct.field("postgresql.query.fingerprint").alias("fingerprint"))
        .pivot(on="metric", index=["fingerprint", "summary"], values="value", aggregate_function="sum")
        .sort("postgresql.query.duration", descending=True)
        .head(8)
    )
    print("\ntop queries by execution time between the two scrapes (as pgflow would export them):")
    for row in by_series.iter_rows(named=True):
        print(f"  {row['postgresql.query.calls']:>7.0f} calls {row['postgresql.query.duration']:>8.3f} s  "
              f"{row['summary']}")
