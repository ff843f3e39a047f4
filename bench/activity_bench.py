"""Active-session sampling cost with 200 client backends: pgflow's sample against Datadog's.

A real PostgreSQL 18 (max_connections 300) holds 200 scripted client sessions, in two mixes
measured one after the other: ``pool`` (195 idle, their last statement a ~1 KB SELECT, 5
active in pg_sleep: a connection pool) and ``busy`` (130 idle, 30 idle in transaction, 30
active in pg_sleep, and a lock chain of 10: one idle-in-transaction holder, 9 sessions queued
behind it). The last line is the busy mix's (the harder case for pgflow). Alternating, N
times each:

- pgflow: ``Sampler.sample()`` (one round trip: the marked set_config of the limits, EXECUTE of
  the prepared sampling query, in one implicit transaction; a text-free look at every backend, then the status rows
  of the possibly busy ones only, pg_blocking_pids() only for the sessions waiting on a Lock;
  folded into the accumulator);
- peer: the query Datadog's agent runs every second, ``SELECT *, pg_blocking_pids(pid) FROM
  pg_stat_activity`` (texts included, pg_blocking_pids for every row), fetched with psycopg.
  Datadog then obfuscates every text in Python; that cost is NOT counted here (the peer's
  figure is a lower bound).

Cost of one sample = server CPU (the side's backend process, /proc/<pid>/schedstat, per
sample: everything it did, pgflow's set_config of the limits included) + client
CPU (median thread CPU time around the call). Also printed: server exec ms (pg_stat_statements:
planning + execution of every statement the side sent, summed per role, per sample; wall
clock, so inflated when the machine is busy) and the median wall time of a call. cpu_pct_1hz = the process's
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


def open_sessions(pg: LocalPostgres, mix: str = "busy") -> list[psycopg.Connection]:
    """200 client sessions: ``busy`` (70 not idle, a lock chain) or ``pool`` (195 idle, 5 active)."""
    dsn = pg.dsn()
    conns: list[psycopg.Connection] = []
    if mix == "pool":
        for k in range(200):
            c = psycopg.connect(dsn, autocommit=True)
            c.execute(LONG_SELECT)
            if k < 5:
                c.pgconn.send_query(b"SELECT pg_sleep(3600)")
            conns.append(c)
        return conns
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


def backend_cpu_ms(pid: int) -> float:
    """CPU time the server process ``pid`` has used (Linux /proc/<pid>/schedstat: ns on a CPU)."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e6


def server_ms(pg: LocalPostgres, role: str, samples: int) -> float:
    """Everything the role ran (planning and execution, every statement of the round trip), per sample."""
    rows = pg.execute(
        "SELECT sum(total_exec_time + total_plan_time) FROM pg_stat_statements s "
        f"JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{role}'"
    )
    return float(rows[0][0]) / samples


