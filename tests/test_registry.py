"""The metric registry (pgflow/metrics.py, pgflow/metric_catalog.py) and the pages generated from it.

Ground truth is what pgflow really sends: the points and events of the shipped datasets replayed
through the operators, the README's table of every exported metric (written by hand before the
registry existed), the dashboard pgflow ships, and pydantic's own reading of the environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import psycopg
import pytest

from pgflow import capture, dashboard_check, gendocs, metrics, ops
from pgflow.config import Settings
from pgflow.pgserver import LocalPostgres, standby_of
from pgflow.replay import as_received, events_as_received
from pgflow.schema import ATTRIBUTE_KEYS, EVENT_ATTRIBUTE_TYPES, HEALTH_GROUPS
from pgflow.scrape import Scraper
from pgflow.scrape.health import HealthSchedule
from pgflow.scrape.tables import TableScraper

ROOT = Path(__file__).resolve().parent.parent
DATASETS = sorted((ROOT / "datasets").glob("*.duckdb"))


def with_metrics(replayed: dict[str, tuple[pl.DataFrame, pl.DataFrame]], *names: str) -> pl.DataFrame:
    """The points of the first shipped dataset that has every metric ``names`` (datasets get renamed)."""
    for points, _ in replayed.values():
        if set(names) <= set(points.get_column("metric").unique()):
            return points
    pytest.fail(f"no shipped dataset has {names}")


def with_events(replayed: dict[str, tuple[pl.DataFrame, pl.DataFrame]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    return next((p, e) for p, e in replayed.values() if e.height)


def replay(dataset: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    snapshots = list(capture.read(dataset))
    return ops.run(snapshots, export_interval_secs=10), ops.run_events(snapshots, export_interval_secs=10)


@pytest.fixture(scope="module")
def replayed() -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    return {d.stem: replay(d) for d in DATASETS}


# Every point is declared ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", [d.stem for d in DATASETS])
def test_every_point_and_event_of_a_shipped_dataset_is_declared(replayed, dataset):
    points, events = replayed[dataset]
    assert points.height
    assert metrics.point_problems(points) == []
    assert metrics.check_points(points) is points
    assert metrics.event_problems(events) == []


def _with_attribute(points: pl.DataFrame, metric: str, key: str, value: str) -> pl.DataFrame:
    fields = [pl.col("attributes").struct.field(k) for k in ATTRIBUTE_KEYS]
    fields = [
        pl.when(pl.col("metric") == metric).then(pl.lit(value)).otherwise(f).alias(k) if k == key else f
        for k, f in zip(ATTRIBUTE_KEYS, fields)
    ]
    return points.with_columns(pl.struct(fields).alias("attributes"))


def _set(points: pl.DataFrame, metric: str, column: str, value: object) -> pl.DataFrame:
    return points.with_columns(pl.when(pl.col("metric") == metric).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))


def test_check_points_refuses_each_kind_of_undeclared_point(replayed):
    points = with_metrics(replayed, "postgresql.wal.bytes", "postgresql.db_size", "postgresql.bgwriter.checkpoint.count")
    cases = {
        "unit 'kBy', declared 'By'": _set(points, "postgresql.wal.bytes", "unit", "kBy"),
        "postgresql.commit: not declared": _set(points, "postgresql.commits", "metric", "postgresql.commit"),
        "kind 'sum', declared 'gauge'": _set(points, "postgresql.db_size", "kind", "sum"),
        "monotonic False, declared True": _set(points, "postgresql.commits", "monotonic", False),
        "is_int False, declared True": _set(points, "postgresql.commits", "is_int", False),
        "postgresql.db_size: attribute 'user.name' not declared": _with_attribute(points, "postgresql.db_size", "user.name", "alice"),
        "type='timed', declared values ['scheduled', 'requested']": _with_attribute(
            points, "postgresql.bgwriter.checkpoint.count", "type", "timed"
        ),
    }
    for expected, frame in cases.items():
        with pytest.raises(metrics.UndeclaredPoint, match=re.escape(expected)):
            metrics.check_points(frame)


def test_check_points_checks_each_layout_once_yet_refuses_one_bad_point_among_good_ones(replayed):
    """Issue 20: the check remembers the layouts it found declared; a point of a new layout (one
    attribute more, another fixed value, another unit) is still refused, even alone among
    thousands of points whose layouts were seen before."""
    points = with_metrics(replayed, "postgresql.commits", "postgresql.bgwriter.checkpoint.count")
    assert metrics.check_points(points) is points and metrics.check_points(points) is points  # remembered

    def one(metric: str) -> pl.DataFrame:
        return points.filter(pl.col("metric") == metric).head(1)

    cases = {
        "postgresql.commits: attribute 'user.name' not declared": _with_attribute(
            one("postgresql.commits"), "postgresql.commits", "user.name", "alice"
        ),
        "type='timed', declared values ['scheduled', 'requested']": _with_attribute(
            one("postgresql.bgwriter.checkpoint.count"), "postgresql.bgwriter.checkpoint.count", "type", "timed"
        ),
        "unit 'kBy', declared '1'": _set(one("postgresql.commits"), "postgresql.commits", "unit", "kBy"),
    }
    for expected, bad in cases.items():
        with pytest.raises(metrics.UndeclaredPoint, match=re.escape(expected)):
            metrics.check_points(pl.concat([points, bad, points]))
        with pytest.raises(metrics.UndeclaredPoint, match=re.escape(expected)):
            metrics.check_points(bad)  # and again: a problem is remembered as a problem
    assert metrics.check_points(points) is points


def test_check_events_refuses_undeclared_events(replayed):
    _, events = with_events(replayed)
    renamed = events.with_columns(pl.lit("db.server.query_plans").alias("event_name"))
    with pytest.raises(metrics.UndeclaredPoint, match="db.server.query_plans: event not declared"):
        metrics.check_events(renamed)
    with pytest.raises(metrics.UndeclaredPoint, match="an event without a body"):
        metrics.check_events(events.with_columns(pl.lit(None, pl.String).alias("body")))
    fields = [pl.col("attributes").struct.field(k) for k in EVENT_ATTRIBUTE_TYPES]
    with_pid = [pl.lit(42, pl.Int64).alias(k) if k == "postgresql.pid" else f for k, f in zip(EVENT_ATTRIBUTE_TYPES, fields)]
    with pytest.raises(metrics.UndeclaredPoint, match=r"attributes \['postgresql.pid'\] not declared"):
        metrics.check_events(events.with_columns(pl.struct(with_pid).alias("attributes")))


def test_what_a_receiver_stores_is_declared(replayed):
    """The points and events encoded as OTLP and flattened as the receiver stores them (the form
    tests/registry_coverage.py checks in every end-to-end test): temporality, event.name and all."""
    points, events = with_events(replayed)
    received, logs = as_received(points), events_as_received(events)
    assert set(received.get_column("temporality").drop_nulls().unique()) == {"delta"}
    assert metrics.received_problems(received, logs) == []
    bad = as_received(
        _with_attribute(
            _set(points, "postgresql.connection.max", "unit", "1"), "postgresql.query.blocks", "postgresql.block.kind", "shared_miss"
        )
    )
    assert metrics.received_problems(bad, logs.with_columns(pl.lit("db.server.query").alias("event_name"))) == [
        "db.server.query: event not declared in pgflow/metric_catalog.py",
        "postgresql.connection.max: unit '1', declared '{connection}'",
        "postgresql.query.blocks: postgresql.block.kind='shared_miss', declared values "
        f"{list(metrics.metric('postgresql.query.blocks').attribute('postgresql.block.kind').values)}",
    ]


def test_every_declared_attribute_of_a_replayed_metric_is_sent(replayed):
    """A declared attribute a metric never carries is a documentation lie (version-dependent ones excepted)."""
    frames = [p for p, _ in replayed.values()]
    points = pl.concat(frames)
    sent: dict[str, set[str]] = {}
    long = points.select("metric", pl.col("attributes").struct.unnest()).unpivot(index="metric").drop_nulls("value")
    for name, key in long.select("metric", "variable").unique().iter_rows():
        sent.setdefault(name, set()).add(key)
    never = {(m.name, a.key) for m in metrics.metrics().values() if m.name in sent for a in m.attributes if a.key not in sent[m.name]}
    assert not never, f"declared, never sent by any replay: {sorted(never)}"


def test_the_registry_is_consistent_with_the_schema():
    declared = metrics.metrics()
    groups = metrics.groups()
    assert len(declared) == len(metrics._catalog().METRICS), "a metric is declared twice"
    for m in declared.values():
        assert m.name.startswith("postgresql."), m.name
        assert m.group in groups, f"{m.name}: unknown group {m.group!r}"
        assert m.description.endswith("."), m.name
        assert m.kind in ("sum", "gauge") and m.value_type in ("int", "double")
        assert (m.temporality == "DELTA") == (m.kind == "sum") == m.monotonic
        assert m.min_version >= 130000
        keys = [a.key for a in m.attributes]
        assert len(keys) == len(set(keys)), m.name
        assert set(keys) <= set(ATTRIBUTE_KEYS), f"{m.name}: {set(keys) - set(ATTRIBUTE_KEYS)} not in schema"
    health = {g.name for g in groups.values() if g.health_group}
    assert health == set(HEALTH_GROUPS), "health groups differ from schema.HEALTH_GROUPS"
    for e in metrics.events().values():  # event.name: the encoder adds it (pgflow.otlp.logs)
        assert {a.key for a in e.attributes} - {"event.name"} <= set(EVENT_ATTRIBUTE_TYPES), e.name
    assert metrics.metric("postgresql.replication.standbys").unit == "{standby}"
    with pytest.raises(KeyError, match="not declared"):
        metrics.metric("postgresql.nope")


# Declared metrics no other test produces -----------------------------------------------------------


def _wait_for(check, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def _gauge(points: pl.DataFrame, metric: str, **attrs: str) -> list[float]:
    frame = points.filter(pl.col("metric") == metric)
    for key, value in attrs.items():
        frame = frame.filter(pl.col("attributes").struct.field(key) == value)
    return frame.get_column("value").to_list()


def _burn_xids(pg: LocalPostgres, n: int) -> None:
    """``n`` transactions that each take a transaction id (ground truth for the ages below)."""
    for _ in range(n):
        pg.execute("SELECT txid_current()")


def test_slot_horizons_and_autovacuum_ages_from_a_real_server(pg_factory):
    """``replication_slot.xmin.age`` / ``.catalog_xmin.age`` and ``table.autovacuum.age`` /
    ``.autoanalyze.age``: a standby with hot_standby_feedback holding a snapshot, a logical slot
    nobody reads, and autovacuum let loose on a table; every age is at least what the workload made."""
    primary = pg_factory(settings={"wal_level": "logical", "autovacuum_naptime": "1"})
    primary.execute(
        "CREATE EXTENSION pg_stat_statements",
        "CREATE TABLE av (i int) WITH (autovacuum_vacuum_threshold = 1, autovacuum_vacuum_scale_factor = 0,"
        " autovacuum_analyze_threshold = 1, autovacuum_analyze_scale_factor = 0)",
        "SELECT pg_create_logical_replication_slot('logical_slot', 'pgoutput')",
    )
    created = time.time()
    standby = standby_of(primary, slot="standby_slot", settings={"hot_standby_feedback": "on"})
    try:
        _wait_for(
            lambda: primary.execute("SELECT xmin IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'standby_slot'")[0][0],
            "the standby's feedback xmin",
        )
        holder = psycopg.connect(standby.dsn())  # holds the standby's snapshot: the slot's xmin stays put
        try:
            holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            holder.execute("SELECT 1").fetchone()
            primary.execute("INSERT INTO av SELECT generate_series(1, 100)", "DELETE FROM av WHERE i > 50")
            _burn_xids(primary, 10)
            _wait_for(
                lambda: primary.execute(
                    "SELECT last_autovacuum IS NOT NULL AND last_autoanalyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'av'"
                )[0][0],
                "autovacuum and autoanalyze of av",
            )
            with (
                Scraper(primary.dsn(), health=HealthSchedule.of(0.001, 0.001)) as scraper,
                TableScraper(primary.dsn(), instance="t", include=["postgres"]) as tables,
            ):
                snapshots = [replace(scraper.scrape(), tables=tables.scrape()) for _ in range(2)]
        finally:
            holder.close()
    finally:
        standby.cleanup()
    points = ops.run(snapshots, export_interval_secs=0.001)
    assert metrics.point_problems(points) == []
    physical = _gauge(points, "postgresql.replication_slot.xmin.age", **{"postgresql.replication_slot.name": "standby_slot"})
    logical = _gauge(
        points,
        "postgresql.replication_slot.catalog_xmin.age",
        **{"postgresql.replication_slot.name": "logical_slot", "postgresql.replication_slot.type": "logical"},
    )
    assert physical and min(physical) >= 10 and logical and min(logical) >= 10, (physical, logical)
    since = time.time() - created
    for metric in ("postgresql.table.autovacuum.age", "postgresql.table.autoanalyze.age"):
        ages = _gauge(points, metric, **{"db.collection.name": "public.av"})
        assert ages and all(0 <= a <= since for a in ages), (metric, ages, since)


# The generated pages -------------------------------------------------------------------------------


def test_gen_docs_check_passes_on_the_repository():
    done = subprocess.run([ROOT / "scripts" / "gen-docs", "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_metrics_page_lists_every_metric_with_its_kind_unit_and_version():
    page = (ROOT / "docs" / "metrics.md").read_text()
    for m in metrics.metrics().values():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{m.name}` |")), None)
        assert row, m.name
        assert f"| `{m.unit}` |" in row and f"| {metrics.version_label(m.min_version)} |" in row, row
        assert row.split(" | ")[1].startswith(m.kind), row
    for e in metrics.events().values():
        assert f"### `{e.name}`" in page


def _copy_repo(tmp_path: Path) -> Path:
    for part in ("pgflow", "scripts", "docs"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")  # the interpreter; `-m pgflow` runs the copy (cwd first)
    return tmp_path


def test_gen_docs_check_fails_when_a_unit_changes_without_regenerating(tmp_path):
    copy = _copy_repo(tmp_path)
    catalog = copy / "pgflow" / "metric_catalog.py"
    text = catalog.read_text()
    line = 'M("postgresql.wal.bytes", "sum", "By",'
    assert text.count(line) == 1
    catalog.write_text(text.replace(line, 'M("postgresql.wal.bytes", "sum", "KiBy",'))
    gen = copy / "scripts" / "gen-docs"
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run([gen, "--check"], capture_output=True, text=True, timeout=120, cwd=copy, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "docs/metrics.md is out of date" in done.stderr and "configuration.md" not in done.stderr
    assert subprocess.run([gen], capture_output=True, timeout=120, cwd=copy, env=env).returncode == 0
    assert "| `postgresql.wal.bytes` | sum (DELTA) | `KiBy` |" in (copy / "docs" / "metrics.md").read_text()
    assert subprocess.run([gen, "--check"], capture_output=True, timeout=120, cwd=copy, env=env).returncode == 0


def test_the_configuration_page_lists_every_setting_default_and_environment_name():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in page, name
    for env in (
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "NEW_RELIC_API_KEY",
        "NEW_RELIC_API_KEY_FILE",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "PGFLOW_EXPORT_INTERVAL_SECS",
    ):
        assert f"`{env}`" in page, env
    assert "| `export_interval_secs` | `PGFLOW_EXPORT_INTERVAL_SECS` | `60.0` | number (> 0, ≤ 86400) |" in page


def _candidate(name: str, default: object) -> str | None:
    """A valid value other than the default, as an environment variable's text (None: not tried here)."""
    special = {
        "database_url": "postgresql://u@db.example:5432/app",
        "new_relic_api_key": "key-1",
        "otlp_endpoint": "http://127.0.0.1:4999",
        "metrics_addr": "127.0.0.1:9999",
        "service_name": "svc",
        "state_dir": "/tmp/pgflow-registry-test",
        "new_relic_region": "eu",
        "otlp_protocol": "grpc",
        "log_level": "debug",
        "log_format": "json",
        "table_stats_enabled": "false",
        "table_stats_databases": '["app"]',
        "table_stats_exclude_databases": '["tmp*"]',
        "health_groups_disabled": "io",
        "activity_sample_interval_secs": "2",
    }
    if name in special:
        return special[name]
    if isinstance(default, bool) or default is None:
        return None
    if isinstance(default, int):
        return str(default + 1)
    if isinstance(default, float):
        return str(default / 2 if default else 1.0)
    return None


