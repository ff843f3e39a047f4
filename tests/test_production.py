"""Issue 14, scrape side: what a production user met, against real servers.

Encodings (a SQL_ASCII statement text, SQL_ASCII and LATIN1 databases), another server
behind the same DSN, a multi-host DSN, hidden statements, pgflow's own statements and the
instance's identity. Ground truth is the workload each test runs.
"""

from __future__ import annotations

import json
import logging
import socket

import polars as pl
import psycopg
import pytest
from conftest import PGBENCH_STATEMENTS

from pgflow import ops, telemetry
from pgflow.config import InstanceConfig, Settings
from pgflow.errors import ScrapeError
from pgflow.ops.delta import delta
from pgflow.otlp.exporter import Exporter
from pgflow.otlp.receiver import Receiver
from pgflow.pgserver import free_port
from pgflow.scrape import Scraper
from pgflow.scrape.diagnose import check

BAD_BYTE_STATEMENT = b'SELECT 1 AS "caf\xe9"'  # stored from a SQL_ASCII database: not valid UTF-8


@pytest.fixture(scope="module")
def encodings(pg_factory):
    """A server whose pg_stat_statements holds a 0xe9 text from a SQL_ASCII database."""
    server = pg_factory()
    server.execute(
        "CREATE EXTENSION pg_stat_statements",
        "CREATE DATABASE sqlascii ENCODING 'SQL_ASCII' TEMPLATE template0",
        "CREATE DATABASE latin ENCODING 'LATIN1' TEMPLATE template0",
    )
    for db in ("sqlascii", "latin"):
        server.execute("CREATE EXTENSION pg_stat_statements", dbname=db)
    with psycopg.connect(server.dsn("sqlascii"), autocommit=True) as conn:
        conn.execute(BAD_BYTE_STATEMENT)
    with pytest.raises(psycopg.errors.CharacterNotInRepertoire):  # the failure the issue reports
        server.execute("SELECT count(query) FROM pg_stat_statements(true)")
    return server


def _calls(deltas, needle: str) -> int:
    frame = deltas.statements
    return int(sum(c for q, c in zip(frame["query"], frame["calls"]) if q is not None and needle in q)) if "query" in frame.columns else 0


def _calls_by_queryid(deltas, queryids: set[int]) -> int:
    frame = deltas.statements
    return int(sum(c for q, c in zip(frame["queryid"], frame["calls"]) if q in queryids))


def _texts(deltas) -> dict[str, int]:
    frame = deltas.statements
    out: dict[str, int] = {}
    for q, c in zip(frame["query"], frame["calls"]):
        if q is not None:
            out[q] = out.get(q, 0) + int(c)
    return out


def test_unreadable_text_keeps_counting(encodings, caplog):
    """Item 1 (issue 14), issue 19 item 2: one text the server cannot convert stops neither the
    counters nor the texts: they are read through the SQL_ASCII database that has the extension."""
    with Scraper(encodings.dsn()) as scraper, caplog.at_level(logging.INFO, logger="pgflow.scrape"):
        state, _ = delta(None, scraper.scrape())
        with psycopg.connect(encodings.dsn(), autocommit=True) as conn:
            for _ in range(7):
                conn.execute("SELECT 42 AS fresh_after_the_bad_text")
        with psycopg.connect(encodings.dsn("sqlascii"), autocommit=True) as conn:
            for _ in range(3):
                conn.execute(BAD_BYTE_STATEMENT)
        state, deltas = delta(state, scraper.scrape())
    assert deltas is not None
    texts = _texts(deltas)
    assert texts.get("SELECT $1 AS fresh_after_the_bad_text") == 7, texts  # its own text, not a queryid
    assert texts.get('SELECT $1 AS "caf\ufffd"') == 3, texts  # the bad byte replaced, the rest kept
    assert scraper.stats.text_failures >= 1
    assert any("read through a SQL_ASCII database" in r.getMessage() for r in caplog.records)
    logged = caplog.text + " ".join(str(getattr(r, "kv", "")) for r in caplog.records)
    assert "caf" not in logged and "0xe9" not in logged  # the failure is named, no byte of the text


