"""The operators: exact deltas, fingerprints, aggregation, cap with rollup, windows, points."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from conftest import PGBENCH_STATEMENTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from pgflow import ops
from pgflow.errors import ConfigError
from pgflow.ops.cap import _names_at
from pgflow.ops.delta import Counters, Deltas, active_rows, delta
from pgflow.ops.fingerprint import MAX_TEXT, Fingerprinter, query_info
from pgflow.ops.groups import _group_exactly, columns, group_rows, number, rows_where
from pgflow.ops.window import Run, window_bounds
from pgflow.schema import POINTS, STATEMENT_INT_COUNTERS, STATEMENT_TIME_COUNTERS, STATEMENTS, Snapshot, conform
from pgflow.scrape import Scraper

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snap(
    at: datetime, rows: list[dict], *, stats_reset: datetime | None = T0, dealloc: int | None = 0, instance: str = "db1:5432"
) -> Snapshot:
    base = {"dbid": 1, "userid": 10, "toplevel": True, "database": "app", "user": "web"}
    frame = conform(pl.DataFrame([{**base, **r} for r in rows]) if rows else pl.DataFrame(), STATEMENTS)
    return Snapshot(
        instance=instance,
        scraped_at=at,
        server_version_num=170000,
        stats_reset=stats_reset,
        dealloc=dealloc,
        statements=frame,
        server_address="db1",
        server_port=5432,
    )


def calls_of(points: pl.DataFrame, attr: str = "postgresql.query.fingerprint") -> dict[str, float]:
    calls = points.filter(pl.col("metric") == "postgresql.query.calls")
    keyed = calls.with_columns(k=pl.col("attributes").struct.field(attr))
    return dict(keyed.group_by("k").agg(pl.col("value").sum()).iter_rows())


# Delta -----------------------------------------------------------------------------------


def test_baseline_emits_nothing_then_exact_difference():
    s0 = snap(T0, [{"queryid": 1, "query": "SELECT 1", "calls": 5, "total_exec_time": 10.0}])
    s1 = snap(T0 + timedelta(seconds=10), [{"queryid": 1, "query": "SELECT 1", "calls": 8, "total_exec_time": 16.0}])
    state, out = delta(None, s0)
    assert out is None
    state, out = delta(state, s1)
    row = out.statements.row(0, named=True)
    assert (row["calls"], row["total_exec_time"]) == (3, 6.0)
    assert (out.start, out.end) == (s0.scraped_at, s1.scraped_at)


def test_new_key_counts_whole_value_and_reset_entry_counts_current():
    s0 = snap(T0, [{"queryid": 1, "calls": 50}, {"queryid": 2, "calls": 7}])
    s1 = snap(
        T0 + timedelta(seconds=10),
        [
            {"queryid": 1, "calls": 4},  # went down: reset, 4 since
            {"queryid": 3, "calls": 2},
        ],
    )  # new; 2 vanished
    state, _ = delta(None, s0)
    _, out = delta(state, s1)
    assert dict(out.statements.select("queryid", "calls").iter_rows()) == {1: 4, 3: 2}


def test_stats_since_change_means_recreated():
    a, b = T0 - timedelta(hours=1), T0 + timedelta(seconds=5)
    s0 = snap(T0, [{"queryid": 1, "calls": 5, "stats_since": a}])
    s1 = snap(T0 + timedelta(seconds=10), [{"queryid": 1, "calls": 9, "stats_since": b}])
    _, out = delta(delta(None, s0)[0], s1)
    assert out.statements["calls"].to_list() == [9]  # not 4: the entry was re-created


def test_whole_reset_counts_current_values_and_dealloc():
    s0 = snap(T0, [{"queryid": 1, "calls": 50}], dealloc=3)
    s1 = snap(T0 + timedelta(seconds=10), [{"queryid": 1, "calls": 60}], stats_reset=T0 + timedelta(seconds=5), dealloc=2)
    _, out = delta(delta(None, s0)[0], s1)
    assert out.statements["calls"].to_list() == [60] and out.deallocated == 2
    s2 = snap(T0 + timedelta(seconds=20), [{"queryid": 1, "calls": 61}], stats_reset=T0 + timedelta(seconds=5), dealloc=9)
    _, out = delta(delta(None, s1)[0], s2)
    assert out.deallocated == 7


def test_toplevel_is_part_of_the_key_and_null_means_top():
    rows0 = [{"queryid": 1, "toplevel": True, "calls": 5}, {"queryid": 1, "toplevel": False, "calls": 100}]
    rows1 = [{"queryid": 1, "toplevel": True, "calls": 6}, {"queryid": 1, "toplevel": False, "calls": 101}]
    _, out = delta(delta(None, snap(T0, rows0))[0], snap(T0 + timedelta(seconds=1), rows1))
    assert sorted(out.statements["calls"].to_list()) == [1, 1]
    pg13 = [{"queryid": 1, "toplevel": None, "calls": 5}]
    _, out = delta(delta(None, snap(T0, pg13))[0], snap(T0 + timedelta(seconds=1), [{**pg13[0], "calls": 9}]))
    assert out.statements["calls"].to_list() == [4]


def test_snapshot_from_the_past_is_ignored():
    s0 = snap(T0, [{"queryid": 1, "calls": 5}])
    state, _ = delta(None, s0)
    new_state, out = delta(state, snap(T0 - timedelta(seconds=1), [{"queryid": 1, "calls": 1}]))
    assert out is None and new_state is state


# Fingerprint ------------------------------------------------------------------------------


def test_seed_fingerprint_cases():
    a, b = query_info("SELECT * FROM users WHERE id = 1"), query_info("SELECT * FROM users WHERE id = 999")
    assert a.fingerprint == b.fingerprint
    assert query_info("SELECT * FROM orders WHERE id = 1").fingerprint != a.fingerprint
    assert query_info("DELETE FROM users WHERE id = 1").fingerprint != a.fingerprint
    assert (a.operation, a.summary) == ("SELECT", "SELECT users")


def test_in_lists_comments_and_whitespace():
    base = query_info("SELECT * FROM t WHERE id IN (1, 2, 3)")
    assert query_info("SELECT * FROM t WHERE id IN (4, 5)").fingerprint == base.fingerprint
    assert query_info("select  *\n from t /* hello */ where id in (7) -- x").fingerprint == base.fingerprint


def test_operations_and_summaries():
    cases = {
        "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2": ("UPDATE", "UPDATE pgbench_branches"),
        "INSERT INTO h (a) VALUES ($1)": ("INSERT", "INSERT h"),
        "DELETE FROM t WHERE a = $1": ("DELETE", "DELETE t"),
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE": ("MERGE", "MERGE t s"),
        "CREATE TABLE x (a int)": ("DDL", "DDL x"),
        "BEGIN": ("TRANSACTION", "BEGIN"),
        "END": ("TRANSACTION", "COMMIT"),
        "VACUUM t": ("MAINTENANCE", "MAINTENANCE t"),
    }
    for text, expected in cases.items():
        info = query_info(text)
        assert (info.operation, info.summary) == expected, text


@pytest.mark.parametrize(
    "text",
    [
        "SELECT * FROM users WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1",  # truncated
        "SELECT '\udcff\udcfe' FROM t",  # undecodable bytes as psycopg surrogate-escapes them
        "<insufficient privilege>",
        "",
        "SELEC * FORM nowhere",
    ],
)
def test_fallback_never_raises_and_is_stable(text):
    a, b = query_info(text), query_info(text)
    assert a == b and len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0  # xxh3_64: one format for every fingerprint
    assert len(a.text) <= MAX_TEXT


def test_one_megabyte_statement():
    text = "SELECT " + ", ".join(f"'{i}' AS c{i}" for i in range(80_000)) + " FROM t"
    assert len(text) > 1_000_000
    info = query_info(text)
    assert len(info.text) <= MAX_TEXT and "'1'" not in info.text


@pytest.mark.parametrize(
    "text",
    [
        "ALTER ROLE app PASSWORD 'hunter2-secret'",
        "SELECT * FROM sessions WHERE token = 'hunter2-secret'",
        "SELECT 1 /* hunter2-secret */",
        "SELECT * FROM sessions WHERE token = 'hunter2-secret",  # truncated: fallback path
        "UPDATE t SET v = $1 -- hunter2-secret",
    ],
)
def test_secret_literals_never_reach_any_column(text):
    info = query_info(text)
    assert all("hunter2" not in getattr(info, f) for f in ("fingerprint", "operation", "summary", "text"))


def test_fingerprinter_caches_by_key_and_text():
    fp = Fingerprinter(key_cache_size=10, text_cache_size=10)
    frame = pl.DataFrame({"dbid": [1, 1, 2], "queryid": [7, 8, 7], "query": ["SELECT 1", "SELECT 2", "SELECT 1"]})
    out = fp.apply("i", frame)
    assert out["fingerprint"].n_unique() == 1 and fp.parses == 2  # 3 keys, 2 distinct texts
    fp.apply("i", frame)
    assert fp.key_hits == 3
    many = pl.DataFrame({"dbid": [1] * 30, "queryid": list(range(100, 130)), "query": [f"SELECT {i}" for i in range(30)]})
    assert fp.apply("i", many).height == 30
    assert fp._by_key["i"].height <= 30  # bounded: keeps this frame's keys, sheds older ones


def test_one_fingerprint_keeps_one_label_whatever_the_cache_size():
    """Keys of one fingerprint (t10..t19: libpg_query ignores digits in names) share one label, so
    a series' attributes never depend on which of its keys ran in a window. With a label cache
    smaller than the fingerprints of one frame, the labels put first were pushed out while the
    frame was labelled and each key kept its own text (the series' summary flipped window to window)."""
    texts = [f"SELECT count(*) FROM t{i}" for i in range(10, 20)] + [f"SELECT count(*) FROM x{chr(97 + i)}" for i in range(26)]
    frame = pl.DataFrame({"dbid": [1] * len(texts), "queryid": list(range(len(texts))), "query": texts})
    for size in (1, 5, 50_000):
        out = Fingerprinter(key_cache_size=size, text_cache_size=size).apply("i", frame)
        same = out.head(10)
        assert same["fingerprint"].n_unique() == 1, size
        assert same["text"].unique().to_list() == ["SELECT count(*) FROM t10"], size  # the smallest text wins


# Cap, windows, points ---------------------------------------------------------------------


def _pipeline_snaps(n_queries: int, scrapes: int = 4, step: int = 20) -> list[Snapshot]:
    out = []
    for i in range(scrapes):
        rows = [
            {
                "queryid": q,
                "query": f"SELECT * FROM t{q} WHERE id = $1",
                "calls": (i + 1) * (q + 1),
                "total_exec_time": float((i + 1) * (q + 1) * (q + 1)),
            }
            for q in range(n_queries)
        ]
        out.append(snap(T0 + timedelta(seconds=step * i), rows))
    return out


def test_cap_rolls_into_other_and_keeps_totals():
    snaps = _pipeline_snaps(10)
    full = ops.run(snaps, export_interval_secs=60)
    capped = ops.run(snaps, export_interval_secs=60, max_queries_tracked=3)
    assert sum(calls_of(full).values()) == sum(calls_of(capped).values()) == sum(3 * (q + 1) for q in range(10))
    named = {k for k in calls_of(capped) if k != "other"}
    assert len(named) == 3 and "other" in calls_of(capped)
    tables = set(calls_of(capped, "db.query.summary"))
    assert {"SELECT t9", "SELECT t8", "SELECT t7"} <= tables  # the heaviest stay named


def test_slow_query_threshold_rolls_fast_series():
    snaps = _pipeline_snaps(5)
    pts = ops.run(snaps, export_interval_secs=60, slow_query_threshold_ms=3.5)  # mean = q+1 ms
    summaries = calls_of(pts, "db.query.summary")
    assert set(summaries) == {"SELECT t3", "SELECT t4", "SELECT"}  # "SELECT": the other series' summary
    assert sum(summaries.values()) == sum(3 * (q + 1) for q in range(5))


def test_lru_evicts_least_recently_active():
    first = [{"queryid": q, "query": f"SELECT * FROM a{q}", "calls": 1, "total_exec_time": 1.0} for q in range(3)]
    s = [snap(T0, first)]
    # window 2: a0 active again; window 3: a new one arrives at the cap of 2
    s.append(snap(T0 + timedelta(seconds=61), [dict(r, calls=2) for r in first]))
    later = [
        dict(first[0], calls=3),
        dict(first[1], calls=2),
        dict(first[2], calls=2),
        {"queryid": 9, "query": "SELECT * FROM fresh", "calls": 1, "total_exec_time": 5.0},
    ]
    s.append(snap(T0 + timedelta(seconds=122), later))
    pts = ops.run(s, export_interval_secs=60, max_queries_tracked=2)
    last = pts.filter(pl.col("end") == pts["end"].max())
    assert set(calls_of(last, "db.query.summary")) == {"SELECT a0", "SELECT fresh"}


def test_users_and_databases_capped_with_rollup():
    rows = [
        {
            "queryid": q,
            "user": f"u{q}",
            "database": f"d{q}",
            "dbid": q,
            "query": "SELECT * FROM t",
            "calls": 10 * (q + 1),
            "total_exec_time": float(q + 1),
        }
        for q in range(4)
    ]
    s0 = snap(T0, [dict(r, calls=0, total_exec_time=0.0) for r in rows])
    pts = ops.run([s0, snap(T0 + timedelta(seconds=5), rows)], max_users_tracked=2, max_databases_tracked=1)
    users, dbs = calls_of(pts, "user.name"), calls_of(pts, "db.namespace")
    assert set(users) == {"u3", "u2", "other"} and set(dbs) == {"d3", "other"}
    assert sum(users.values()) == sum(dbs.values()) == 100


def test_window_alignment_and_boundary():
    length = timedelta(seconds=60)
    assert window_bounds(T0 + timedelta(seconds=59), length) == (T0, T0 + length)
    assert window_bounds(T0 + timedelta(seconds=60), length) == (T0 + length, T0 + 2 * length)
    snaps = [
        snap(T0 + timedelta(seconds=s), [{"queryid": 1, "query": "SELECT 1", "calls": c}]) for s, c in [(50, 1), (70, 4), (130, 10)]
    ]  # first delta crosses the boundary
    pts = ops.run(snaps, export_interval_secs=60).filter(pl.col("metric") == "postgresql.query.calls")
    # the last window is closed by the end of the stream: it ends at its last scrape (130 s)
    assert pts.select("start", "end", "value").rows() == [
        (T0 + length, T0 + 2 * length, 3.0),
        (T0 + 2 * length, T0 + timedelta(seconds=130), 6.0),
    ]


def test_points_frame_contract():
    pts = ops.run(_pipeline_snaps(2), export_interval_secs=30)
    assert pts.schema == POINTS
    durations = pts.filter(pl.col("metric") == "postgresql.query.duration")
    assert (durations["unit"] == "s").all() and not durations["is_int"].any()
    calls = pts.filter(pl.col("metric") == "postgresql.query.calls")
    assert (calls["kind"] == "sum").all() and calls["monotonic"].all() and calls["is_int"].all()
    attrs = calls["attributes"].struct.unnest()
    for key in (
        "db.system.name",
        "db.namespace",
        "user.name",
        "db.operation.name",
        "db.query.summary",
        "postgresql.query.fingerprint",
        "db.query.text",
    ):
        assert attrs[key].null_count() == 0, key
    assert (attrs["db.system.name"] == "postgresql").all()


def test_run_rejects_unknown_settings():
    with pytest.raises(ConfigError, match="unknown setting"):
        ops.run([], max_queris_tracked=3)


# Grouping ---------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "", None]), st.integers(0, 3)), min_size=1, max_size=40))
def test_grouping_by_hash_equals_grouping_by_value(rows):
    keys = pl.DataFrame(rows, schema={"name": pl.String, "n": pl.Int64}, orient="row")
    hashed, exact = group_rows(keys), _group_exactly(keys)
    assert hashed.first.tolist() == exact.first.tolist() and hashed.of_row.tolist() == exact.of_row.tolist()
    values = np.arange(len(rows), dtype=np.int64)[:, None] * 3
    assert hashed.sum(values).tolist() == [[3 * sum(i for i, g in enumerate(exact.of_row) if g == k)] for k in range(len(exact))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "", None]), st.booleans()), max_size=30), st.randoms())
