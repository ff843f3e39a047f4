"""Issue 19, item 1: a long statement's wait time carries its own fingerprint in every window.

Ground truth from the workload: one session in ``pg_sleep(N)`` timed by the client, spanning
several short export windows. Before the fix, every window but the statement's last filed its
sampled time under ``other`` (the cap named only fingerprints with completed calls).
"""

from __future__ import annotations

import time
from datetime import UTC

import polars as pl
import pytest
from e2e import timed_sleep

from pgflow import ops
from pgflow.scrape import Scraper
from pgflow.scrape.sampler import Sampler, with_samples

PERIOD = 0.25  # activity sampling
SLEEP_SECS = 9  # spans at least four 2-s windows


@pytest.fixture(scope="module")
def pg(pg_factory):
    """A server of this module's own: sessions other tests leave sleeping on the shared one would
    be sampled as PgSleep time too."""
    server = pg_factory()
    server.execute("CREATE EXTENSION pg_stat_statements")
    return server


def _attr(name: str) -> pl.Expr:
    return pl.col("attributes").str.json_path_match(f"$['{name}']")


def _received(points: pl.DataFrame, metric: str) -> pl.DataFrame:
    return points.filter(pl.col("metric") == metric).with_columns(
        fp=_attr("postgresql.query.fingerprint"), text=_attr("db.query.text"), wait=_attr("postgresql.wait_event.name")
    )


def _sleep_fingerprint(calls: pl.DataFrame) -> str:
    """The fingerprint the query metrics give ``SELECT pg_sleep($1)`` (exactly one call)."""
    mine = calls.filter(pl.col("text").str.to_lowercase().str.contains("pg_sleep", literal=True))
    assert mine["fp"].n_unique() == 1 and mine["value"].sum() == 1, mine
    return mine["fp"][0]


def test_a_long_statement_carries_its_fingerprint_in_every_window_end_to_end(pg, tmp_path):
    """The real collector (flow, sampler thread) to real receivers, uncapped and with
    ``max_queries_tracked=1`` side by side on the same statement."""
    from e2e import collector_env, settle, start_collector, wait_for_baseline

    from pgflow.otlp.receiver import Receiver

    pg.execute("SELECT pg_stat_statements_reset()")
    slept: list[float] = []
    with Receiver() as full_rx, Receiver() as capped_rx:
        procs, dirs = [], []
        for name, rx, extra in (("full", full_rx, {}), ("capped", capped_rx, {"PGFLOW_MAX_QUERIES_TRACKED": "1"})):
            state = tmp_path / name
            dirs.append(state)
            env = collector_env(
                pg.dsn(),
                rx.http_endpoint,
                state,
                PGFLOW_EXPORT_INTERVAL_SECS="2",
                PGFLOW_COLLECTION_INTERVAL_SECS="0.5",
                PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS=str(PERIOD),
                **extra,
            )
            procs.append(start_collector(env, log=tmp_path / f"{name}.log"))
        try:
            for state in dirs:
                wait_for_baseline(state)
            timed_sleep(pg.dsn(), SLEEP_SECS, slept).join()
            for state in dirs:
                settle(4.5, state_dir=state, scrapes=6)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                assert proc.wait(timeout=60) == 0
        full, capped = full_rx.points(), capped_rx.points()

    truth = slept[0]
    slack = 4 * PERIOD  # a sample's period at each end, with room for one late or skipped sample
    act = _received(full, "postgresql.activity.time")
    sleeping = act.filter(pl.col("wait") == "PgSleep")
    fp = _sleep_fingerprint(_received(full, "postgresql.query.calls"))
    assert sleeping["start"].n_unique() >= 4, sleeping  # the statement spans at least four windows
    assert abs(sleeping["value"].sum() - truth) <= slack, (sleeping, truth)
    if int(pg.execute("SHOW server_version_num")[0][0]) < 140000:  # no query_id: unknown, never dropped
        assert set(sleeping["fp"]) == {"unknown"}
        fp = "unknown"
    own = sleeping.filter(pl.col("fp") == fp)["value"].sum()
    assert own >= 0.8 * sleeping["value"].sum(), sleeping.select("start", "fp", "value")
    assert "other" not in set(sleeping["fp"])

    # Capped at one fingerprint: the cap still bounds the names (one per window at most, over
    # the query metrics and the activity), ``other`` is right, and no time is lost.
    capped_act = _received(capped, "postgresql.activity.time")
    capped_sleep = capped_act.filter(pl.col("wait") == "PgSleep")
    assert abs(capped_sleep["value"].sum() - truth) <= slack, (capped_sleep, truth)
    assert set(capped_sleep["fp"]) <= {fp, "other"}  # 13: "unknown" (no query id), which no cap renames
    named = pl.concat([capped_act.select("start", "fp"), _received(capped, "postgresql.query.calls").select("start", "fp")])
    per_window = named.filter(~pl.col("fp").is_in(["other", "unknown"])).group_by("start").agg(pl.col("fp").n_unique())
    assert per_window.height == 0 or per_window["fp"].max() <= 1, per_window