def test_check_exercises_the_text_path(encodings):
    """`pgflow check` reads texts the way the scraper does, and says which way (issue 19 item 2)."""
    report = check(InstanceConfig(name="enc", database_url=encodings.dsn()))
    texts = [f for f in report.findings if f.name == "texts"]
    assert texts and texts[0].level == "ok" and "read through database sqlascii" in texts[0].detail, report.render()
    assert report.usable, report.render()
    assert "0xe9" not in report.render()  # the server quotes the bytes; they may belong to a literal


def test_sql_ascii_and_latin1_databases(encodings):
    """Item 2: a DSN naming a SQL_ASCII or a LATIN1 database scrapes and checks like any other."""
    with psycopg.connect(encodings.dsn(), autocommit=True) as conn:  # a text LATIN1 cannot hold
        conn.execute('SELECT 1 AS "€uro"')
    for db in ("sqlascii", "latin"):
        with Scraper(encodings.dsn(db)) as scraper:
            first = scraper.scrape()
            second = scraper.scrape()
        assert first.statements.height > 0 and second.statements.height > 0
        assert all(isinstance(d, str) for d in second.statements["database"].drop_nulls())
        report = check(InstanceConfig(name=db, database_url=encodings.dsn(db)))
        assert report.usable, report.render()
        assert "Traceback" not in report.render()
    # Read through the SQL_ASCII database, the 0xe9 text arrives, its byte replaced.
    with Scraper(encodings.dsn("sqlascii")) as scraper:
        texts = scraper.scrape().statements["query"].drop_nulls().to_list()
    assert 'SELECT $1 AS "caf\ufffd"' in texts or 'SELECT 1 AS "caf\ufffd"' in texts


def test_latin1_text_comes_out_as_unicode(encodings):
    """Issue 19 item 2: a valid LATIN1 text is the right characters whichever way it is read: from
    a UTF8 database (converted by the server, here through the SQL_ASCII database because of the
    0xe9 text) and from the SQL_ASCII database itself (decoded in the LATIN1 database's encoding)."""
    with psycopg.connect(encodings.dsn("latin"), autocommit=True) as conn:
        assert conn.info.encoding == "iso8859-1"
        for _ in range(2):
            conn.execute('SELECT 1 AS "déjà_vu_café"')
    for db in ("postgres", "sqlascii"):
        with Scraper(encodings.dsn(db)) as scraper:
            texts = scraper.scrape().statements["query"].drop_nulls().to_list()
        assert 'SELECT $1 AS "déjà_vu_café"' in texts, (db, [t for t in texts if "vu" in t])


@pytest.fixture()
def blind(pg_factory):
    """A server whose 0xe9 text comes from a SQL_ASCII database without pg_stat_statements."""
    server = pg_factory()
    server.execute("CREATE EXTENSION pg_stat_statements", "CREATE DATABASE legacy ENCODING 'SQL_ASCII' TEMPLATE template0")
    with psycopg.connect(server.dsn("legacy"), autocommit=True) as conn:
        conn.execute(BAD_BYTE_STATEMENT)
    return server


