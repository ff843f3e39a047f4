"""The New Relic dashboard queries only what pgflow exports.

pgflow runs against a real primary (with a streaming standby) under a workload that exercises
every feature (pgbench, a lock chain, a slow statement, a checkpoint, a vacuum) and exports to
the local OTLP receiver. The metric names, attribute keys and event names the receiver stored
are the truth; every widget's NRQL is parsed and each name it uses must be among them.

Names that other issues add are listed in ``LANDS_WITH``: a widget that uses only such names
while they are not exported is an expected failure naming its issue; once the names are
exported the widget must pass, and ``test_names_waiting_for_other_issues_are_still_missing``
fails until the entry is removed. A widget whose feature never lands is dropped from the
dashboard, not excused here.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import psycopg
import pytest
from e2e import collector_env, settle, start_collector, wait_for_baseline, write_config

from pgflow.dashboard_check import read_nrql
from pgflow.otlp.receiver import Receiver
from pgflow.pgserver import LocalPostgres, standby_of

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "newrelic" / "dashboard.json"

# Names the dashboard uses that land with other issues (remove an entry once its issue lands).
LANDS_WITH: dict[str, str] = {}  # every issue the dashboard draws on (11, 12, 13) has landed

# Names a server version cannot give (README, "What pgflow cannot promise"): name -> (first version, why).
NEEDS_VERSION = {"postgresql.statements.deallocated": (140000, "PostgreSQL 13 has no pg_stat_statements_info")}

# Settings that make every feature show within the test's short run.
FEATURE_ENV = {
    "PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS": "0.1",
    "PGFLOW_SAMPLE_MIN_DURATION_MS": "100",
    "PGFLOW_TABLE_STATS_INTERVAL_SECS": "1",
    "PGFLOW_HEALTH_INTERVAL_SECS": "0.5",
    "PGFLOW_EXPLAINS_PER_WINDOW": "5",
}

# What New Relic itself puts on a Log record from an OTLP LogRecord: the body is `message`.
LOG_FIELDS = {"message", "timestamp"}


# NRQL ----------------------------------------------------------------------------------------


@dataclass
class Nrql:
    """The names one NRQL query uses, by where it uses them."""

    source: str = ""
    selected: set[str] = field(default_factory=set)  # metric names or attributes (inside SELECT)
    filtered: set[str] = field(default_factory=set)  # attributes in WHERE (and filter(... WHERE ...))
    faceted: set[str] = field(default_factory=set)  # attributes in FACET
    metric_names: set[str] = field(default_factory=set)  # values compared with metricName
    event_names: set[str] = field(default_factory=set)  # values compared with event.name

    @property
    def attributes(self) -> set[str]:
        return self.filtered | self.faceted


def parse_nrql(query: str) -> Nrql:
    """The names one query uses, read by the dashboard checker's own NRQL reader (one reader)."""
    out = Nrql()
    out.source, uses = read_nrql(query)
    for use in uses:
        if use.clause == "WHERE" and use.name in ("metricName", "event.name"):
            (out.metric_names if use.name == "metricName" else out.event_names).update(use.compared)
            if use.name == "metricName":
                continue
        {"SELECT": out.selected, "WHERE": out.filtered, "FACET": out.faceted}[use.clause].add(use.name)
    return out


