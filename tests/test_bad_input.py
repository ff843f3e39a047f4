"""Bad input: every setting, odd statement texts, and secrets that must never come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import psycopg
import pytest
from e2e import collector_env, settle, start_collector, wait_for_baseline

from pgflow.config import Settings
from pgflow.errors import ConfigError
from pgflow.ops.fingerprint import query_info
from pgflow.otlp.receiver import Receiver

NUMERIC = {name: f for name, f in Settings.model_fields.items() if f.annotation in (int, float, int | None, float | None)}


@pytest.mark.parametrize("name", sorted(NUMERIC))
@pytest.mark.parametrize("value", ["not-a-number", -1, 0])
def test_every_numeric_setting_rejects_bad_values(name, value):
    if value == 0 and name in (
        "slow_query_threshold_ms",
        "explains_per_window",
        "activity_sample_interval_secs",
        "reserved_connections_headroom",
    ):
        Settings.load(**{name: value})  # 0 is meaningful there: the threshold is off
        return
    with pytest.raises(ConfigError) as info:
        Settings.load(**{name: value})
    assert name in str(info.value) and "\n" not in str(info.value) and info.value.exit_code == 2


@pytest.mark.parametrize("content", ['{"batch_size": "x"}', '{"collection_interval_secs": -3}', '{"nope": 1}', "{broken", '"a string"'])
def test_config_file_errors_from_the_cli(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://mon:Pa55-Secret@db:5432/app"}
    for command in (["check"], ["run"], ["capture", "--out", str(tmp_path / "x.duckdb")]):
        proc = subprocess.run(
            [sys.executable, "-m", "pgflow", *command, "--config", str(path)], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "Pa55-Secret" not in proc.stderr + proc.stdout


def test_unreadable_config_file_from_the_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow", "check", "--config", str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "text",
    [
        "SELECT " + "x, " * 400,  # truncated by track_activity_query_size-like limits
        "\udcff\udcfe garbage",  # non-UTF-8 bytes as surrogate escapes
        "SELECT '" + "a" * 1_100_000 + "'",  # a 1 MB statement
        "<insufficient privilege>",
        "",
        "SELECT 1; UPDATE t SET a = 2; DELETE FROM u",  # several statements
    ],
)
def test_odd_statement_texts_never_crash(text):
    info = query_info(text)
    assert info.fingerprint and len(info.text) <= 4095 and info.operation


def test_secrets_never_leave(pg, tmp_path):
    """Literals of statements, the DSN password and the API key: in no point, log, ledger or capture."""
    literal, dsn_password, api_key = "Literal-Secret-4471", "Dsn-Secret-9923", "NRAK-Secret-5510"
    pg.execute("DROP ROLE IF EXISTS mon_secret", f"CREATE ROLE mon_secret LOGIN PASSWORD '{dsn_password}' IN ROLE pg_monitor")
    dsn = pg.dsn(user="mon_secret", password=dsn_password)
    with Receiver() as receiver:
        env = collector_env(dsn, receiver.http_endpoint, tmp_path / "state", NEW_RELIC_API_KEY=api_key, PGFLOW_LOG_LEVEL="debug")
        proc = start_collector(env, log=tmp_path / "log")
        wait_for_baseline(tmp_path / "state")
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f"ALTER ROLE mon_secret PASSWORD '{dsn_password}'")  # type: ignore[arg-type]
            conn.execute(f"CREATE TEMP TABLE sessions AS SELECT '{literal}'::text AS token")  # type: ignore[arg-type]
            conn.execute(f"SELECT * FROM sessions WHERE token = '{literal}'")  # type: ignore[arg-type]
            conn.execute(f"DO $$ BEGIN PERFORM '{literal}'; END $$")  # type: ignore[arg-type]
        settle(1.5, state_dir=tmp_path / "state")
        subprocess.run(
            [sys.executable, "-m", "pgflow", "capture", "--out", str(tmp_path / "cap.duckdb"), "--scrapes", "1"],
            env=env,
            check=True,
            capture_output=True,
        )
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        points = receiver.points()
        texts = points.select(pl.col("attributes").str.json_path_match("$['db.query.text']")).to_series()
        assert texts.str.contains("ALTER ROLE mon_secret PASSWORD").any()  # the statements were exported
    outputs = [json.dumps(points.drop("start", "end", "received_at").to_dicts())]
    outputs += [p.read_bytes().decode("latin-1") for p in Path(tmp_path).rglob("*") if p.is_file()]
    for secret in (literal, dsn_password, api_key):
        assert not any(secret in out for out in outputs), secret
