"""Points frame → ExportMetricsServiceRequest bytes (the message of opentelemetry-proto).

One ResourceMetrics per PostgreSQL instance (``service.instance.id`` = ``host:port``), one
scope ``pgflow``, one Metric per (name, kind, unit) holding its data points. Sums are
DELTA and monotonic; gauges carry the time they were observed. Counts travel as ``as_int``,
durations as ``as_double``. NaN and infinite values are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from pgflow import __version__
from pgflow.ops.groups import group_rows
from pgflow.otlp import wire
from pgflow.schema import ATTRIBUTE_KEYS

MAX_ATTRIBUTE_LENGTH = 4095
MAX_REQUEST_BYTES = 1_000_000  # New Relic's payload limit (before compression)
_DELTA = 1  # AGGREGATION_TEMPORALITY_DELTA
_SUM_TAIL = wire.field_varint(2, _DELTA) + wire.field_varint(3, 1)  # temporality, is_monotonic
_SCOPE = wire.field_bytes(1, wire.field_bytes(1, b"pgflow") + wire.field_bytes(2, __version__.encode()))


_SERIES_KEYS = ATTRIBUTE_KEYS[:7]  # up to db.query.text: what every metric of a query series shares
_POINT_KEYS = ATTRIBUTE_KEYS[7:]


@dataclass
class EncodeStats:
    dropped_non_finite: int = 0
    truncated_attributes: int = 0


@dataclass
class Batch:
    """One request's worth of points: the serialized request and what it carries."""

    payload: bytes
    points: int
    rows: tuple[int, ...] = ()  # ids of the points it carries (``row_id`` column, else position)


_FIXED = np.dtype([("t_start", "u1"), ("start", "<u8"), ("t_time", "u1"), ("time", "<u8"),
                   ("t_value", "u1"), ("value", "<u8")])


def _fixed_fields(frame: pl.DataFrame) -> bytes:
    """27 bytes a row: start_time_unix_nano, time_unix_nano and the value, in wire format.

    ``as_int`` (sfixed64, field 6) for counts and ``as_double`` (double, field 4) otherwise;
    gauges use the last 18 bytes (no start time).
    """
    n = frame.height
    out = np.zeros(n, dtype=_FIXED)
    out["t_start"], out["t_time"] = (2 << 3) | 1, (3 << 3) | 1
    out["start"] = frame["start"].dt.epoch("ns").fill_null(0).to_numpy().astype(np.uint64)
    out["time"] = frame["end"].dt.epoch("ns").to_numpy().astype(np.uint64)
    is_int = frame["is_int"].to_numpy()
    values = frame["value"].to_numpy().astype(np.float64)
    out["t_value"] = np.where(is_int, (6 << 3) | 1, (4 << 3) | 1)
    as_int = np.where(is_int, values, 0).astype(np.int64).view(np.uint64)
    out["value"] = np.where(is_int, as_int, values.view(np.uint64))
    return out.tobytes()


def resource_attributes(instance: str, address: str, port: int, version_num: int, service_name: str) -> dict[str, object]:
    """The resource of one PostgreSQL instance (New Relic keys its entity on service.instance.id)."""
    major, minor = divmod(int(version_num or 0), 10000)
    attrs: dict[str, object] = {
        "service.name": service_name,
        "service.instance.id": f"{address}:{port}" if address else instance,
        "server.address": address,
        "server.port": int(port) if port else None,
        "db.system.name": "postgresql",
        "db.system.version": f"{major}.{minor}" if version_num else "",
        "postgresql.instance.name": instance,
    }
    return {k: v for k, v in attrs.items() if v not in (None, "")}


def _resource_bytes(attrs: dict[str, object]) -> bytes:
    encoded = b"".join(
        wire.field_bytes(1, wire.int_kv(k, v) if isinstance(v, int) else wire.string_kv(k, str(v)))
        for k, v in attrs.items()
    )
    return wire.field_bytes(1, encoded)


