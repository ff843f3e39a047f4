"""Tuning before deploying: what would each setting cost, and what would it keep out of "other"?

``sweep`` replays one capture through the operators once per combination of settings and
reports, per combination: distinct query series, data points per minute, the share of
execution time and of calls that stays in named fingerprints, OTLP bytes per minute from
the real encoder (raw and gzip), and the ingest that makes per 30-day month.

Cost is measured per export window, the unit the collector sends: a window carries one
point per series and metric however much of it a scrape covered, so dividing a capture's
points by its wall-clock length overstates short captures (a 4 s capture inside a 60 s
window would be billed as if each window lasted 4 s). The figures are the mean over the
capture's *complete* windows (both ends inside the capture), times windows per month; a
capture shorter than one window falls back to its partial windows that hold any deltas,
and says so (``complete_windows`` = 0).
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Sequence
from datetime import datetime
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


def scrape_times(snapshots: Sequence[Snapshot]) -> dict[str, list[datetime]]:
    """Per instance, the times of its scrapes in order."""
    times: dict[str, list[datetime]] = {}
    for s in snapshots:
        times.setdefault(s.instance, []).append(s.scraped_at)
    return {instance: sorted(t) for instance, t in times.items()}


def _measured_windows(points: pl.DataFrame, length_us: int, times: dict[str, list[datetime]]) -> tuple[pl.DataFrame, bool]:
    """``points`` with their window's end (``window_end``, epoch µs), kept to the windows measured.

    Sums carry their window; a gauge belongs to the window containing its observation.
    Complete windows are used when the capture has any, else partial ones with deltas.
    """
    # A sum's window is the one its start falls in (the last window ends at its last scrape,
    # before its nominal end); a gauge's, the one containing its observation.
    at_us = pl.when(pl.col("kind") == "sum").then(pl.col("start")).otherwise(pl.col("end")).dt.epoch("us")
    keyed = points.with_columns(window_end=(at_us // length_us + 1) * length_us)
    complete, partial = [], []
    for instance, at in times.items():
        first, last = (int(t.timestamp() * 1_000_000) for t in (at[0], at[-1]))
        ends = {(int(t.timestamp() * 1_000_000) // length_us + 1) * length_us for t in at}
        complete += [(instance, e) for e in ends if e - length_us >= first and e <= last]
        deltas = {(int(t.timestamp() * 1_000_000) // length_us + 1) * length_us for t in at[1:]}
        partial += [(instance, e) for e in deltas]
    chosen = complete or partial
    keep = pl.DataFrame(chosen, schema={"instance": pl.String, "window_end": pl.Int64}, orient="row")
    return keyed.join(keep, on=["instance", "window_end"], how="semi"), bool(complete)


def summarize(points: pl.DataFrame, export_interval_secs: float, times: dict[str, list[datetime]]) -> dict[str, float]:
    """Cost and coverage figures of one replay's points, normalized per export window.

    ``times``: each instance's scrape times (``scrape_times``), which tell complete windows
    from partial ones. Every instance's windows are sent, so per-window figures add up.
    """
    calls = points.filter(pl.col("metric") == "postgresql.query.calls")
    series = calls.select("instance", "attributes").unique().height
    length_us = int(round(export_interval_secs * 1_000_000))
    measured, complete = _measured_windows(points, length_us, times)
    raw = zipped = n_points = 0.0
    encoder = Encoder()
    for (_instance,), per_instance in measured.group_by("instance", maintain_order=True):
        windows = per_instance.partition_by("window_end", maintain_order=True)
        for window in windows:  # each window is sent on its own, as the collector does
            for batch in encoder.batches(window.drop("window_end")):
                raw += len(batch.payload) / len(windows)
                zipped += len(gzip.compress(batch.payload, compresslevel=6)) / len(windows)
        n_points += per_instance.height / len(windows)
    per_minute = 60.0 / export_interval_secs  # windows per minute
    return {
        "series": series,
        "points": points.height,
        "windows": measured.select("instance", "window_end").unique().height,
        "complete_windows": complete,
        "points_per_min": n_points * per_minute,
        "time_share_named": _fingerprint_share(points, "postgresql.query.duration"),
        "calls_share_named": _fingerprint_share(points, "postgresql.query.calls"),
        "bytes_per_min": raw * per_minute,
        "gzip_bytes_per_min": zipped * per_minute,
        "gb_per_month": raw * per_minute * MINUTES_PER_MONTH / 1e9,
    }


def capture_minutes(snapshots: Sequence[Snapshot]) -> float:
    """How long the capture covers (per instance, the longest), in minutes."""
    return max(((t[-1] - t[0]).total_seconds() / 60 for t in scrape_times(snapshots).values()), default=0.0)


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
    times = scrape_times(snapshots)
    rows = []
    for cap, threshold, interval in itertools.product(max_queries_tracked, slow_query_threshold_ms, export_interval_secs):
        points = ops.run(snapshots, max_queries_tracked=cap, slow_query_threshold_ms=threshold, export_interval_secs=interval, **fixed)
        rows.append(
            {
                "max_queries_tracked": cap,
                "slow_query_threshold_ms": float(threshold),
                "export_interval_secs": float(interval),
                **summarize(points, float(interval), times),
            }
        )
    return pl.DataFrame(rows)
