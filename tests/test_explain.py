"""Explain plans: obfuscation and plan hash over plans of a real server (pgflow.ops.plans), and the
budgeted, read-only, time-limited explaining itself (pgflow.scrape.explain)."""

from __future__ import annotations

import json
import string

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg_parser

from pgflow.ops import plans

SCHEMA = [
    "CREATE TABLE t (id int PRIMARY KEY, name text, n numeric, ts timestamptz, tags int[])",
    "CREATE INDEX t_name ON t (name)",
    "CREATE INDEX t_tags ON t USING gin (tags)",
    "INSERT INTO t SELECT g, 'n' || g, g, now(), ARRAY[g] FROM generate_series(1, 3000) g",
    "CREATE TABLE u (id int, t_id int, v text)",
    "INSERT INTO u SELECT g, g % 100, 'v' || (g % 7) FROM generate_series(1, 3000) g",
    "CREATE VIEW secret_view AS SELECT * FROM t WHERE name <> 'viewsecret_zq'",
    "CREATE FUNCTION is_big(x int) RETURNS bool LANGUAGE sql IMMUTABLE AS $$ SELECT x > 4242429 $$",
    "ANALYZE",
]
# {s}, {s2}: string literals; {n}: an integer; {f}: a float; {tid}: a valid tuple id offset.
TEMPLATES = [
    "SELECT * FROM t WHERE name = '{s}' AND id > {n}",
    "SELECT * FROM t JOIN u ON u.t_id = t.id + {n} WHERE u.v = '{s}'",
    "SELECT count(*) FROM t GROUP BY n + {n} ORDER BY n + {n}",
    "SELECT * FROM t WHERE tags @> ARRAY[{n}]",
    "SELECT * FROM t WHERE ctid = '(0,{tid})'",
    "SELECT * FROM generate_series(1, {n}) g WHERE g::text <> '{s}'",
    "SELECT * FROM t TABLESAMPLE BERNOULLI ({f}) REPEATABLE ({n})",
    "SELECT id, row_number() OVER (PARTITION BY name ORDER BY id) FROM t WHERE '{s}' = current_user",
    "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t_id = t.id AND u.v = '{s}' LIMIT 1) x",
    "WITH c AS MATERIALIZED (SELECT * FROM t WHERE name LIKE '{s}%') SELECT * FROM c WHERE id IN (SELECT t_id FROM u WHERE v = '{s2}')",
    "SELECT * FROM (SELECT id, rank() OVER (ORDER BY id) r FROM t) s WHERE r <= {n}",
    "INSERT INTO t VALUES ({n}, '{s}') ON CONFLICT (id) DO UPDATE SET name = '{s2}' WHERE t.name <> '{s2}'",
    "UPDATE t SET name = '{s}' WHERE id = {n}",
    "DELETE FROM t WHERE name = '{s}' OR id = {n}",
    "SELECT * FROM t WHERE id = ANY('{{{n},{n}}}'::int[]) ORDER BY name DESC NULLS LAST",
    "SELECT name, sum(id) FROM t GROUP BY GROUPING SETS ((name), (n)) HAVING sum(id) > {n}",
    "SELECT * FROM t a JOIN t b ON a.name = b.name || '{s}'",
    "SELECT CASE WHEN id > {n} THEN '{s}' ELSE '{s2}' END, name || '{s}' FROM t WHERE n < {f}",
    "SELECT * FROM t WHERE name IN ('{s}', '{s2}') AND is_big(id)",
    "SELECT * FROM secret_view WHERE n = {f}",
    "SELECT * FROM u WHERE EXISTS (SELECT 1 FROM t WHERE t.id = u.t_id AND t.name = '{s}')",
    "SELECT * FROM u WHERE v = (SELECT max(name) FROM t WHERE name > '{s}')",
    "SELECT * FROM t WHERE name ~ '{s}' LIMIT {n}",
    "SELECT * FROM t WHERE ts > '2020-01-01'::date + {n} AND b'1010' = b'1010' AND x'ff' = x'ff' AND true",
]
SETTINGS = [
    "",
    "SET enable_hashjoin = off; SET enable_mergejoin = on",
    "SET enable_seqscan = off",
    "SET enable_nestloop = off; SET enable_hashagg = off",
]
CONSTANT_TOKENS = {"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST", "TRUE_P", "FALSE_P"}


@pytest.fixture(scope="module")
def plan_db(pg):
    """A database of its own on the session server, with tables, a view and an inlinable function."""
    pg.execute("DROP DATABASE IF EXISTS plans_db", "CREATE DATABASE plans_db")
    pg.execute(*SCHEMA, dbname="plans_db")
    with psycopg.connect(pg.dsn("plans_db"), autocommit=True) as conn:
        yield conn


