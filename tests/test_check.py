"""`pgflow check` advice, classified by SQLSTATE, with real roles on a real server (issue 14, item 12)."""

from __future__ import annotations

import psycopg
import pytest

from pgflow.config import InstanceConfig
from pgflow.errors import ExtensionNotLoaded, InsufficientPrivilege, PoolerRefused, SslRefused
from pgflow.scrape import Scraper
from pgflow.scrape.connection import classify
from pgflow.scrape.diagnose import check, preloaded


@pytest.fixture(scope="module")
def server(pg_factory):
    """``$libdir/pg_stat_statements`` preloaded, track_io_timing off, and the roles the cases need."""
    server = pg_factory(settings={"shared_preload_libraries": "$libdir/pg_stat_statements", "track_io_timing": "off"})
    server.execute(
        "CREATE EXTENSION pg_stat_statements",
        "CREATE ROLE plain LOGIN PASSWORD 'pw'",  # no pg_monitor, no pg_read_all_settings
        "CREATE ROLE monitor LOGIN PASSWORD 'pw' IN ROLE pg_monitor",
        "CREATE ROLE sslonly LOGIN PASSWORD 'pw' IN ROLE pg_monitor",
        "CREATE DATABASE schemadb",
        "CREATE DATABASE noconnect",
        "REVOKE CONNECT ON DATABASE noconnect FROM PUBLIC",
    )
    server.execute("CREATE SCHEMA mon", "CREATE EXTENSION pg_stat_statements SCHEMA mon", dbname="schemadb")
    hba = server.datadir / "pg_hba.conf"
    hba.write_text("hostnossl all sslonly 127.0.0.1/32 reject\n" + hba.read_text())
    server.execute("SELECT pg_reload_conf()")
    return server


def _report(dsn: str) -> tuple[str, dict[str, tuple[str, str]]]:
    report = check(InstanceConfig(name="t", database_url=dsn))
    return report.render(), {f.name: (f.level, f.detail) for f in report.findings}


def test_role_without_pg_monitor_is_not_told_to_edit_preload(server):
    text, findings = _report(server.dsn(user="plain", password="pw"))
    assert "restart" not in text and "add it to shared_preload_libraries" not in text, text
    assert findings["preload"][0] == "ok", text  # pg_stat_statements answered
    assert findings["privileges"][0] == "warn" and "GRANT pg_read_all_stats TO plain" in findings["privileges"][1]
    assert "=> usable" in text


def test_permission_denied_reading_a_setting_is_not_a_missing_library(server):
    with psycopg.connect(server.dsn(user="plain", password="pw")) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT current_setting('shared_preload_libraries')")
    error = classify(caught.value, server.dsn(user="plain", password="pw"))
    assert isinstance(error, InsufficientPrivilege) and not isinstance(error, ExtensionNotLoaded)
    assert "GRANT pg_monitor TO plain" in str(error)


def test_libdir_prefixed_preload_counts_as_loaded(server):
    assert preloaded("$libdir/pg_stat_statements") and preloaded('auto_explain, "$libdir/pg_stat_statements.so"')
    assert not preloaded("auto_explain, pg_stat_statements_extra")
    text, findings = _report(server.dsn())
    assert findings["preload"] == ("ok", "pg_stat_statements is in shared_preload_libraries"), text


def test_track_io_timing_advice_is_a_server_setting(server):
    text, findings = _report(server.dsn(user="monitor", password="pw"))
    level, detail = findings["track_io_timing"]
    assert level == "warn" and "ALTER SYSTEM SET track_io_timing = on" in detail and "pg_reload_conf()" in detail, text


def test_missing_schema_usage_says_grant_usage(server):
    dsn = server.dsn("schemadb", user="monitor", password="pw")
    text, findings = _report(dsn)
    assert "GRANT USAGE ON SCHEMA mon TO monitor" in text, text
    assert "GRANT pg_monitor" not in text, text
    with pytest.raises(InsufficientPrivilege, match="GRANT USAGE ON SCHEMA mon TO monitor"), Scraper(dsn) as scraper:
        scraper.scrape()


