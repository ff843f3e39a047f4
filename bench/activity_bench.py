"""Active-session sampling cost with 200 client backends: pgflow's sample against Datadog's.

A real PostgreSQL 18 (max_connections 300) holds 200 scripted client sessions: 130 idle
(their last statement a ~1 KB SELECT), 30 idle in transaction, 30 active in pg_sleep, and a
lock chain of 10 (one idle-in-transaction holder, 9 sessions queued behind it). In the same
run, alternating, N times each:

- pgflow: ``Sampler.sample()`` (one round trip: the narrow pg_stat_activity SELECT, with
  pg_blocking_pids() only for the sessions waiting on a Lock, folded into the accumulator);
- peer: the query Datadog's agent runs every second, ``SELECT *, pg_blocking_pids(pid) FROM
  pg_stat_activity`` (texts included, pg_blocking_pids for every row), fetched with psycopg.
  Datadog then obfuscates every text in Python; that cost is NOT counted here (the peer's
  figure is a lower bound).

Cost of one sample = server time (pg_stat_statements: planning + execution of every statement
the side sent, summed per role, per sample; pgflow's BEGIN READ ONLY / SET LOCAL / ROLLBACK
included) + client CPU (median thread CPU time around the call). cpu_pct_1hz = the process's
CPU while the sampler runs on its own thread at 1 Hz for 30 s (the main thread asleep), as a
percentage of one core.
Ends with: ratio_datadog=<f> cpu_pct_1hz=<f>
Usage: python bench/activity_bench.py [samples]
"""

from __future__ import annotations

import statistics
import sys
import time

import psycopg

from pgflow.pgserver import LocalPostgres
from pgflow.scrape.sampler import Sampler

PEER_SQL = "SELECT *, pg_blocking_pids(pid) AS blocking_pids FROM pg_stat_activity"
RUN_1HZ_SECS = 30
LONG_SELECT = "SELECT " + ", ".join(f"{i} AS column_number_{i}" for i in range(60))


def open_sessions(pg: LocalPostgres) -> list[psycopg.Connection]:
    dsn = pg.dsn()
    conns: list[psycopg.Connection] = []
    for _ in range(130):  # idle, last statement a long one
        c = psycopg.connect(dsn, autocommit=True)
        c.execute(LONG_SELECT)
        conns.append(c)
    for _ in range(30):  # idle in transaction
        c = psycopg.connect(dsn)
        c.execute("SELECT txid_current()")
        conns.append(c)
    for _ in range(30):  # active, waiting on a timeout
        c = psycopg.connect(dsn, autocommit=True)
        c.pgconn.send_query(b"SELECT pg_sleep(3600)")
        conns.append(c)
    holder = psycopg.connect(dsn)  # a lock chain: 1 holder, 9 queued
    holder.execute("SELECT v FROM chain WHERE id = 1 FOR UPDATE")
    conns.append(holder)
    for _ in range(9):
        c = psycopg.connect(dsn, autocommit=True)
        c.pgconn.send_query(b"UPDATE chain SET v = v + 1 WHERE id = 1")
        conns.append(c)
    return conns


def client_backends(pg: LocalPostgres) -> int:
    return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")[0][0]


def server_ms(pg: LocalPostgres, role: str, samples: int) -> float:
    """Everything the role ran (planning and execution, every statement of the round trip), per sample."""
    rows = pg.execute("SELECT sum(total_exec_time + total_plan_time) FROM pg_stat_statements s "
                      f"JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{role}'")
    return float(rows[0][0]) / samples


def main(samples: int = 200) -> None:
    with LocalPostgres(settings={"max_connections": "300"}) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements", "CREATE TABLE chain (id int PRIMARY KEY, v int)",
                   "INSERT INTO chain VALUES (1, 0)")
        conns = open_sessions(pg)
        deadline = time.monotonic() + 30
        while pg.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")[0][0] < 9:
            if time.monotonic() > deadline:
                raise SystemExit("the lock chain did not form")
            time.sleep(0.1)
        backends = client_backends(pg)
        for role in ("pgflow_bench", "datadog_bench"):  # one role each: server time is counted per role
            pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'bench'", f"GRANT pg_monitor TO {role}")
        sampler = Sampler(pg.dsn(user="pgflow_bench", password="bench"), instance="bench", interval_secs=1.0)
        peer = psycopg.connect(pg.dsn(user="datadog_bench", password="bench"), autocommit=True,
                               application_name="datadog-peer")
        sampler.sample()  # connect both before measuring
        peer.execute(PEER_SQL).fetchall()
        pg.execute("SELECT pg_stat_statements_reset()")
        ours_cpu, peer_cpu, ours_wall, peer_wall = [], [], [], []
        peer_rows = 0
        for _ in range(samples):
            c0, w0 = time.thread_time(), time.perf_counter()
            assert sampler.sample()
            ours_cpu.append(time.thread_time() - c0)
            ours_wall.append(time.perf_counter() - w0)
            c0, w0 = time.thread_time(), time.perf_counter()
            peer_rows = len(peer.execute(PEER_SQL).fetchall())
            peer_cpu.append(time.thread_time() - c0)
            peer_wall.append(time.perf_counter() - w0)
        sampled, stats = sampler.drain()
        # The sampler as the collector runs it: its own thread at 1 Hz, the process otherwise idle.
        cpu0, wall0 = time.process_time(), time.monotonic()
        sampler.start()
        time.sleep(RUN_1HZ_SECS)
        sampler.stop()
        cpu_1hz = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        taken_1hz = sampler.stats.taken - samples - 1
        if "-v" in sys.argv:
            for row in pg.execute("SELECT r.rolname, calls, round((total_exec_time + total_plan_time)::numeric, 2), round(min_exec_time::numeric, 3), round(stddev_exec_time::numeric, 3), round(total_plan_time::numeric, 2), "
                                  "left(query, 60) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
                                  "WHERE r.rolname LIKE '%_bench' ORDER BY 3 DESC"):
                print(*row)
        ours_server = server_ms(pg, "pgflow_bench", samples)
        peer_server = server_ms(pg, "datadog_bench", samples)
        peer.close()
        for c in conns:
            c.close()
    ours_cpu_ms = statistics.median(ours_cpu) * 1000
    peer_cpu_ms = statistics.median(peer_cpu) * 1000
    ours = ours_server + ours_cpu_ms
    theirs = peer_server + peer_cpu_ms
    rows_seen = int(sampled["count"].sum()) // samples
    print(f"client backends: {backends}; pgflow sees {rows_seen} non-idle sessions a sample, the peer fetches "
          f"{peer_rows} rows")
    print(f"{'':28}{'server ms':>10}{'client cpu ms':>15}{'wall ms':>10}{'total ms':>10}")
    print(f"{'pgflow sample':28}{ours_server:10.3f}{ours_cpu_ms:15.3f}{statistics.median(ours_wall) * 1000:10.3f}"
          f"{ours:10.3f}")
    print(f"{'Datadog per-second query':28}{peer_server:10.3f}{peer_cpu_ms:15.3f}"
          f"{statistics.median(peer_wall) * 1000:10.3f}{theirs:10.3f}")
    print(f"sampler thread at 1 Hz for {RUN_1HZ_SECS} s ({taken_1hz} samples): process CPU {cpu_1hz * 100:.3f}% of a "
          f"core (per-sample client CPU x 1 Hz: {ours_cpu_ms / 1000 * 100:.3f}%)")
    print(f"ratio_datadog={theirs / ours:.2f} cpu_pct_1hz={cpu_1hz * 100:.3f}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "-v"]
    main(int(args[0]) if args else 200)
