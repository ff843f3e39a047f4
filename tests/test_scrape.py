"""The scrape layer against a real PostgreSQL, with pgbench as ground truth."""

from __future__ import annotations

import subprocess
import sys
import threading

import polars as pl
import psycopg
import pytest
from conftest import PGBENCH_STATEMENTS

from pgflow.config import InstanceConfig
from pgflow.errors import AuthenticationFailed, DatabaseMissing, ExtensionMissing, ExtensionNotLoaded, ScrapeTimeout, ServerUnreachable
from pgflow.pgserver import free_port
from pgflow.schema import ACTIVITY, BLOCKED, DATABASES, LOCKS, STATEMENTS
from pgflow.scrape import Scraper
from pgflow.scrape.diagnose import check

SECRET = "Wr0ngPa55-xyz"


def _calls_by_text(statements: pl.DataFrame) -> dict[str, int]:
    top = statements.filter(pl.col("toplevel").fill_null(True))
    return dict(top.group_by("query").agg(pl.col("calls").sum()).iter_rows())


def test_pgbench_calls_are_exact_with_text(fresh_stats):
    fresh_stats.pgbench("-n", "-c", "4", "-t", "250")
    with Scraper(fresh_stats.dsn()) as scraper:
        snap = scraper.scrape()
    calls = _calls_by_text(snap.statements)
    for text in PGBENCH_STATEMENTS.values():
        assert calls[text] == 1000, text
    assert snap.statements.schema == STATEMENTS
    assert snap.server_version_num >= 130000
    assert snap.scraped_at.tzinfo is not None


def test_delta_between_two_scrapes_is_exact(pg):
    with Scraper(pg.dsn()) as scraper:
        before = scraper.scrape()
        pg.pgbench("-n", "-c", "4", "-t", "250")
        after = scraper.scrape()
    b, a = _calls_by_text(before.statements), _calls_by_text(after.statements)
    for text in PGBENCH_STATEMENTS.values():
        assert a[text] - b.get(text, 0) == 1000


def test_steady_state_transfers_no_text(pg):
    with Scraper(pg.dsn()) as scraper:
        scraper.scrape()
        scraper.scrape()  # on a fresh server the first scrape's own statements are new entries at the second
        fetches, texts = scraper.stats.text_fetches, scraper.stats.texts_fetched
        snap = scraper.scrape()
        assert scraper.stats.text_fetches == fetches and scraper.stats.texts_fetched == texts
        assert snap.statements["query"].null_count() < snap.statements.height  # texts still attached
        pg.execute("SELECT 'a brand new statement shape' AS brand_new_shape, 42")
        changed = scraper.scrape()
        assert scraper.stats.text_fetches == fetches + 1  # exactly one round trip for the new key
        again = scraper.scrape()
    # Issue 20: between key changes the texts are kept only in the last frame's column; after one,
    # every entry still there keeps its text, read from that column, not from the server again.
    key = ["dbid", "userid", "queryid", "toplevel"]
    both = snap.statements.select(*key, "query").join(changed.statements.select(*key, "query"), on=key, nulls_equal=True)
    assert both.height >= 5 and both["query"].null_count() == 0 and both["query"].equals(both["query_right"], check_names=False)
    assert "brand_new_shape" in " ".join(changed.statements["query"].drop_nulls())
    assert again.statements.select(*key, "query").equals(changed.statements.select(*key, "query"))


def test_every_text_is_the_servers_own_while_entries_come_and_go(pg_factory):
    """Issue 20: when the keys change (new entries, evictions, the server's order moved), each
    entry still there keeps its text from the last scrape's column by position and only new
    ones are read; every row's text must still be the one the server holds for its key, and
    only new keys cost a text. Ground truth: pg_stat_statements read directly after each scrape."""
    pg = pg_factory(settings={"pg_stat_statements.max": "100"})  # the smallest: entries are evicted
    pg.execute("CREATE EXTENSION pg_stat_statements", "CREATE TABLE churn (v int)", "INSERT INTO churn VALUES (1)")
    key = ["dbid", "userid", "queryid", "toplevel"]
    with Scraper(pg.dsn()) as scraper, psycopg.connect(pg.dsn(), autocommit=True) as work:
        toplevel = "toplevel" if work.info.server_version >= 140000 else "NULL::bool"  # PostgreSQL 13 has none
        read = f"SELECT dbid::int8, userid::int8, queryid, {toplevel}, query FROM pg_stat_statements"
        scraper.scrape()
        compared = 0
        for r in range(6):
            for i in range(r * 30, (r + 1) * 30):  # a distinct tree each: a new entry each, older ones evicted
                work.execute("SELECT " + " + ".join(["v"] * (i + 1)) + " FROM churn")  # type: ignore[arg-type]
            before = scraper.stats.texts_fetched
            frame = scraper.scrape().statements
            rows = work.execute(read).fetchall()  # type: ignore[call-overload]
            truth = pl.DataFrame(rows, schema=[*key, "query"], orient="row").cast(
                {"dbid": pl.Int64, "userid": pl.Int64, "queryid": pl.Int64, "toplevel": pl.Boolean}
            )
            both = frame.select(*key, "query").join(truth, on=key, nulls_equal=True, suffix="_server")
            assert both.height >= 40, both.height  # most entries survive from the scrape to the read (evictions: 5 % at a time)
            wrong = both.filter(pl.col("query").ne_missing(pl.col("query_server")))
            assert wrong.height == 0, wrong
            assert scraper.stats.texts_fetched - before <= 30 + 10  # the new entries (and pgflow's own), not every text
            compared += both.height
    assert compared >= 240