def measure(samples: int, mix: str, run_1hz: bool) -> dict:
    """One server, one session mix: both sides alternately, ``samples`` times each."""
    with LocalPostgres(settings={"max_connections": "300"}) as pg:
        pg.execute(
            "CREATE EXTENSION pg_stat_statements", "CREATE TABLE chain (id int PRIMARY KEY, v int)", "INSERT INTO chain VALUES (1, 0)"
        )
        conns = open_sessions(pg, mix)
        waiters = 9 if mix == "busy" else 0
        deadline = time.monotonic() + 30
        while pg.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")[0][0] < waiters:
            if time.monotonic() > deadline:
                raise SystemExit("the lock chain did not form")
            time.sleep(0.1)
        backends = client_backends(pg)
        for role in ("pgflow_bench", "datadog_bench"):  # one role each: server time is counted per role
            pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'bench'", f"GRANT pg_monitor TO {role}")
        sampler = Sampler(pg.dsn(user="pgflow_bench", password="bench"), instance="bench", interval_secs=1.0)
        peer = psycopg.connect(pg.dsn(user="datadog_bench", password="bench"), autocommit=True, application_name="datadog-peer")
        sampler.sample()  # connect both before measuring
        peer.execute(PEER_SQL).fetchall()
        pg.execute("SELECT pg_stat_statements_reset()")
        backends_cpu0 = (backend_cpu_ms(sampler._conn.info.backend_pid), backend_cpu_ms(peer.info.backend_pid))  # type: ignore[union-attr]
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
        ours_backend = (backend_cpu_ms(sampler._conn.info.backend_pid) - backends_cpu0[0]) / samples  # type: ignore[union-attr]
        peer_backend = (backend_cpu_ms(peer.info.backend_pid) - backends_cpu0[1]) / samples
        sampled, _ = sampler.drain()
        cpu_1hz = taken_1hz = 0.0
        if run_1hz:  # the sampler as the collector runs it: its own thread at 1 Hz, the process otherwise idle
            cpu0, wall0 = time.process_time(), time.monotonic()
            sampler.start()
            time.sleep(RUN_1HZ_SECS)
            sampler.stop()
            cpu_1hz = (time.process_time() - cpu0) / (time.monotonic() - wall0)
            taken_1hz = sampler.stats.taken - samples - 1
        sampler.close()
        if "-v" in sys.argv:
            for row in pg.execute(
                "SELECT r.rolname, calls, round((total_exec_time + total_plan_time)::numeric, 3), "
                "round(min_exec_time::numeric, 3), left(query, 60) FROM pg_stat_statements s "
                "JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname LIKE '%_bench' ORDER BY 3 DESC"
            ):
                print(*row)
        result = {
            "mix": mix,
            "backends": backends,
            "seen": int(sampled["count"].sum()) // samples,
            "peer_rows": peer_rows,
            "ours_exec": server_ms(pg, "pgflow_bench", samples),
            "peer_exec": server_ms(pg, "datadog_bench", samples),
            "ours_server": ours_backend,
            "peer_server": peer_backend,
            "ours_cpu": statistics.median(ours_cpu) * 1000,
            "peer_cpu": statistics.median(peer_cpu) * 1000,
            "ours_wall": statistics.median(ours_wall) * 1000,
            "peer_wall": statistics.median(peer_wall) * 1000,
            "cpu_1hz": cpu_1hz,
            "taken_1hz": taken_1hz,
        }
        peer.close()
        for c in conns:
            c.close()
    return result


def report(r: dict) -> float:
    ours, theirs = r["ours_server"] + r["ours_cpu"], r["peer_server"] + r["peer_cpu"]
    print(
        f"{r['mix']} mix: {r['backends']} client backends; pgflow sees {r['seen']} non-idle sessions a sample, "
        f"the peer fetches {r['peer_rows']} rows"
    )
    print(f"{'':26}{'server cpu ms':>14}{'client cpu ms':>14}{'total ms':>10}{'server exec ms':>16}{'wall ms':>9}")
    for name, side, total in (("pgflow sample", "ours", ours), ("Datadog per-second query", "peer", theirs)):
        print(f"{name:26}{r[side + '_server']:14.3f}{r[side + '_cpu']:14.3f}{total:10.3f}{r[side + '_exec']:16.3f}{r[side + '_wall']:9.3f}")
    print(f"ratio ({r['mix']} mix): {theirs / ours:.2f}")
    return theirs / ours


def main(samples: int = 200) -> None:
    report(measure(samples, "pool", run_1hz=False))
    busy = measure(samples, "busy", run_1hz=True)
    ratio = report(busy)
    print(
        f"sampler thread at 1 Hz for {RUN_1HZ_SECS} s ({busy['taken_1hz']:.0f} samples, busy mix): process CPU "
        f"{busy['cpu_1hz'] * 100:.3f}% of a core (per-sample client CPU x 1 Hz: {busy['ours_cpu'] / 10:.3f}%)"
    )
    print(f"ratio_datadog={ratio:.2f} cpu_pct_1hz={busy['cpu_1hz'] * 100:.3f}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "-v"]
    main(int(args[0]) if args else 200)
