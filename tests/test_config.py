"""Configuration: precedence, validation, one-line errors, and secrets never shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pgflow.config import NEW_RELIC_ENDPOINTS, Settings, redact_dsn
from pgflow.errors import ConfigError

SECRET = "s3cr3t-Pa55"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("PGFLOW_", "OTEL_EXPORTER_OTLP_")) or name in ("DATABASE_URL", "NEW_RELIC_API_KEY"):
            monkeypatch.delenv(name)


def test_defaults_point_at_new_relic_us_over_http():
    """Issue 20: OTLP/HTTP binary protobuf by default (New Relic's advice, the OTLP spec's default;
    no gRPC library loaded)."""
    s = Settings.load()
    assert (s.otlp_protocol, s.endpoint) == ("http", NEW_RELIC_ENDPOINTS["us"]["http"]) == ("http", "https://otlp.nr-data.net:4318")
    assert s.batch_size == 1000 and s.batch_timeout_secs == 10
    assert Settings.load(otlp_protocol="grpc").endpoint == "https://otlp.nr-data.net:4317"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"PGFLOW_OTLP_ENDPOINT": "http://collector:4317"}, "grpc"),  # OTLP/gRPC's port, written when gRPC was the default
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.nr-data.net:4317"}, "grpc"),
        ({"PGFLOW_OTLP_ENDPOINT": "collector:4317"}, "grpc"),
        ({"PGFLOW_OTLP_ENDPOINT": "http://collector:4318"}, "http"),
        ({"PGFLOW_OTLP_ENDPOINT": "https://otlp.nr-data.net"}, "http"),
        ({"PGFLOW_OTLP_ENDPOINT": "http://collector:4317", "PGFLOW_OTLP_PROTOCOL": "http"}, "http"),  # said: kept
        ({"PGFLOW_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
    ],
)
def test_protocol_unset_follows_the_endpoints_port(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings.load().otlp_protocol == expected


def test_eu_region_is_one_setting(monkeypatch):
    monkeypatch.setenv("PGFLOW_NEW_RELIC_REGION", "eu")
    monkeypatch.setenv("PGFLOW_OTLP_PROTOCOL", "http")
    assert Settings.load().endpoint == "https://otlp.eu01.nr-data.net:4318"


def test_seed_env_names(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://mon:{SECRET}@db.example:6543/app")
    monkeypatch.setenv("NEW_RELIC_API_KEY", "NRAK-KEY")
    monkeypatch.setenv("PGFLOW_COLLECTION_INTERVAL_SECS", "15")
    monkeypatch.setenv("PGFLOW_MAX_QUERIES_TRACKED", "250")
    s = Settings.load()
    assert s.collection_interval_secs == 15 and s.max_queries_tracked == 250
    assert s.export_headers == {"api-key": "NRAK-KEY"}
    [target] = s.targets()
    assert target.name == "db.example:6543"
    assert SECRET not in repr(s) and SECRET not in str(s.redacted()) and SECRET not in repr(target)
    assert "NRAK-KEY" not in repr(s)


def test_env_overrides_file_and_file_overrides_defaults(tmp_path, monkeypatch):
    path = tmp_path / "pgflow.json"
    path.write_text(
        json.dumps(
            {
                "database_url": "postgresql://localhost/mydb",
                "batch_size": 500,
                "collection_interval_secs": 30,
                "slow_query_threshold_ms": 100,
                "max_queries_tracked": 1000,
            }
        )
    )
    monkeypatch.setenv("PGFLOW_BATCH_SIZE", "200")
    s = Settings.load(path)
    assert s.batch_size == 200  # env wins
    assert s.slow_query_threshold_ms == 100  # file wins over default
    assert s.export_interval_secs == 60  # default


def test_config_file_from_env(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {"instances": [{"name": "a", "database_url": "postgresql://h1/db"}, {"name": "b", "database_url": "postgresql://h2/db"}]}
        )
    )
    monkeypatch.setenv("PGFLOW_CONFIG", str(path))
    assert [i.name for i in Settings.load().targets()] == ["a", "b"]


def test_otel_fallbacks(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=abc%3D,x-team=db")
    s = Settings.load()
    assert (s.endpoint, s.otlp_protocol) == ("http://127.0.0.1:4318", "http")
    assert s.export_headers == {"api-key": "abc=", "x-team": "db"}
    monkeypatch.setenv("PGFLOW_OTLP_ENDPOINT", "http://127.0.0.1:9999")
    assert Settings.load().endpoint == "http://127.0.0.1:9999"  # pgflow's own name wins


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"batch_size": "abc"}, "batch_size"),
        ({"batch_size": 0}, "greater than 0"),
        ({"collection_interval_secs": -5}, "collection_interval_secs"),
        ({"export_interval_secs": 0}, "export_interval_secs"),
        ({"slow_query_threshold_ms": -1}, "slow_query_threshold_ms"),
        ({"otlp_protocol": "udp"}, "otlp_protocol"),
        ({"metrics_addr": "nowhere"}, "host:port"),
        ({"database_url": f"postgresql://u:{SECRET}@h:notaport/db"}, "invalid port"),
        ({"database_url": f"mysql://u:{SECRET}@h/db"}, "scheme"),
        ({"no_such_setting": 1}, "unknown setting 'no_such_setting'"),
        (
            {"instances": [{"name": "a", "database_url": "postgresql://h/db"}, {"name": "a", "database_url": "postgresql://h2/db"}]},
            "used twice",
        ),
    ],
)
def test_bad_settings_give_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        Settings.load(**overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and SECRET not in message
    assert info.value.exit_code == 2


def test_missing_database_url_is_named():
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        Settings.load().targets()


@pytest.mark.parametrize(
    "content, expected", [("{not json", "not valid JSON"), ("[1, 2]", "JSON list"), ('{"bogus": 1}', "unknown setting 'bogus'")]
)
def test_bad_config_file(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        Settings.load(path)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(tmp_path / "missing.json")


def test_redact_dsn_forms():
    assert redact_dsn(f"postgresql://mon:{SECRET}@db:5433/app") == "mon@db:5433/app"
    assert redact_dsn(f"host=db port=5433 user=mon password={SECRET} dbname=app") == "mon@db:5433/app"


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": f"postgresql://u:{SECRET}@h:xx/db"}
    proc = subprocess.run([sys.executable, "-m", "pgflow", "check"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr + proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "database_url" in proc.stderr


# --- issue 19 item 8: the user's mistakes, said once and clearly (the real CLI) ----------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, "-m", "pgflow", *args], capture_output=True, text=True, env={**base, **env}, timeout=120)


@pytest.mark.parametrize("command", ["check", "run"])
def test_misspelled_env_variable_exits_2_naming_the_setting(command, tmp_path):
    """A typo in a PGFLOW_ variable was silently ignored (interval stayed 30 s, exit 0)."""
    proc = _cli(command, PGFLOW_COLECTION_INTERVAL_SECS="5", DATABASE_URL="postgresql://u@127.0.0.1:1/db", PGFLOW_STATE_DIR=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "pgflow: unknown environment variable PGFLOW_COLECTION_INTERVAL_SECS: did you mean PGFLOW_COLLECTION_INTERVAL_SECS?"
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_value_names_the_source_it_came_from(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"collection_interval_secs": -1}))
    from_file = _cli("check", "--config", str(path), DATABASE_URL="postgresql://u@127.0.0.1:1/db")
    assert from_file.returncode == 2
    assert f"invalid setting collection_interval_secs (config file {path})" in from_file.stderr, from_file.stderr
    from_env = _cli("check", PGFLOW_COLLECTION_INTERVAL_SECS="-1", DATABASE_URL="postgresql://u@127.0.0.1:1/db")
    assert from_env.returncode == 2
    assert "invalid setting collection_interval_secs (env PGFLOW_COLLECTION_INTERVAL_SECS)" in from_env.stderr


def test_duplicate_instance_names_are_named_as_instances(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {"instances": [{"name": "a", "database_url": "postgresql://u@h/x"}, {"name": "a", "database_url": "postgresql://u@h/y"}]}
        )
    )
    proc = _cli("check", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"pgflow: invalid setting instances (config file {path}): instance name 'a' is used twice; each instance needs its own name"
    ), proc.stderr
    assert "PGFLOW_SETTINGS" not in proc.stderr


def test_database_url_beside_instances_says_which_wins_once(pg, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"instances": [{"name": "listed", "database_url": pg.dsn()}]}))
    proc = _cli("check", "--config", str(path), DATABASE_URL="postgresql://u@127.0.0.1:1/elsewhere")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = [line for line in (proc.stderr + proc.stdout).splitlines() if "DATABASE_URL" in line and "ignored" in line]
    assert len(said) == 1 and "listed in instances are scraped" in said[0], said
    assert "listed (" in proc.stdout and "elsewhere" not in proc.stdout