def test_statements_arrive_in_rows_no_larger_than_one_column(pg):
    """Issue 20: libpq keeps a connection's input buffer as large as the largest message it ever
    received. The counters of every statement in one row (~450 KB at 2,000 statements) kept
    ~0.7 MB per instance resident for good; one row per column keeps each message to one
    counter's values (8 bytes a statement), and the values are the same as the plain query's."""
    from pgflow.scrape.columnar import columnar, columnar_row
    from pgflow.scrape.statements import EXTENSION_SQL, statements_columnar_sql, statements_sql

    pg.pgbench("-n", "-c", "2", "-t", "50")
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        _, schema, columns = conn.execute(EXTENSION_SQL).fetchone()
        rows = conn.cursor(binary=True).execute(statements_columnar_sql(schema, set(columns))).fetchall()
        plain = conn.execute(statements_sql(schema, set(columns))).fetchall()
    cols = columnar(columnar_row(rows))
    assert cols.n >= len(PGBENCH_STATEMENTS)
    assert max(len(b or b"") + sum(len(str(x)) for x in (o or []) + (t or [])) for _, _, b, o, t in rows) <= 8 * cols.n + 4096
    # The same entries and counters as the plain query (pgflow's own statement moves between the two).
    calls = dict(zip(cols.queryid.tolist(), cols.counters[0].to_list()))
    plain_calls = {r[2]: r[7] for r in plain}
    shared = set(calls) & set(plain_calls)
    assert len(shared) >= cols.n - 3
    assert sum(calls[q] == plain_calls[q] for q in shared) >= len(shared) - 3


def test_frames_have_fixed_schemas_and_see_activity_and_locks(pg):
    with psycopg.connect(pg.dsn()) as holder:
        holder.execute("LOCK TABLE pgbench_branches IN SHARE MODE")
        with Scraper(pg.dsn()) as scraper:
            snap = scraper.scrape()
    assert snap.activity.schema == ACTIVITY and snap.locks.schema == LOCKS
    assert snap.blocked.schema == BLOCKED and snap.databases.schema == DATABASES
    assert snap.locks.filter((pl.col("mode") == "ShareLock") & pl.col("granted"))["count"].sum() >= 1
    assert snap.activity.filter(pl.col("state") == "idle in transaction")["count"].sum() >= 1
    assert "postgres" in snap.databases["database"].to_list()
    assert snap.max_connections == 100


def test_blocked_sessions_are_seen(pg):
    holder = psycopg.connect(pg.dsn())
    holder.execute("LOCK TABLE pgbench_tellers IN ACCESS EXCLUSIVE MODE")
    waiter = threading.Thread(target=lambda: pg.execute("SELECT count(*) FROM pgbench_tellers"))
    waiter.start()
    try:
        with Scraper(pg.dsn()) as scraper:
            for _ in range(50):
                snap = scraper.scrape()
                if snap.blocked.height:
                    break
        assert snap.blocked["sessions"].sum() == 1
        assert snap.blocked["max_wait_secs"][0] >= 0
    finally:
        holder.rollback()
        holder.close()
        waiter.join()


def test_unreachable_server():
    dsn = f"postgresql://mon:{SECRET}@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(ServerUnreachable) as info, Scraper(dsn, connect_timeout_secs=2) as scraper:
        scraper.scrape()
    assert "check that the server is running" in str(info.value) and SECRET not in str(info.value)


def test_wrong_password_is_not_echoed(pg):
    pg.execute("DROP ROLE IF EXISTS mon_pw", "CREATE ROLE mon_pw LOGIN PASSWORD 'right-one' IN ROLE pg_monitor")
    with pytest.raises(AuthenticationFailed) as info, Scraper(pg.dsn(user="mon_pw", password=SECRET)) as scraper:
        scraper.scrape()
    assert SECRET not in str(info.value) and "password" in str(info.value)