def test_row_helpers_equal_the_query_engine(rows, rng):
    """Issue 20: the operators' engine-free helpers give what filter, select and gather give."""
    frame = pl.DataFrame(rows, schema={"name": pl.String, "keep": pl.Boolean}, orient="row")
    mask = np.array([keep for _, keep in rows], dtype=bool)
    assert_frame_equal(rows_where(frame, mask), frame.filter(pl.Series(mask, dtype=pl.Boolean)))
    assert_frame_equal(columns(frame, ["keep", "name"]), frame.select("keep", "name"))
    at = np.array(rng.sample(range(len(rows)), rng.randint(0, len(rows))), dtype=np.int64)
    assert _names_at(frame.get_column("name"), at) == frame.get_column("name").gather(at).to_list()
    hashes = pl.Series(np.array([rng.randint(0, 3) for _ in rows], dtype=np.uint64))
    groups = number(hashes)
    first = np.flatnonzero(hashes.is_first_distinct().to_numpy())
    assert groups.first.tolist() == first.tolist()
    assert groups.of_row.tolist() == [first.tolist().index(np.flatnonzero(hashes.to_numpy() == h)[0]) for h in hashes.to_numpy()]


def test_grouping_survives_a_hash_collision(monkeypatch):
    keys = pl.DataFrame({"name": ["a", "b", "a", "c"]})
    real = pl.DataFrame.hash_rows

    def colliding(self, seed=0, *args, **kwargs):  # every row the same first hash
        return real(self, seed, *args, **kwargs) * 0 if seed == 0 else real(self, seed, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "hash_rows", colliding)
    groups = group_rows(keys)
    assert groups.of_row.tolist() == [0, 1, 0, 2] and groups.digest is None  # grouped by value instead