def _record(dsn: str, statements: list[tuple[float, list[float]]], query_samples: bool) -> list:
    """Snapshots every 0.5 s while each ``(seconds, out)`` sleeps in turn (one session each)."""
    snapshots = []
    with (
        Scraper(dsn) as scraper,
        Sampler(dsn, instance=scraper.instance, interval_secs=PERIOD, max_query_samples=100 if query_samples else 0) as sampler,
    ):
        snapshots.append(with_samples(scraper.scrape(), sampler))
        sampler.start()
        for secs, out in statements:
            thread = timed_sleep(dsn, secs, out)
            while thread.is_alive():
                time.sleep(0.5)
                snapshots.append(with_samples(scraper.scrape(), sampler))
            thread.join()
        time.sleep(0.5)
        sampler.stop()
        snapshots.append(with_samples(scraper.scrape(), sampler))
    return snapshots


def _activity(points: pl.DataFrame) -> pl.DataFrame:
    return points.filter(pl.col("metric") == "postgresql.activity.time").with_columns(
        pl.col("attributes").struct.field("postgresql.query.fingerprint").alias("fp"),
        pl.col("attributes").struct.field("postgresql.wait_event.name").alias("wait"),
    )


def _calls_fp(points: pl.DataFrame) -> str:
    calls = points.filter(pl.col("metric") == "postgresql.query.calls").with_columns(
        pl.col("attributes").struct.field("postgresql.query.fingerprint").alias("fp"),
        pl.col("attributes").struct.field("db.query.text").alias("text"),
    )
    mine = calls.filter(pl.col("text").str.to_lowercase().str.contains("pg_sleep", literal=True))
    assert mine["fp"].n_unique() == 1, mine
    return mine["fp"][0]


@pytest.fixture(scope="module")
def untracked_planning(pg_factory):
    """A server where pg_stat_statements shows a statement only once it has run (no track_planning)."""
    server = pg_factory(settings={"pg_stat_statements.track_planning": "off"})
    server.execute("CREATE EXTENSION pg_stat_statements")
    return server