def explain(conn: psycopg.Connection, query: str, setting: str = "", verbose: bool = False) -> list:
    conn.execute("RESET ALL")
    for statement in filter(None, setting.split("; ")):
        conn.execute(statement)
    options = "VERBOSE, FORMAT JSON" if verbose else "FORMAT JSON"
    with conn.transaction(force_rollback=True):
        return conn.execute(f"EXPLAIN ({options}) {query}").fetchone()[0]


def strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings_in(v)]]
    return []


def expressions_in(node: dict) -> list[str]:
    out = [s for k, v in node.items() if k in plans.EXPRESSION_FIELDS for s in strings_in(v)]
    for key in ("Plans", "Grouping Sets"):
        for child in node.get(key, []):
            out += expressions_in(child)
    return out


def assert_no_constant(normalized: dict, literals: list[str]) -> None:
    text = json.dumps(normalized)
    for literal in literals:
        assert all(literal not in s for s in strings_in(normalized)), (literal, text)
    for expression in expressions_in(normalized):
        tokens = pg_parser.scan(expression)
        raw = expression.encode()
        for i, tok in enumerate(tokens):
            if tok.name in CONSTANT_TOKENS:
                before = raw[tokens[i - 1].start : tokens[i - 1].end + 1] if i else b""
                assert tok.name == "ICONST" and before in (b"SubPlan", b"InitPlan", b"CTE"), (expression, text)


def fill(template: str, s: str, s2: str, n: int, f: float) -> str:
    return template.format(s=s, s2=s2, n=n, f=f, tid=n % 50 + 1)


def test_every_template_shows_its_literals_raw_and_none_normalized(plan_db):
    """Ground truth first: the raw plans do carry the literals (so the check below can fail)."""
    carried = 0
    for template in TEMPLATES:
        query = fill(template, "strsecret_zq", "other_zq", 9137452, 37.25)
        for verbose in (False, True):
            raw = explain(plan_db, query, verbose=verbose)
            raw_text = json.dumps(raw)
            literals = [lit for lit in ("strsecret_zq", "other_zq", "9137452", "viewsecret_zq", "4242429", "37.25") if lit in raw_text]
            carried += bool(literals)
            normalized = plans.obfuscate(raw)
            assert normalized["Node Type"] == raw[0]["Plan"]["Node Type"]
            assert_no_constant(normalized, literals + ["strsecret_zq", "other_zq", "viewsecret_zq"])
            body = plans.normalize(raw).body
            assert all(lit not in body for lit in ("strsecret_zq", "other_zq", "viewsecret_zq"))
    assert carried >= 30  # most raw plans showed a literal in some expression field


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    template=st.sampled_from(TEMPLATES),
    s=st.text(string.ascii_letters + string.digits + " _-", min_size=4, max_size=12).map(lambda x: f"zq{x}qz"),
    s2=st.text(string.ascii_letters + string.digits, min_size=4, max_size=12).map(lambda x: f"zq{x}qz"),
    n=st.integers(1_000_003, 999_999_999),
    f=st.floats(1.5, 99.5).map(lambda x: round(x, 3)),
    setting=st.sampled_from(SETTINGS),
    verbose=st.booleans(),
)
def test_no_literal_survives_any_plan(plan_db, template, s, s2, n, f, setting, verbose):
    raw = explain(plan_db, fill(template, s, s2, n, f), setting, verbose)
    normalized = plans.obfuscate(raw)
    assert_no_constant(normalized, [s, s2, str(n), "viewsecret_zq", "4242429"])


def test_hash_follows_the_shape_not_the_costs(plan_db):
    query = "SELECT * FROM u WHERE t_id = 42"
    first = explain(plan_db, query)
    assert plans.plan_hash(plans.obfuscate(first)) == plans.normalize(first).hash  # stable, text or tree
    plan_db.execute("INSERT INTO u SELECT g, g % 100, 'w' FROM generate_series(1, 20000) g")
    plan_db.execute("ANALYZE u")
    try:
        second = explain(plan_db, query)
        assert second[0]["Plan"]["Total Cost"] != first[0]["Plan"]["Total Cost"]
        assert plans.normalize(second).hash == plans.normalize(first).hash
        plan_db.execute("CREATE INDEX u_t_id ON u (t_id)")
        third = explain(plan_db, query)
        assert "u_t_id" in json.dumps(third)
        assert plans.normalize(third).hash != plans.normalize(first).hash
    finally:
        plan_db.execute("DROP INDEX IF EXISTS u_t_id")
        plan_db.execute("DELETE FROM u WHERE id > 3000 OR v = 'w'")
        plan_db.execute("ANALYZE u")


def test_body_stays_within_its_limit(plan_db):
    query = " UNION ALL ".join(f"(SELECT id, name FROM t WHERE name = 'x{i}' ORDER BY id LIMIT 2)" for i in range(300))
    raw = explain(plan_db, query, verbose=True)
    full = plans.normalize(raw)
    assert len(full.body.encode()) <= plans.MAX_PLAN_BYTES
    plan = plans.obfuscate(raw)
    for limit in (60_000, 8_000, 500):
        body = plans.body(plan, limit)
        assert len(body.encode()) <= limit
        assert json.loads(body)[0]["Plan"]["Node Type"] == raw[0]["Plan"]["Node Type"]


