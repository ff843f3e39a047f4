"""OTLP export against the real local receiver (official protocol, gRPC and HTTP)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from pgflow.config import Settings
from pgflow.otlp.encode import MAX_REQUEST_BYTES, Encoder, decode
from pgflow.otlp.exporter import Exporter
from pgflow.otlp.receiver import Receiver, parse_script
from pgflow.otlp.retry import RetryPolicy, parse_retry_after
from pgflow.otlp.store import read_points
from pgflow.pgserver import free_port
from pgflow.schema import ATTRIBUTE_KEYS, POINTS

API_KEY = "NRAK-TESTKEY-0123456789"
W0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
W1 = W0 + timedelta(seconds=60)


def make_points(n: int, text_len: int = 40, value: float | None = None) -> pl.DataFrame:
    """n points: alternating integer calls and double durations, distinct attributes."""
    rows = []
    for i in range(n):
        is_int = i % 2 == 0
        attrs = {k: None for k in ATTRIBUTE_KEYS}
        attrs.update(
            {
                "db.system.name": "postgresql",
                "db.namespace": "app",
                "user.name": f"u{i % 3}",
                "db.operation.name": "SELECT",
                "db.query.summary": f"SELECT t{i}",
                "postgresql.query.fingerprint": f"{i:016x}",
                "db.query.text": ("x" * text_len)[:text_len],
            }
        )
        rows.append(
            {
                "instance": "db1:5432",
                "metric": "postgresql.query.calls" if is_int else "postgresql.query.duration",
                "kind": "sum",
                "unit": "{call}" if is_int else "s",
                "monotonic": True,
                "start": W0,
                "end": W1,
                "value": float(value if value is not None else (i + 1 if is_int else (i + 1) / 1000)),
                "is_int": is_int,
                "attributes": attrs,
                "server_address": "db1",
                "server_port": 5432,
                "server_version_num": 170004,
            }
        )
    gauge = dict(
        rows[0],
        metric="postgresql.connection.max",
        kind="gauge",
        unit="{connection}",
        monotonic=False,
        start=W1,
        value=100.0,
        attributes={k: None for k in ATTRIBUTE_KEYS},
    )
    return pl.DataFrame(rows + [gauge], schema=POINTS)


def exporter_for(receiver: Receiver, protocol: str, **overrides) -> tuple[Exporter, list[float]]:
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
    return Exporter(settings, sleep=delays.append), delays


@pytest.fixture()
def receiver():
    with Receiver() as r:
        yield r


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_round_trip(receiver, protocol):
    points = make_points(10)
    exporter, _ = exporter_for(receiver, protocol)
    results = exporter.export(points)
    assert all(r.acknowledged for _, r in results)
    got = receiver.points().sort("metric", "value")
    assert got.height == points.height
    sums = got.filter(pl.col("kind") == "sum")
    assert set(sums["temporality"]) == {"delta"} and sums["monotonic"].all()
    assert (sums["start"] == W0).all() and (sums["end"] == W1).all()
    calls = sums.filter(pl.col("metric") == "postgresql.query.calls")
    assert sorted(calls["value"]) == [1, 3, 5, 7, 9] and set(calls["unit"]) == {"{call}"}
    durations = sums.filter(pl.col("metric") == "postgresql.query.duration")
    assert sorted(durations["value"]) == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.010])
    attrs = json.loads(calls["attributes"][0])
    assert attrs["db.system.name"] == "postgresql" and attrs["db.namespace"] == "app"
    assert "postgresql.block.kind" not in attrs  # null attributes are not sent
    resource = json.loads(calls["resource"][0])
    assert resource["service.instance.id"] == "db1:5432" and resource["server.port"] == 5432
    assert resource["db.system.version"] == "17.4" and resource["service.name"] == "pgflow"
    gauge = got.filter(pl.col("kind") == "gauge").row(0, named=True)
    assert (gauge["metric"], gauge["value"], gauge["end"]) == ("postgresql.connection.max", 100.0, W1)


def test_integers_as_int_and_durations_as_double():
    [batch] = Encoder().batches(make_points(4))
    request = decode(batch.payload)
    kinds = {
        m.name: m.sum.data_points[0].WhichOneof("value") for m in request.resource_metrics[0].scope_metrics[0].metrics if m.HasField("sum")
    }
    assert kinds == {"postgresql.query.calls": "as_int", "postgresql.query.duration": "as_double"}
    assert request.resource_metrics[0].scope_metrics[0].scope.name == "pgflow"


@pytest.mark.parametrize(
    "protocol, code",
    [
        ("grpc", "UNAVAILABLE"),
        ("grpc", "CANCELLED"),
        ("grpc", "DEADLINE_EXCEEDED"),
        ("grpc", "ABORTED"),
        ("grpc", "OUT_OF_RANGE"),
        ("grpc", "DATA_LOSS"),
        ("http", "429"),
        ("http", "502"),
        ("http", "503"),
        ("http", "504"),
    ],
)
def test_retryable_codes_are_retried(receiver, protocol, code):
    receiver.set_script(parse_script(f"{code},{code},OK"))
    exporter, delays = exporter_for(receiver, protocol)
    [(_, result)] = exporter.export(make_points(2))
    assert result.acknowledged and result.attempts == 3
    assert [outcome for _, outcome in receiver.attempts] == [code, code, "OK"]
    assert len(delays) == 2 and all(0 < d <= 0.05 for d in delays)  # backoff within the policy
    assert receiver.points().height == 3


@pytest.mark.parametrize(
    "protocol, code",
    [
        ("grpc", "RESOURCE_EXHAUSTED"),
        ("grpc", "INVALID_ARGUMENT"),
        ("grpc", "UNAUTHENTICATED"),
        ("grpc", "PERMISSION_DENIED"),
        ("http", "400"),
        ("http", "401"),
        ("http", "403"),
        ("http", "413"),
        ("http", "500"),
    ],
)
def test_non_retryable_codes_are_not_retried(receiver, protocol, code, caplog):
    receiver.set_script(parse_script(f"{code},OK"))
    exporter, delays = exporter_for(receiver, protocol)
    with caplog.at_level(logging.ERROR, logger="pgflow.export"):
        [(_, result)] = exporter.export(make_points(2))
    assert not result.acknowledged and result.attempts == 1 and not result.retryable
    assert len(receiver.attempts) == 1 and delays == []
    assert exporter.stats.failures[result.cause] == 1
    [record] = [r for r in caplog.records if r.name == "pgflow.export"]
    assert "\n" not in record.getMessage()
    if code in ("403", "401", "PERMISSION_DENIED", "UNAUTHENTICATED"):
        assert "rejected the license key" in record.getMessage() and "NEW_RELIC_API_KEY" in record.getMessage()


def test_resource_exhausted_with_retry_info_is_retried_after_its_delay(receiver):
    receiver.set_script(parse_script("RESOURCE_EXHAUSTED:2,OK"))
    exporter, delays = exporter_for(receiver, "grpc")
    [(_, result)] = exporter.export(make_points(2))
    assert result.acknowledged and delays == [2.0]


def test_retry_after_is_honoured(receiver):
    receiver.set_script(parse_script("429:3,503:1,OK"))
    exporter, delays = exporter_for(receiver, "http")
    [(_, result)] = exporter.export(make_points(2))
    assert result.acknowledged and delays == [3.0, 1.0]


def test_retry_after_http_date():
    now = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:07 GMT", now) == 7.0
    assert parse_retry_after("12", now) == 12.0 and parse_retry_after("soon", now) is None


def test_backoff_is_exponential_capped_and_jittered():
    policy = RetryPolicy(initial_delay=1, max_delay=8, max_attempts=10)
    for retry, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (7, 8)]:
        delays = {policy.backoff(retry) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1


def test_gives_up_after_max_attempts_and_says_so(receiver):
    receiver.set_script(parse_script("UNAVAILABLE," * 10))
    exporter, delays = exporter_for(receiver, "grpc", retry_max_attempts=3)
    [(_, result)] = exporter.export(make_points(2))
    assert not result.acknowledged and result.retryable and result.attempts == 3 and len(delays) == 2


def test_http_endpoint_closing_idle_connections_costs_no_retry(caplog):
    """Issue 20 made OTLP/HTTP the default, on one kept-alive connection. Servers and load
    balancers close idle connections, and windows are a minute apart: the next window is sent
    at once on a new connection, exactly once, not counted or logged as a failed attempt."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

    requests: list[int] = []

    class ClosesIdle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.3  # the server drops a connection idle this long

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            requests.append(1)
            body = ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), ClosesIdle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings.load(otlp_endpoint=f"http://127.0.0.1:{server.server_port}", retry_initial_delay_secs=0.5)
        assert settings.otlp_protocol == "http"  # the default
        exporter = Exporter(settings)
        results = []
        with caplog.at_level(logging.INFO, logger="pgflow.export"):
            for _ in range(3):
                results += [r for _, r in exporter.export(make_points(2))]
                time.sleep(0.8)  # the server has closed the connection meanwhile
        exporter.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [(r.acknowledged, r.attempts) for r in results] == [(True, 1)] * 3
    assert len(requests) == 3 and not exporter.stats.retries
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_connection_refused_is_retried(protocol):
    port = free_port()
    settings = Settings.load(
        otlp_endpoint=f"http://127.0.0.1:{port}",
        otlp_protocol=protocol,
        retry_max_attempts=3,
        retry_initial_delay_secs=0.01,
        export_timeout_secs=2,
    )
    delays: list[float] = []
    exporter = Exporter(settings, sleep=delays.append)
    [(_, result)] = exporter.export(make_points(2))
    assert not result.acknowledged and result.retryable and result.attempts == 3 and len(delays) == 2


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_partial_success_is_counted(receiver, protocol):
    receiver.set_script(parse_script("PARTIAL:2"))
    exporter, _ = exporter_for(receiver, protocol)
    [(_, result)] = exporter.export(make_points(4))
    assert result.acknowledged and result.rejected_points == 2
    assert exporter.stats.points_rejected == 2 and exporter.stats.points_acked == 3