# Property: whatever happens on the server, exported totals equal the truth -----------------


@st.composite
def workloads(draw):
    """Cumulative snapshots from a simulated server, with the per-interval truth."""
    n_texts = draw(st.integers(1, 6))
    texts = [f"SELECT * FROM t{i % 4} WHERE a = {i}" for i in range(n_texts)]  # shared fingerprints
    entries: dict[tuple, dict] = {}
    stats_reset = T0
    at = T0
    snaps, truth_calls, truth_time = [], 0, 0.0
    by_series: list[tuple] = []  # (scraped_at, database, user, toplevel, calls, time): the truth per series
    next_qid = 1
    for i in range(draw(st.integers(2, 9))):
        at = at + timedelta(seconds=draw(st.integers(1, 50)))
        event = draw(st.sampled_from(["work", "work", "new", "reset_one", "reset_all", "vanish"]))
        if event == "reset_all" and i:
            entries.clear()
            stats_reset = at - timedelta(microseconds=1)
        if event == "vanish" and entries:
            entries.pop(draw(st.sampled_from(sorted(entries))))
        if event == "reset_one" and entries:
            key = draw(st.sampled_from(sorted(entries)))
            entries[key] = {"calls": 0, "time": 0.0, "since": at - timedelta(microseconds=1), "text": entries[key]["text"]}
        if event == "new" or not entries:
            for _ in range(draw(st.integers(1, 3))):
                key = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), next_qid, draw(st.booleans()))
                next_qid += 1
                entries[key] = {"calls": 0, "time": 0.0, "since": at - timedelta(microseconds=1), "text": draw(st.sampled_from(texts))}
        for key in sorted(entries):
            calls = draw(st.integers(0, 5))
            time = calls * draw(st.sampled_from([0.5, 2.0, 7.25]))
            entries[key]["calls"] += calls
            entries[key]["time"] += time
            if i:  # work before the baseline is not in any interval
                truth_calls += calls
                truth_time += time
                by_series.append((at, f"db{key[0]}", f"u{key[1]}", key[3], calls, time))
        rows = [
            {
                "dbid": k[0],
                "userid": k[1],
                "queryid": k[2],
                "toplevel": k[3],
                "query": e["text"],
                "database": f"db{k[0]}",
                "user": f"u{k[1]}",
                "calls": e["calls"],
                "total_exec_time": e["time"],
                "stats_since": e["since"],
            }
            for k, e in entries.items()
        ]
        snaps.append(snap(at, rows, stats_reset=stats_reset))
    return snaps, truth_calls, truth_time, by_series


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(1, 4), st.sampled_from([0.0, 1.0, 3.0]), st.sampled_from([10, 30, 60]))
def test_exported_totals_equal_truth(workload, cap, threshold, window):
    """Totals are exact overall, and per window for each database, each user and top-level
    vs nested (issue 14 items 7, 8): ``other`` keeps the user, database and toplevel of what
    it rolls up, and a user the user cap rolled up is counted under user ``other``."""
    snaps, truth_calls, truth_time, by_series = workload
    pts = ops.run(snaps, max_queries_tracked=cap, max_users_tracked=1, slow_query_threshold_ms=threshold, export_interval_secs=window)
    exported_calls = pts.filter(pl.col("metric") == "postgresql.query.calls")["value"].sum()
    exported_time = pts.filter(pl.col("metric") == "postgresql.query.duration")["value"].sum()
    assert exported_calls == truth_calls
    assert exported_time == pytest.approx(truth_time / 1000.0, abs=1e-9)
    assert (pts.filter(pl.col("kind") == "sum")["value"] >= 0).all()

    truth = pl.DataFrame(by_series, schema=["at", "database", "user", "toplevel", "calls", "time"], orient="row")
    truth = truth.with_columns(
        start=pl.col("at").map_elements(lambda t: window_bounds(t, timedelta(seconds=window))[0], return_dtype=pts.schema["start"]),
        toplevel=pl.col("toplevel").cast(pl.String),
    )
    # windows are told apart by their start: the last one ends at its last scrape, not its nominal end
    calls = pts.filter(pl.col("metric") == "postgresql.query.calls").select(
        "start",
        *(
            pl.col("attributes").struct.field(a).alias(k)
            for k, a in (("database", "db.namespace"), ("user", "user.name"), ("toplevel", "postgresql.query.toplevel"))
        ),
        "value",
    )
    assert calls["user"].null_count() == 0 and calls["toplevel"].null_count() == 0
    for dimension in ("database", "user", "toplevel"):
        exported = calls.group_by("start", dimension).agg(pl.col("value").sum())
        named = exported.filter(pl.col(dimension) != "other")
        expected = truth.group_by("start", dimension).agg(pl.col("calls").sum())
        joined = named.join(expected, on=["start", dimension], how="left")
        assert (joined["value"] == joined["calls"].fill_null(0)).all(), (dimension, joined)
        # what is named "other" is exactly the truth of those not named in that window
        rest = expected.join(named, on=["start", dimension], how="anti")["calls"].sum()
        assert exported.filter(pl.col(dimension) == "other")["value"].sum() == rest, dimension


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(0, 2**32 - 1))
def test_row_order_changes_nothing(workload, seed):
    """Scrapes returning their rows in the same order pair up by position; in any other
    order by key. Both must give every series the same numbers."""
    snaps = workload[0]
    shuffled = [
        replace(s, statements=s.statements.sample(fraction=1.0, shuffle=True, seed=(seed + i) % 2**32)) for i, s in enumerate(snaps)
    ]
    series = ("postgresql.query.fingerprint", "db.namespace", "user.name")

    def totals(points: pl.DataFrame) -> dict:
        keyed = points.filter(pl.col("kind") == "sum").with_columns(*(pl.col("attributes").struct.field(a).alias(a) for a in series))
        summed = keyed.group_by("metric", *series).agg(pl.col("value").sum())
        return {tuple(row[:4]): round(row[4], 9) for row in summed.iter_rows()}

    assert totals(ops.run(snaps)) == totals(ops.run(shuffled))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.sampled_from([0.0, 0.05, 0.3, 1.0]), st.integers(0, 2**32 - 1))
