"""The statements scrape and its operators, once warm, against a bare psycopg fetch of the same rows (issue 20).

What each further instance costs every statements interval: one real PostgreSQL holds about
``statements`` distinct statements (the shapes of bench/fleet_bench.py); between scrapes a light
workload runs ``touched`` of them again (so deltas are not zero, as in life). Each cycle is one
export window (``export_interval_secs=1``) with two scrapes in it, as the defaults have (a 60 s
window, a scrape every 30 s): the first scrape of a cycle closes the previous window.

- pgflow: ``Scraper.scrape()`` (the one pipelined round trip: statements, activity, locks,
  databases, info; health groups when due) and then what the flow runs on that snapshot
  (``pipeline.step`` and ``pipeline.events``, as ``CollectorLogic.on_item`` calls them), with
  texts cached and baselines present;
- the peer: a bare psycopg 3 fetch of the rows pgflow's statements query reads (the same SQL:
  same columns, same joins, same server), ``fetchall()`` into tuples, on its own connection.

CPU is ``time.process_time()`` (every thread of this process: psycopg's libpq work and polars'
threads are in it; the workload runs outside the timed spans). Medians over ``cycles`` cycles
after ``warmup`` cycles, per scrape (a cycle's two scrapes summed, halved).

Last line: scrape_cpu_ms=<f> bare_fetch_cpu_ms=<f> ratio=<f>
Usage: python bench/scrape_bench.py [cycles=60] [statements=2000] [touched=300] [warmup=5]
PGFLOW_BENCH_PG_BINDIR picks the PostgreSQL (default: the embedded 18). PGFLOW_BENCH_PROFILE=<file>
writes a cProfile of pgflow's timed spans to <file> (the ratio is then not a figure).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # as `pgflow run` sets it (before polars is imported)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_bench import make_statements  # noqa: E402
from workload_shapes import statement  # noqa: E402

from pgflow.ops.fingerprint import Fingerprinter  # noqa: E402
from pgflow.ops.pipeline import EventsState, OpsSettings, events, initial_state, step  # noqa: E402
from pgflow.pgserver import LocalPostgres  # noqa: E402
from pgflow.scrape import Scraper  # noqa: E402
from pgflow.scrape.statements import statements_sql  # noqa: E402


def workload(conn: psycopg.Connection, statements: int, touched: int, rng: random.Random) -> None:
    """Run ``touched`` of the statements again (other literals: the same entries)."""
    for i in rng.sample(range(statements), touched):
        conn.execute(statement(i, literal=i + 1_000_000))  # type: ignore[arg-type]


def next_second() -> float:
    """The next whole second (windows are aligned to the clock; the server's is this machine's)."""
    return float(int(datetime.now(UTC).timestamp()) + 1)


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - datetime.now(UTC).timestamp()))


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    cycles, statements, touched, warmup = (args + [60, 2000, 300, 5][len(args) :])[:4]
    profile_to = os.environ.get("PGFLOW_BENCH_PROFILE")
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile(time.process_time)
    bindir = os.environ.get("PGFLOW_BENCH_PG_BINDIR") or None
    rng = random.Random(7)
    with LocalPostgres(bindir, settings={"pg_stat_statements.max": str(statements + 1000)}) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        make_statements(pg, statements)
        ops = OpsSettings.of(export_interval_secs=1)
        fingerprinter = Fingerprinter(ops.fingerprint_cache_size, ops.fingerprint_cache_size)
        state, events_state = initial_state(ops), EventsState()
        with (
            Scraper(pg.dsn(), instance="bench") as scraper,
            psycopg.connect(pg.dsn(), autocommit=True) as bare,
            psycopg.connect(pg.dsn(), autocommit=True) as work,
        ):
            scraper.scrape()  # connect and discover
            assert scraper.server is not None
            query = statements_sql(scraper.server.extension_schema, set(scraper.server.columns)).as_string(bare)
            pgflow_ms: list[float] = []
            bare_ms: list[float] = []
            scrape_only_ms: list[float] = []
            rows = points = 0
            for cycle in range(warmup + cycles):
                spent = [0.0, 0.0, 0.0]
                second = next_second()
                for offset in (0.1, 0.6):  # two scrapes per window, the first closes the previous one
                    workload(work, statements, touched, rng)
                    sleep_until(second + offset)
                    order = ("pgflow", "bare") if (cycle + (offset > 0.5)) % 2 == 0 else ("bare", "pgflow")
                    for who in order:
                        if who == "pgflow":
                            if profiler is not None and cycle >= warmup:
                                profiler.enable()
                            started = time.process_time()
                            snapshot = scraper.scrape()
                            scraped = time.process_time()
                            state, out = step(state, snapshot, fingerprinter, ops)
                            events_state, _ = events(events_state, snapshot, ops)
                            spent[0] += time.process_time() - started
                            spent[2] += scraped - started
                            if profiler is not None:
                                profiler.disable()
                            rows, points = snapshot.statements.height, points + out.height
                        else:
                            started = time.process_time()
                            fetched = bare.execute(query).fetchall()  # type: ignore[arg-type]
                            spent[1] += time.process_time() - started
                            assert len(fetched) >= statements
                if cycle >= warmup:
                    pgflow_ms.append(spent[0] / 2 * 1000)
                    bare_ms.append(spent[1] / 2 * 1000)
                    scrape_only_ms.append(spent[2] / 2 * 1000)
    if profiler is not None:
        profiler.dump_stats(profile_to)
    scrape_ms, bare_med = statistics.median(pgflow_ms), statistics.median(bare_ms)
    print(f"statements={statements} rows_per_scrape={rows} touched_per_scrape={touched} cycles={cycles} points={points}")
    print(
        f"pgflow scrape + operators, CPU per scrape (median): {scrape_ms:8.2f} ms  (p10 {_pct(pgflow_ms, 10):.2f}, p90 {_pct(pgflow_ms, 90):.2f})"
    )
    print(f"  of which Scraper.scrape() (median)              : {statistics.median(scrape_only_ms):8.2f} ms")
    print(
        f"bare psycopg fetch of the same rows (median)      : {bare_med:8.2f} ms  (p10 {_pct(bare_ms, 10):.2f}, p90 {_pct(bare_ms, 90):.2f})"
    )
    print(f"scrape_cpu_ms={scrape_ms:.3f} bare_fetch_cpu_ms={bare_med:.3f} ratio={scrape_ms / bare_med:.2f}")


def _pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * p // 100)]


if __name__ == "__main__":
    main()
