"""The peer of bench/fleet_bench.py: a Python process that only reads what pgflow reads (issue 20).

For each instance (a DSN) it holds two connections and, like ``pgflow run`` at its defaults,
sends the activity sampling query once a second (all instances on one 1 s grid, one after the
other, as pgflow's one sampler thread does) and fetches pg_stat_statements every 30 s (the
instances' fetches spread over the 30 s, as pgflow's scrape slots are). Both are pgflow's own SQL
texts, given by the bench (so the server does the same work); psycopg 3 ``fetchall()`` into
tuples, prepared by psycopg after a few runs. Nothing else: no operators, no export, no state.
So its CPU and memory are the floor of a Python collector that reads the same data at the same
rates, which pgflow's figures are compared to (the bench prints the ratio).

Input (one JSON object on stdin): ``dsns``, ``sample_sql``, ``statements_sql``,
``sample_secs`` (1), ``statements_secs`` (30). It prints ``ready`` once connected, then runs
until it is terminated. Its connections carry ``application_name=fleet-peer``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time

import psycopg


def main() -> None:
    config = json.load(sys.stdin)
    sample_sql, statements_sql = config["sample_sql"], config["statements_sql"]
    sample_secs, statements_secs = float(config.get("sample_secs", 1)), float(config.get("statements_secs", 30))
    pairs = [
        (
            psycopg.connect(dsn, autocommit=True, application_name="fleet-peer"),
            psycopg.connect(dsn, autocommit=True, application_name="fleet-peer"),
        )
        for dsn in config["dsns"]
    ]
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    start = time.monotonic()
    due = [start + i * statements_secs / len(pairs) for i in range(len(pairs))]  # spread, as pgflow's slots
    print("ready", flush=True)
    tick = math.floor(start / sample_secs) + 1
    while not stopping:
        time.sleep(max(0.0, tick * sample_secs - time.monotonic()))
        tick += 1
        now = time.monotonic()
        for i, (sampler, scraper) in enumerate(pairs):
            sampler.execute(sample_sql).fetchall()
            if now >= due[i]:
                scraper.execute(statements_sql).fetchall()
                due[i] += statements_secs
    for pair in pairs:
        for conn in pair:
            conn.close()


if __name__ == "__main__":
    main()
