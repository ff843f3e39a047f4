"""Cardinality churn: 1,000,000 distinct fingerprints over time with a cap of 1,000; memory stays flat.

Synthetic snapshots of STATEMENTS entries each; every scrape replaces CHURN of them with
statements never seen before (new queryid, new table name, so a new fingerprint), the way a
workload of generated SQL churns through pg_stat_statements. Everything runs through the
operators (delta, fingerprint, window, cap, points). Prints resident memory every tenth of the
run (100,000 new fingerprints by default), and the peer in the same run: the same replay with an unbounded
fingerprint cache and no cap (what memory does without the bounds).
Ends with: rss_growth_mb=<f> rss_growth_unbounded_mb=<f> ratio=<f>
Usage: python bench/churn_bench.py [total_fingerprints] [statements] [churn_per_scrape]
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta

os.environ.setdefault("POLARS_MAX_THREADS", "1")

import polars as pl  # noqa: E402
import psutil  # noqa: E402

from pgflow.ops.fingerprint import Fingerprinter  # noqa: E402
from pgflow.ops.pipeline import OpsSettings, finish, initial_state, step  # noqa: E402
from pgflow.schema import STATEMENTS, Snapshot, conform  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snapshots(total: int, statements: int, churn: int):  # type: ignore[no-untyped-def]
    live = list(range(statements))  # ids of the statements currently in pg_stat_statements
    next_id = statements
    calls = {i: 0 for i in live}
    n = 0
    seen = statements
    while seen < total:
        for _ in range(min(churn, total - seen)):
            victim = live.pop(0)
            calls.pop(victim)
            live.append(next_id)
            calls[next_id] = 0
            next_id += 1
            seen += 1
        for i in live:
            calls[i] += 1 + i % 3
        frame = pl.DataFrame(
            {
                "dbid": [1] * len(live),
                "userid": [10] * len(live),
                "queryid": live,
                "toplevel": [True] * len(live),
                "database": ["app"] * len(live),
                "user": ["app"] * len(live),
                "query": [f"SELECT a, b FROM generated_{i} WHERE id = $1" for i in live],
                "calls": [calls[i] for i in live],
                "total_exec_time": [calls[i] * 0.5 for i in live],
            }
        )
        yield seen, Snapshot("churn:5432", T0 + timedelta(seconds=10 * n), 170000, T0, 0, conform(frame, STATEMENTS))
        n += 1


def run(total: int, statements: int, churn: int, bounded: bool) -> list[tuple[int, float]]:
    every = max(1, total // 10)  # 100,000 for the default million
    proc = psutil.Process()
    settings = OpsSettings(
        export_interval_secs=60, max_queries_tracked=1000 if bounded else 10**9, fingerprint_cache_size=50_000 if bounded else 10**9
    )
    fp = Fingerprinter(settings.fingerprint_cache_size, settings.fingerprint_cache_size)
    state = initial_state(settings)
    curve, mark = [], 0
    for seen, snap in snapshots(total, statements, churn):
        state, _ = step(state, snap, fp, settings)
        if seen >= mark:
            curve.append((seen, proc.memory_info().rss / 1e6))
            print(f"  {'bounded' if bounded else 'unbounded'}: {seen:>9,} fingerprints  rss {curve[-1][1]:8.1f} MB", flush=True)
            mark += every
    finish(state, settings)
    return curve


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    statements = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    churn = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    bounded = run(total, statements, churn, bounded=True)
    unbounded = run(total, statements, churn, bounded=False)
    # growth after warm-up (the first mark), so allocator start-up is not counted
    growth = bounded[-1][1] - bounded[1][1] if len(bounded) > 2 else 0.0
    growth_u = unbounded[-1][1] - unbounded[1][1] if len(unbounded) > 2 else 0.0
    print(
        f"rss_growth_mb={growth:.1f} rss_growth_unbounded_mb={growth_u:.1f} ratio={growth_u / growth if growth > 0 else float('inf'):.1f}"
    )


if __name__ == "__main__":
    main()