def test_the_nrql_parser_reads_every_form_the_dashboard_may_use():
    q = parse_nrql(
        "FROM Metric SELECT rate(sum(postgresql.query.calls), 1 second) AS 'calls FROM x WHERE y', "
        "sum(a.b) * 1000 / (sum(c.d) + sum(`e.f`)), filter(sum(g.h), WHERE `type` = 'x' AND i.j IN ('a')) "
        "WHERE metricName IN ('m.one', 'm.two') AND k.l IS NOT NULL AND fp = {{fingerprint}} "
        "FACET db.namespace, `type` LIMIT 10 SINCE 1 hour ago TIMESERIES 1 minute"
    )
    assert q.source == "Metric"
    assert q.selected == {"postgresql.query.calls", "a.b", "c.d", "e.f", "g.h"}
    assert q.filtered == {"type", "i.j", "k.l", "fp"} and q.faceted == {"db.namespace", "type"}
    assert q.metric_names == {"m.one", "m.two"}
    q = parse_nrql("SELECT count(*) FROM Log WHERE event.name = 'db.server.query_sample' FACET x.y LIMIT MAX")
    assert (q.source, q.selected, q.filtered, q.faceted, q.event_names) == (
        "Log",
        set(),
        {"event.name"},
        {"x.y"},
        {"db.server.query_sample"},
    )
    q = parse_nrql("FROM Log SELECT a, b.c, message WHERE event.name = 'p' AND metricName = 'q'")
    assert q.selected == {"a", "b.c", "message"} and q.metric_names == {"q"}


# The dashboard ---------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def widgets() -> list[tuple[str, dict]]:
    return [(f"{page['name']} / {w['title'] or w['visualization']['id']}", w) for page in dashboard()["pages"] for w in page["widgets"]]


def nrql_widgets() -> list[tuple[str, dict]]:
    return [(name, w) for name, w in widgets() if w["visualization"]["id"] != "viz.markdown"]


def test_the_dashboard_is_importable_new_relic_json():
    d = dashboard()
    assert d["name"] and d["permissions"] in ("PUBLIC_READ_WRITE", "PUBLIC_READ_ONLY", "PRIVATE")
    assert [p["name"] for p in d["pages"]] == ["Overview", "Query detail", "Server health", "Events"]
    variables = {v["name"]: v for v in d["variables"]}
    assert set(variables) == {"fingerprint"}
    for v in variables.values():
        assert v["type"] == "NRQL" and v["replacementStrategy"] == "STRING" and v["nrqlQuery"]["query"]
        assert v["nrqlQuery"]["accountIds"] == [0]
    used: set[str] = set()
    for page in d["pages"]:
        cells: set[tuple[int, int]] = set()
        for w in page["widgets"]:
            layout = w["layout"]
            assert 1 <= layout["column"] and layout["column"] + layout["width"] - 1 <= 12, w["title"]
            mine = {
                (r, c)
                for r in range(layout["row"], layout["row"] + layout["height"])
                for c in range(layout["column"], layout["column"] + layout["width"])
            }
            assert not mine & cells, f"{page['name']} / {w['title']} overlaps another widget"
            cells |= mine
            viz = w["visualization"]["id"]
            assert viz in ("viz.markdown", "viz.line", "viz.area", "viz.bar", "viz.table", "viz.billboard", "viz.pie")
            raw = w["rawConfiguration"]
            if viz == "viz.markdown":
                assert raw["text"]
                continue
            assert w["title"] and raw["nrqlQueries"]
            for q in raw["nrqlQueries"]:
                assert q["accountIds"] == [0] and q["query"]
                used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q["query"]))
                assert ("TIMESERIES" in q["query"]) == (viz in ("viz.line", "viz.area")), w["title"]
    assert used == set(variables)
    queries = len(variables) + sum(len(w["rawConfiguration"]["nrqlQueries"]) for _, w in nrql_widgets())
    assert DASHBOARD.read_text().count('"accountIds": [0]') == queries  # the README's sed replaces every one
    detail = [w for name, w in nrql_widgets() if name.startswith("Query detail")]
    assert all("{{fingerprint}}" in q["query"] for w in detail for q in w["rawConfiguration"]["nrqlQueries"])


def state_filters(query: str) -> set[str]:
    """The values a query compares ``postgresql.session.state`` with (``=`` or ``IN``), anywhere in it."""
    return {value for use in read_nrql(query)[1] if use.name == "postgresql.session.state" for value in use.compared}


