"""Issue 20: what each instance carries between scrapes is sized by what its server holds.

A real PostgreSQL with the smallest ``pg_stat_statements.max`` (100) and statement churn (five
times as many distinct statements over the run as the server keeps): the collector's own path
(Scraper, then CollectorLogic: operators, ledger, shipper) exporting to the real receiver. The
statement texts, the fingerprints and the delta baselines stay bounded by the server's max, not
by the 50,000-entry cache settings, and the exported calls of a statement run throughout stay
exact. Ground truth: the workload's own count of its executions.
"""

from __future__ import annotations

import time

import psycopg
from e2e import calls_by_summary

from pgflow.config import Settings
from pgflow.otlp.receiver import Receiver
from pgflow.pgserver import free_port
from pgflow.scrape import Scraper
from pgflow.stream import logic as logic_module
from pgflow.stream import runtime as runtime_module

SERVER_MAX = 100  # the smallest pg_stat_statements.max PostgreSQL accepts
ROUNDS = 8
NEW_PER_ROUND = 60  # 480 distinct statements over the run: 4.8 times what the server keeps
STEADY_PER_ROUND = 25


def churn_statement(i: int) -> str:
    """A statement whose queryid differs for every ``i`` on every version (its tree differs)."""
    return "SELECT " + " + ".join(["v"] * (i + 1)) + " FROM churn"


def cache_sizes(scraper: Scraper, instance: str) -> dict[str, int]:
    fp = logic_module._local.fingerprinter
    keys = fp._by_key.get(instance)
    return {
        "texts": scraper.texts_held,
        "fingerprint_keys": keys.height if keys is not None else 0,
        "fingerprint_texts": len(fp._by_text),
        "labels": len(fp._labels),
    }


def test_caches_stay_within_what_the_server_holds_and_totals_stay_exact(tmp_path, pg_factory):
    runtime_module.reset()
    pg = pg_factory(settings={"pg_stat_statements.max": str(SERVER_MAX)})
    pg.execute(
        "CREATE EXTENSION pg_stat_statements",
        "CREATE TABLE churn (v int)",
        "INSERT INTO churn VALUES (1)",
        "CREATE TABLE steady (id int PRIMARY KEY, v int)",
        "INSERT INTO steady VALUES (1, 1)",
    )
    with Receiver() as receiver, psycopg.connect(pg.dsn(), autocommit=True) as work:
        settings = Settings.load(
            database_url=pg.dsn(),
            otlp_endpoint=receiver.http_endpoint,
            otlp_protocol="http",
            export_interval_secs=1,
            state_dir=tmp_path / "state",
            metrics_addr=f"127.0.0.1:{free_port()}",
        )
        rt = runtime_module.runtime(settings)
        scraper = Scraper(pg.dsn(), instance="db1")
        logic = logic_module.CollectorLogic("db1", rt.ops, rt.ledger("db1"), rt.shipper, 30)
        try:
            work.execute("SELECT v FROM steady WHERE id = 1")  # the entry exists before the baseline
            logic.on_item(scraper.scrape())  # the baseline: nothing before it is exported
            sizes = []
            for r in range(ROUNDS):
                for i in range(r * NEW_PER_ROUND, (r + 1) * NEW_PER_ROUND):
                    work.execute(churn_statement(i))  # type: ignore[arg-type]
                for _ in range(STEADY_PER_ROUND):
                    work.execute("SELECT v FROM steady WHERE id = 1")
                logic.on_item(scraper.scrape())
                sizes.append(cache_sizes(scraper, "db1") | {"baselines": logic.record.state.delta.rows.height})
                time.sleep(0.3)
            logic.on_eof()  # the last windows closed and flushed
            entries = work.execute("SELECT count(*) FROM pg_stat_statements").fetchone()
            evicted = pg.execute("SELECT dealloc FROM pg_stat_statements_info")[0][0] if pg_version(work) >= 140000 else None
        finally:
            scraper.close()
            rt.shipper.close(deadline=time.monotonic() + 10)
            runtime_module.reset()
        points = receiver.points()
    # The server evicted entries (more distinct statements than it keeps; counted from 14) ...
    assert entries is not None and entries[0] <= SERVER_MAX
    assert evicted is None or evicted > 0
    # ... and every cache stayed about as large as what it holds, never near 50,000.
    for n, size in enumerate(sizes):
        assert size["texts"] <= SERVER_MAX, (n, size)
        assert size["fingerprint_keys"] <= SERVER_MAX, (n, size)
        assert size["baselines"] <= SERVER_MAX, (n, size)
        assert size["fingerprint_texts"] <= 2 * SERVER_MAX, (n, size)
        assert size["labels"] <= 2 * SERVER_MAX, (n, size)
    # Exactness: the statement run throughout is exported with exactly its executions.
    calls = calls_by_summary(points)
    assert calls.get("SELECT steady") == ROUNDS * STEADY_PER_ROUND, calls
    churned = sum(v for k, v in calls.items() if k and k.startswith("SELECT churn"))
    assert 0 < churned <= ROUNDS * NEW_PER_ROUND


def pg_version(conn: psycopg.Connection) -> int:
    return conn.info.server_version


def test_a_fingerprint_still_held_keeps_its_text_through_churn():
    """The shared label cache is bounded by the keys held, but never forgets the label of a
    fingerprint an instance still holds: a new key of it (another user's) gets the same text, so
    the series keeps its identity. Variants libpg_query fingerprints alike: a select list's order."""
    import polars as pl

    from pgflow.ops.fingerprint import Fingerprinter

    def rows(entries: list[tuple[int, str]]) -> pl.DataFrame:
        return pl.DataFrame({"dbid": [1] * len(entries), "queryid": [q for q, _ in entries], "query": [t for _, t in entries]})

    fp = Fingerprinter()
    held = (1, "SELECT a, b FROM t WHERE id = 1")
    first = fp.apply("i", rows([held]))
    for r in range(6):  # 600 other statements come and go, 100 at a time
        fp.apply("i", rows([held, *((1000 * (r + 1) + j, f"SELECT c{j} FROM u{r} WHERE id = 1") for j in range(100))]))
    assert len(fp._labels) <= 2 * 101
    variant = fp.apply("i", rows([held, (2, "SELECT b, a FROM t WHERE id = 1")]))
    assert variant["fingerprint"][0] == variant["fingerprint"][1]
    assert variant["text"].to_list() == [first["text"][0]] * 2