def test_twelve_thousand_points_respect_both_limits(receiver):
    points = make_points(12_000, text_len=4095)  # ~4 KB of attributes a point: the byte limit binds
    encoder = Encoder(batch_size=1000)
    batches = list(encoder.batches(points))
    assert sum(b.points for b in batches) == points.height
    assert all(len(b.payload) <= MAX_REQUEST_BYTES and b.points <= 1000 for b in batches)
    assert max(len(b.payload) for b in batches) > MAX_REQUEST_BYTES * 0.5  # the byte limit shaped them
    small = list(Encoder(batch_size=1000).batches(make_points(12_000)))
    assert [b.points for b in small][:12] == [1000] * 12  # the count limit shaped these
    exporter, _ = exporter_for(receiver, "grpc")
    assert all(r.acknowledged for _, r in exporter.export(points))
    assert receiver.points().height == points.height


def test_non_finite_values_are_dropped_and_counted():
    points = pl.concat([make_points(2), make_points(2, value=math.nan), make_points(2, value=math.inf)])
    encoder = Encoder()
    assert sum(b.points for b in encoder.batches(points)) == 5  # 3 + the two gauges (100.0)
    assert encoder.stats.dropped_non_finite == 4


def test_long_attributes_are_truncated():
    [batch] = Encoder().batches(make_points(1, text_len=10_000))
    [metric] = [m for m in decode(batch.payload).resource_metrics[0].scope_metrics[0].metrics if m.HasField("sum")]
    dp = metric.sum.data_points[0]
    text = {a.key: a.value.string_value for a in dp.attributes}["db.query.text"]
    assert len(text) == 4095


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_api_key_is_sent_as_header_and_never_logged(receiver, protocol, caplog):
    receiver.set_script(parse_script("400"))
    exporter, _ = exporter_for(receiver, protocol)
    with caplog.at_level(logging.DEBUG):
        exporter.export(make_points(2))
        exporter.export(make_points(2))
    hashes = receiver.store.requests()["api_key_sha256"].to_list()
    assert hashes == [hashlib.sha256(API_KEY.encode()).hexdigest()[:16]] * 2
    assert API_KEY not in caplog.text and API_KEY not in repr(exporter)