def test_unknown_fields_and_unreadable_expressions_are_dropped():
    raw = [
        {
            "Plan": {
                "Node Type": "Seq Scan",
                "Relation Name": "t",
                "Filter": "(name = 'open",
                "Some Future Field": "secret 'x'",
                "Plans": [{"Node Type": "Result", "Extra": {"a": "b"}}],
            },
            "Query Text": "SELECT 'secret'",
            "Settings": {"work_mem": "1GB"},
        }
    ]
    assert plans.obfuscate(raw) == {"Node Type": "Seq Scan", "Relation Name": "t", "Plans": [{"Node Type": "Result"}]}


# Explaining (pgflow.scrape.explain), on a real server with pgbench ----------------------------------


import polars as pl  # noqa: E402

from pgflow import telemetry  # noqa: E402
from pgflow.ops.fingerprint import query_info  # noqa: E402
from pgflow.scrape.explain import Explainer, ExplainFailed, PlanSource, database_connector, explainable, helper_sql, helper_status  # noqa: E402

CANDIDATES_SQL = """
SELECT d.datname AS database, r.rolname AS "user", s.queryid, s.query, s.total_exec_time AS exec_time
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid
"""


@pytest.fixture(scope="module")
def server(pgbench_server):
    """pgbench's tables, every statement in the server log with its application name."""
    srv = pgbench_server(settings={"log_statement": "all", "log_line_prefix": "%a|"})
    srv.pgbench("-c", "2", "-t", "40")
    return srv


def candidates(server, extra: list[tuple] = ()) -> pl.DataFrame:
    rows = server.execute(CANDIDATES_SQL) + list(extra)
    frame = pl.DataFrame(
        rows,
        schema={"database": pl.String, "user": pl.String, "queryid": pl.Int64, "query": pl.String, "exec_time": pl.Float64},
        orient="row",
    )
    return frame.with_columns(pl.Series("fingerprint", [query_info(q).fingerprint for q in frame["query"]]))


def pgflow_statements(server, since: int) -> list[str]:
    """What pgflow's connections sent after log offset ``since`` (the server's own record)."""
    text = server.logfile.read_text(errors="replace")[since:]
    return [line.split("statement: ", 1)[1] for line in text.splitlines() if line.startswith("pgflow|") and "statement: " in line]


