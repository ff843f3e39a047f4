"""Query samples (issue 12) from the active-session sampler, against a real PostgreSQL.

One workload runs once for the module (about 3 s) on a server started with a small
``track_activity_query_size`` (256): a 2 s statement with a secret literal, short statements,
a long text past the size, twelve slow sessions of two shapes, and a lock chain A -> B -> C
(A holds a row lock and sits idle in its transaction). Ground truth comes from the clients
(their pids, their timings) and from pg_stat_statements; the query metrics' fingerprints come
from ``pgflow.ops.run`` over the same snapshots.

Three samplers watch it at once: the one the snapshots carry (threshold 0.8 s), one whose
threshold no statement reaches, and one whose budget is 3 and that is drained only at the end.
A capture with sampling off (``activity_sample_interval_secs = 0``) runs beside them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import duckdb
import polars as pl
import psycopg
import pytest

from pgflow import capture, ops, telemetry
from pgflow.config import Settings
from pgflow.ops.query_samples import TRUNCATED, SampleLimits, query_sample_events, window_index
from pgflow.schema import QUERY_SAMPLES, Snapshot
from pgflow.scrape import Scraper
from pgflow.scrape.sampler import Sampler, sampler_for, with_samples

SECRET = "supersecret-literal"
PERIOD = 0.1
THRESHOLD_MS = 800
SLOW_SECS = 2.0
SHORT_SECS = 0.2
QUERY_SIZE = 256
SECRET_SQL = f"SELECT pg_sleep({SLOW_SECS:g}) WHERE '{SECRET}' <> current_user"
SHORT_SQL = f"SELECT pg_sleep({SHORT_SECS:g}), 'supersecret-short'"
LONG_SQL = f"SELECT pg_sleep({SLOW_SECS:g}), 'supersecret-truncated-{'x' * 300}'"
MANY_A = [f"SELECT pg_sleep({SLOW_SECS:g}), {i} AS a" for i in range(8)]
MANY_B = [f"SELECT pg_sleep({SLOW_SECS:g}) WHERE {i} >= 0" for i in range(4)]
HOLD_SQL = "SELECT v FROM qs_lock WHERE id = 1 FOR UPDATE"
WAIT_SQL = ("UPDATE qs_lock SET v = v + 1 WHERE id = 1", "UPDATE qs_lock SET v = v + 2 WHERE id = 1")


@dataclass
class Workload:
    version: int
    snapshots: list[Snapshot] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # application_name -> the client's backend pid
    short_secs: list[float] = field(default_factory=list)  # client-timed short statements
    slow_secs: list[float] = field(default_factory=list)  # client-timed slow statements
    unreached: Sampler | None = None  # threshold above every statement
    unreached_samples: pl.DataFrame | None = None
    unreached_queries: pl.DataFrame | None = None
    budget: pl.DataFrame | None = None  # the budget-3 sampler's query samples
    per_query_id: pl.DataFrame | None = None  # the query samples of a sampler reading 2 texts per query id an hour
    off_capture: str = ""
    capture: str = ""
    log: list[str] = field(default_factory=list)
    server: object = None

    @property
    def queries(self) -> pl.DataFrame:
        return pl.concat([s.query_samples for s in self.snapshots])


class _Lines(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(self.format(record) + " " + json.dumps(record.__dict__, default=str))


def _session(dsn: str, app: str, sql: str, w: Workload, timings: list[float] | None = None) -> threading.Thread:
    def run() -> None:
        with psycopg.connect(dsn, autocommit=True, application_name=app) as conn:
            w.pids[app] = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            for statement in sql.split(";\n"):
                started = time.monotonic()
                conn.execute(statement)  # type: ignore[arg-type]
                if timings is not None:
                    timings.append(time.monotonic() - started)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(server, sql: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.execute(sql)[0][0]:
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {sql}")


def _texts_read(instance: str) -> float:
    return telemetry.REGISTRY.get_sample_value("pgflow_query_sample_texts_read_total", {"instance": instance}) or 0.0


@pytest.fixture(scope="module")
def workload(pg_factory, tmp_path_factory) -> Workload:
    server = pg_factory(settings={"track_activity_query_size": str(QUERY_SIZE)})
    server.execute(
        "CREATE EXTENSION pg_stat_statements",
        "CREATE TABLE qs_lock (id int PRIMARY KEY, v int)",
        "INSERT INTO qs_lock VALUES (1, 0)",
        "SELECT pg_stat_statements_reset()",
    )
    dsn = server.dsn()
    w = Workload(version=int(server.execute("SHOW server_version_num")[0][0]), server=server)
    lines = _Lines(w.log)
    logger = logging.getLogger("pgflow")
    old_level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    tmp = tmp_path_factory.mktemp("query-samples")
    w.off_capture, w.capture = str(tmp / "off.duckdb"), str(tmp / "on.duckdb")
    off = Settings.load(activity_sample_interval_secs=0)
    try:
        with (
            Scraper(dsn) as scraper,
            Sampler(dsn, instance="qs-main", interval_secs=PERIOD, sample_min_duration_ms=THRESHOLD_MS) as main,
            Sampler(dsn, instance="qs-unreached", interval_secs=PERIOD, sample_min_duration_ms=60_000) as high,
            Sampler(dsn, instance="qs-budget", interval_secs=PERIOD, sample_min_duration_ms=THRESHOLD_MS, max_query_samples=3) as budget,
            Sampler(
                dsn, instance="qs-per-id", interval_secs=PERIOD, sample_min_duration_ms=THRESHOLD_MS, samples_per_fingerprint_per_hour=2
            ) as per_id,
            Scraper(dsn) as off_scraper,
        ):
            assert sampler_for(dsn, "qs-off", off) is None  # sampling off: no sampler at all
            off_samplers = {off_scraper.instance: sampler_for(dsn, off_scraper.instance, off)}
            off_thread = threading.Thread(
                target=capture.capture_live,
                args=([off_scraper], w.off_capture),
                kwargs=dict(scrapes=4, interval=0.5, samplers={k: v for k, v in off_samplers.items() if v}),
                daemon=True,
            )
            w.snapshots.append(with_samples(scraper.scrape(), main))
            for s in (main, high, budget, per_id):
                s.start()
            off_thread.start()
            holder = psycopg.connect(dsn, application_name="qs-holder")  # A: a row lock, then idle in transaction
            w.pids["qs-holder"] = holder.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            holder.execute(HOLD_SQL)
            threads = [
                _session(dsn, "qs-secret", SECRET_SQL, w, w.slow_secs),
                _session(dsn, "qs-short", ";\n".join([SHORT_SQL] * 5), w, w.short_secs),
                _session(dsn, "qs-long", LONG_SQL, w, w.slow_secs),
            ]
            threads += [_session(dsn, f"qs-many-a{i}", sql, w, w.slow_secs) for i, sql in enumerate(MANY_A)]
            threads += [_session(dsn, f"qs-many-b{i}", sql, w, w.slow_secs) for i, sql in enumerate(MANY_B)]
            threads.append(_session(dsn, "qs-waiter-b", WAIT_SQL[0], w))
            _wait_for(server, "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            threads.append(_session(dsn, "qs-waiter-c", WAIT_SQL[1], w))
            _wait_for(server, "SELECT count(*) = 2 FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            deadline = time.monotonic() + SLOW_SECS + 0.5  # the waiters wait at least as long as the slow ones
            while time.monotonic() < deadline:
                w.snapshots.append(with_samples(scraper.scrape(), main))
                time.sleep(0.4)
            holder.commit()
            holder.close()
            for t in threads:
                t.join(30)
            off_thread.join(30)
            for s in (main, high, budget, per_id):
                s.stop()
            w.snapshots.append(with_samples(scraper.scrape(), main))
            w.unreached_samples, _ = high.drain()
            w.unreached_queries = high.drain_query_samples()
            w.unreached = high
            w.budget = budget.drain_query_samples()
            w.per_query_id = per_id.drain_query_samples()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    capture.record(w.snapshots, w.capture)
    return w


def _fingerprint_of(points: pl.DataFrame, text: str) -> str:
    """The fingerprint the query metrics give the statement whose normalized text is ``text``."""
    calls = (
        points.filter(pl.col("metric") == "postgresql.query.calls")
        .with_columns(pl.col("attributes").struct.unnest())
        .filter(pl.col("db.query.text") == text)
    )
    assert calls["postgresql.query.fingerprint"].n_unique() == 1, f"no query series for {text!r}"
    return calls["postgresql.query.fingerprint"][0]


def _events(snapshots: list[Snapshot], limits: SampleLimits | None = None, **settings) -> tuple[SampleLimits, pl.DataFrame]:
    frames = []
    for snapshot in snapshots:
        limits, events = query_sample_events(limits, snapshot, **settings)
        frames.append(events)
    return limits, pl.concat(frames).with_columns(pl.col("attributes").struct.unnest())  # type: ignore[return-value]


def _by_app(w: Workload, app: str) -> pl.DataFrame:
    return w.queries.filter(pl.col("application_name") == app)


def test_a_slow_statement_gives_one_normalized_sample_keyed_like_its_metrics(workload):
    w = workload
    row = _by_app(w, "qs-secret")
    assert row.height == 1  # one execution: one sample, however many ticks saw it run
    (r,) = row.rows(named=True)
    assert r["text"] == "SELECT pg_sleep($1) WHERE $2 <> CURRENT_USER"
    assert r["pid"] == w.pids["qs-secret"] and r["database"] == "postgres" and r["user"] == "postgres"
    assert r["state"] == "active" and r["wait_event"] == "PgSleep" and not r["truncated"] and not r["unparsable"]
    assert THRESHOLD_MS / 1000 <= r["duration_secs"] <= max(w.slow_secs)
    assert r["query_start"] < r["seen_at"] and r["blocking_root_pid"] is None
    points = ops.run(w.snapshots)
    assert r["fingerprint"] == _fingerprint_of(points, "SELECT pg_sleep($1) WHERE $2 <> CURRENT_USER")
    if w.version >= 140000:  # the statement's pg_stat_statements queryid; PostgreSQL 13 has none
        (pgss,) = w.snapshots[-1].statements.filter(
            pl.col("query").str.contains("current_user", literal=True) & pl.col("query").str.contains("pg_sleep")
        )["queryid"]
        assert r["query_id"] == pgss
    else:
        assert r["query_id"] is None
    _, events = _events(w.snapshots)
    (e,) = events.filter(pl.col("postgresql.application_name") == "qs-secret").rows(named=True)
    assert e["event_name"] == "db.server.query_sample" and e["db.system.name"] == "postgresql"
    assert e["db.query.text"] == r["text"] and e["postgresql.query.fingerprint"] == r["fingerprint"]
    assert e["postgresql.pid"] == r["pid"] and e["postgresql.query.duration"] == r["duration_secs"]
    assert e["db.namespace"] == "postgres" and e["user.name"] == "postgres" and e["network.peer.address"] == "127.0.0.1"
    assert e["postgresql.state"] == "active" and e["postgresql.wait_event_type"] == "Timeout"
    assert e["postgresql.query_start"].startswith(r["query_start"].strftime("%Y-%m-%dT%H:%M:%S"))
    assert e["postgresql.query.truncated"] is None and e["postgresql.query.unparsable"] is None


def test_the_literal_is_in_no_frame_capture_event_or_log_line(workload):
    w = workload
    assert SECRET in SECRET_SQL and _by_app(w, "qs-secret").height == 1  # it was sampled
    for snapshot in w.snapshots:
        for name in Snapshot.FRAMES:
            assert "supersecret" not in getattr(snapshot, name).write_csv(), name
    stored = list(capture.read(w.capture))
    assert pl.concat([s.query_samples for s in stored]).equals(w.queries)  # captures keep samples as they were
    with duckdb.connect(w.capture, read_only=True) as con:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            assert "supersecret" not in str(con.execute(f'SELECT * FROM "{table}"').fetchall()), table
    with open(w.capture, "rb") as f:
        assert b"supersecret" not in f.read()
    _, events = _events(w.snapshots)
    assert events.height and "supersecret" not in events.write_json()
    assert "supersecret" not in "\n".join(w.log)


def test_a_statement_shorter_than_the_threshold_is_not_sampled(workload):
    w = workload
    assert len(w.short_secs) == 5 and max(w.short_secs) < THRESHOLD_MS / 1000  # ground truth: all shorter
    assert _by_app(w, "qs-short").height == 0
    # The sampler whose threshold no statement reached saw the sessions but read no text.
    assert w.unreached.stats.taken > 0 and max(w.slow_secs) < 60
    sleeping = w.unreached_samples.filter(pl.col("wait_event") == "PgSleep")["count"].sum()
    assert sleeping > 0 and w.unreached_queries.height == 0 and _texts_read("qs-unreached") == 0


def test_a_text_longer_than_track_activity_query_size_leaves_as_a_marker(workload):
    w = workload
    assert len(LONG_SQL) > QUERY_SIZE
    (r,) = _by_app(w, "qs-long").rows(named=True)
    assert r["text"] == TRUNCATED and r["truncated"] and not r["unparsable"] and r["fingerprint"]
    _, events = _events(w.snapshots)
    (e,) = events.filter(pl.col("postgresql.application_name") == "qs-long").rows(named=True)
    assert e["db.query.text"] == TRUNCATED and e["postgresql.query.truncated"] is True


def test_limits_hold_with_many_slow_sessions(workload):
    w = workload
    many = w.queries.filter(pl.col("application_name").str.starts_with("qs-many"))
    assert many.height == len(MANY_A) + len(MANY_B) and many["pid"].n_unique() == many.height  # once each
    assert many["fingerprint"].n_unique() == 2
    # The sampler with a budget of 3 read 3 texts (and its root blockers' at most) and skipped the rest.
    assert w.budget.height == 3 and _texts_read("qs-budget") <= 4
    assert (
        telemetry.REGISTRY.get_sample_value("pgflow_query_samples_skipped_total", {"instance": "qs-budget", "reason": "budget"})
        >= many.height - 3
    )
    # A sampler reads at most samples_per_fingerprint_per_hour texts per query id an hour (14+: 13 has none).
    per_id = w.per_query_id.filter(pl.col("application_name").str.starts_with("qs-many"))
    skipped_early = (
        telemetry.REGISTRY.get_sample_value("pgflow_query_samples_skipped_total", {"instance": "qs-per-id", "reason": "fingerprint"}) or 0
    )
    if w.version >= 140000:
        assert per_id["fingerprint"].value_counts()["count"].to_list() == [2, 2] and skipped_early >= many.height - 4
    else:
        assert per_id.height == many.height and skipped_early == 0
    # The limiter: at most 3 per fingerprint per hour, at most 5 per window, the rest counted by reason.
    limits, events = _events(w.snapshots, samples_per_fingerprint_per_hour=3, max_samples_per_window=5, export_interval_secs=3600)
    assert events.height and events["postgresql.query.fingerprint"].value_counts()["count"].max() <= 3
    per_window: dict[int, int] = {}  # a snapshot's samples count against the window its scrape falls in
    state = None
    for snapshot in w.snapshots:
        state, sent = query_sample_events(
            state, snapshot, samples_per_fingerprint_per_hour=3, max_samples_per_window=5, export_interval_secs=3600
        )
        key = window_index(snapshot.scraped_at, 3600)
        per_window[key] = per_window.get(key, 0) + sent.height
    assert max(per_window.values()) <= 5 and sum(per_window.values()) == events.height
    windows = {window_index(s.scraped_at, 3600) for s in w.snapshots if s.query_samples.height}
    if len(windows) == 1:
        assert events.height == 5
    taken, skipped = limits.counts_since(None)
    assert taken == events.height and taken + sum(skipped.values()) == w.queries.height
    assert set(skipped) <= {"window", "fingerprint"} and skipped
    before = telemetry.REGISTRY.get_sample_value("pgflow_query_samples_total", {"instance": "qs-limits"}) or 0
    telemetry.count_query_samples("qs-limits", taken, skipped)
    assert telemetry.REGISTRY.get_sample_value("pgflow_query_samples_total", {"instance": "qs-limits"}) == before + taken
    # The state is a value: the one passed in is unchanged, and it pickles small.
    import pickle

    again, replayed = _events(w.snapshots, limits, samples_per_fingerprint_per_hour=3, max_samples_per_window=5, export_interval_secs=3600)
    assert replayed.height == 0  # the same executions again (a restarted sampler): never sent twice
    assert limits.counts_since(None) == (taken, skipped) and again.counts_since(limits)[1]["seen"] == events.height
    assert len(pickle.dumps(again)) < 10_000


def test_a_blocked_session_carries_its_root_blocker(workload):
    w = workload
    points = ops.run(w.snapshots)
    holder_fp = _fingerprint_of(points, "SELECT v FROM qs_lock WHERE id = $1 FOR UPDATE")
    for app in ("qs-waiter-b", "qs-waiter-c"):  # C waits on B, which waits on A: A is the root of both
        (r,) = _by_app(w, app).rows(named=True)
        assert r["wait_event_type"] == "Lock" and r["text"].startswith("UPDATE qs_lock SET v = v + $1")
        assert r["blocking_root_pid"] == w.pids["qs-holder"]
        assert r["blocking_root_state"] == "idle in transaction"
        assert r["blocking_root_fingerprint"] == holder_fp
    _, events = _events(w.snapshots)
    waiters = events.filter(pl.col("postgresql.application_name").str.starts_with("qs-waiter"))
    assert waiters["postgresql.blocking.root.pid"].to_list() == [w.pids["qs-holder"]] * 2
    assert set(waiters["postgresql.blocking.root.fingerprint"]) == {holder_fp}


def test_sampling_off_takes_no_query_samples(workload):
    snapshots = list(capture.read(workload.off_capture))
    assert len(snapshots) == 4 and all(s.samples.height == 0 for s in snapshots)
    assert all(s.query_samples.height == 0 for s in snapshots)
    assert _by_app(workload, "qs-secret").height == 1  # while the sampling collector took one


def test_older_captures_without_query_samples_still_read(workload, tmp_path):
    path = tmp_path / "old.duckdb"
    capture.record(workload.snapshots[:2], path)
    with duckdb.connect(str(path)) as con:
        con.execute("DROP TABLE query_samples")  # as written before issue 12
    (first, second) = capture.read(path)
    assert first.query_samples.schema == QUERY_SAMPLES and first.query_samples.height == 0
    assert second.statements.height == workload.snapshots[1].statements.height


def test_a_failed_text_read_is_counted_and_retried(workload, monkeypatch, caplog):
    """The text statement times out (statement_timeout, for real): counted, the activity sample
    stands, the connection recovers and the execution is read at the next tick."""
    import pgflow.scrape.query_sample_reads as reads_module

    server = workload.server
    w = Workload(version=0)
    caplog.set_level(logging.DEBUG, "pgflow.sampler")
    worker = _session(server.dsn(), "qs-retry", SECRET_SQL, w)
    _wait_for(
        server,
        "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'qs-retry' "
        "AND state = 'active' AND now() - query_start > interval '400 ms'",
    )
    sampler = Sampler(server.dsn(), instance="qs-retry", interval_secs=PERIOD, statement_timeout_ms=200, sample_min_duration_ms=300)
    slow_texts = reads_module._TEXTS_SQL.replace("FROM unnest", "FROM pg_sleep(1), unnest")
    before = telemetry.REGISTRY.get_sample_value("pgflow_query_samples_skipped_total", {"instance": "qs-retry", "reason": "failed"}) or 0
    with monkeypatch.context() as patch:
        patch.setattr(reads_module, "_TEXTS_SQL", slow_texts)
        assert sampler.sample()  # the activity sample is taken; its text statement timed out
    assert (
        telemetry.REGISTRY.get_sample_value("pgflow_query_samples_skipped_total", {"instance": "qs-retry", "reason": "failed"})
        == before + 1
    )
    assert [r.kv["error"] for r in caplog.records if "texts not read" in r.getMessage()] == ["QueryCanceled"]
    assert sampler.drain_query_samples().height == 0 and sampler.drain()[0]["count"].sum() >= 1
    assert sampler.sample()  # the next tick reads it
    (row,) = sampler.drain_query_samples().rows(named=True)
    assert row["application_name"] == "qs-retry" and row["text"] == "SELECT pg_sleep($1) WHERE $2 <> CURRENT_USER"
    sampler.close()
    worker.join(30)


def test_without_pg_read_all_stats_other_roles_texts_are_not_sampled(workload):
    """PostgreSQL shows other roles' texts as <insufficient privilege>: those sessions are not
    sampled; the role's own slow statement is (README: Query samples, privilege)."""
    server = workload.server
    server.execute("DROP ROLE IF EXISTS qs_limited", "CREATE ROLE qs_limited LOGIN PASSWORD 'pw'")
    limited = server.dsn(user="qs_limited", password="pw")
    w = Workload(version=0)
    threads = [_session(server.dsn(), "qs-other-role", SECRET_SQL, w), _session(limited, "qs-own-role", SECRET_SQL, w)]
    _wait_for(
        server,
        "SELECT count(*) = 2 FROM pg_stat_activity WHERE application_name IN ('qs-other-role', "
        "'qs-own-role') AND state = 'active' AND now() - query_start > interval '400 ms'",
    )
    with Sampler(limited, instance="qs-limited", interval_secs=PERIOD, sample_min_duration_ms=300) as sampler:
        assert sampler.sample()
        rows = sampler.drain_query_samples()
        _, stats = sampler.drain()
    for t in threads:
        t.join(30)
    assert rows["application_name"].to_list() == ["qs-own-role"] and rows["user"].to_list() == ["qs_limited"]
    assert stats.filter(pl.col("stat") == "hidden_sessions")["value"].max() >= 1  # the other one, counted
