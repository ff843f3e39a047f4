"""DuckDB storage of received OTLP data points (the local receiver's ``points`` table).

Columns: ``metric, kind, temporality, monotonic, unit, start, end, value, attributes,
resource, received_at``; ``attributes`` and ``resource`` are JSON objects. ``requests`` logs
every request the receiver answered, with a hash of the ``api-key`` header, never the key.
``logs`` holds received OTLP log records (events): ``event_name, time, severity, body,
attributes, resource, received_at``, the JSON columns as in ``points``.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_TEMPORALITY = {0: None, 1: "delta", 2: "cumulative"}
Dtype = pl.DataType | type[pl.DataType]  # a polars dtype, as a class (pl.String) or an instance

POINTS_DDL = """
CREATE TABLE IF NOT EXISTS points (
    metric VARCHAR, kind VARCHAR, temporality VARCHAR, monotonic BOOLEAN, unit VARCHAR,
    start TIMESTAMPTZ, "end" TIMESTAMPTZ, value DOUBLE, attributes JSON, resource JSON,
    received_at TIMESTAMPTZ
)
"""
REQUESTS_DDL = """
CREATE TABLE IF NOT EXISTS requests (
    received_at TIMESTAMPTZ, protocol VARCHAR, outcome VARCHAR, points INTEGER, api_key_sha256 VARCHAR
)
"""
LOGS_DDL = """
CREATE TABLE IF NOT EXISTS logs (
    event_name VARCHAR, time TIMESTAMPTZ, severity VARCHAR, body VARCHAR, attributes JSON, resource JSON,
    received_at TIMESTAMPTZ
)
"""
LOGS_SCHEMA: dict[str, Dtype] = {
    "event_name": pl.String,
    "time": pl.Datetime("ns", "UTC"),
    "severity": pl.String,
    "body": pl.String,
    "attributes": pl.String,
    "resource": pl.String,
    "received_at": pl.Datetime("us", "UTC"),
}
POINTS_SCHEMA: dict[str, Dtype] = {
    "metric": pl.String,
    "kind": pl.String,
    "temporality": pl.String,
    "monotonic": pl.Boolean,
    "unit": pl.String,
    "start": pl.Datetime("ns", "UTC"),
    "end": pl.Datetime("ns", "UTC"),
    "value": pl.Float64,
    "attributes": pl.String,
    "resource": pl.String,
    "received_at": pl.Datetime("us", "UTC"),
}


def _value(v: AnyValue) -> object:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def request_rows(request: ExportMetricsServiceRequest, received_at: datetime) -> pl.DataFrame:
    """Flatten a request into rows of the ``points`` table."""
    cols: dict[str, list[Any]] = {name: [] for name in POINTS_SCHEMA}
    for rm in request.resource_metrics:
        resource = json.dumps({kv.key: _value(kv.value) for kv in rm.resource.attributes}, sort_keys=True)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind == "sum":
                    points, temporality = metric.sum.data_points, _TEMPORALITY.get(metric.sum.aggregation_temporality)
                    monotonic = metric.sum.is_monotonic
                elif kind == "gauge":
                    points, temporality, monotonic = metric.gauge.data_points, None, False
                else:
                    continue
                for dp in points:
                    cols["metric"].append(metric.name)
                    cols["kind"].append(kind)
                    cols["temporality"].append(temporality)
                    cols["monotonic"].append(monotonic)
                    cols["unit"].append(metric.unit)
                    cols["start"].append(dp.start_time_unix_nano or None)
                    cols["end"].append(dp.time_unix_nano)
                    cols["value"].append(float(dp.as_int) if dp.WhichOneof("value") == "as_int" else dp.as_double)
                    cols["attributes"].append(json.dumps({kv.key: _value(kv.value) for kv in dp.attributes}, sort_keys=True))
                    cols["resource"].append(resource)
                    cols["received_at"].append(received_at)
    frame = pl.DataFrame(
        {k: v for k, v in cols.items() if k not in ("start", "end")},
        schema={k: t for k, t in POINTS_SCHEMA.items() if k not in ("start", "end")},
    )
    return frame.with_columns(
        pl.Series("start", cols["start"], dtype=pl.Int64).cast(pl.Datetime("ns", "UTC")),
        pl.Series("end", cols["end"], dtype=pl.Int64).cast(pl.Datetime("ns", "UTC")),
    ).select(list(POINTS_SCHEMA))


def log_rows(request: ExportLogsServiceRequest, received_at: datetime) -> pl.DataFrame:
    """Flatten a logs request into rows of the ``logs`` table (an AnyValue body as its value)."""
    rows: dict[str, list[Any]] = {name: [] for name in LOGS_SCHEMA}
    for rl in request.resource_logs:
        resource = json.dumps({kv.key: _value(kv.value) for kv in rl.resource.attributes}, sort_keys=True)
        for sl in rl.scope_logs:
            for record in sl.log_records:
                body = _value(record.body) if record.HasField("body") else None
                rows["event_name"].append(record.event_name)
                rows["time"].append(record.time_unix_nano or record.observed_time_unix_nano)
                rows["severity"].append(record.severity_text or None)
                rows["body"].append(None if body is None else body if isinstance(body, str) else str(body))
                rows["attributes"].append(json.dumps({kv.key: _value(kv.value) for kv in record.attributes}, sort_keys=True))
                rows["resource"].append(resource)
                rows["received_at"].append(received_at)
    frame = pl.DataFrame({k: v for k, v in rows.items() if k != "time"}, schema={k: t for k, t in LOGS_SCHEMA.items() if k != "time"})
    return frame.with_columns(pl.Series("time", rows["time"], dtype=pl.Int64).cast(pl.Datetime("ns", "UTC"))).select(list(LOGS_SCHEMA))


class PointStore:
    """A DuckDB file (or memory) holding received points; safe to call from several threads."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path) if path else ":memory:"
        self._con = duckdb.connect(self.path)
        self._con.execute(POINTS_DDL)
        self._con.execute(REQUESTS_DDL)
        self._con.execute(LOGS_DDL)
        self._lock = threading.Lock()

    def add(self, request: ExportMetricsServiceRequest, protocol: str, outcome: str, api_key_sha256: str | None, store: bool) -> int:
        now = datetime.now(UTC)
        rows = request_rows(request, now) if store else None
        with self._lock:
            if rows is not None and rows.height:
                self._con.register("incoming", rows.to_arrow())
                self._con.execute("INSERT INTO points SELECT * FROM incoming")
                self._con.unregister("incoming")
            self._con.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?)", [now, protocol, outcome, 0 if rows is None else rows.height, api_key_sha256]
            )
        return 0 if rows is None else rows.height

    def add_logs(self, request: ExportLogsServiceRequest, protocol: str, outcome: str, api_key_sha256: str | None, store: bool) -> int:
        """Store a logs request's records (when accepted) and log the request like ``add``."""
        now = datetime.now(UTC)
        rows = log_rows(request, now) if store else None
        with self._lock:
            if rows is not None and rows.height:
                self._con.register("incoming_logs", rows.to_arrow())
                self._con.execute("INSERT INTO logs SELECT * FROM incoming_logs")
                self._con.unregister("incoming_logs")
            self._con.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                [now, f"{protocol}/logs", outcome, 0 if rows is None else rows.height, api_key_sha256],
            )
        return 0 if rows is None else rows.height

    def logs(self) -> pl.DataFrame:
        with self._lock:
            return _utc(self._con.sql("SELECT * FROM logs").pl())

    def points(self) -> pl.DataFrame:
        with self._lock:
            return _utc(self._con.sql("SELECT * FROM points").pl())

    def requests(self) -> pl.DataFrame:
        with self._lock:
            return _utc(self._con.sql("SELECT * FROM requests ORDER BY received_at").pl())

    def close(self) -> None:
        with self._lock:
            if self.path != ":memory:":
                self._con.execute("CHECKPOINT")
            self._con.close()


def read_points(path: str | Path) -> pl.DataFrame:
    """The points table of a receiver's DuckDB file (after the receiver has exited)."""
    with duckdb.connect(str(path), read_only=True) as con:
        return _utc(con.sql("SELECT * FROM points").pl())


def read_logs(path: str | Path) -> pl.DataFrame:
    """The logs table of a receiver's DuckDB file (after the receiver has exited)."""
    with duckdb.connect(str(path), read_only=True) as con:
        return _utc(con.sql("SELECT * FROM logs").pl())


def _utc(frame: pl.DataFrame) -> pl.DataFrame:
    """DuckDB hands TIMESTAMPTZ back in the session's zone; pgflow speaks UTC."""
    return frame.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC"))