def test_connect_privilege_missing_says_grant_connect(server):
    text, findings = _report(server.dsn("noconnect", user="plain", password="pw"))
    assert findings["connect"][0] == "fail" and "GRANT CONNECT ON DATABASE noconnect TO plain" in text, text
    assert "host and port" not in text, text


def test_ssl_required_by_the_client_but_not_offered(server):
    text, findings = _report(server.dsn() + "?sslmode=require")
    assert findings["connect"][0] == "fail", text
    assert "does not offer SSL" in text and "sslmode" in text and "host and port" not in text, text


def test_ssl_required_by_the_server_for_the_role(server):
    text, findings = _report(server.dsn(user="sslonly", password="pw") + "?sslmode=disable")
    assert findings["connect"][0] == "fail", text
    assert "sslmode=require" in text and "host and port" not in text, text


def test_pgbouncer_statement_pooling_by_sqlstate_and_message():
    """PgBouncer is not installed here: the classifier is tested with the error PgBouncer sends
    (SQLSTATE 08P01 and its message), not against a real PgBouncer."""
    error = psycopg.errors.ProtocolViolation("transaction blocks not allowed in statement pooling mode")
    assert error.sqlstate == "08P01"
    result = classify(error, "postgresql://mon@pool:6432/app")
    assert isinstance(result, PoolerRefused) and "transaction or session mode" in str(result)
    assert "host and port" not in str(result)
    assert isinstance(
        classify(
            psycopg.OperationalError('connection to server at "db" failed: SSL error: certificate verify failed'), "postgresql://db/app"
        ),
        SslRefused,
    )


def test_not_loaded_is_still_reported(pg_factory):
    server = pg_factory(preload=False)
    server.execute("CREATE EXTENSION pg_stat_statements")
    text, findings = _report(server.dsn())
    assert findings["preload"][0] == "fail" and "shared_preload_libraries" in findings["preload"][1], text


# --- issue 19 item 8 (the real CLI) ------------------------------------------------------------


def _cli_check(dsn: str) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "DATABASE_URL": dsn}
    proc = subprocess.run([sys.executable, "-m", "pgflow", "check"], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


def test_missing_role_gets_missing_role_advice(server):
    """`FATAL: role "nobody" does not exist` (a trusted socket: no password step first) was told
    to check that the server is running."""
    code, out = _cli_check(f"postgresql://nobody@/postgres?host={server.root}&port={server.port}")
    assert code == 1
    assert "has no role nobody" in out and "CREATE ROLE nobody LOGIN" in out, out
    assert "server is running" not in out


def test_check_warns_per_database_where_plans_will_fail(pg_factory):
    """A pg_monitor role cannot explain the statements on tables it may not read, in a database
    other than the DSN's: `check` says so for that database with the fix, and says ok once the
    helper is installed there and granted."""
    from pathlib import Path

    server = pg_factory()
    server.execute(
        "CREATE EXTENSION pg_stat_statements", "CREATE ROLE watcher LOGIN PASSWORD 'pw' IN ROLE pg_monitor", "CREATE DATABASE shop"
    )
    server.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)", "SELECT total FROM orders WHERE id = 1", dbname="shop")
    dsn = server.dsn(user="watcher", password="pw")
    code, out = _cli_check(dsn)
    assert code == 0, out
    line = next((x for x in out.splitlines() if "plans in shop" in x), "")
    assert line.strip().startswith("WARN") and "may not read 1 of 1 tables" in line, out
    assert "psql -d shop -f pgflow/sql/explain_helper.sql" in line and "TO watcher" in line, line
    helper = (Path(__file__).resolve().parent.parent / "pgflow" / "sql" / "explain_helper.sql").read_text()
    with psycopg.connect(server.dsn("shop"), autocommit=True) as conn:
        conn.execute(helper)
        conn.execute("GRANT USAGE ON SCHEMA pgflow TO watcher")
        conn.execute("GRANT EXECUTE ON FUNCTION pgflow.explain_generic(text) TO watcher")
    code, out = _cli_check(dsn)
    line = next((x for x in out.splitlines() if "plans in shop" in x), "")
    assert line.strip().startswith("ok") and "helper installed and usable" in line, out
