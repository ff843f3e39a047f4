"""The README's first command: pgflow end to end on an embedded PostgreSQL, no account needed."""

from __future__ import annotations

import polars as pl

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


def _print_top(before, after) -> None:  # type: ignore[no-untyped-def]
    key = ["dbid", "userid", "queryid", "toplevel"]
    joined = after.statements.join(before.statements.select(*key, "calls", "total_exec_time"), on=key, how="left",
                                   suffix="_prev", nulls_equal=True)
    top = (
        joined.with_columns(
            calls=pl.col("calls") - pl.col("calls_prev").fill_null(0),
            total_ms=pl.col("total_exec_time") - pl.col("total_exec_time_prev").fill_null(0.0),
        )
        .filter(pl.col("calls") > 0)
        .sort("total_ms", descending=True)
        .head(8)
    )
    print("\ntop statements by execution time between the two scrapes:")
    for row in top.iter_rows(named=True):
        print(f"  {row['calls']:>7} calls {row['total_ms']:>10.1f} ms  {row['query'][:70]}")
