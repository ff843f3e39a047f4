"""The notebook toolkit: captures, replay through both paths, the sweep, notebooks, datasets."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

from pgflow import capture, ops, tune
from pgflow.config import Settings
from pgflow.errors import CaptureError
from pgflow.replay import as_received, replay, replay_flow
from pgflow.scrape import Scraper

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT / "datasets"
PGBENCH_SUMMARIES = (
    "UPDATE pgbench_branches",
    "UPDATE pgbench_tellers",
    "UPDATE pgbench_accounts",
    "SELECT pgbench_accounts",
    "INSERT pgbench_history",
)


def test_capture_round_trip(pg, tmp_path):
    snapshots = []
    with Scraper(pg.dsn()) as scraper:
        snapshots.append(scraper.scrape())
        pg.pgbench("-n", "-c", "2", "-t", "20")
        snapshots.append(scraper.scrape())
    path = tmp_path / "c.duckdb"
    capture.record(snapshots[:1], path)
    capture.record(snapshots[1:], path)  # appending continues the file
    back = list(capture.read(path))
    assert len(back) == 2 and all(capture.as_stored(a).equals(b) for a, b in zip(snapshots, back))
    assert ops.run(back).equals(ops.run(snapshots))  # stored texts fingerprint exactly as live ones
    with pytest.raises(CaptureError, match="no capture"):
        list(capture.read(tmp_path / "missing.duckdb"))


def test_capture_holds_no_secret(pg, tmp_path):
    secret = "Capture-Secret-8317"
    pg.execute(
        "DROP ROLE IF EXISTS cap_role",
        f"CREATE ROLE cap_role PASSWORD '{secret}'",
        f"SELECT count(*) FROM pg_class WHERE relname = '{secret}'",
    )
    with Scraper(pg.dsn()) as scraper:
        snapshots = [scraper.scrape()]
    assert any(secret in (q or "") for q in snapshots[0].statements["query"].to_list())  # pg_stat_statements has it
    path = tmp_path / "c.duckdb"
    capture.record(snapshots, path)
    assert secret.encode() not in path.read_bytes()
    assert not any(secret in (q or "") for s in capture.read(path) for q in s.statements["query"].to_list())


def test_texts_stored_once_per_key(pg, tmp_path):
    with Scraper(pg.dsn()) as scraper:
        snaps = [scraper.scrape() for _ in range(3)]
    path = tmp_path / "c.duckdb"
    capture.record(snaps, path)
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        texts = con.execute("SELECT count(*), count(DISTINCT (dbid, userid, queryid)) FROM texts").fetchone()
    assert texts[0] == texts[1]


def test_capture_cli_sigint_keeps_committed_scrapes(pg, tmp_path):
    out = tmp_path / "live.duckdb"
    env = {**os.environ, "DATABASE_URL": pg.dsn()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgflow", "capture", "--out", str(out), "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Interrupted once it says it has captured three (its start-up alone can take seconds on a busy machine).
    seen, deadline = b"", time.monotonic() + 60
    while b"captured 3 snapshots" not in seen and proc.poll() is None and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
    if b"captured 3 snapshots" not in seen:
        proc.kill()
        pytest.fail(f"capture did not get to 3 snapshots in 60 s: {seen[-200:]!r} {proc.communicate()[1][-500:]!r}")
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    stdout, stderr = (seen + rest).decode(), err.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr
    n = len(list(capture.read(out)))
    assert n >= 3 and f"{n} snapshots written" in stdout
    subprocess.run(
        [sys.executable, "-m", "pgflow", "capture", "--out", str(out), "--scrapes", "2", "--interval", "0.1"],
        env=env,
        check=True,
        capture_output=True,
    )
    assert len(list(capture.read(out))) == n + 2


def test_run_can_capture_while_collecting(fresh_stats, tmp_path):
    from e2e import collector_env, start_collector

    from pgflow.otlp.receiver import Receiver

    with Receiver() as receiver:
        env = collector_env(fresh_stats.dsn(), receiver.http_endpoint, tmp_path / "state")
        proc = start_collector(env, "--scrapes", "4", "--capture", str(tmp_path / "cap.duckdb"))
        assert proc.wait(timeout=60) == 0
    snapshots = list(capture.read(tmp_path / "cap.duckdb"))
    assert len(snapshots) == 4 and snapshots[0].statements.height > 0


def _same_points(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    cols = [c for c in a.columns if c != "received_at"]
    norm = [f.select(cols).with_columns(pl.col("start", "end").cast(pl.Datetime("us", "UTC"))).sort(cols) for f in (a, b)]
    return norm[0].equals(norm[1])


@pytest.mark.parametrize("dataset", ["pgbench", "varied", "activity", "workload"])  # activity: issue 11; workload: 19
def test_replay_through_bytewax_equals_polars(dataset, tmp_path):
    path = DATASETS / f"{dataset}.duckdb"
    settings = Settings.load(max_queries_tracked=20, export_interval_secs=10)
    stored = replay_flow(path, settings, out=tmp_path / "points.duckdb")
    from pgflow.otlp.store import read_points

    flow_points = read_points(tmp_path / "points.duckdb")
    polars_points = as_received(replay(path, max_queries_tracked=20, export_interval_secs=10))
    assert stored == flow_points.height == polars_points.height > 0
    assert _same_points(flow_points, polars_points)


def test_pgbench_dataset_replays_to_its_ground_truth():
    path = DATASETS / "pgbench.duckdb"
    truth = int(capture.meta(path)["pgbench_transactions_after_baseline"])
    points = replay(path)
    calls = points.filter(pl.col("metric") == "postgresql.query.calls").with_columns(
        s=pl.col("attributes").struct.field("db.query.summary")
    )
    got = dict(calls.group_by("s").agg(pl.col("value").sum()).iter_rows())
    assert {s: got[s] for s in PGBENCH_SUMMARIES} == {s: truth for s in PGBENCH_SUMMARIES}
    assert (points.filter(pl.col("kind") == "sum")["value"] >= 0).all()


def test_varied_dataset_shows_cap_other_and_dealloc():
    points = replay(DATASETS / "varied.duckdb", max_queries_tracked=20)
    assert points.filter(pl.col("metric") == "postgresql.statements.deallocated")["value"].sum() > 0
    fingerprints = points["attributes"].struct.field("postgresql.query.fingerprint").drop_nulls()
    assert "other" in fingerprints.to_list()
    assert "secret-token" not in points["attributes"].struct.field("db.query.text").drop_nulls().str.join("").item()


def test_sweep_matches_replay():
    path = DATASETS / "varied.duckdb"
    table = tune.sweep(path, max_queries_tracked=[10, 50], slow_query_threshold_ms=[0.0, 0.5], export_interval_secs=[30])
    assert table.height == 4
    snapshots = list(capture.read(path))
    for row in table.iter_rows(named=True):
        points = ops.run(
            snapshots,
            max_queries_tracked=row["max_queries_tracked"],
            slow_query_threshold_ms=row["slow_query_threshold_ms"],
            export_interval_secs=30,
        )
        assert row["points"] == points.height
        calls = points.filter(pl.col("metric") == "postgresql.query.calls")
        assert row["series"] == calls.select("instance", "attributes").unique().height
    small, large = table.filter(pl.col("slow_query_threshold_ms") == 0).sort("max_queries_tracked").iter_rows(named=True)
    assert small["series"] <= large["series"] and small["time_share_named"] <= large["time_share_named"]


@pytest.mark.parametrize("name", ["explore_workload", "tune_limits", "replay_check", "server_health"])
def test_notebook_runs_headless_and_draws(name):
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no chart"


def test_explore_notebook_draws_single_points_visibly():
    """Issue 14 item 16: a series with one point (a connection state seen at one scrape) drawn
    as a line without markers is invisible; every line of the explore notebook has markers."""
    notebook = nbformat.read(ROOT / "notebooks" / "explore_workload.ipynb", as_version=4)
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "drawn = [line for ax in (c_ax, l_ax, calls_ax, latency_ax) for line in ax.lines]\n"
            "assert drawn, 'no line drawn'\n"
            "assert all(line.get_marker() not in (None, '', ' ', 'None', 'none') for line in drawn), "
            "[line.get_marker() for line in drawn]"
        )
    )
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()


def test_workload_dataset_has_table_statistics_and_health():
    """datasets/workload.duckdb (issue 19, replacing issue 13's health.duckdb): its one VACUUM of t0 and of t1,
    dead tuples that grow and fall, and every health group that the notebook draws."""
    points = replay(DATASETS / "workload.duckdb", export_interval_secs=10)
    table = points.with_columns(
        t=pl.col("attributes").struct.field("db.namespace") + "." + pl.col("attributes").struct.field("db.collection.name")
    )
    vacuums = table.filter(pl.col("metric") == "postgresql.table.vacuum.count").group_by("t").agg(pl.col("value").sum())
    assert {t: v for t, v in vacuums.iter_rows() if v} == {"app.public.t0": 1, "app.public.t1": 1}  # the workload's
    dead = table.filter(
        (pl.col("metric") == "postgresql.rows")
        & (pl.col("t") == "app.public.t0")
        & (pl.col("attributes").struct.field("postgresql.row.state") == "dead")
    ).sort("end")["value"]
    assert dead.max() > dead[-1] and dead.max() > dead[0]  # piled up, then vacuumed
    for metric in (
        "postgresql.wal.fpi",
        "postgresql.wal.syncs",
        "postgresql.wal.sync.time",
        "postgresql.wal.buffers_full",
        "postgresql.bgwriter.checkpoint.count",
        "postgresql.blks_read",
        "postgresql.rollbacks",
    ):
        assert points.filter(pl.col("metric") == metric)["value"].sum() > 0, metric
    assert (points.filter(pl.col("kind") == "sum")["value"] >= 0).all()
    states = {
        s
        for snap in capture.read(DATASETS / "workload.duckdb")
        for s in snap.activity.filter(pl.col("backend_type") == "client backend")["state"].to_list()
    }
    assert {"active", "idle", "idle in transaction"} <= states  # the scrapes saw the clients' states