def test_a_run_keeps_only_the_rows_that_moved_and_sums_them_bit_for_bit(rows, scrapes, moving, seed):
    """Issue 20: a window's run holds sums only for the rows that moved; what it gives the
    window (rows that ran, their sums) equals summing every row of every scrape, to the bit."""
    rng = np.random.default_rng(seed)
    labels = pl.DataFrame({"row": np.arange(rows)})
    deltas = []
    for _ in range(scrapes):
        ran = rng.random(rows) < moving
        ints = np.where(ran[:, None], rng.integers(0, 4, (rows, len(STATEMENT_INT_COUNTERS))), 0).astype(np.int64)
        floats = np.where(ran[:, None], rng.random((rows, len(STATEMENT_TIME_COUNTERS))) * 10.0 ** rng.integers(-9, 4, (rows, 1)), 0.0)
        deltas.append(Counters(ints, floats, np.zeros(rows, np.int64)))
    run = None
    for d in deltas:
        item = Deltas("i", T0, T0, labels, d, pl.DataFrame(), d, 0)
        run = Run.of(item) if run is None else run.plus(item)
    dense_ints, dense_floats = deltas[0].ints.copy(), deltas[0].floats.copy()
    for d in deltas[1:]:
        dense_ints, dense_floats = dense_ints + d.ints, dense_floats + d.floats
    keep = active_rows(Counters(dense_ints, dense_floats, np.zeros(rows, np.int64)))
    compacted = run.compacted()
    assert compacted.rows["row"].to_list() == np.flatnonzero(keep).tolist()
    assert np.array_equal(compacted.counters.ints, dense_ints[keep])
    assert compacted.counters.floats.tobytes() == dense_floats[keep].tobytes()
    assert len(run.counters.ints) <= max(1, int((dense_ints != 0).any(axis=1).sum() + (dense_floats != 0).any(axis=1).sum()))