def test_missing_database(pg):
    with pytest.raises(DatabaseMissing, match="does not exist"), Scraper(pg.dsn("no_such_db")) as scraper:
        scraper.scrape()


def test_extension_not_installed(pg):
    pg.execute("DROP DATABASE IF EXISTS noext", "CREATE DATABASE noext")
    with pytest.raises(ExtensionMissing, match="CREATE EXTENSION pg_stat_statements"), Scraper(pg.dsn("noext")) as scraper:
        scraper.scrape()


def test_library_not_preloaded(pg_factory):
    server = pg_factory(preload=False)
    server.execute("CREATE EXTENSION pg_stat_statements")
    with pytest.raises(ExtensionNotLoaded, match="shared_preload_libraries"), Scraper(server.dsn()) as scraper:
        scraper.scrape()


def test_statement_timeout_raises_and_next_scrape_works(pg):
    with Scraper(pg.dsn(), statement_timeout_ms=300) as scraper:
        scraper.scrape()  # connected before the lock: new connections would wait for it too
        holder = psycopg.connect(pg.dsn())
        holder.execute("LOCK TABLE pg_database IN ACCESS EXCLUSIVE MODE")  # the scrape joins pg_database
        try:
            with pytest.raises(ScrapeTimeout, match="statement_timeout"):
                scraper.scrape()
        finally:
            holder.rollback()
            holder.close()
        assert scraper.scrape().statements.height > 0  # reconnects and goes on


def test_rows_hidden_by_missing_privileges(pg):
    pg.execute("DROP ROLE IF EXISTS mon_plain", "CREATE ROLE mon_plain LOGIN PASSWORD 'pw'", "GRANT pg_read_all_settings TO mon_plain")
    with Scraper(pg.dsn(user="mon_plain", password="pw")) as scraper:
        snap = scraper.scrape()
    assert snap.hidden_statements > 0  # the superuser's pgbench statements
    assert snap.statements["queryid"].null_count() == 0
    report = check(InstanceConfig(name="plain", database_url=pg.dsn(user="mon_plain", password="pw")))
    assert any(f.level == "warn" and "GRANT pg_read_all_stats TO mon_plain" in f.detail for f in report.findings)


def test_pg_monitor_role_sees_everything(pg):
    pg.execute("DROP ROLE IF EXISTS mon_ok", "CREATE ROLE mon_ok LOGIN PASSWORD 'pw' IN ROLE pg_monitor")
    with Scraper(pg.dsn(user="mon_ok", password="pw")) as scraper:
        snap = scraper.scrape()
    assert snap.hidden_statements == 0
    assert set(PGBENCH_STATEMENTS.values()) <= set(snap.statements["query"].drop_nulls())


def _cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "pgflow", *args], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60
    )


def test_check_exit_codes(pg):
    ok = _cli("check", env={"DATABASE_URL": pg.dsn()})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "usable" in ok.stdout and "pg_stat_statements.max" in ok.stdout
    pg.execute("DROP DATABASE IF EXISTS noext2", "CREATE DATABASE noext2")
    bad = _cli("check", env={"DATABASE_URL": pg.dsn("noext2")})
    assert bad.returncode == 1
    assert "CREATE EXTENSION pg_stat_statements" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_check_unreachable_does_not_echo_password():
    proc = _cli("check", env={"DATABASE_URL": f"postgresql://mon:{SECRET}@127.0.0.1:{free_port()}/db"})
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_columns_follow_the_server_version(pg):
    """13 has no toplevel and no pg_stat_statements_info; 17 renamed blk_*_time and added
    stats_since; 18 adds columns pgflow does not map. Every server gives the same frame."""
    pg.execute("SELECT pg_stat_statements_reset()")
    pg.pgbench("-n", "-c", "1", "-t", "20")
    with Scraper(pg.dsn()) as scraper:
        snap = scraper.scrape()
        server = scraper.server
    st = snap.statements
    version = snap.server_version_num
    assert st.schema == STATEMENTS
    assert st["shared_blk_read_time"].null_count() == 0  # blk_read_time before 17, shared_blk_read_time after
    if version < 140000:
        assert st["toplevel"].null_count() == st.height
        assert snap.dealloc is None and snap.stats_reset is None and not server.has_info_view
    else:
        assert st["toplevel"].null_count() == 0
        assert snap.dealloc is not None and snap.stats_reset is not None
    if version < 170000:
        assert st["stats_since"].null_count() == st.height and "blk_read_time" in server.columns
    else:
        assert st["stats_since"].null_count() == 0 and "shared_blk_read_time" in server.columns
        assert st["local_blk_read_time"].null_count() == 0
    if version >= 180000:
        assert {"wal_buffers_full", "parallel_workers_launched"} <= server.columns