def test_every_documented_environment_name_sets_its_setting(monkeypatch):
    """The page's environment names come from the fields; pydantic itself says they work."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    for key in list(os.environ):
        if key.startswith(("PGFLOW_", "OTEL_")) or key in ("DATABASE_URL", "NEW_RELIC_API_KEY"):
            monkeypatch.delenv(key)
    defaults = Settings.load()
    tried = set()
    for name, info in Settings.model_fields.items():
        value = _candidate(name, getattr(defaults, name))
        if value is None:
            continue
        for env in gendocs.env_names(name, info, prefix):
            with monkeypatch.context() as m:
                m.setenv(env, value)
                got = getattr(Settings.load(), name)
            assert got != getattr(defaults, name), f"{env}={value} did not set {name}"
            tried.add(env)
    assert {
        "DATABASE_URL",
        "PGFLOW_DATABASE_URL",
        "NEW_RELIC_API_KEY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "PGFLOW_OTLP_ENDPOINT",
        "PGFLOW_EXPORT_INTERVAL_SECS",
        "PGFLOW_MAX_QUERIES_TRACKED",
    } <= tried
    assert len(tried) > 40


def test_every_setting_has_a_description():
    assert gendocs.undescribed_settings() == []


# The dashboard -------------------------------------------------------------------------------------


def test_the_dashboard_queries_only_declared_names_aggregated_by_their_kind():
    dashboard = json.loads((ROOT / "deploy" / "newrelic" / "dashboard.json").read_text())
    queries = sum(len(w.get("rawConfiguration", {}).get("nrqlQueries", [])) for p in dashboard["pages"] for w in p["widgets"])
    assert queries > 20
    assert dashboard_check.dashboard_problems(dashboard) == []


@pytest.mark.parametrize(
    "query, problem",
    [
        ("FROM Metric SELECT average(postgresql.query.calls) FACET db.namespace", "is a DELTA sum"),
        ("FROM Metric SELECT sum(postgresql.db_size) FACET db.namespace", "is a gauge"),
        ("FROM Metric SELECT postgresql.connection.count", "not nothing"),
        ("FROM Metric SELECT max(postgresql.db_size) FACET postgresql.block.kind", "not an attribute of the metrics"),
        ("FROM Metric SELECT max(postgresql.db_size) FACET postgresql.database.name", "not declared"),
        ("FROM Metric SELECT latest(postgresql.rows) WHERE postgresql.row.state = 'zombie'", "pgflow sends only"),
        ("FROM Metric SELECT filter(sum(postgresql.operations), WHERE postgresql.operation IN ('ins', 'insert'))", "'insert'"),
        ("FROM Metric SELECT uniques(postgresql.query.fingerprint) WHERE metricName = 'postgresql.query.call'", "not a declared metric"),
        ("FROM Log SELECT message WHERE event.name = 'db.server.query_sample'", "has no body"),
        ("FROM Log SELECT postgresql.pid WHERE event.name = 'db.server.query_plan'", "not an attribute of"),
        ("FROM Log SELECT count(*) WHERE event.name = 'db.server.query_plans'", "not a declared event"),
        ("FROM Span SELECT count(*)", "Metric and Log data only"),
    ],
)
def test_the_dashboard_check_finds_each_kind_of_mistake(query, problem):
    problems = dashboard_check.query_problems(query)
    assert any(problem in p for p in problems), problems


def test_the_dashboard_check_accepts_each_correct_form():
    for query in [
        "FROM Metric SELECT rate(sum(postgresql.activity.time), 1 second) WHERE postgresql.session.state = 'active' "
        "AND postgresql.backend.type = 'client backend' FACET postgresql.wait_event.type LIMIT MAX TIMESERIES",
        "FROM Metric SELECT max(postgresql.blocked.count) AS 'blocked', latest(`postgresql.rows`) FACET db.namespace, "
        "postgresql.instance.name",
        "FROM Metric SELECT filter(sum(postgresql.bgwriter.checkpoint.count), WHERE `type` = 'requested') / "
        "sum(postgresql.bgwriter.checkpoint.count) FACET service.instance.id",
        "FROM Metric SELECT uniques(postgresql.query.fingerprint) WHERE metricName = 'postgresql.query.calls' AND "
        "postgresql.query.fingerprint = {{fingerprint}}",
        "FROM Log SELECT message, postgresql.plan.hash WHERE event.name = 'db.server.query_plan'",
    ]:
        assert dashboard_check.query_problems(query) == [], query