# Against the real server -------------------------------------------------------------------


def _pgbench_calls(points: pl.DataFrame) -> dict[str, float]:
    return {k: v for k, v in calls_of(points, "db.query.text").items() if k in PGBENCH_STATEMENTS.values()}


def test_real_pgbench_deltas_are_exact(pg):
    with Scraper(pg.dsn()) as scraper:
        before = scraper.scrape()
        pg.pgbench("-n", "-c", "4", "-t", "250")
        after = scraper.scrape()
    calls = _pgbench_calls(ops.run([before, after]))
    assert calls == {text: 1000 for text in PGBENCH_STATEMENTS.values()}


def test_real_reset_between_scrapes_counts_post_reset_work(pg):
    with Scraper(pg.dsn()) as scraper:
        before = scraper.scrape()
        pg.pgbench("-n", "-c", "2", "-t", "100")  # lost with the reset: it is never counted
        pg.execute("SELECT pg_stat_statements_reset()")
        pg.pgbench("-n", "-c", "4", "-t", "250")
        after = scraper.scrape()
    points = ops.run([before, after])
    assert _pgbench_calls(points) == {text: 1000 for text in PGBENCH_STATEMENTS.values()}
    assert (points.filter(pl.col("kind") == "sum")["value"] >= 0).all()