def test_receive_cli_stores_and_closes_cleanly_on_sigterm(tmp_path):
    out = tmp_path / "points.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgflow", "receive", "--out", str(out), "--grpc-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        grpc_port, http_port = map(int, re.findall(r"127\.0\.0\.1:(\d+)", line))
        for protocol, port in [("grpc", grpc_port), ("http", http_port)]:
            settings = Settings.load(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_protocol=protocol)
            assert all(r.acknowledged for _, r in Exporter(settings).export(make_points(3)))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err
    assert read_points(out).height == 8
    assert os.path.getsize(out) > 0


def test_points_of_a_metric_travel_in_one_metric_message():
    """make_points interleaves two metrics row by row: each request still carries every metric
    once, with all of its points, and names every point it carries exactly once."""
    points = make_points(2500)
    batches = list(Encoder(batch_size=1000).batches(points))
    assert sorted(i for b in batches for i in b.rows) == list(range(points.height))
    for batch in batches:
        [resource] = decode(batch.payload).resource_metrics
        names = [m.name for m in resource.scope_metrics[0].metrics]
        assert len(names) == len(set(names))
        counted = sum(len(m.sum.data_points) + len(m.gauge.data_points) for m in resource.scope_metrics[0].metrics)
        assert counted == batch.points == len(batch.rows)


def test_encoding_is_the_same_when_attribute_hashes_collide(monkeypatch):
    """Attribute sets are told apart by row hashes; should two collide, they are grouped by
    value and nothing is cached: the request carries the same points and attributes."""
    points = make_points(50)
    expected = decode(next(Encoder().batches(points)).payload)
    real = pl.DataFrame.hash_rows
    monkeypatch.setattr(pl.DataFrame, "hash_rows", lambda self, seed=0, *a, **k: real(self, seed, *a, **k) * (0 if seed == 0 else 1))
    assert decode(next(Encoder().batches(points)).payload) == expected


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stop_waits_for_the_requests_being_handled(protocol):
    # A handler still running once stop() had returned left a daemon thread inside polars or
    # DuckDB while the process exited (`pgflow replay --out`, a notebook's replay): "Fatal Python
    # error" at exit, twice in CI. stop() now lets it finish, then closes the store.
    receiver = Receiver().start()
    inside, finished, errors = threading.Event(), threading.Event(), []
    add = receiver.store.add

    def slow_add(*args, **kwargs):  # type: ignore[no-untyped-def]
        inside.set()
        time.sleep(3)  # longer than gRPC's 2 s grace
        try:
            return add(*args, **kwargs)
        except Exception as exc:
            errors.append(exc)
            raise
        finally:
            finished.set()

    receiver.store.add = slow_add  # type: ignore[method-assign]
    exporter, _ = exporter_for(receiver, protocol, retry_max_attempts=1)
    threading.Thread(target=exporter.export, args=(make_points(10),), daemon=True).start()
    assert inside.wait(30)
    receiver.stop()
    assert finished.is_set(), "stop() returned while a request was still being handled"
    assert errors == []  # the store was still open for it
