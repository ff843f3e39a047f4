"""Operator-chain throughput against two peers, measured in the same run, on one core.

pgflow: delta + fingerprint (cache warm) + aggregate + window + cap + points over a
synthetic replay of SCRAPES scrapes x STATEMENTS statements.
Peers on the same rows:
- Datadog's StatementMetrics.compute_derivative_rows (datadog-checks-base), the derivative
  step alone of the most used Python collector;
- DuckDB computing the same deltas with a LAG window in SQL (one query over all rows, every
  delta column consumed so that none is pruned; no reset handling).

Ends with: rows_per_s=<float> ratio_datadog=<float> ratio_duckdb=<float>
(ratio = pgflow's throughput / the peer's). Usage: python bench/ops_bench.py [scrapes] [statements]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # one core, for every contender

from datetime import UTC, datetime, timedelta  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from pgflow.ops.fingerprint import Fingerprinter  # noqa: E402
from pgflow.ops.pipeline import OpsSettings, finish, initial_state, step  # noqa: E402
from pgflow.schema import STATEMENT_COUNTERS, STATEMENT_INT_COUNTERS, STATEMENTS, Snapshot, conform  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def synthetic(scrapes: int, statements: int, seed: int = 7) -> list[Snapshot]:
    """Cumulative snapshots: every statement runs a random number of times each interval."""
    rng = np.random.default_rng(seed)
    tables = [f"table_{i}" for i in range(max(1, statements // 25))]
    texts = [f"SELECT c{i % 7}, c{i % 11} FROM {tables[i % len(tables)]} WHERE id = $1 AND k{i} = $2" for i in range(statements)]
    base = pl.DataFrame(
        {
            "dbid": np.full(statements, 16384),
            "userid": (np.arange(statements) % 5) + 10,
            "queryid": rng.integers(-(2**62), 2**62, statements),
            "toplevel": np.ones(statements, bool),
            "database": ["app"] * statements,
            "user": [f"role{i % 5}" for i in range(statements)],
            "query": texts,
        }
    )
    cumulative = {c: np.zeros(statements) for c in STATEMENT_COUNTERS}
    out = []
    for n in range(scrapes):
        calls = rng.poisson(3, statements)
        for c in STATEMENT_COUNTERS:
            step_ = calls * (rng.random(statements) * 2 if c not in STATEMENT_INT_COUNTERS else rng.integers(0, 3, statements))
            cumulative[c] = cumulative[c] + (calls if c == "calls" else step_)
        frame = base.with_columns(
            *(pl.Series(c, cumulative[c]).cast(pl.Int64 if c in STATEMENT_INT_COUNTERS else pl.Float64) for c in STATEMENT_COUNTERS)
        )
        out.append(
            Snapshot(
                "bench:5432",
                T0 + timedelta(seconds=10 * n),
                170000,
                T0,
                0,
                conform(frame, STATEMENTS),
                server_address="bench",
                server_port=5432,
            )
        )
    return out


def bench_pgflow(snaps: list[Snapshot]) -> tuple[float, int]:
    settings = OpsSettings(export_interval_secs=60, max_queries_tracked=1000)
    fp = Fingerprinter()
    fp.apply("bench:5432", snaps[0].statements.select("dbid", "queryid", "query"))  # warm the cache
    state = initial_state(settings)
    points = 0
    start = time.perf_counter()
    for snap in snaps:
        state, out = step(state, snap, fp, settings)
        points += out.height
    state, out = finish(state, settings)
    points += out.height
    return time.perf_counter() - start, points


def bench_datadog(snaps: list[Snapshot]) -> float:
    from datadog_checks.base.utils.db.statement_metrics import StatementMetrics

    rows_per_scrape = [s.statements.to_dicts() for s in snaps]  # what a dict cursor hands the check
    sm = StatementMetrics()
    metrics = list(STATEMENT_COUNTERS)

    def key(row: dict) -> tuple:
        return (row["queryid"], row["dbid"], row["userid"], row["toplevel"])

    start = time.perf_counter()
    for rows in rows_per_scrape:
        sm.compute_derivative_rows(rows, metrics, key=key, execution_indicators=["calls"])
    return time.perf_counter() - start


def bench_duckdb(snaps: list[Snapshot]) -> float:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 1")
    allrows = pl.concat([s.statements.drop("query").with_columns(scrape=pl.lit(i)) for i, s in enumerate(snaps)])
    con.register("rows_view", allrows.to_arrow())
    con.execute("CREATE TABLE rows AS SELECT * FROM rows_view")
    deltas = ", ".join(f"{c} - lag({c}) OVER w AS {c}" for c in STATEMENT_COUNTERS)
    sql = (
        f"SELECT scrape, dbid, userid, queryid, toplevel, {deltas} FROM rows "
        "WINDOW w AS (PARTITION BY dbid, userid, queryid, toplevel ORDER BY scrape)"
    )
    # Sum every delta column: with only some of them used, DuckDB prunes the other LAGs and
    # computes a fraction of the deltas (EXPLAIN shows one projection for `sum(calls)` alone).
    every = ", ".join(f"sum({c})" for c in STATEMENT_COUNTERS)
    start = time.perf_counter()
    con.execute(f"SELECT count(*), {every} FROM ({sql})").fetchall()
    return time.perf_counter() - start


def main() -> None:
    scrapes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    statements = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    snaps = synthetic(scrapes, statements)
    rows = scrapes * statements
    t_pgflow, points = bench_pgflow(snaps)
    t_datadog = bench_datadog(snaps)
    t_duckdb = bench_duckdb(snaps)
    rps = rows / t_pgflow
    print(f"rows={rows} polars_threads={os.environ['POLARS_MAX_THREADS']}")
    print(f"pgflow full chain : {t_pgflow:8.3f} s  {rps:12,.0f} rows/s  ({points} points)")
    print(f"datadog derivative: {t_datadog:8.3f} s  {rows / t_datadog:12,.0f} rows/s")
    print(f"duckdb LAG delta  : {t_duckdb:8.3f} s  {rows / t_duckdb:12,.0f} rows/s")
    print(f"rows_per_s={rps:.0f} ratio_datadog={t_datadog / t_pgflow:.2f} ratio_duckdb={t_duckdb / t_pgflow:.2f}")


if __name__ == "__main__":
    main()