def log_size(server) -> int:
    return len(server.logfile.read_text(errors="replace"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def source(server, **kwargs) -> PlanSource:
    return PlanSource(database_connector(server.dsn()), instance="t", **kwargs)


def generic(server) -> bool:
    return int(server.execute("SHOW server_version_num")[0][0]) >= 160000


def version(server) -> int:
    return int(server.execute("SHOW server_version_num")[0][0])


def test_pgbench_plans_arrive_with_a_stable_hash_that_follows_an_index(server):
    clock = Clock()
    plans_source = source(server, clock=clock)
    pgbench = candidates(server).filter(pl.col("query").str.contains("pgbench_"))
    got = plans_source.run(pgbench, version(server))
    summaries = {query_info(q).summary for q in pgbench.filter(pl.col("fingerprint").is_in(got["fingerprint"].implode()))["query"]}
    assert {
        "UPDATE pgbench_accounts",
        "UPDATE pgbench_tellers",
        "UPDATE pgbench_branches",
        "SELECT pgbench_accounts",
        "INSERT pgbench_history",
    } <= summaries
    assert set(got["method"]) == {"generic_plan" if generic(server) else "prepare"}
    assert got.height <= 5 and set(got["database"]) == {"postgres"}
    assert all(json.loads(b)[0]["Plan"]["Node Type"] for b in got["body"])
    # The same statements again, past the TTL: the same hashes.
    clock.now += 3601
    again = plans_source.run(pgbench, version(server))
    assert dict(zip(again["fingerprint"], again["plan_hash"])) == dict(zip(got["fingerprint"], got["plan_hash"]))
    # A statement filtering on an unindexed column; then an index on it: another plan, another hash.
    server.execute(
        "CREATE TABLE keyed AS SELECT g AS id, g * 7 AS k FROM generate_series(1, 50000) g",
        "ANALYZE keyed",
        "SELECT * FROM keyed WHERE k = 4242",
    )
    focus = candidates(server).filter(pl.col("query").str.contains("FROM keyed WHERE k = \\$1"))
    before = source(server).run(focus, version(server))
    server.execute("CREATE INDEX keyed_k ON keyed (k)")
    try:
        after = source(server).run(focus, version(server))
        assert source(server).run(focus, version(server))["plan_hash"].to_list() == after["plan_hash"].to_list()
    finally:
        server.execute("DROP TABLE keyed")
    assert before.height == after.height == 1
    assert "keyed_k" in after["body"][0] and "keyed_k" not in before["body"][0]
    assert before["plan_hash"][0] != after["plan_hash"][0]


def test_an_explained_statement_is_never_exported_as_workload(server):
    """With pg_stat_statements.track = all (the test servers' setting), EXPLAIN counts the
    explained statement as one nested call under the text it was given; that entry is pgflow's
    own (marked) and never reaches a snapshot, so a workload's calls stay exact."""
    from pgflow.scrape import Scraper

    text = "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2"
    with database_connector(server.dsn())("postgres") as conn:
        Explainer().explain(conn, text, version(server))
    rows = server.execute("SELECT query FROM pg_stat_statements WHERE query LIKE '%pgbench_tellers%' AND calls > 0")
    ours = [q for (q,) in rows if "/*pgflow*/" in q]
    assert ours  # the server counted the explain (ground truth)
    with Scraper(server.dsn()) as scraper:
        texts = [q for q in scraper.scrape().statements.get_column("query").to_list() if q and "pgbench_tellers" in q]
    assert sorted(texts) == sorted(q for (q,) in rows if "/*pgflow*/" not in q)  # the workload's, and only


def test_an_update_is_explained_read_only_and_not_executed(server):
    rows_before = server.execute("SELECT bid, bbalance, xmin::text FROM pgbench_branches ORDER BY bid")
    since = log_size(server)
    text = "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2"
    with database_connector(server.dsn())("postgres") as conn:
        plan, method = Explainer().explain(conn, text, version(server))
    assert plan[0]["Plan"]["Node Type"] == "ModifyTable" and plan[0]["Plan"]["Operation"] == "Update"
    assert server.execute("SELECT bid, bbalance, xmin::text FROM pgbench_branches ORDER BY bid") == rows_before
    sent = pgflow_statements(server, since)
    # Issue 19: no BEGIN or ROLLBACK (they would be exported as the user's); every round trip is one
    # implicit transaction opened by the marked limits: read-only, statement and lock timeouts.
    limits = (
        "SELECT /*pgflow*/ set_config('statement_timeout', '2000', true) || set_config('lock_timeout', '100', true)"
        " || set_config('transaction_read_only', 'on', true)"
    )
    assert not any(s.split()[0].upper() in ("BEGIN", "ROLLBACK", "COMMIT", "START") for s in sent), sent
    assert not any("ANALYZE" in s.upper() for s in sent)
    text = "UPDATE /*pgflow*/ pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2"  # as sent: marked
    if method == "generic_plan":
        assert sent == [f"{limits}; EXPLAIN /*pgflow*/ (GENERIC_PLAN, FORMAT JSON) {text}"]
    else:
        assert sent[0] == (
            f"{limits}; PREPARE /*pgflow*/ pgflow_explain AS {text}; SELECT /*pgflow*/ "
            "coalesce(cardinality(parameter_types), 0) FROM pg_prepared_statements WHERE name = 'pgflow_explain'"
        )
        assert sent[1:] == [
            f"{limits} || set_config('plan_cache_mode', 'force_generic_plan', true); "
            "EXPLAIN /*pgflow*/ (FORMAT JSON) EXECUTE pgflow_explain(NULL, NULL)",
            "DEALLOCATE pgflow_explain",
        ]


def test_a_locked_table_times_out_on_lock_timeout_and_is_retried_later(server):
    failures = telemetry.REGISTRY.get_sample_value("pgflow_explain_failures_total", {"instance": "t", "cause": "lock_timeout"}) or 0
    focus = candidates(server).filter(pl.col("query").str.starts_with("UPDATE pgbench_branches"))
    assert focus.height == 1
    plans_source = source(server)
    with psycopg.connect(server.dsn()) as holder:
        holder.execute("LOCK TABLE pgbench_branches IN ACCESS EXCLUSIVE MODE")
        got = plans_source.run(focus, version(server))  # returns: lock_timeout, no wait on the lock
        assert got.height == 0 and plans_source.stats.failed == {"lock_timeout": 1}
        assert (
            holder.execute(
                "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation = 'pgbench_branches'::regclass AND granted"
            ).fetchone()[0]
            == 1
        )
        holder.rollback()
    assert telemetry.REGISTRY.get_sample_value("pgflow_explain_failures_total", {"instance": "t", "cause": "lock_timeout"}) == failures + 1
    assert not server.execute("SELECT name FROM pg_prepared_statements")  # nothing left behind
    retried = plans_source.run(focus, version(server))  # a timeout is not remembered as an error
    assert retried.height == 1


def test_multi_statement_utility_and_pgflow_texts_are_never_sent(server):
    bad = [
        "SELECT 1; DROP TABLE pgbench_history",
        "VACUUM pgbench_accounts",
        "CREATE TABLE evil (a int)",
        "SELECT * INTO evil FROM pgbench_branches",
        "BEGIN",
        "SELECT pgflow.explain_generic($1)",
        "SELECT clock_timestamp(), current_setting($1)::int",
        "SELECT queryid, calls FROM public.pg_stat_statements(false)",
        "SELECT count(*) FROM pg_stat_activity",
        "SET work_mem = $1",
        "EXPLAIN ANALYZE DELETE FROM pgbench_history",
        "SELECT 'unterminated",
    ]
    for text in bad:
        assert explainable(text) is not None, text
    assert explainable("WITH x AS (SELECT $1::int AS a) SELECT a FROM x") is None
    extra = [("postgres", "postgres", 10_000 + i, text, 1e9) for i, text in enumerate(bad)]
    only_bad = candidates(server, extra).filter(pl.col("query").is_in(bad))
    since = log_size(server)
    plans_source = source(server, explains_per_window=100)
    assert plans_source.run(only_bad, version(server)).height == 0
    assert plans_source.stats.skipped == {"not_explainable": len(bad)}
    assert not [s for s in pgflow_statements(server, since) if "EXPLAIN" in s or "PREPARE" in s]
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for text in bad[:2]:
            with pytest.raises(ExplainFailed, match="not_explainable"):
                Explainer().explain(conn, text, version(server))
    assert server.execute("SELECT count(*) FROM pgbench_history")[0][0] > 0
    assert not server.execute("SELECT 1 FROM pg_class WHERE relname = 'evil'")


def test_budget_ttl_and_error_cache_hold(server):
    server.execute(*[f"CREATE TABLE IF NOT EXISTS slow{i} (a int, b{i} int)" for i in range(50)])
    for i in range(50):
        server.execute(f"SELECT count(*) FROM slow{i} WHERE b{i} = 7")
    fifty = candidates(server).filter(pl.col("query").str.contains("FROM slow"))
    assert fifty["fingerprint"].n_unique() == 50
    clock = Clock()
    plans_source = source(server, explains_per_window=5, clock=clock)
    seen: list[set] = []
    for _ in range(3):
        since = log_size(server)
        got = plans_source.run(fifty, version(server))
        sent = [
            s for s in pgflow_statements(server, since) if "; EXPLAIN /*pgflow*/ (GENERIC_PLAN" in s or "; PREPARE" in s
        ]  # one per statement explained
        assert got.height == 5 and len(sent) == 5  # the server saw five explains, no more
        seen.append(set(got["fingerprint"]))
    assert len(seen[0] | seen[1] | seen[2]) == 15  # none again within its TTL
    top = fifty.sort("exec_time", descending=True)["fingerprint"].head(5).to_list()
    assert seen[0] == set(top)  # the ones with the most execution time first
    clock.now += 3601
    assert set(plans_source.run(fifty, version(server))["fingerprint"]) == set(top)  # past the TTL: again
    # A deterministic error: tried once, remembered 24 h, counted by cause.
    missing = candidates(server, [("postgres", "postgres", 99, "SELECT * FROM elsewhere.nothing WHERE a = $1", 1e12)])
    missing = missing.filter(pl.col("query").str.contains("elsewhere"))
    errors = source(server, clock=clock)
    assert errors.run(missing, version(server)).height == 0 and errors.stats.failed == {"undefined_object": 1}
    since = log_size(server)
    errors.run(missing, version(server))
    assert errors.stats.skipped == {"error_cached": 1} and not pgflow_statements(server, since)
    clock.now += 24 * 3600 + 1
    errors.run(missing, version(server))
    assert errors.stats.failed == {"undefined_object": 2}
    assert source(server, explains_per_window=0).run(fifty, version(server)).height == 0  # 0: plans off


def test_the_helper_explains_for_a_role_without_table_privileges(server):
    server.execute(
        "CREATE TABLE IF NOT EXISTS private_t (id int PRIMARY KEY, secret text)",
        "DROP ROLE IF EXISTS mon",
        "CREATE ROLE mon LOGIN PASSWORD 'mon-pw'",
        "GRANT pg_monitor TO mon",
    )
    connect = database_connector(server.dsn(user="mon", password="mon-pw"))
    text = "SELECT secret FROM private_t WHERE id = $1"
    row = [("postgres", "app", 7, text, 1e6)]
    focus = candidates(server, row).filter(pl.col("query") == text)
    direct = PlanSource(connect, instance="t")
    assert direct.run(focus, version(server)).height == 0 and direct.stats.failed == {"permission": 1}
    with connect("postgres") as conn:
        assert helper_status(conn)[0] == "ok" and "not installed" in helper_status(conn)[1]
    server.execute(helper_sql())
    try:
        with connect("postgres") as conn:
            level, detail = helper_status(conn)
            assert level == "warn" and "GRANT EXECUTE" in detail
        server.execute("GRANT USAGE ON SCHEMA pgflow TO mon", "GRANT EXECUTE ON FUNCTION pgflow.explain_generic(text) TO mon")
        with connect("postgres") as conn:
            assert helper_status(conn) == ("ok", "explain helper installed and usable")
        import subprocess
        import sys

        check = subprocess.run(
            [sys.executable, "-m", "pgflow", "check"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", "DATABASE_URL": server.dsn(user="mon", password="mon-pw")},
        )
        assert "explain helper: explain helper installed and usable" in check.stdout, check.stdout + check.stderr
        got = PlanSource(connect, instance="t").run(focus, version(server))
        assert got["method"].to_list() == ["helper"]
        plan = json.loads(got["body"][0])[0]["Plan"]
        assert plan["Relation Name"] == "private_t" and plan["Node Type"] in ("Index Scan", "Bitmap Heap Scan")
        assert not server.execute("SELECT name FROM pg_prepared_statements")
    finally:
        server.execute("DROP SCHEMA pgflow CASCADE", "DROP OWNED BY mon", "DROP ROLE mon")


def test_bad_explain_settings_exit_2():
    import subprocess
    import sys

    for name, value in [
        ("PGFLOW_EXPLAINS_PER_WINDOW", "-1"),
        ("PGFLOW_EXPLAIN_TTL_SECS", "0"),
        ("PGFLOW_SAMPLE_MIN_DURATION_MS", "x"),
        ("PGFLOW_MAX_SAMPLES_PER_WINDOW", "0"),
        ("PGFLOW_SAMPLES_PER_FINGERPRINT_PER_HOUR", "-3"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "pgflow", "check"],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", "DATABASE_URL": "postgresql://x@h/db", name: value},
        )
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name.removeprefix("PGFLOW_").lower() in lines[0]


def test_plans_ride_on_the_snapshot_through_capture_and_arrive_as_events(server, tmp_path):
    """Real plans → Snapshot.plans → capture round trip → plan events → the receiver's logs table;
    a literal a plan shows (a view's) reaches neither the capture nor the receiver."""
    from dataclasses import replace

    from pgflow import capture
    from pgflow.config import Settings
    from pgflow.ops.plan_events import snapshot_plan_events
    from pgflow.otlp.logs_export import LogsExporter
    from pgflow.otlp.receiver import Receiver
    from pgflow.otlp.store import read_logs
    from pgflow.scrape.scraper import Scraper

    server.execute(
        "CREATE OR REPLACE VIEW secret_branches AS SELECT * FROM pgbench_branches WHERE filler IS DISTINCT FROM 'viewsecret_e2e'",
        "SELECT * FROM secret_branches WHERE bid = 1",
    )
    with database_connector(server.dsn())("postgres") as conn:
        raw, _ = Explainer().explain(conn, "SELECT * FROM secret_branches WHERE bid = $1", version(server))
    assert "viewsecret_e2e" in json.dumps(raw)  # the plan does show it
    pgbench = candidates(server).filter(pl.col("query").str.contains("pgbench_|secret_branches"))
    got = source(server, explains_per_window=10).run(pgbench, version(server))
    assert "secret_branches" in " ".join(pgbench.filter(pl.col("fingerprint").is_in(got["fingerprint"].implode()))["query"])
    with Scraper(server.dsn()) as scraper:
        snapshot = replace(scraper.scrape(), plans=got)
    path = tmp_path / "cap.duckdb"
    capture.record([snapshot], path)
    (back,) = list(capture.read(path))
    assert back.equals(capture.as_stored(snapshot)) and back.plans.equals(got)
    assert b"viewsecret_e2e" not in path.read_bytes()
    events = snapshot_plan_events(back)
    assert events.height == got.height and set(events["event_name"]) == {"db.server.query_plan"}
    out = tmp_path / "received.duckdb"
    with Receiver(out) as receiver:
        settings = Settings.load(otlp_endpoint=receiver.grpc_endpoint, otlp_protocol="grpc")
        assert all(r.acknowledged for _, r in LogsExporter(settings).export(events))
    logs = read_logs(out)
    attrs = [json.loads(a) for a in logs["attributes"]]
    assert {(a["postgresql.query.fingerprint"], a["postgresql.plan.hash"]) for a in attrs} == set(zip(got["fingerprint"], got["plan_hash"]))
    assert all(a["db.namespace"] == "postgres" and a["postgresql.plan.generic"] is True for a in attrs)
    assert sorted(logs["body"]) == sorted(got["body"])
    assert not any("viewsecret_e2e" in (b or "") + a for b, a in zip(logs["body"], logs["attributes"]))
    assert b"viewsecret_e2e" not in out.read_bytes()


def test_candidates_are_the_statements_busiest_since_the_last_window(server):
    from pgflow.ops.explain_targets import explain_candidates
    from pgflow.scrape.scraper import Scraper

    with Scraper(server.dsn()) as scraper:
        before = scraper.scrape()
        server.execute("SELECT pg_sleep(0.3)", "SELECT pg_sleep(0.3)")
        server.pgbench("-c", "1", "-t", "5")
        after = scraper.scrape()
    got = explain_candidates(before.statements, after.statements)
    top = got.row(0, named=True)
    assert query_info(top["query"]).summary.startswith("SELECT") and "pg_sleep" in top["query"]
    assert top["exec_time"] >= 590  # the two sleeps, 300 ms each, and nothing from before
    assert "pgbench_branches" in " ".join(got["query"]) and got["exec_time"].is_sorted(descending=True)
    assert got.select("database", "fingerprint").is_unique().all()
    idle = explain_candidates(after.statements, after.statements)
    assert idle.height == 0  # nothing ran: nothing to explain
    plans_got = source(server).run(got, version(server))
    assert top["fingerprint"] not in plans_got["fingerprint"].to_list()  # no table: no plan worth having
    assert plans_got.height and all("pgbench_" in b for b in plans_got["body"])


def test_window_plans_explain_once_per_window_on_the_scrape_after_it(server):
    """Beside the source: the first scrape of a new window carries the plans of the closed one."""
    from dataclasses import replace
    from datetime import timedelta

    from pgflow.config import Settings
    from pgflow.scrape.explain import WindowPlans
    from pgflow.scrape.scraper import Scraper

    assert WindowPlans.for_instance(server.dsn(), "t", Settings.load(explains_per_window=0)) is None
    step = WindowPlans.for_instance(server.dsn(), "t", Settings.load(export_interval_secs=60, explains_per_window=3))
    with Scraper(server.dsn()) as scraper:
        first = scraper.scrape()
        start = first.scraped_at.replace(second=0, microsecond=0)
        assert step.attach(replace(first, scraped_at=start)).plans.height == 0  # the baseline
        server.pgbench("-c", "1", "-t", "20")
        same = step.attach(replace(scraper.scrape(), scraped_at=start + timedelta(seconds=30)))
        assert same.plans.height == 0  # the window is still open
        closed = step.attach(replace(scraper.scrape(), scraped_at=start + timedelta(seconds=61)))
        quiet = step.attach(replace(scraper.scrape(), scraped_at=start + timedelta(seconds=125)))
    assert 1 <= closed.plans.height <= 3
    assert all("pgbench_" in b for b in closed.plans["body"])  # what ran in that window, none of pgflow's
    assert quiet.plans.height == 0  # nothing new ran, and the TTL holds the others


def test_pgflow_capture_cli_attaches_the_plans_of_each_closed_window(server, tmp_path):
    """`pgflow capture` explains like `pgflow run --capture`: the busiest statements of each export
    window that closed ride, as plans, on the next snapshot of the capture."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from e2e import ROOT

    from pgflow import capture

    stop = threading.Event()

    def workload() -> None:  # a statement busy in every window
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("SELECT abalance FROM pgbench_accounts WHERE aid = %s", (7,))
                time.sleep(0.01)

    out = tmp_path / "plans.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_")}
    env.update(
        {
            "DATABASE_URL": server.dsn(),
            "PYTHONPATH": str(ROOT),
            "PGFLOW_EXPORT_INTERVAL_SECS": "2",
            "PGFLOW_ACTIVITY_SAMPLE_INTERVAL_SECS": "0",
            "PGFLOW_TABLE_STATS_ENABLED": "false",
        }
    )
    thread = threading.Thread(target=workload)
    thread.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pgflow", "capture", "--out", str(out), "--scrapes", "12", "--interval", "0.5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        stop.set()
        thread.join()
    assert proc.returncode == 0, proc.stderr
    snaps = list(capture.read(out))
    with_plans = [s for s in snaps if s.plans.height]
    assert len(snaps) == 12 and with_plans  # 6 s of 2 s windows: plans of the windows that closed
    explained = pl.concat([s.statements for s in snaps]).filter(
        pl.col("query").str.contains("pgbench_accounts", literal=True) & pl.col("query").str.contains("abalance")
    )
    assert explained.height
    plans_frame = pl.concat([s.plans for s in with_plans])
    assert set(explained["queryid"].to_list()) & set(plans_frame["queryid"].to_list())


def test_plans_resume_after_a_grant_without_restart(server, caplog):
    """Issue 19 item 8: a permission failure is retried after PERMISSION_RETRY_SECS (10 min), not
    24 h: once the DBA grants access, plans resume in the same process."""
    import logging

    from pgflow.scrape.explain import PERMISSION_RETRY_SECS

    server.execute(
        "DROP ROLE IF EXISTS planner",
        "CREATE ROLE planner LOGIN PASSWORD 'pw' IN ROLE pg_monitor",
        "REVOKE SELECT ON pgbench_accounts FROM planner",
    )
    focus = candidates(server).filter(pl.col("query").str.starts_with("SELECT abalance FROM pgbench_accounts")).head(1)
    assert focus.height == 1  # (on 13 one statement may have several entries: one is enough)
    clock = Clock()
    plans_source = PlanSource(database_connector(server.dsn(user="planner", password="pw")), instance="t", clock=clock)
    with caplog.at_level(logging.INFO, logger="pgflow.explain"):
        assert plans_source.run(focus, version(server)).height == 0
    assert plans_source.stats.failed == {"permission": 1}
    assert any("retried in 10 min" in r.getMessage() for r in caplog.records)
    server.execute("GRANT SELECT ON pgbench_accounts TO planner")
    clock.now += 60  # a minute later: still waiting, nothing sent
    assert plans_source.run(focus, version(server)).height == 0 and plans_source.stats.failed == {"permission": 1}
    clock.now += PERMISSION_RETRY_SECS
    got = plans_source.run(focus, version(server))
    assert got.height == 1 and plans_source.stats.explained == 1
    server.execute("REVOKE SELECT ON pgbench_accounts FROM planner", "DROP OWNED BY planner", "DROP ROLE planner")


def test_a_busy_window_parses_only_its_busiest_statements_and_once(server):
    """Issue 20: when most of pg_stat_statements gains time every window (a busy server), the
    plans are chosen from the busiest statements, each parsed once while it stays among them,
    not from a parse of every statement each window (~1 ms each, on the scrape thread)."""
    from dataclasses import replace
    from datetime import timedelta

    from pgflow.config import Settings
    from pgflow.scrape.explain import WindowPlans
    from pgflow.scrape.scraper import Scraper

    statements = [f"SELECT {', '.join(f'v + {j} AS c{j}' for j in range(i % 9 + 1))} FROM busy_{i // 9} WHERE id = 1" for i in range(300)]
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for k in range(300 // 9 + 1):
            conn.execute(f"CREATE TABLE IF NOT EXISTS busy_{k} (id int PRIMARY KEY, v int)")  # type: ignore[arg-type]

        def run_all() -> None:
            for text in statements:
                conn.execute(text)  # type: ignore[arg-type]

        step = WindowPlans.for_instance(server.dsn(), "t", Settings.load(export_interval_secs=60, explains_per_window=1))
        assert step is not None
        with Scraper(server.dsn()) as scraper:
            run_all()
            start = scraper.scrape().scraped_at.replace(second=0, microsecond=0)
            step.attach(replace(scraper.scrape(), scraped_at=start))  # the baseline
            windows, parsed = [], []
            for k in (1, 2):
                run_all()
                windows.append(step.attach(replace(scraper.scrape(), scraped_at=start + timedelta(seconds=61 * k))))
                parsed.append(step._fingerprints.parses)
    assert 1 <= parsed[0] <= 200, parsed  # 300 statements gained time: the 200 busiest parsed
    assert parsed[1] <= 300, parsed  # and in the next window only those not parsed before
    assert step._fingerprints.hits >= 100  # the second window's busiest were mostly parsed before
    assert windows[0].plans.height == 1 and "busy_" in windows[0].plans["body"][0]  # the plans go on


def test_instances_of_one_server_parse_each_busy_text_once(server, monkeypatch):
    """Issue 20: the instances of a worker share the plans' fingerprint cache: databases of one
    server (or servers of one application) hold the same texts, and 200 of them each parsing the
    same busiest statements cost ~40 s of CPU at their first windows. Both still get plans."""
    from dataclasses import replace
    from datetime import timedelta

    from pgflow.config import Settings
    from pgflow.ops import fingerprint as fingerprint_module
    from pgflow.scrape.explain import WindowPlans
    from pgflow.scrape.scraper import Scraper

    parses: list[str | None] = []
    real_parse = fingerprint_module.query_info
    monkeypatch.setattr(fingerprint_module, "query_info", lambda text: parses.append(text) or real_parse(text))
    statements = [f"SELECT {', '.join(f'v + {j} AS c{j}' for j in range(i % 9 + 1))} FROM shared_{i // 9} WHERE id = 1" for i in range(60)]
    settings = Settings.load(export_interval_secs=60, explains_per_window=1)
    shared = WindowPlans.shared(settings)
    steps = [WindowPlans.for_instance(server.dsn(), name, settings, fingerprints=shared) for name in ("a", "b")]
    with psycopg.connect(server.dsn(), autocommit=True) as conn, Scraper(server.dsn()) as scraper:
        for k in range(60 // 9 + 1):
            conn.execute(f"CREATE TABLE IF NOT EXISTS shared_{k} (id int PRIMARY KEY, v int)")  # type: ignore[arg-type]
        baseline = scraper.scrape()
        start = baseline.scraped_at.replace(second=0, microsecond=0)
        for step in steps:
            step.attach(replace(baseline, scraped_at=start))  # type: ignore[union-attr]
        for text in statements:
            conn.execute(text)  # type: ignore[arg-type]
        closing = replace(scraper.scrape(), scraped_at=start + timedelta(seconds=61))
        first = steps[0].attach(closing)  # type: ignore[union-attr]
        parsed = len(parses)
        second = steps[1].attach(closing)  # type: ignore[union-attr]
    assert parsed >= 60  # the first instance parsed the window's busy texts
    assert len(parses) == parsed  # the second found every one of them parsed
    for window in (first, second):
        assert window.plans.height == 1 and "shared_" in window.plans["body"][0]  # and both explained their busiest
