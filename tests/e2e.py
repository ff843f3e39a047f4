"""Helpers for end-to-end tests: the real collector as a subprocess, the receiver's totals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import psycopg

from pgflow.pgserver import free_port

ROOT = Path(__file__).resolve().parent.parent


def collector_env(dsn: str | None, endpoint: str, state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGFLOW_", "OTEL_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "PGFLOW_OTLP_ENDPOINT": endpoint,
            "PGFLOW_COLLECTION_INTERVAL_SECS": "0.3",
            "PGFLOW_EXPORT_INTERVAL_SECS": "1",
            "PGFLOW_STATE_DIR": str(state_dir),
            "PGFLOW_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            "PGFLOW_RETRY_INITIAL_DELAY_SECS": "0.05",
            "PGFLOW_RETRY_MAX_DELAY_SECS": "0.2",
            "PGFLOW_RETRY_MAX_ATTEMPTS": "2",
            "PYTHONPATH": str(ROOT),
        }
    )
    if dsn:
        env["DATABASE_URL"] = dsn
    env.update(extra)
    return env


def start_collector(env: dict[str, str], *args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "pgflow", "run", *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for_baseline(state_dir: Path, instances: int = 1, timeout: float = 30) -> None:
    """Wait until every instance's first scrape is in its ledger (the baseline pgbench must follow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(state_dir.glob("instances/*/state.pkl"))) >= instances:
            return
        time.sleep(0.05)
    raise AssertionError(f"no baseline scrape within {timeout} s")


def settle(seconds: float = 2.5, state_dir: Path | None = None, scrapes: int = 3, timeout: float = 60, instance: str = "*") -> None:
    """Let time pass (interval 0.3 s, windows of 1 s) and, with ``state_dir``, wait until every
    (or one) instance's ledger has been saved ``scrapes`` more times, however slow the machine is
    (a ledger is saved after each scrape that closes a window or queues events)."""
    started = time.monotonic()
    ledgers = sorted(state_dir.glob(f"instances/{instance}/state.pkl")) if state_dir else []
    seen = {p: p.stat().st_mtime_ns for p in ledgers}
    counts = dict.fromkeys(ledgers, 0)
    while any(c < scrapes for c in counts.values()):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"the collector recorded fewer than {scrapes} scrapes in {timeout} s")
        time.sleep(0.02)
        for path in ledgers:
            mtime = path.stat().st_mtime_ns
            if mtime != seen[path]:
                seen[path] = mtime
                counts[path] += 1
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))


def calls_by_summary(points: pl.DataFrame, instance: str | None = None) -> dict[str, float]:
    calls = points.filter(pl.col("metric") == "postgresql.query.calls")
    if instance is not None:
        calls = calls.filter(pl.col("resource").str.json_path_match("$['postgresql.instance.name']") == instance)
    keyed = calls.with_columns(s=pl.col("attributes").str.json_path_match("$['db.query.summary']"))
    return dict(keyed.group_by("s").agg(pl.col("value").sum()).iter_rows())


def write_config(path: Path, **settings: object) -> Path:
    path.write_text(json.dumps(settings))
    return path


def wait_until(condition, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    """``condition()``'s first truthy value, polled until ``timeout``; else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def timed_sleep(dsn: str, secs: float, out: list[float]) -> threading.Thread:
    """A session in ``pg_sleep(secs)`` on a thread; appends the client-timed seconds it took (ground truth)."""

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.monotonic()
            conn.execute(f"SELECT pg_sleep({secs})")  # type: ignore[arg-type]
            out.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    return thread