@dataclass
class Encoder:
    """Turns points frames into requests of at most ``batch_size`` points and ``max_bytes`` bytes.

    Data points are written straight in protobuf wire format. The attribute block of each
    distinct attribute set is encoded once and kept (bounded) for the next windows, which
    carry the same series; sizes and batch boundaries are computed for all points at once.
    """

    service_name: str = "pgflow"
    batch_size: int = 1000
    max_bytes: int = MAX_REQUEST_BYTES
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __post_init__(self) -> None:
        self._blocks: dict[tuple, bytes] = {}
        self._resources: dict[tuple, bytes] = {}

    def _block(self, keys: tuple[str, ...], values: tuple) -> bytes:
        """The encoded ``attributes`` entries of ``keys`` = ``values`` (None: absent)."""
        block = self._blocks.get((keys, values))
        if block is None:
            entries = []
            for key, value in zip(keys, values):
                if value is None:
                    continue
                if len(value) > MAX_ATTRIBUTE_LENGTH:
                    value = value[:MAX_ATTRIBUTE_LENGTH]
                    self.stats.truncated_attributes += 1
                entries.append(wire.field_bytes(7, wire.string_kv(key, value)))
            if len(self._blocks) > 100_000:  # bounded: a long-running exporter sees ever new texts
                self._blocks.clear()
            block = self._blocks[(keys, values)] = b"".join(entries)
        return block

    def _resource(self, instance: str, address: str, port: int, version: int) -> bytes:
        key = (instance, address, port, version)
        block = self._resources.get(key)
        if block is None:
            block = self._resources[key] = _resource_bytes(
                resource_attributes(instance, address, port, version, self.service_name))
        return block

    def batches(self, points: pl.DataFrame, row_id: str | None = None) -> Iterator[Batch]:
        """Requests carrying every finite point of ``points``, each within both limits.

        Each batch names the points it carries by ``row_id`` (a column of ``points``) or,
        without one, by position, so a caller can tell exactly which points were sent.
        """
        if row_id is None:
            points = points.with_row_index("__position")
            row_id = "__position"
        frame = points.sort("instance", "metric", "kind", "unit", maintain_order=True)
        finite = frame["value"].is_finite().fill_null(False)
        self.stats.dropped_non_finite += frame.height - int(finite.sum())
        frame = frame.filter(finite)
        if frame.height == 0:
            return
        # Attributes in two halves, each encoded once per distinct value set: the series' own
        # (shared by all its metrics) and the metric's (block kind, io direction, ...).
        attrs = frame["attributes"].struct.unnest()
        halves = []
        for keys in (_SERIES_KEYS, _POINT_KEYS):
            sets = group_rows(attrs.select(keys))
            blocks = [self._block(keys, values) for values in attrs.select(keys)[sets.first].iter_rows()]
            halves.append((blocks, sets.of_row, np.array([len(b) for b in blocks])[sets.of_row]))
        (series_blocks, series_of, series_len), (point_blocks, point_of, point_len) = halves
        fixed = _fixed_fields(frame)
        is_sum = (frame["kind"] == "sum").to_numpy()
        # NumberDataPoint as data_points (field 1): tag, length, attributes, then the fixed fields.
        body = series_len + point_len + np.where(is_sum, 27, 18)
        ends = np.arange(1, frame.height + 1) * 27
        starts = ends - np.where(is_sum, 27, 18)  # gauges have no start time: their last 18 bytes
        varint = wire.varint
        encoded = [b"".join((b"\x0a", varint(n), series_blocks[i], point_blocks[j], fixed[a:z]))
                   for n, i, j, a, z in zip(body.tolist(), series_of.tolist(), point_of.tolist(), starts.tolist(),
                                            ends.tolist())]
        sizes = body + 1 + np.where(body < 128, 1, np.where(body < 16384, 2, 3))
        yield from self._split(_Points(encoded, sizes, np.concatenate([[0], np.cumsum(sizes)]), self._runs(frame),
                                       frame[row_id].to_list()))

    def _runs(self, frame: pl.DataFrame) -> list[_Run]:
        keys = ["instance", "metric", "kind", "unit", "server_address", "server_port", "server_version_num"]
        bounds = frame.select(keys).with_row_index("__at").group_by(pl.struct(keys[:4]).rle_id().alias("__run"), maintain_order=True).agg(
            pl.col("__at").first().alias("start"), pl.col("__at").last().alias("last"), *(pl.col(k).first() for k in keys))
        return [_Run(r["instance"], r["metric"], r["kind"], r["unit"],
                     self._resource(r["instance"], r["server_address"], r["server_port"], r["server_version_num"]),
                     r["start"], r["last"] + 1) for r in bounds.iter_rows(named=True)]

    def _split(self, points: _Points) -> Iterator[Batch]:
        """Greedy batches in point order: full by count or by bytes.

        A run's Metric header (and its instance's resource) is counted with its first point;
        a batch that starts inside a run gets room for one more of each.
        """
        sizes, runs = points.sizes.copy(), points.runs
        seen: set[str] = set()
        for run in runs:
            sizes[run.start] += 64 + len(run.metric) + len(run.unit) + (
                len(run.resource) + 64 if run.instance not in seen else 0)
            seen.add(run.instance)
        slack = 256 + max(64 + len(r.metric) + len(r.unit) + len(r.resource) + 64 for r in runs)
        budget = max(1, self.max_bytes - slack)
        total = np.concatenate([[0], np.cumsum(sizes)])
        start, n = 0, len(sizes)
        while start < n:
            by_bytes = int(np.searchsorted(total, total[start] + budget, side="right")) - 1
            end = max(start + 1, min(n, start + self.batch_size, by_bytes))
            yield from self._requests(points, start, end)
            start = end

    def _requests(self, points: _Points, start: int, end: int) -> Iterator[Batch]:
        """One request, or halves of it should the size estimate have fallen short."""
        batch = self._request(points, start, end)
        if len(batch.payload) <= self.max_bytes or end - start == 1:
            yield batch
        else:
            half = (start + end) // 2
            yield from self._requests(points, start, half)
            yield from self._requests(points, half, end)

    def _request(self, points: _Points, start: int, end: int) -> Batch:
        """The request's bytes, joined once: message lengths are summed, not measured on copies."""
        varint, offsets, encoded = wire.varint, points.offsets, points.encoded
        instances: dict[str, tuple[bytes, list[tuple[list[bytes], int]]]] = {}
        for run in points.runs:
            a, b = max(run.start, start), min(run.end, end)
            if a >= b:
                continue
            tail = _SUM_TAIL if run.kind == "sum" else b""
            data_len = int(offsets[b] - offsets[a]) + len(tail)
            head = (wire.field_bytes(1, run.metric.encode()) + wire.field_bytes(3, run.unit.encode())
                    + varint(((7 if run.kind == "sum" else 5) << 3) | 2) + varint(data_len))
            instances.setdefault(run.instance, (run.resource, []))[1].append(
                ([head, *encoded[a:b], tail], len(head) + data_len))
        pieces: list[bytes] = []
        for resource, metrics in instances.values():
            scope_len = len(_SCOPE) + sum(1 + len(varint(n)) + n for _, n in metrics)
            pieces += [b"\x0a", varint(len(resource) + 1 + len(varint(scope_len)) + scope_len), resource,
                       b"\x12", varint(scope_len), _SCOPE]
            for metric, n in metrics:
                pieces += [b"\x12", varint(n)]
                pieces += metric
        return Batch(b"".join(pieces), end - start, tuple(points.ids[start:end]))


@dataclass(frozen=True)
class _Points:
    """One frame's points, encoded, in request order."""

    encoded: list[bytes]  # each a data_points entry
    sizes: np.ndarray  # len(encoded[i])
    offsets: np.ndarray  # offsets[i] = sum(sizes[:i])
    runs: list[_Run]
    ids: list


@dataclass(frozen=True)
class _Run:
    """Consecutive points of one metric of one instance: one Metric message."""

    instance: str
    metric: str
    kind: str
    unit: str
    resource: bytes
    start: int
    end: int


def decode(payload: bytes) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(payload)
    return request