def test_real_database_counters_get_deltas(pg):
    """pg_stat_database counters get the same delta treatment: pgbench's 1000 transactions,
    each with 3 updates, show up between two scrapes (the scrapes' own commits add a few).

    pgbench's database only, from a quiet baseline: before PostgreSQL 15 the statistics
    collector reports other sessions' commits (earlier tests') up to half a second late."""
    database = pg.execute("SELECT current_database()")[0][0]

    def moved(first, second) -> dict:
        _, deltas = delta(delta(None, first)[0], second)
        mine = deltas.databases.filter(pl.col("database") == database)
        return mine.select(pl.col("xact_commit", "tup_updated").sum()).row(0, named=True)

    with Scraper(pg.dsn()) as scraper:
        before = scraper.scrape()
        for _ in range(20):
            time.sleep(0.6)
            again = scraper.scrape()
            quiet = moved(before, again)["xact_commit"] < 10
            before = again
            if quiet:
                break
        pg.pgbench("-n", "-c", "4", "-t", "250")
        for _ in range(50):  # backends flush their stats as they exit, a moment after pgbench returns
            after = scraper.scrape()
            totals = moved(before, after)
            if totals["tup_updated"] >= 3000:
                break
            time.sleep(0.1)
    assert 1000 <= totals["xact_commit"] < 1100, totals
    assert 3000 <= totals["tup_updated"] < 3100, totals
    _, deltas = delta(delta(None, before)[0], after)
    assert (deltas.databases.select(pl.col("xact_commit", "blks_hit")) >= 0).to_numpy().all()