def test_average_active_sessions_count_the_active_state_only():
    """Issue 19 item 4: AAS, as RDS Performance Insights, Oracle ASH and pganalyze define it, counts
    sessions in the ``active`` state; ``postgresql.activity.time`` also holds idle-in-transaction
    sessions, so every widget that sums it names the state it draws, and idle in transaction has a
    widget of its own."""
    assert state_filters("FROM Metric SELECT x WHERE a = 'b' AND postgresql.session.state = 'active'") == {"active"}
    assert state_filters("FROM Metric SELECT x WHERE `postgresql.session.state` IN ('idle in transaction')") == {"idle in transaction"}
    drawn: dict[str, set[str]] = {}
    for name, widget in nrql_widgets():
        for q in widget["rawConfiguration"]["nrqlQueries"]:
            if "postgresql.activity.time" in q["query"]:
                states = state_filters(q["query"])
                assert len(states) == 1, f"{name}: sums postgresql.activity.time over {sorted(states) or 'every state'}"
                drawn[name] = states
    active = {name for name, states in drawn.items() if states == {"active"}}
    idle = {name for name, states in drawn.items() if states == {"idle in transaction"}}
    assert active | idle == set(drawn), drawn
    assert {n for n in drawn if "active sessions" in n.lower()} <= active
    assert any("Average active sessions" in n for n in active) and any(n.startswith("Query detail") for n in active)
    assert any("idle in transaction" in n.lower() for n in idle)
    [intro] = [
        w["rawConfiguration"]["text"]
        for _, w in widgets()
        if w["visualization"]["id"] == "viz.markdown" and "Average active sessions" in w["rawConfiguration"]["text"]
    ]
    assert "`active`" in intro and "idle in transaction" in intro


# What pgflow exports, from a real run -------------------------------------------------------------


@dataclass
class Exported:
    metrics: set[str]
    metric_attributes: set[str]
    events: set[str]
    log_attributes: set[str]
    has_logs: bool
    server_version_num: int


def _keys(rows: list[tuple[str | None]]) -> set[str]:
    keys: set[str] = set()
    for (text,) in rows:
        if text:
            keys |= set(json.loads(text))
    return keys


def _workload(server: LocalPostgres) -> None:
    """pgbench, a lock chain (a holder and a blocked session), a slow statement, a vacuum, a checkpoint,
    and more distinct statements than pg_stat_statements.max holds (deallocations)."""
    server.pgbench("-n", "-c", "2", "-t", "100")
    server.execute(*[f"SELECT {' + '.join(['1'] * n)}" for n in range(1, 160)])
    holder = psycopg.connect(server.dsn())
    holder.execute("LOCK TABLE pgbench_branches IN ACCESS EXCLUSIVE MODE")
    blocked = threading.Thread(target=server.execute, args=("SELECT count(*) FROM pgbench_branches",))
    slow = threading.Thread(target=server.execute, args=("SELECT pg_sleep(1.5)",))
    blocked.start()
    slow.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not server.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")[0][0]:
        time.sleep(0.05)
    slow.join()  # the blocked session waited as long as the slow statement ran
    holder.rollback()
    holder.close()
    blocked.join()
    server.execute("VACUUM pgbench_history", "CHECKPOINT")


