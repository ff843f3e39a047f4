"""Tuning before deploying: what would each setting cost, and what would it keep out of "other"?

``sweep`` replays one capture through the operators once per combination of settings and
reports, per combination: distinct query series, data points per minute, the share of
execution time and of calls that stays in named fingerprints, OTLP bytes per minute from
the real encoder (raw and gzip), and the ingest that makes per 30-day month.
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from pgflow import capture, ops
from pgflow.otlp.encode import Encoder
from pgflow.schema import Snapshot

MINUTES_PER_MONTH = 60 * 24 * 30


def _fingerprint_share(points: pl.DataFrame, metric: str) -> float:
    rows = points.filter(pl.col("metric") == metric)
    total = rows["value"].sum()
    named = rows.filter(pl.col("attributes").struct.field("postgresql.query.fingerprint") != "other")["value"].sum()
    return float(named / total) if total else 1.0


def summarize(points: pl.DataFrame, minutes: float) -> dict[str, float]:
    """Cost and coverage figures of one replay's points."""
    calls = points.filter(pl.col("metric") == "postgresql.query.calls")
    series = calls.select("instance", "attributes").unique().height
    raw = zipped = 0
    for batch in Encoder().batches(points):
        raw += len(batch.payload)
        zipped += len(gzip.compress(batch.payload, compresslevel=6))
    minutes = max(minutes, 1e-9)
    return {
        "series": series,
        "points": points.height,
        "points_per_min": points.height / minutes,
        "time_share_named": _fingerprint_share(points, "postgresql.query.duration"),
        "calls_share_named": _fingerprint_share(points, "postgresql.query.calls"),
        "bytes_per_min": raw / minutes,
        "gzip_bytes_per_min": zipped / minutes,
        "gb_per_month": raw / minutes * MINUTES_PER_MONTH / 1e9,
    }


def capture_minutes(snapshots: Sequence[Snapshot]) -> float:
    """How long the capture covers (per instance, the longest), in minutes."""
    spans: dict[str, list] = {}
    for s in snapshots:
        spans.setdefault(s.instance, []).append(s.scraped_at)
    return max(((max(t) - min(t)).total_seconds() / 60 for t in spans.values()), default=0.0)


def sweep(
    capture_path: str | Path | Sequence[Snapshot],
    *,
    max_queries_tracked: Sequence[int] = (1000,),
    slow_query_threshold_ms: Sequence[float] = (0.0,),
    export_interval_secs: Sequence[float] = (60.0,),
    **fixed: object,
) -> pl.DataFrame:
    """One row per combination of the three settings (others fixed), with the figures of ``summarize``."""
    snapshots = list(capture.read(capture_path)) if isinstance(capture_path, (str, Path)) else list(capture_path)
    minutes = capture_minutes(snapshots)
    rows = []
    for cap, threshold, interval in itertools.product(max_queries_tracked, slow_query_threshold_ms,
                                                      export_interval_secs):
        points = ops.run(snapshots, max_queries_tracked=cap, slow_query_threshold_ms=threshold,
                         export_interval_secs=interval, **fixed)
        rows.append({"max_queries_tracked": cap, "slow_query_threshold_ms": float(threshold),
                     "export_interval_secs": float(interval), **summarize(points, minutes)})
    return pl.DataFrame(rows)