def test_real_nested_statements_sum_top_level_only(pg):
    """Issue 14 item 7: with pg_stat_statements.track = all a PL/pgSQL function's statements
    are counted too, and their time is already inside the caller's. Top-level and nested
    executions of one statement are separate series, told apart by postgresql.query.toplevel,
    and summing toplevel = "true" gives the workload's top-level work alone."""
    assert pg.execute("SHOW pg_stat_statements.track")[0][0] == "all"
    version = int(pg.execute("SHOW server_version_num")[0][0])
    pg.execute("DROP DATABASE IF EXISTS nested14", "CREATE DATABASE nested14")
    pg.execute(
        "CREATE TABLE n14 (id int PRIMARY KEY, v int)",
        "INSERT INTO n14 VALUES (1, 0)",
        "CREATE FUNCTION bump14() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
        "UPDATE n14 SET v = v + 1 WHERE id = 1; PERFORM pg_sleep(0.02); END $$",
        dbname="nested14",
    )
    try:
        with Scraper(pg.dsn()) as scraper:
            before = scraper.scrape()
            started = time.monotonic()
            pg.execute(*["SELECT bump14()"] * 10, *["UPDATE n14 SET v = v + 1 WHERE id = 1"] * 7, dbname="nested14")
            wall = time.monotonic() - started
            after = scraper.scrape()
    finally:
        pg.execute("DROP DATABASE nested14")
    pts = ops.run([before, after]).filter(pl.col("attributes").struct.field("db.namespace") == "nested14")
    rows = pts.filter(pl.col("metric").is_in(["postgresql.query.calls", "postgresql.query.duration"])).select(
        "metric",
        "value",
        text=pl.col("attributes").struct.field("db.query.text"),
        toplevel=pl.col("attributes").struct.field("postgresql.query.toplevel"),
    )
    if version < 140000:  # one entry holds both there: the attribute is absent rather than wrong
        assert rows.height and rows["toplevel"].null_count() == rows.height
        return
    calls = {
        (t, top): v
        for t, top, v in rows.filter(pl.col("metric") == "postgresql.query.calls").select("text", "toplevel", "value").iter_rows()
    }
    update = "UPDATE n14 SET v = v + $1 WHERE id = $2"
    assert calls[(update, "true")] == 7 and calls[(update, "false")] == 10  # one statement, two series
    assert calls[("SELECT bump14()", "true")] == 10
    assert sum(v for (_, top), v in calls.items() if top == "true") == 17  # the workload's 17 statements
    assert sum(v for (_, top), v in calls.items() if top == "false") == 20  # 10 updates, 10 sleeps inside
    durations = rows.filter(pl.col("metric") == "postgresql.query.duration")
    top = durations.filter(pl.col("toplevel") == "true")["value"].sum()
    nested = durations.filter(pl.col("toplevel") == "false")["value"].sum()
    assert 10 * 0.02 <= top <= wall  # top-level time fits in the workload's wall time ...
    assert nested >= 10 * 0.02  # ... while summing nested time too would count the sleeps twice


