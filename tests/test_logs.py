"""Events as OTLP logs: the encoder (decoded with opentelemetry-proto), batching, and export to the
real local receiver over gRPC and HTTP with its retries, refusals and partial successes."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pytest

from pgflow.config import Settings
from pgflow.otlp.encode import MAX_REQUEST_BYTES, Encoder
from pgflow.otlp.encode import decode as decode_metrics
from pgflow.otlp.logs import MAX_ATTRIBUTE_CHARS, MAX_BODY_BYTES, LogEncoder, decode, events_frame
from pgflow.otlp.logs_export import LogsExporter
from pgflow.otlp.receiver import Receiver, parse_script
from pgflow.otlp.store import read_logs
from pgflow.schema import EVENTS

API_KEY = "NRAK-LOGSKEY-0123456789"
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def sample(i: int, instance: str = "db1:5432", body: str | None = None, **extra) -> dict:
    """A query sample, or with ``body`` a plan, each with only the attributes the registry declares for it."""
    own = {"postgresql.pid": 1000 + i, "postgresql.query.duration": i / 8, "postgresql.query.truncated": True} if body is None else {}
    return {
        "instance": instance,
        "event_name": "db.server.query_sample" if body is None else "db.server.query_plan",
        "time": T0 + timedelta(seconds=i),
        "severity": "INFO",
        "body": body,
        "attributes": {"db.system.name": "postgresql", "db.namespace": "app", "postgresql.query.fingerprint": f"{i:016x}", **own, **extra},
        "server_address": instance.split(":")[0],
        "server_port": 5432,
        "server_version_num": 170004,
    }


def test_records_decode_with_opentelemetry_proto():
    events = events_frame(
        [
            sample(0, **{"postgresql.query_id": -(2**63)}),
            sample(1, body='{"Plan": {}}'),
            sample(2, instance="db2:5432", **{"postgresql.pid": None, "postgresql.query_id": 2**63 - 1}),
        ]
    )
    assert events.schema == EVENTS
    (batch,) = list(LogEncoder().batches(events))
    request = decode(batch.payload)
    assert batch.points == 3 and batch.rows == (0, 1, 2)
    assert len(request.resource_logs) == 2
    first = request.resource_logs[0]
    assert first.scope_logs[0].scope.name == "pgflow"
    records = first.scope_logs[0].log_records
    assert [r.event_name for r in records] == ["db.server.query_sample", "db.server.query_plan"]
    r0 = records[0]
    assert r0.time_unix_nano == int(T0.timestamp()) * 10**9 + 123456000 == r0.observed_time_unix_nano
    assert r0.severity_text == "INFO" and r0.severity_number == 9
    assert not r0.HasField("body") and records[1].body.string_value == '{"Plan": {}}'
    attrs = {kv.key: kv.value for kv in r0.attributes}
    assert attrs["postgresql.pid"].int_value == 1000
    assert attrs["postgresql.query.duration"].double_value == 0.0
    assert attrs["postgresql.query.truncated"].WhichOneof("value") == "bool_value"
    assert attrs["db.namespace"].string_value == "app"
    assert attrs["event.name"].string_value == "db.server.query_sample"
    assert attrs["postgresql.query_id"].int_value == -(2**63)
    last = {kv.key: kv.value for kv in request.resource_logs[1].scope_logs[0].log_records[0].attributes}
    assert "postgresql.pid" not in last and last["postgresql.query_id"].int_value == 2**63 - 1
    assert last["postgresql.query.duration"].double_value == 0.25
    with pytest.raises(ValueError, match="unknown event attribute"):
        events_frame([sample(0, secret="x")])


def test_resource_is_the_metrics_resource():
    """Events and metrics of an instance carry the same resource, so a backend joins them."""
    from tests.test_otlp import make_points

    (metrics,) = list(Encoder().batches(make_points(2)))
    (logs,) = list(LogEncoder().batches(events_frame([sample(0)])))
    assert decode(logs.payload).resource_logs[0].resource == decode_metrics(metrics.payload).resource_metrics[0].resource


def test_long_values_are_cut_where_new_relic_cuts():
    encoder = LogEncoder()
    events = events_frame([sample(0, body="é" * MAX_BODY_BYTES, **{"db.query.text": "x" * 10_000})])
    (batch,) = list(encoder.batches(events))
    record = decode(batch.payload).resource_logs[0].scope_logs[0].log_records[0]
    assert len(record.body.string_value.encode()) <= MAX_BODY_BYTES
    assert record.body.string_value == "é" * (MAX_BODY_BYTES // 2)  # cut on a character boundary
    text = {kv.key: kv.value.string_value for kv in record.attributes}["db.query.text"]
    assert len(text) == MAX_ATTRIBUTE_CHARS
    assert encoder.stats.truncated_bodies == 1 and encoder.stats.truncated_attributes == 1


@pytest.mark.parametrize("batch_size", [1000, 7])
def test_batches_stay_within_both_limits_and_carry_each_event_once(batch_size):
    # 60 events with 100 KB bodies over three instances: several requests by bytes alone.
    rows = [sample(i, instance=f"db{i % 3}:5432", body=f"{i:05d}" + "p" * 100_000) for i in range(60)]
    events = events_frame(rows).with_columns(pl.Series("id", [f"e{i}" for i in range(60)]))
    batches = list(LogEncoder(batch_size=batch_size).batches(events, row_id="id"))
    assert len(batches) > 6
    carried: list[str] = []
    for batch in batches:
        assert len(batch.payload) <= MAX_REQUEST_BYTES and batch.points <= batch_size
        request = decode(batch.payload)
        bodies = [r.body.string_value[:5] for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]
        assert [f"e{int(b)}" for b in bodies] == list(batch.rows)
        carried += batch.rows
    assert sorted(carried) == sorted(events["id"].to_list())


def exporter_for(receiver: Receiver, protocol: str, **overrides) -> tuple[LogsExporter, list[float]]:
    delays: list[float] = []
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    settings = Settings.load(
        otlp_endpoint=endpoint,
        otlp_protocol=protocol,
        new_relic_api_key=API_KEY,
        retry_initial_delay_secs=0.01,
        retry_max_delay_secs=0.05,
        **overrides,
    )
    return LogsExporter(settings, sleep=delays.append), delays


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_receiver_stores_logs_beside_points(tmp_path, protocol):
    out = tmp_path / "received.duckdb"
    events = events_frame([sample(i, body=json.dumps({"Plan": i}) if i % 2 else None) for i in range(5)])
    with Receiver(out) as receiver:
        exporter, _ = exporter_for(receiver, protocol)
        results = exporter.export(events)
        assert [r.acknowledged for _, r in results] == [True]
        requests = receiver.store.requests()
    assert requests["protocol"].to_list() == [f"{protocol}/logs"]
    assert requests["api_key_sha256"].to_list() == [hashlib.sha256(API_KEY.encode()).hexdigest()[:16]]
    with duckdb.connect(str(out), read_only=True) as con:
        columns = [row[0] for row in con.sql("DESCRIBE logs").fetchall()]
        tables = {row[0] for row in con.sql("SHOW TABLES").fetchall()}
    assert columns == ["event_name", "time", "severity", "body", "attributes", "resource", "received_at"]
    assert {"logs", "points"} <= tables
    logs = read_logs(out).sort("time")
    assert logs["event_name"].to_list() == ["db.server.query_sample", "db.server.query_plan"] * 2 + ["db.server.query_sample"]
    assert logs["time"].to_list() == events["time"].to_list()
    assert logs["body"].to_list() == [None, '{"Plan": 1}', None, '{"Plan": 3}', None]
    attrs = [json.loads(a) for a in logs["attributes"]]
    assert [a.get("postgresql.pid") for a in attrs] == [1000, None, 1002, None, 1004]  # plans have no pid
    assert json.loads(logs["resource"][0])["service.instance.id"] == "db1:5432"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_retries_refusals_and_partial_success(protocol):
    events = events_frame([sample(i) for i in range(4)])
    with Receiver(script=parse_script("UNAVAILABLE,429:1,OK,PARTIAL:2,403")) as receiver:
        exporter, delays = exporter_for(receiver, protocol)
        ((_, first),) = exporter.export(events)
        assert first.acknowledged and first.attempts == 3
        assert delays[1] == 1.0  # the server's Retry-After / RetryInfo, honoured
        ((_, partial),) = exporter.export(events)
        assert partial.acknowledged and partial.rejected_points == 2
        ((_, refused),) = exporter.export(events)
        assert not refused.acknowledged and not refused.retryable and refused.attempts == 1
        assert len(receiver.logs()) == 8  # the OK and the PARTIAL request: stored once each
        assert [o for _, o in receiver.attempts][-1] in ("403", "PERMISSION_DENIED")


# Query samples (pgflow.ops.query_samples): a real long-running statement, read as the sampler would ----

import threading  # noqa: E402
import time  # noqa: E402

import psycopg  # noqa: E402

from pgflow.ops.fingerprint import query_info  # noqa: E402
from pgflow.ops.query_samples import QUERY_SAMPLES, TRUNCATED, UNPARSABLE, limit_samples, sample_events, sample_text  # noqa: E402

ACTIVITY_SQL = """
SELECT now() AS seen_at, datname AS database, usename AS "user", pid, query_start,
       extract(epoch FROM now() - query_start)::float8 AS duration_secs, state, wait_event_type, wait_event,
       {query_id} AS query_id, application_name, host(client_addr) AS client_addr, query