def test_unreadable_text_without_a_way_round_says_where_and_how(blind, caplog, monkeypatch):
    """Issue 19 item 2: no SQL_ASCII database with the extension: known texts kept, new keys by
    queryid, one warning naming the database and the fix, the same in `pgflow check`; once the
    DBA creates the extension there, texts come back without a restart."""
    from pgflow.scrape import scraper as scraper_module

    with Scraper(blind.dsn()) as scraper, caplog.at_level(logging.WARNING, logger="pgflow.scrape"):
        state, _ = delta(None, scraper.scrape())
        with psycopg.connect(blind.dsn(), autocommit=True) as conn:
            for _ in range(7):
                conn.execute("SELECT 42 AS fresh_after_the_bad_text")
        state, deltas = delta(state, scraper.scrape())
        state, _ = delta(state, scraper.scrape())
        queryid = blind.execute(
            "SELECT queryid FROM pg_stat_statements(false) s JOIN pg_roles r ON r.oid = s.userid WHERE calls = 7 AND r.rolname = 'postgres'"
        )
        assert _calls_by_queryid(deltas, {q for (q,) in queryid}) == 7  # counted, under the queryid label
        warnings = [r.getMessage() for r in caplog.records if "statement texts cannot be read" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once
        assert "database legacy" in warnings[0] and "CREATE EXTENSION pg_stat_statements in database legacy" in warnings[0], warnings[0]
        assert "caf" not in caplog.text
        # The way out: the extension created there; looked for again (TEXT_RETRY_SECS, 0 here).
        blind.execute("CREATE EXTENSION pg_stat_statements", dbname="legacy")
        monkeypatch.setattr(scraper_module, "TEXT_RETRY_SECS", 0.0)
        scraper._probe_after = 0.0
        with psycopg.connect(blind.dsn(), autocommit=True) as conn:
            for _ in range(5):
                conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'after_the_grant'")
        snap = scraper.scrape()
        state, deltas = delta(state, snap)
    assert _texts(deltas).get("SELECT count(*) FROM pg_class WHERE relname = $1") == 5, _texts(deltas)
    # The statement that ran while texts were unreadable gets its text back too (it was pending, not forgotten).
    assert "SELECT $1 AS fresh_after_the_bad_text" in snap.statements["query"].drop_nulls().to_list()
    blind.execute("DROP EXTENSION pg_stat_statements", dbname="legacy")
    report = check(InstanceConfig(name="blind", database_url=blind.dsn()))
    texts = [f for f in report.findings if f.name == "texts"]
    assert texts and texts[0].level == "warn", report.render()
    assert "database legacy" in texts[0].detail and "CREATE EXTENSION pg_stat_statements in database legacy" in texts[0].detail, (
        report.render()
    )
    assert "caf" not in report.render()


def _scrape_retrying(scraper: Scraper):
    """The first scrape after the server went away fails (dead connection); the next reconnects."""
    try:
        return scraper.scrape()
    except ScrapeError:
        return scraper.scrape()


def _pgbench_calls(deltas) -> int:
    frame = deltas.statements
    return int(sum(c for q, c in zip(frame["query"], frame["calls"]) if q in PGBENCH_STATEMENTS.values()))


def test_another_server_on_the_same_port_starts_a_new_baseline(pgbench_server, caplog):
    """Item 3: server B replaces server A behind the same DSN: B's history is not an interval."""
    a = pgbench_server()
    b = pgbench_server()
    b.pgbench("-c", "2", "-t", "150")  # B's own history: 300 of each pgbench statement
    b.stop()
    with Scraper(a.dsn(), instance="behind-the-vip") as scraper:
        state, _ = delta(None, scraper.scrape())
        state, first = delta(state, scraper.scrape())
        assert first is not None
        a.stop()
        b.port = a.port  # the same host and port: a failover behind a VIP or a DNS name
        b.start()
        with caplog.at_level(logging.WARNING, logger="pgflow.scrape"):
            state, switched = delta(state, _scrape_retrying(scraper))
            assert switched is None  # a new baseline: nothing exported for that interval
            state, after = delta(state, scraper.scrape())
    assert after is not None and _pgbench_calls(after) == 0  # zero phantom calls
    warnings = [r for r in caplog.records if "server behind this instance changed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].kv["instance"] == "behind-the-vip"
    assert "system identifier" in warnings[0].kv["reason"]


def test_promoted_standby_behind_the_same_address_starts_a_new_baseline(pgbench_server, caplog):
    """Item 3: the primary fails, its standby (same system identifier, own counters) is promoted
    behind the same address: the standby's history is not an interval."""
    a = pgbench_server()
    b = a.standby()
    try:
        b.start()
        b.pgbench("-n", "-S", "-c", "1", "-t", "200")  # the standby's own read-only history
        select = PGBENCH_STATEMENTS["SELECT pgbench_accounts"]
        with Scraper(a.dsn(), instance="primary-vip") as scraper:
            state, _ = delta(None, scraper.scrape())
            a.stop()
            b.stop()
            b.port = a.port
            b.start()
            b.promote()
            with caplog.at_level(logging.WARNING, logger="pgflow.scrape"):
                state, switched = delta(state, _scrape_retrying(scraper))
                assert switched is None
                state, after = delta(state, scraper.scrape())
    finally:
        b.cleanup()  # the promoted standby listens on the primary's old port: never leave it running
    assert after is not None
    frame = after.statements
    assert sum(c for q, c in zip(frame["query"], frame["calls"]) if q == select) == 0  # zero phantom calls
    (warning,) = [r for r in caplog.records if "server behind this instance changed" in r.getMessage()]
    assert "timeline" in warning.kv["reason"] and warning.kv["instance"] == "primary-vip"


def test_fast_restart_of_the_same_server_keeps_the_interval(pgbench_server, caplog):
    """Item 3: a restart of the same server keeps pg_stat_statements' counters: no interval lost."""
    a = pgbench_server()
    with Scraper(a.dsn()) as scraper:
        state, _ = delta(None, scraper.scrape())
        a.pgbench("-c", "1", "-t", "40")
        a.restart("fast")
        with caplog.at_level(logging.WARNING, logger="pgflow.scrape"):
            state, deltas = delta(state, _scrape_retrying(scraper))
    assert deltas is not None
    assert _pgbench_calls(deltas) == 40 * len(PGBENCH_STATEMENTS)
    assert "server behind this instance changed" not in caplog.text


def test_multi_host_dsn_is_labelled_by_the_host_that_answered(pg):
    """Item 3: ``host=a,b`` with ``a`` down: the snapshot names ``b``, the instance both."""
    dead = free_port()
    dsn = f"postgresql://postgres@127.0.0.1:{dead},127.0.0.1:{pg.port}/postgres"
    settings = Settings.load(database_url=dsn)
    (target,) = settings.targets()
    assert target.name == f"127.0.0.1:{dead},127.0.0.1:{pg.port}"
    with Scraper(dsn, instance=target.name) as scraper:
        snap = scraper.scrape()
    assert (snap.server_address, snap.server_port) == ("127.0.0.1", pg.port)
    assert snap.identity is not None and snap.identity.address == f"127.0.0.1:{pg.port}"


def test_hidden_statements_are_counted_in_metrics_and_warned_once(pg, caplog):
    """Item 5: other roles' statements hidden without pg_read_all_stats: a gauge and one warning."""
    pg.execute("DROP ROLE IF EXISTS mon_hidden", "CREATE ROLE mon_hidden LOGIN PASSWORD 'pw'")
    pg.pgbench("-c", "1", "-t", "5")
    with caplog.at_level(logging.WARNING, logger="pgflow.scrape"):
        with Scraper(pg.dsn(user="mon_hidden", password="pw"), instance="hidden-test") as scraper:
            scraper.scrape()
            snap = scraper.scrape()
    assert snap.hidden_statements > 0
    body = telemetry.generate_latest(telemetry.REGISTRY).decode()
    assert f'pgflow_hidden_statements{{instance="hidden-test"}} {float(snap.hidden_statements)}' in body
    grants = [r for r in caplog.records if "GRANT pg_read_all_stats TO mon_hidden" in r.getMessage()]
    assert len(grants) == 1


def test_own_statements_are_never_exported(pgbench_server):
    """Item 16: pgflow's scrape statements are not the top statement; a user's same-looking one is."""
    server = pgbench_server()
    snapshots = []
    with Scraper(server.dsn()) as scraper:
        for _ in range(3):
            snapshots.append(scraper.scrape())
            with psycopg.connect(server.dsn(), autocommit=True) as conn:  # the user's own monitoring query
                conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'")
    for snap in snapshots:
        texts = snap.statements["query"].drop_nulls().to_list()
        assert not any("pg_stat_statements(" in t or "pg_locks" in t for t in texts), texts
    state = None
    calls = []
    for snap in snapshots:
        state, deltas = delta(state, snap)
        if deltas is not None:
            calls.append(
                sum(c for q, c in zip(deltas.statements["query"], deltas.statements["calls"]) if q is not None and "pg_stat_activity" in q)
            )
    assert calls == [1, 1]  # the user's query, exactly once per interval; pgflow's own never


def test_texts_are_keyed_like_the_counters_top_level_and_nested_apart(pgbench_server):
    """One queryid can have a top-level entry (the user's) and a nested one (pgflow's EXPLAIN of
    it, marked): each keeps its own text, so the user's calls are exported exactly and pgflow's
    nested one never. Before texts were keyed with ``toplevel``, one text served both keys."""
    server = pgbench_server()
    if server.execute("SHOW server_version_num")[0][0] < "140000":
        pytest.skip("PostgreSQL 13 keeps top-level and nested executions in one entry (no toplevel)")
    server.execute(
        "CREATE TABLE twin (id int)",
        "CREATE FUNCTION twin_count() RETURNS bigint LANGUAGE sql AS $$SELECT /*pgflow*/ count(*) FROM twin WHERE id = 1$$",
    )
    user = "SELECT count(*) FROM twin WHERE id = 1"
    nested = "SELECT twin_count()"  # the same statement, nested and marked: same queryid, toplevel false
    with Scraper(server.dsn()) as scraper:
        snapshots = [scraper.scrape()]
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            for _ in range(5):
                conn.execute(user)
            for _ in range(3):
                conn.execute(nested)
        snapshots.append(scraper.scrape())
    same = server.execute(
        "SELECT count(DISTINCT toplevel), count(DISTINCT queryid) FROM pg_stat_statements "
        "WHERE query LIKE 'SELECT %count(*) FROM twin WHERE%'"
    )
    assert same == [(2, 1)]  # ground truth: one queryid, a top-level and a nested entry
    calls = ops.run(snapshots, export_interval_secs=0.001).filter(
        (pl.col("metric") == "postgresql.query.calls") & pl.col("attributes").struct.field("db.query.text").str.contains("FROM twin")
    )
    assert calls["value"].sum() == 5
    assert set(calls["attributes"].struct.field("postgresql.query.toplevel")) == {"true"}


def test_instance_identity_names_the_host_for_a_local_address(pg, monkeypatch):
    """Item 11: a sidecar on localhost is told apart by the host; OTEL_RESOURCE_ATTRIBUTES merges."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.instance.id=spoof,team=db%20ops")
    with Scraper(pg.dsn()) as scraper:
        snaps = [scraper.scrape(), scraper.scrape()]
    points = ops.run(snaps, export_interval_secs=0.001)
    assert points.height > 0
    with Receiver() as receiver:
        settings = Settings.load(otlp_endpoint=receiver.http_endpoint, otlp_protocol="http", new_relic_api_key="k" * 40)
        results = Exporter(settings).export(points)
        assert all(r.acknowledged for _, r in results)
        resource = json.loads(receiver.points()["resource"][0])
    host = socket.gethostname()
    assert resource["service.instance.id"] == f"127.0.0.1:{pg.port}@{host}"
    assert resource["host.name"] == host and resource["server.address"] == "127.0.0.1"
    assert resource["deployment.environment"] == "prod" and resource["team"] == "db ops"
    assert resource["service.name"] == "pgflow"


def test_configured_instance_name_is_the_instance_id(monkeypatch):
    """Item 11: a configured name is the entity's key; OTEL_SERVICE_NAME names the service."""
    from pgflow.otlp.encode import resource_attributes

    attrs = resource_attributes("orders-primary", "10.1.2.3", 5432, 170004, "pgflow")
    assert attrs["service.instance.id"] == "orders-primary" and "host.name" not in attrs
    monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-db")
    assert resource_attributes("orders-primary", "10.1.2.3", 5432, 170004, "pgflow")["service.name"] == "payments-db"
    assert resource_attributes("orders-primary", "10.1.2.3", 5432, 170004, "mine")["service.name"] == "mine"


def test_identity_survives_a_capture(pg, tmp_path):
    """Item 3: the identity is captured, so a replay starts the same new baselines as live."""
    from pgflow.capture import CaptureWriter, as_stored, read

    with Scraper(pg.dsn()) as scraper:
        snap = scraper.scrape()
    assert snap.identity is not None and snap.identity.system_identifier is not None
    with CaptureWriter(tmp_path / "c.duckdb") as writer:
        writer.write(snap)
    (back,) = list(read(tmp_path / "c.duckdb"))
    assert back.identity == snap.identity and back.equals(as_stored(snap))


def test_stats_reset_moved_before_the_previous_scrape_is_another_server(pg):
    """Item 3, without the system identifier (a role that may not call pg_control_system()):
    a ``stats_reset`` that moved to before the previous scrape cannot be a reset inside the
    interval, so it is another server's counters; one after the previous scrape is a reset."""
    from dataclasses import replace
    from datetime import timedelta

    with Scraper(pg.dsn()) as scraper:
        first, second = scraper.scrape(), scraper.scrape()
    first = replace(first, identity=None, stats_reset=first.scraped_at - timedelta(hours=2))
    state, _ = delta(None, first)
    other = replace(second, identity=None, stats_reset=first.scraped_at - timedelta(hours=1))
    assert delta(state, other)[1] is None
    reset = replace(second, identity=None, stats_reset=first.scraped_at + timedelta(microseconds=1))
    assert delta(state, reset)[1] is not None


def test_every_statement_pgflow_sends_carries_its_mark(pg_factory):
    """pgflow's own work is never exported as workload: every statement its scrapers send (the
    statements and health scrape, the table scrape and its database discovery, the sampler, the
    check) carries /*pgflow*/, so pg_stat_statements' entries of the monitoring role are all
    marked. No transaction control is sent at all (issue 19): from PostgreSQL 16 a marked
    ROLLBACK would share the user's entry (utility queryids ignore comments). The table
    scrape and the discovery of databases were once unmarked and showed in the demo's top queries."""
    from pgflow.scrape.health import HealthSchedule
    from pgflow.scrape.sampler import Sampler
    from pgflow.scrape.statements import MARK
    from pgflow.scrape.tables import TableScraper

    server = pg_factory()
    server.execute(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        "CREATE ROLE pgflow_mark LOGIN PASSWORD 'mark'",
        "GRANT pg_monitor TO pgflow_mark",
        "CREATE DATABASE marked",
    )
    server.execute("CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)", dbname="marked")
    dsn = server.dsn(user="pgflow_mark", password="mark")
    server.execute("SELECT pg_stat_statements_reset()")
    with (
        Scraper(dsn, health=HealthSchedule.of(interval_secs=0.001)) as scraper,
        TableScraper(dsn, instance="mark") as tables,
        Sampler(dsn, instance="mark", interval_secs=1) as sampler,
    ):
        for _ in range(2):
            scraper.scrape()
            tables.scrape()
            assert sampler.sample()
    check(InstanceConfig(name="mark", database_url=dsn))
    entries = server.execute("SELECT s.query FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'pgflow_mark'")
    assert len(entries) >= 10  # the scrapers did run as that role
    unmarked = [q for (q,) in entries if MARK not in q]  # transaction control included (issue 19)
    assert unmarked == [], "\n".join(q[:100] for q in unmarked)