@pytest.fixture(scope="module")
def exported(pgbench_server, tmp_path_factory) -> Exported:
    tmp = tmp_path_factory.mktemp("dashboard")
    primary = pgbench_server(settings={"pg_stat_statements.max": "100"})  # the least it allows
    [(version,)] = primary.execute("SELECT current_setting('server_version_num')::int")
    standby = standby_of(primary)  # (pgserver's: on 13 it rewrites what 13's libpq rejects, so it streams)
    try:
        state, out = tmp / "state", tmp / "received.duckdb"
        config = write_config(
            tmp / "pgflow.json",
            instances=[{"name": "primary", "database_url": primary.dsn()}, {"name": "standby", "database_url": standby.dsn()}],
        )
        with Receiver(out) as receiver:
            env = collector_env(None, receiver.http_endpoint, state, **FEATURE_ENV)
            proc = start_collector(env, "--config", str(config), log=tmp / "collector.log")
            try:
                wait_for_baseline(state, instances=2)
                _workload(primary)
                settle(3, state_dir=state, scrapes=4)
            finally:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=90)
            assert code == 0, (tmp / "collector.log").read_text()[-3000:]
    finally:
        standby.cleanup()
        shutil.rmtree(standby.root, ignore_errors=True)
    with duckdb.connect(str(out), read_only=True) as db:
        tables = {name for (name,) in db.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        metrics = {m for (m,) in db.execute("SELECT DISTINCT metric FROM points").fetchall()}
        attributes = _keys(db.execute("SELECT DISTINCT attributes FROM points").fetchall())
        attributes |= _keys(db.execute("SELECT DISTINCT resource FROM points").fetchall())
        events, log_attributes = set(), set()
        if "logs" in tables:
            events = {e for (e,) in db.execute("SELECT DISTINCT event_name FROM logs").fetchall()}
            log_attributes = _keys(db.execute("SELECT DISTINCT attributes FROM logs").fetchall())
            log_attributes |= _keys(db.execute("SELECT DISTINCT resource FROM logs").fetchall()) | LOG_FIELDS
    assert "postgresql.query.calls" in metrics and "db.query.summary" in attributes  # the run did export
    return Exported(metrics, attributes | {"metricName"}, events, log_attributes, "logs" in tables, version)


def missing_names(query: str, ex: Exported) -> set[str]:
    """Every name the query uses that pgflow did not export (with FROM Log itself if no logs came)."""
    q = parse_nrql(query)
    if q.source == "Metric":
        missing = (q.selected - ex.metrics - ex.metric_attributes) | (q.attributes - ex.metric_attributes)
        missing |= q.metric_names - ex.metrics
        if not (q.selected | q.metric_names) & ex.metrics and not missing:
            missing.add("<no metric named>")
        return missing
    if q.source == "Log":
        if not ex.has_logs:
            return {"FROM Log"} | q.event_names
        if q.event_names and not q.event_names & ex.events:
            return set(q.event_names)  # none of its events came: their attributes cannot be judged yet
        missing = (q.selected | q.attributes) - ex.log_attributes
        missing |= q.event_names - ex.events
        if not q.event_names:
            missing.add("<no event.name filter>")
        return missing
    return {f"FROM {q.source or '?'}"}  # pgflow exports Metric and Log data only


@pytest.mark.slow
@pytest.mark.parametrize("name, widget", nrql_widgets(), ids=[name for name, _ in nrql_widgets()])
def test_every_widget_queries_only_what_pgflow_exports(exported, name, widget):
    for q in widget["rawConfiguration"]["nrqlQueries"]:
        missing = missing_names(q["query"], exported)
        too_old = {n for n in missing if n in NEEDS_VERSION and exported.server_version_num < NEEDS_VERSION[n][0]}
        if missing and missing == too_old:
            pytest.xfail("; ".join(sorted({NEEDS_VERSION[n][1] for n in too_old})))
        if missing and missing <= set(LANDS_WITH):
            pytest.xfail(f"waits for {', '.join(sorted({LANDS_WITH[n] for n in missing}))}: {sorted(missing)}")
        assert not missing, f"{name}: pgflow never sends {sorted(missing)}"


@pytest.mark.slow
def test_the_fingerprint_variable_lists_real_fingerprints(exported):
    [variable] = dashboard()["variables"]
    assert not missing_names(variable["nrqlQuery"]["query"], exported)


@pytest.mark.slow
def test_names_waiting_for_other_issues_are_still_missing(exported):
    landed = {
        n
        for n in LANDS_WITH
        if n in exported.metrics | exported.metric_attributes | exported.events | exported.log_attributes
        or (n == "FROM Log" and exported.has_logs)
    }
    assert not landed, f"these names are exported now: remove them from LANDS_WITH: {sorted(landed)}"