def test_real_gauges_read_zero_rather_than_vanish(pg):
    """Issue 14 item 16: a database nobody is connected to still has its connection counts
    per state, its waiting-lock count and its blocked-session count, each reading 0."""
    pg.execute("DROP DATABASE IF EXISTS idle14", "CREATE DATABASE idle14")
    try:
        with Scraper(pg.dsn()) as scraper:
            snaps = [scraper.scrape(), scraper.scrape()]
    finally:
        pg.execute("DROP DATABASE idle14")
    gauges = ops.run(snaps).filter((pl.col("kind") == "gauge") & (pl.col("attributes").struct.field("db.namespace") == "idle14"))

    def values(metric: str, attr: str) -> dict[str | None, float]:
        rows = gauges.filter(pl.col("metric") == metric).with_columns(k=pl.col("attributes").struct.field(attr))
        return dict(rows.group_by("k").agg(pl.col("value").sum()).iter_rows())

    connections = values("postgresql.connection.count", "postgresql.connection.state")
    assert {s: connections.get(s) for s in ("active", "idle", "idle in transaction")} == {"active": 0, "idle": 0, "idle in transaction": 0}
    assert values("postgresql.lock.count", "postgresql.lock.granted").get("false") == 0
    assert values("postgresql.blocked.count", "db.namespace") == {"idle14": 0}
