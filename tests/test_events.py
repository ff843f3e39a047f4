"""Events (plans, query samples) on the collector's durable path (issue 12): `pgflow run` explains
pgbench's statements and sends the plans as OTLP log records through the ledger, so an endpoint
outage or a `kill -9` loses none and sends none twice; capture → replay gives the same events.

Real PostgreSQL and pgbench, the real receiver (in process), the collector as a subprocess. Ground
truth for "every event once" is what the collector captured as it explained (`--capture`),
re-derived through the operators (`pgflow.ops.run_events`), and the ledger read after a crash.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from e2e import ROOT, collector_env, start_collector, wait_for_baseline, wait_until

from pgflow import capture, ops
from pgflow.otlp.receiver import Receiver, Reply
from pgflow.otlp.store import read_logs, read_points
from pgflow.pgserver import free_port
from pgflow.replay import events_as_received
from pgflow.stream.ledger import read_state

PGBENCH = (
    "UPDATE pgbench_branches",
    "UPDATE pgbench_tellers",
    "UPDATE pgbench_accounts",
    "SELECT pgbench_accounts",
    "INSERT pgbench_history",
)
PLAN = "db.server.query_plan"

pytestmark = pytest.mark.slow


# Helpers --------------------------------------------------------------------------------------


def stop(proc: subprocess.Popen, timeout: float = 90) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def background_pgbench(server, seconds: int) -> threading.Thread:  # type: ignore[no-untyped-def]
    """pgbench at a modest rate for ``seconds``: its statements run through several 1 s windows."""
    thread = threading.Thread(target=server.pgbench, args=("-n", "-c", "1", "-T", str(seconds), "-R", "150"), daemon=True)
    thread.start()
    return thread


def ledger_events(state_dir: Path) -> int:
    """Events waiting in the (single) instance's ledger, as last saved (read without locking)."""
    paths = list(state_dir.glob("instances/*/state.pkl"))
    if not paths:
        return 0
    try:
        _, record = read_state(paths[0])
    except (EOFError, pickle.UnpicklingError, FileNotFoundError):
        return 0
    return sum(f.height for f in getattr(record, "events", {}).values())


def rows(logs: pl.DataFrame) -> list[tuple]:
    """Received (or would-be-received) log records, comparable: no receive time, JSON normalized."""
    logs = logs.with_columns(pl.col("time").cast(pl.Datetime("us", "UTC")))
    return sorted(
        (
            r["event_name"],
            r["time"],
            r["severity"],
            r["body"],
            json.dumps(json.loads(r["attributes"]), sort_keys=True),
            json.dumps(json.loads(r["resource"]), sort_keys=True),
        )
        for r in logs.iter_rows(named=True)
    )


def captured_events(path: Path) -> list[tuple]:
    """The events the operators derive from a capture, as the receiver would store them."""
    return rows(events_as_received(ops.run_events(capture.read(path))))


def attrs(logs: pl.DataFrame) -> list[dict]:
    return [json.loads(a) for a in logs["attributes"]]


def pgbench_fingerprints(points: pl.DataFrame) -> dict[str, str]:
    """summary → fingerprint of pgbench's statements, from the query metrics the receiver got."""
    calls = points.filter(pl.col("metric") == "postgresql.query.calls")
    found = {}
    for a in attrs(calls):
        if a.get("db.query.summary") in PGBENCH:
            found[a["db.query.summary"]] = a["postgresql.query.fingerprint"]
    return found


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))