FROM pg_stat_activity WHERE application_name = 'slow-app' AND state = 'active'
"""


def observe(server, seconds_at_least: float) -> list[dict]:
    """pg_stat_activity rows of the 'slow-app' session, once it has run ``seconds_at_least``."""
    version = int(server.execute("SHOW server_version_num")[0][0])
    sql = ACTIVITY_SQL.format(query_id="query_id" if version >= 140000 else "NULL::int8")
    deadline = time.monotonic() + 30
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            cur = conn.execute(sql)  # type: ignore[arg-type]
            names = [d.name for d in cur.description]
            found = [dict(zip(names, r)) for r in cur.fetchall()]
            if found and found[0]["duration_secs"] >= seconds_at_least:
                return found
            time.sleep(0.05)
    raise AssertionError("the slow statement never showed up in pg_stat_activity")


def run_slow(server, statement: str) -> threading.Thread:
    def work() -> None:
        with psycopg.connect(server.dsn(), autocommit=True, application_name="slow-app") as conn:
            conn.execute(statement)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def as_samples(rows: list[dict], size: int) -> pl.DataFrame:
    out = []
    for row in rows:
        text = sample_text(row.pop("query"), size)  # the only place the raw text is read
        out.append(dict(row, fingerprint=text.fingerprint, text=text.text, truncated=text.truncated, unparsable=text.unparsable))
    return pl.DataFrame(out, schema=QUERY_SAMPLES)


def test_a_slow_statement_with_a_secret_arrives_as_a_normalized_sample(fresh_stats, tmp_path):
    server = fresh_stats
    secret = "zq-sample-secret-77"
    worker = run_slow(server, f"SELECT pg_sleep(1.5) WHERE '{secret}' <> current_user")
    first = observe(server, 0.15)
    second = observe(server, 0.3)  # the same execution, seen again by a later sample
    worker.join()
    samples = as_samples(first + second, 1024)
    kept, state = limit_samples(samples)
    assert kept.height == 1 and state.skipped == {}
    assert kept["duration_secs"][0] >= 0.3  # the longest observation of the execution is kept
    events = sample_events(kept, instance="db1", server_address="127.0.0.1", server_port=server.port, server_version_num=180000)
    out = tmp_path / "received.duckdb"
    with Receiver(out) as receiver:
        settings = Settings.load(otlp_endpoint=receiver.http_endpoint, otlp_protocol="http")
        assert all(r.acknowledged for _, r in LogsExporter(settings).export(events))
    (row,) = read_logs(out).rows(named=True)
    attrs = json.loads(row["attributes"])
    assert row["event_name"] == "db.server.query_sample"
    assert attrs["db.query.text"] == "SELECT pg_sleep($1) WHERE $2 <> CURRENT_USER"
    assert attrs["postgresql.pid"] == first[0]["pid"] and attrs["db.namespace"] == "postgres"
    assert attrs["postgresql.application_name"] == "slow-app" and attrs["postgresql.state"] == "active"
    assert attrs["postgresql.query.duration"] >= 0.3 and "postgresql.query_start" in attrs
    # The sample's fingerprint is the key of the statement's metrics.
    (pgss_text,) = [q for (q,) in server.execute("SELECT query FROM pg_stat_statements WHERE query LIKE '%pg_sleep%'")]
    assert attrs["postgresql.query.fingerprint"] == query_info(pgss_text).fingerprint
    assert secret.encode() not in out.read_bytes() and secret not in json.dumps(row, default=str)


def test_truncated_and_unparsable_texts_leave_as_markers(pg_factory):
    server = pg_factory(settings={"track_activity_query_size": "100"})
    secret = "zq-truncated-secret-" + "x" * 120
    worker = run_slow(server, f"SELECT pg_sleep(0.6), '{secret}'")
    rows = observe(server, 0.1)
    worker.join()
    assert rows[0]["query"].startswith("SELECT pg_sleep(0.6), 'zq-truncated") and len(rows[0]["query"]) == 99
    samples = as_samples(rows, 100)
    assert samples["text"].to_list() == [TRUNCATED] and samples["truncated"].to_list() == [True]
    events = sample_events(limit_samples(samples)[0], instance="db1")
    attrs = events["attributes"].struct.unnest()
    assert attrs["postgresql.query.truncated"].to_list() == [True] and attrs["db.query.text"].to_list() == [TRUNCATED]
    assert "zq-truncated" not in str(events.rows())
    bad = sample_text("SELEC * FRM t WHERE token = 'zq-unparsable-secret'")
    assert bad.text == UNPARSABLE and bad.unparsable and "zq" not in bad.fingerprint
    assert sample_text("SELEC x", 1024).fingerprint == sample_text("SELEC x", 1024).fingerprint


def test_sample_limits_hold():
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def window(start: datetime, executions: int, fingerprints: int, duration: float = 1.0) -> pl.DataFrame:
        rows = [
            {
                "seen_at": start + timedelta(seconds=i % 60),
                "database": "app",
                "user": "u",
                "pid": 1000 + i,
                "query_start": start + timedelta(milliseconds=i),
                "duration_secs": duration + i / 1000,
                "state": "active",
                "fingerprint": f"fp{i % fingerprints}",
                "text": "SELECT $1",
                "truncated": False,
                "unparsable": False,
            }
            for i in range(executions)
        ]
        return pl.DataFrame(rows, schema=QUERY_SAMPLES)

    first = window(t0, 200, 3)
    kept, state = limit_samples(first, samples_per_fingerprint_per_hour=15, max_samples_per_window=40)
    assert kept.height == 40 and kept["fingerprint"].value_counts()["count"].max() <= 15
    assert kept["duration_secs"].min() >= first.sort("duration_secs")["duration_secs"][-60]  # the longest first
    again, state = limit_samples(first, state, samples_per_fingerprint_per_hour=15, max_samples_per_window=40)
    assert again.height <= 5  # executions already sent are not sent again; fingerprints near their hour's cap
    assert state.skipped["seen"] >= 40
    short = window(t0 + timedelta(minutes=1), 10, 1, duration=0.05).with_columns(pl.col("fingerprint") + "-new")
    short_kept, state = limit_samples(short, state)  # the state is a value: the new one is returned
    assert short_kept.height == 0 and state.skipped["short"] == 10
    later = window(t0 + timedelta(hours=1, minutes=1), 200, 3).with_columns(pl.col("pid") + 10_000)
    kept_later, state = limit_samples(later, state, samples_per_fingerprint_per_hour=15, max_samples_per_window=100)
    assert kept_later.height == 45  # an hour on, each fingerprint may have 15 again