def test_a_query_id_nothing_knows_is_unknown_until_it_is_known_never_other(untracked_planning):
    """Query samples off (no statement text read): the first run's entry is hidden by
    pg_stat_statements until its call completes, so its windows before are ``unknown`` (not
    ``other``); the second run of the same statement is known from its first sample on. With the
    cap at one fingerprint the totals equal the uncapped run's."""
    server = untracked_planning
    if int(server.execute("SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("PostgreSQL 13 has no query_id: every sample is unknown")
    server.execute("SELECT pg_stat_statements_reset()")
    first: list[float] = []
    second: list[float] = []
    snapshots = _record(server.dsn(), [(4, first), (4, second)], query_samples=False)
    points = ops.run(snapshots, export_interval_secs=1)
    act = _activity(points).filter(pl.col("wait") == "PgSleep")
    fp = _calls_fp(points)
    assert set(act["fp"]) <= {fp, "unknown"} and "other" not in set(act["fp"])
    assert act.filter(pl.col("fp") == "unknown")["value"].sum() > 0  # the first run, before its call completed
    # the second run (the statement is now known) is named whole: the named time is at least
    # the second run's, and the unknown time at most the first's
    slack = 4 * PERIOD
    assert act.filter(pl.col("fp") == fp)["value"].sum() >= second[0] - slack, act
    assert act.filter(pl.col("fp") == "unknown")["value"].sum() <= first[0] + slack, act

    capped = _activity(ops.run(snapshots, export_interval_secs=1, max_queries_tracked=1))
    full = _activity(points)
    assert capped["value"].sum() == pytest.approx(full["value"].sum(), abs=1e-9)
    by_wait = lambda f: dict(f.group_by("wait").agg(pl.col("value").sum()).iter_rows())  # noqa: E731
    assert by_wait(capped) == pytest.approx(by_wait(full), abs=1e-9)


def test_a_statement_pgflow_has_read_is_named_before_pg_stat_statements_shows_it(untracked_planning):
    """Query samples on: the sampler reads the running statement's text (past 100 ms), so its
    first execution carries its own fingerprint from the first window, before its call completes
    and with no ``track_planning``; and that fingerprint is the one its calls carry."""
    server = untracked_planning
    if int(server.execute("SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("PostgreSQL 13 has no query_id: every sample is unknown")
    server.execute("SELECT pg_stat_statements_reset()")
    slept: list[float] = []
    snapshots = _record(server.dsn(), [(5, slept)], query_samples=True)
    points = ops.run(snapshots, export_interval_secs=1)
    act = _activity(points).filter(pl.col("wait") == "PgSleep")
    fp = _calls_fp(points)
    assert act.height >= 4  # several windows before the call completed
    own = act.filter(pl.col("fp") == fp)["value"].sum()
    assert own >= 0.8 * act["value"].sum() and own >= slept[0] - 4 * PERIOD, act


def test_a_ledger_written_before_the_seen_query_ids_still_loads():
    """The activity state gained ``seen`` (issue 19): a state pickled without it loads and works."""
    import pickle
    from datetime import datetime, timedelta

    from pgflow.ops import activity as act
    from pgflow.schema import STATEMENTS, Snapshot

    old = act.ActivityState()
    del old.__dict__["seen"]  # what an older pgflow pickled
    state = pickle.loads(pickle.dumps(old))
    assert state.seen == {}
    snapshot = Snapshot("i", datetime(2026, 1, 1, tzinfo=UTC), 180000, None, None, pl.DataFrame(schema=STATEMENTS))
    assert act.add(state, snapshot, timedelta(seconds=1)).seen == {}


def test_track_planning_names_a_first_execution_before_its_call_completes(pg):
    """Query samples off, ``track_planning`` on (the test server's default): pg_stat_statements
    shows the entry once the statement is planned, with no completed call, and the labels pgflow
    looks query ids up in hold every entry of the scrape, not only those that ran in the window."""
    if int(pg.execute("SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("PostgreSQL 13 has no query_id: every sample is unknown")
    assert pg.execute("SHOW pg_stat_statements.track_planning")[0][0] == "on"
    pg.execute("SELECT pg_stat_statements_reset()")
    slept: list[float] = []
    snapshots = _record(pg.dsn(), [(5, slept)], query_samples=False)
    points = ops.run(snapshots, export_interval_secs=1)
    act = _activity(points).filter(pl.col("wait") == "PgSleep")
    fp = _calls_fp(points)
    assert act.height >= 4
    own = act.filter(pl.col("fp") == fp)["value"].sum()
    assert own >= 0.8 * act["value"].sum() and own >= slept[0] - 4 * PERIOD, act