def plan_env(server, endpoint: str, state_dir: Path, per_window: int, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return collector_env(server.dsn(), endpoint, state_dir, PGFLOW_EXPLAINS_PER_WINDOW=str(per_window), **extra)


# End to end -----------------------------------------------------------------------------------


def test_run_sends_plans_keyed_like_the_metrics_and_replay_gives_the_same_events(fresh_stats, tmp_path):
    """`pgflow run` against pgbench: plans arrive in the receiver's logs table with the fingerprint
    of their query metrics and a plan hash, at most explains_per_window per window, each
    fingerprint once (TTL); the capture replayed (bytewax and polars) gives the same events."""
    cap = tmp_path / "cap.duckdb"
    with Receiver() as receiver:
        proc = start_collector(
            plan_env(fresh_stats, receiver.http_endpoint, tmp_path / "state", 2), "--capture", str(cap), log=tmp_path / "log"
        )
        wait_for_baseline(tmp_path / "state")
        bench = background_pgbench(fresh_stats, 6)

        def pgbench_plans() -> set[str]:
            logs = receiver.logs()
            return {a["postgresql.query.fingerprint"] for a in attrs(logs.filter(pl.col("event_name") == PLAN))}

        def explained() -> dict[str, str] | None:
            found = pgbench_fingerprints(receiver.points())
            return found if len(found) == 5 and set(found.values()) <= pgbench_plans() else None

        fingerprints = wait_until(explained, "plans of pgbench's five statements")
        bench.join()
        assert stop(proc) == 0
        live = receiver.logs()
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "flushed" in log
    plans = live.filter(pl.col("event_name") == PLAN)
    plan_attrs = attrs(plans)
    assert all(a["postgresql.plan.hash"] and a["db.namespace"] == "postgres" for a in plan_attrs)
    assert all(json.loads(b)[0]["Plan"]["Node Type"] for b in plans["body"])
    by_fingerprint = {a["postgresql.query.fingerprint"]: a for a in plan_attrs}
    assert set(fingerprints.values()) <= set(by_fingerprint)  # the metrics' fingerprints, exactly
    assert len(by_fingerprint) == len(plan_attrs)  # each fingerprint once: the TTL (3600 s) holds
    # The budget: the capture holds every plan as taken, on the scrape that opened its window.
    snapshots = list(capture.read(cap))
    assert max(s.plans.height for s in snapshots) <= 2
    assert sum(s.plans.height for s in snapshots) == plans.height
    with_plans = [int(s.scraped_at.timestamp()) for s in snapshots if s.plans.height]  # 1 s windows
    assert len(with_plans) >= 3 and len(set(with_plans)) == len(with_plans)  # 5 statements, 2 per window, once each
    # Every event arrived once, exactly as the operators derive it from the capture.
    assert rows(live) == captured_events(cap)
    # capture → replay: the bytewax flow into a receiver file, and polars alone, give the same events.
    out = tmp_path / "replayed.duckdb"
    env = collector_env(None, "http://127.0.0.1:9", tmp_path / "unused")  # --out: its own receiver
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow", "replay", str(cap), "--out", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows(read_logs(out)) == rows(live)
    assert read_points(out).height > 0


def test_endpoint_outage_then_up_every_event_arrives_once(fresh_stats, tmp_path):
    """The endpoint answers UNAVAILABLE to everything while plans are taken; they wait in the
    ledger, and once it accepts, every event of the capture arrives exactly once."""
    cap = tmp_path / "cap.duckdb"
    port = free_port()
    outage = [Reply.parse("UNAVAILABLE")] * 100_000
    with Receiver(script=list(outage)) as receiver:
        env = plan_env(fresh_stats, receiver.http_endpoint, tmp_path / "state", 1, PGFLOW_METRICS_ADDR=f"127.0.0.1:{port}")
        proc = start_collector(env, "--capture", str(cap), log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        bench = background_pgbench(fresh_stats, 5)
        # Plans of at least two windows wait in the ledger, and their sends were refused.
        wait_until(lambda: ledger_events(tmp_path / "state") >= 2, "two plans queued during the outage")
        wait_until(lambda: ("http/logs", "503") in receiver.attempts, "an events send during the outage")
        assert receiver.logs().height == 0
        receiver.set_script([])  # the endpoint is back
        bench.join()
        wait_until(lambda: receiver.logs().height >= 2 and ledger_events(tmp_path / "state") == 0, "the queued events delivered")
        exported = metric(port, "pgflow_events_exported_total")
        assert stop(proc) == 0
        live = receiver.logs()
    assert "endpoint unreachable; the events stays queued" in (tmp_path / "log").read_text()
    received = rows(live)
    assert len(set(received)) == len(received)  # none twice
    assert received == captured_events(cap)  # none lost
    assert exported >= 2 and exported <= len(received)  # /metrics counts the events acknowledged


def test_kill_9_and_restart_every_event_arrives_once(fresh_stats, tmp_path):
    """Plans are acknowledged, then the endpoint fails and more plans wait in the ledger; kill -9.
    A restart with the same state_dir sends what the ledger held, nothing acknowledged before,
    and its own plans: each event once."""
    from pgflow.stream.ledger import Ledger

    state = tmp_path / "state"
    with Receiver() as receiver:
        env = plan_env(fresh_stats, receiver.http_endpoint, state, 1)
        first = start_collector(env, "--capture", str(tmp_path / "cap1.duckdb"), log=tmp_path / "log1")
        wait_for_baseline(state)
        bench = background_pgbench(fresh_stats, 8)
        wait_until(lambda: receiver.logs().height >= 1, "a plan acknowledged before the outage")
        receiver.set_script([Reply.parse("UNAVAILABLE")] * 100_000)
        held = wait_until(lambda: ledger_events(state) >= 2 and ledger_events(state), "plans queued in the ledger")
        first.kill()  # SIGKILL: no flush, no goodbye
        first.wait()
        acknowledged_before = rows(receiver.logs())
        ledger = Ledger(state, next((state / "instances").iterdir()).name)
        record = ledger.load()
        ledger.close()
        assert record is not None and sum(f.height for f in record.events.values()) >= held
        waiting = rows(events_as_received(pl.concat(list(record.events.values())).drop("__row")))
        assert not set(waiting) & set(acknowledged_before)  # what was acknowledged left the ledger
        receiver.set_script([])
        second = start_collector(env, "--capture", str(tmp_path / "cap2.duckdb"), log=tmp_path / "log2")
        wait_until(lambda: set(waiting) <= set(rows(receiver.logs())), "the ledger's events delivered", timeout=90)
        bench.join()
        assert stop(second) == 0
        received = rows(receiver.logs())
    assert "resuming from the ledger" in (tmp_path / "log2").read_text()
    assert len(set(received)) == len(received)  # none twice
    produced = set(captured_events(tmp_path / "cap1.duckdb")) | set(captured_events(tmp_path / "cap2.duckdb"))
    assert set(received) <= produced  # nothing invented
    assert set(acknowledged_before) | set(waiting) | set(captured_events(tmp_path / "cap2.duckdb")) <= set(received)


def test_run_sends_a_slow_statements_sample_once_with_no_literal_anywhere(fresh_stats, tmp_path):
    """`pgflow run` with the sampler on: a statement running 1.5 s with a secret literal arrives once
    as a normalized db.server.query_sample with the fingerprint of its query metrics; the literal is
    in no event, point, log line, ledger or capture file."""
    import psycopg

    secret = "zq-run-sample-secret-91"
    cap, out = tmp_path / "cap.duckdb", tmp_path / "received.duckdb"
    receiver = Receiver(out).start()
    try:
        env = plan_env(fresh_stats, receiver.http_endpoint, tmp_path / "state", 0, PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS="0.1")
        proc = start_collector(env, "--capture", str(cap), log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        with psycopg.connect(fresh_stats.dsn(), autocommit=True, application_name="slow-app") as conn:
            conn.execute(f"SELECT pg_sleep(1.5) WHERE '{secret}' <> current_user")  # type: ignore[arg-type]

        def sampled() -> list[dict]:
            return [a for a in attrs(receiver.logs()) if "pg_sleep" in (a.get("db.query.text") or "")]

        wait_until(sampled, "the sample of the slow statement")
        wait_until(
            lambda: any("pg_sleep" in (a.get("db.query.text") or "") for a in attrs(receiver.points())), "the slow statement's metrics"
        )
        assert stop(proc) == 0
        (sample,) = sampled()  # once
        metrics = {a["postgresql.query.fingerprint"] for a in attrs(receiver.points()) if "pg_sleep" in (a.get("db.query.text") or "")}
    finally:
        receiver.stop()
    assert sample["db.query.text"] == "SELECT pg_sleep($1) WHERE $2 <> CURRENT_USER"
    assert sample["postgresql.application_name"] == "slow-app" and sample["postgresql.query.duration"] >= 0.1
    assert metrics == {sample["postgresql.query.fingerprint"]}  # keyed like its metrics
    assert rows(read_logs(out)) == captured_events(cap)  # what the capture holds, sent once
    files = [out, cap, tmp_path / "log", *(tmp_path / "state").rglob("*")]
    assert not [f for f in files if f.is_file() and secret.encode() in f.read_bytes()]


# The events outbox, in process --------------------------------------------------------------


def _plans(n: int, t0: datetime) -> pl.DataFrame:
    from pgflow.schema import PLANS

    return pl.DataFrame(
        [
            {
                "database": "postgres",
                "fingerprint": f"{i:016x}",
                "queryid": i,
                "plan_hash": f"h{i}",
                "body": '[{"Plan": {"Node Type": "Result"}}]',
                "method": "generic_plan",
                "explained_at": t0 + timedelta(seconds=i),
            }
            for i in range(n)
        ],
        schema=PLANS,
    )


def test_events_backlog_is_bounded_oldest_dropped_and_old_ledgers_load(pg, tmp_path):
    """Against an endpoint that is down: past max_pending_events the oldest events are dropped and
    counted; the ledger keeps the newest; a ledger written before events existed still loads."""
    from dataclasses import replace

    from pgflow import telemetry
    from pgflow.config import Settings
    from pgflow.ops.pipeline import OpsSettings
    from pgflow.otlp.exporter import Exporter
    from pgflow.otlp.logs_export import LogsExporter
    from pgflow.scrape.scraper import Scraper
    from pgflow.stream.ledger import Ledger, Record
    from pgflow.stream.logic import CollectorLogic
    from pgflow.stream.shipper import Shipper

    settings = Settings.load(
        otlp_endpoint=f"http://127.0.0.1:{free_port()}", state_dir=tmp_path, retry_max_attempts=1, export_interval_secs=60
    )
    shipper = Shipper(Exporter(settings), retry_after_secs=60, logs_exporter=LogsExporter(settings))
    shipper.paused_until = {"points": float("inf"), "events": float("inf")}  # nothing in flight: all idle
    ledger = Ledger(tmp_path, "db1")
    dropped = telemetry.REGISTRY.get_sample_value("pgflow_events_dropped_total", {"reason": "backlog"}) or 0
    try:
        logic = CollectorLogic("db1", OpsSettings.from_settings(settings), ledger, shipper, 5, max_pending_events=5)
        t0 = datetime.now(UTC).replace(microsecond=0)
        with Scraper(pg.dsn(), instance="db1") as scraper:
            for i in range(4):
                snapshot = replace(scraper.scrape(), plans=_plans(3, t0 + timedelta(minutes=i)))
                logic.on_item(snapshot)
        waiting = pl.concat(list(logic.record.events.values()))
        assert waiting.height == 5  # 12 taken, bound 5: the 7 oldest dropped
        assert waiting["time"].to_list() == [t0 + timedelta(minutes=m, seconds=s) for m, s in [(2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]]
        assert (telemetry.REGISTRY.get_sample_value("pgflow_events_dropped_total", {"reason": "backlog"}) - dropped) == 7
        saved = ledger.load()
        assert saved is not None and sum(f.height for f in saved.events.values()) == 5
    finally:
        shipper.close(deadline=time.monotonic() + 2)
        ledger.close()
    # A ledger pickled before issue 12 (a Record without the events fields) loads with none waiting.
    old = Record(None, {1: pl.DataFrame({"value": [1.0]})}, 2)
    del old.__dict__["events"], old.__dict__["events_state"]
    again = Ledger(tmp_path, "old")
    try:
        with open(again.dir / "state.pkl", "wb") as fh:
            pickle.dump((Ledger.VERSION, old), fh)
        back = again.load()
        assert back is not None and back.events == {} and back.events_state is None and list(back.outbox) == [1]
    finally:
        again.close()


def test_query_samples_flow_through_events_with_a_budget_per_window():
    """Query samples on the Snapshot (``query_samples``, the sampler's frame) through the events
    operator: limited per execution and per export window across snapshots, with plans beside them."""
    from dataclasses import replace

    from pgflow.ops.pipeline import OpsSettings, events
    from pgflow.ops.query_samples import QUERY_SAMPLE
    from pgflow.schema import QUERY_SAMPLES, STATEMENTS, Snapshot

    ops_settings = OpsSettings.of(export_interval_secs=60, max_samples_per_window=3)
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def snap(at: datetime, pids: range = range(0)) -> Snapshot:
        samples = pl.DataFrame(
            [
                {
                    "seen_at": at,
                    "database": "app",
                    "user": "u",
                    "pid": p,
                    "query_start": t0,
                    "duration_secs": 1.0,
                    "state": "active",
                    "fingerprint": f"fp{p}",
                    "text": "SELECT $1",
                    "truncated": False,
                    "unparsable": False,
                }
                for p in pids
            ],
            schema=QUERY_SAMPLES,
        )
        return Snapshot(
            "db1", at, 180000, None, None, pl.DataFrame(schema=STATEMENTS), server_address="h", server_port=5432, query_samples=samples
        )

    state, first = events(None, snap(t0 + timedelta(seconds=5), range(2)), ops_settings)
    state, second = events(state, snap(t0 + timedelta(seconds=35), range(10)), ops_settings)
    assert first.height == 2 and second.height == 1  # 3 per window, over both snapshots
    assert state.samples.skipped == {"seen": 2, "window": 7}
    with_plan = replace(snap(t0 + timedelta(seconds=65), range(10)), plans=_plans(1, t0))
    state, third = events(state, with_plan, ops_settings)
    assert third["event_name"].to_list() == [PLAN] + [QUERY_SAMPLE] * 3  # a new window: 3 more, and the plan
    assert set(first["event_name"]) == {QUERY_SAMPLE} and first["server_address"].to_list() == ["h", "h"]
    # A snapshot without plans or samples gives no event and leaves the state alone.
    same, none = events(state, snap(t0 + timedelta(seconds=70)), ops_settings)
    assert same is state and none.height == 0


def test_plans_dataset_shows_a_plan_change():
    """datasets/plans.duckdb (what the notebook's plans cells show): every window's plans as events,
    pgbench's plan hashes stable, and the lookup's hash changing once its index exists."""
    from pgflow.replay import replay_events

    path = ROOT / "datasets" / "plans.duckdb"
    events = replay_events(path)
    a = events["attributes"].struct.unnest()
    plans = pl.DataFrame(
        {
            "time": events["time"],
            "fingerprint": a["postgresql.query.fingerprint"],
            "hash": a["postgresql.plan.hash"],
            "body": events["body"],
        }
    )
    hashes = plans.group_by("fingerprint").agg(pl.col("hash").n_unique().alias("n"), pl.len().alias("plans"))
    assert hashes.height == 6 and hashes["plans"].min() >= 3  # pgbench's five and the lookup, window after window
    (changed,) = hashes.filter(pl.col("n") > 1)["fingerprint"].to_list()
    history = plans.filter(pl.col("fingerprint") == changed).sort("time")
    assert "pgbench_history_aid" not in history["body"][0] and "pgbench_history_aid" in history["body"][-1]
    assert history["hash"].n_unique() == 2 and history["hash"].rle_id().max() == 1  # one change, never back


def test_an_endpoint_without_logs_pauses_events_never_metrics(tmp_path):
    """A real gRPC endpoint that serves only MetricsService (UNIMPLEMENTED for logs): the events
    entry is kept and paused, the points entry is acknowledged and metrics keep flowing."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
    from test_logs import sample
    from test_ops import _pipeline_snaps

    from pgflow.config import Settings
    from pgflow.otlp.exporter import Exporter
    from pgflow.otlp.logs import events_frame
    from pgflow.otlp.logs_export import LogsExporter
    from pgflow.otlp.receiver import _GrpcService
    from pgflow.stream.ledger import ROW, Ledger
    from pgflow.stream.shipper import Outgoing, Shipper

    points = ops.run(_pipeline_snaps(3), export_interval_secs=30).with_row_index(ROW)
    events = events_frame([sample(i) for i in range(3)]).with_row_index(ROW)
    receiver = Receiver(grpc_port=None, http_port=None)  # its store and answers, served below
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_GrpcService(receiver), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    settings = Settings.load(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_protocol="grpc", state_dir=tmp_path)
    shipper = Shipper(Exporter(settings), retry_after_secs=1, refused_retry_secs=60, logs_exporter=LogsExporter(settings))
    ledger = Ledger(tmp_path, "db1")
    try:
        for seq, kind, frame in ((0, "events", events), (1, "points", points), (2, "points", points)):
            assert shipper.retry_due("db1", seq, kind)
            shipper.submit(Outgoing("db1", seq, frame, kind), ledger)
            wait_until(lambda seq=seq: not shipper.busy("db1", seq), f"entry {seq} handled", timeout=20)
        acked = ledger.take_acks()
    finally:
        shipper.close(deadline=time.monotonic() + 5)
        ledger.close()
        server.stop(0)
        receiver.store.close()
    assert 0 not in acked and {1, 2} <= set(acked)  # events kept, both windows acknowledged
    assert not shipper.retry_due("db1", 3, "events") and shipper.retry_due("db1", 3, "points")


def test_replay_of_a_capture_with_plans_gives_the_same_events_through_bytewax_and_polars(tmp_path):
    """datasets/plans.duckdb through the bytewax flow (ledger, shipper, logs exporter, the in-process
    receiver) and through polars alone: the same events, each once, beside the same points."""
    from pgflow.config import Settings
    from pgflow.replay import as_received, replay, replay_events, replay_flow

    path = ROOT / "datasets" / "plans.duckdb"
    out = tmp_path / "replayed.duckdb"
    settings = Settings.load(export_interval_secs=10, retry_initial_delay_secs=0.05, retry_max_delay_secs=0.2)
    stored, unacknowledged = replay_flow(path, settings, out=out, report=True)
    assert unacknowledged == 0  # (a slow machine: a failed send is retried within the shutdown bound)
    expected = rows(events_as_received(replay_events(path, export_interval_secs=10)))
    got = rows(read_logs(out))
    assert len(expected) == 30 and len(got) == len(expected) and got == expected
    polars_points = as_received(replay(path, export_interval_secs=10)).height
    assert stored == polars_points, (stored, polars_points)
