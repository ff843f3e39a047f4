"""Encode + gzip of one window of 5,000 points: pgflow's encoder against the OpenTelemetry SDK path.

Both start from the same points frame (the operators' output for a synthetic workload):
- pgflow: Encoder.batches (protobuf wire format written directly) + gzip level 6, as its HTTP transport;
- SDK: the same points as SDK ``MetricsData`` (ResourceMetrics/ScopeMetrics/Metric/Sum/Gauge/
  NumberDataPoint) → ``encode_metrics`` (opentelemetry-exporter-otlp-proto-common) → serialize →
  gzip as the SDK's OTLP/HTTP exporter does it (``gzip.GzipFile(fileobj=..., mode="w")``: level 9).
  The same SDK path with gzip level 6, pgflow's level, is timed too and its ratio printed.

Ends with: ratio_sdk=<float> bytes_gzip=<int>  (ratio = SDK time / pgflow's steady-state time;
the first-window ratio, with nothing cached, and the same-gzip-level ratio are printed above it).
Usage: python bench/otlp_bench.py [points] [repeats]
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import polars as pl  # noqa: E402
from ops_bench import synthetic  # noqa: E402

from pgflow import ops  # noqa: E402
from pgflow.otlp.encode import Encoder, resource_attributes  # noqa: E402
from pgflow.schema import ATTRIBUTE_KEYS  # noqa: E402


def window_points(n: int) -> pl.DataFrame:
    points = ops.run(synthetic(3, max(50, n // 12)), export_interval_secs=3600)
    return points.head(n)


def pgflow_encode(points: pl.DataFrame, encoder: Encoder | None = None) -> int:
    """A fresh encoder encodes every attribute pair anew (the first window); the collector's
    shipper keeps one encoder, so later windows of the same series reuse them (``encoder``)."""
    encoder = encoder or Encoder(batch_size=len(points) + 1, max_bytes=1 << 30)
    total = 0
    for batch in encoder.batches(points):
        total += len(gzip.compress(batch.payload, compresslevel=6))
    return total


def sdk_gzip(payload: bytes) -> bytes:
    """What opentelemetry-exporter-otlp-proto-http's ``_export`` does with Compression.Gzip."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="w") as stream:
        stream.write(payload)
    return buffer.getvalue()


def sdk_encode(points: pl.DataFrame, level: int | None = None) -> int:
    from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    by_metric: dict[tuple, list] = {}
    first = points.row(0, named=True)
    for row in points.iter_rows(named=True):
        attrs = {k: v for k, v in row["attributes"].items() if v is not None}
        value = int(row["value"]) if row["is_int"] else float(row["value"])
        start = int(row["start"].timestamp() * 1e9)
        end = int(row["end"].timestamp() * 1e9)
        dp = NumberDataPoint(attributes=attrs, start_time_unix_nano=start if row["kind"] == "sum" else 0, time_unix_nano=end, value=value)
        by_metric.setdefault((row["metric"], row["kind"], row["unit"]), []).append(dp)
    metrics = []
    for (name, kind, unit), dps in by_metric.items():
        data = (
            Sum(data_points=dps, aggregation_temporality=AggregationTemporality.DELTA, is_monotonic=True)
            if kind == "sum"
            else Gauge(data_points=dps)
        )
        metrics.append(Metric(name=name, description="", unit=unit, data=data))
    resource = Resource(
        resource_attributes(first["instance"], first["server_address"], first["server_port"], first["server_version_num"], "pgflow")
    )
    data = MetricsData(
        resource_metrics=[
            ResourceMetrics(
                resource=resource,
                scope_metrics=[ScopeMetrics(scope=InstrumentationScope("pgflow", "0.1.0"), metrics=metrics, schema_url="")],
                schema_url="",
            )
        ]
    )
    payload = encode_metrics(data).SerializeToString()
    return len(sdk_gzip(payload) if level is None else gzip.compress(payload, compresslevel=level))


def best_of(fn, points: pl.DataFrame, repeats: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        size = fn(points)
        best = min(best, time.perf_counter() - start)
    return best, size


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    points = window_points(n)
    assert set(points["attributes"].struct.fields) == set(ATTRIBUTE_KEYS)
    t_cold, b_pgflow = best_of(pgflow_encode, points, repeats)
    warm = Encoder(batch_size=len(points) + 1, max_bytes=1 << 30)
    pgflow_encode(points, warm)
    t_warm, _ = best_of(lambda p: pgflow_encode(p, warm), points, repeats)
    t_sdk, b_sdk = best_of(sdk_encode, points, repeats)
    t_sdk6, b_sdk6 = best_of(lambda p: sdk_encode(p, level=6), points, repeats)
    print(f"points={points.height}")
    print(f"pgflow encoder, first window : {t_cold * 1000:8.1f} ms  gzip {b_pgflow:>9,} bytes  (x{t_sdk / t_cold:.2f})")
    print(f"pgflow encoder, steady state : {t_warm * 1000:8.1f} ms  (attribute pairs already encoded)")
    print(f"otel sdk path                : {t_sdk * 1000:8.1f} ms  gzip {b_sdk:>9,} bytes  (its exporter's gzip, level 9)")
    print(
        f"otel sdk path, gzip level 6  : {t_sdk6 * 1000:8.1f} ms  gzip {b_sdk6:>9,} bytes  (same level as pgflow: x{t_sdk6 / t_warm:.2f})"
    )
    print(f"ratio_sdk={t_sdk / t_warm:.2f} bytes_gzip={b_pgflow}")


if __name__ == "__main__":
    main()
