"""The tuning cost estimate: a property of the workload and the settings, not of the capture's length."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgflow import capture, tune

DATASETS = Path(__file__).resolve().parent.parent / "datasets"


@pytest.mark.parametrize("interval", [10, 60])
def test_cost_estimate_does_not_depend_on_capture_length(interval):
    """Issue 14 item 9: three cuts (~4 s, ~18 s, ~60 s) of one steady pgbench capture, scraped
    about every 1.2 s, estimate the same ingest: a window costs its points however much of it
    the capture covered. Before the fix the 4 s cut was billed 3x (10 s windows) to 16x (60 s)."""
    snapshots = list(capture.read(DATASETS / "pgbench.duckdb"))[10:]  # past the workload's start-up
    cuts = {n: snapshots[:n] for n in (4, 15, len(snapshots))}
    spans = {n: tune.capture_minutes(cut) * 60 for n, cut in cuts.items()}
    assert spans[4] < 6 and 15 < spans[15] < 25 and spans[len(snapshots)] > 55  # the cuts are what they claim
    estimates = {n: tune.sweep(cut, export_interval_secs=[interval]).row(0, named=True) for n, cut in cuts.items()}
    longest = estimates[len(snapshots)]
    for n, row in estimates.items():
        for figure in ("gb_per_month", "bytes_per_min", "points_per_min"):
            assert row[figure] == pytest.approx(longest[figure], rel=0.05), (n, figure)
    assert longest["windows"] >= 2
    if interval == 10:  # the long capture has whole windows, and they are what it measures
        assert longest["complete_windows"] and not estimates[4]["complete_windows"]
