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
from pgflow.otlp import wire
from pgflow.schema import ATTRIBUTE_KEYS

MAX_ATTRIBUTE_LENGTH = 4095
MAX_REQUEST_BYTES = 1_000_000  # New Relic's payload limit (before compression)
_DELTA = 1  # AGGREGATION_TEMPORALITY_DELTA
_SUM_TAIL = wire.field_varint(2, _DELTA) + wire.field_varint(3, 1)  # temporality, is_monotonic
_SCOPE = wire.field_bytes(1, wire.field_bytes(1, b"pgflow") + wire.field_bytes(2, __version__.encode()))


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
class _Group:
    """The data points of one metric of one instance within a request."""

    name: str
    kind: str
    unit: str
    points: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        data = b"".join(self.points) + (_SUM_TAIL if self.kind == "sum" else b"")
        body = wire.field_bytes(1, self.name.encode()) + wire.field_bytes(3, self.unit.encode())
        return body + wire.field_bytes(7 if self.kind == "sum" else 5, data)


@dataclass
class Encoder:
    """Turns points frames into requests of at most ``batch_size`` points and ``max_bytes`` bytes.

    Data points are written straight in protobuf wire format; the attribute block of a
    series is encoded once and reused for each of its metrics.
    """

    service_name: str = "pgflow"
    batch_size: int = 1000
    max_bytes: int = MAX_REQUEST_BYTES
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __post_init__(self) -> None:
        self._pairs: dict[tuple[str, str], bytes] = {}
        self._resources: dict[tuple, bytes] = {}

    def _pair(self, key: str, value: str) -> bytes:
        """One encoded ``attributes`` entry; each distinct pair is encoded once."""
        encoded = self._pairs.get((key, value))
        if encoded is None:
            text = value
            if len(text) > MAX_ATTRIBUTE_LENGTH:
                text = text[:MAX_ATTRIBUTE_LENGTH]
                self.stats.truncated_attributes += 1
            if len(self._pairs) > 200_000:  # bounded: a long-running exporter sees ever new texts
                self._pairs.clear()
            encoded = self._pairs[(key, value)] = wire.field_bytes(7, wire.string_kv(key, text))
        return encoded

    def _attributes(self, values: tuple) -> bytes:
        pair = self._pair
        return b"".join([pair(k, v) for k, v in zip(ATTRIBUTE_KEYS, values) if v is not None])

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
        # Encode each distinct attribute set once; points refer to it by index.
        attrs = frame["attributes"].struct.unnest()
        distinct = attrs.unique(maintain_order=True)
        blocks = [self._attributes(values) for values in distinct.iter_rows()]
        block_ids = attrs.join(distinct.with_row_index("block"), on=list(ATTRIBUTE_KEYS), how="left",
                               nulls_equal=True, maintain_order="left")["block"].to_list()
        columns = [frame[c].to_list() for c in ("instance", "metric", "kind", "unit", "server_address",
                                                "server_port", "server_version_num")]
        ids = frame[row_id].to_list()
        fixed = _fixed_fields(frame)
        pending: list[tuple[str, bytes, tuple[str, str, str], bytes, int]] = []
        size = 0
        last_group: tuple | None = None
        varint = wire.varint
        for i, (instance, metric, kind, unit, address, port, version) in enumerate(zip(*columns)):
            # start (sums only), time and value were written for every row at once: slice them.
            tail = fixed[i * 27:(i + 1) * 27] if kind == "sum" else fixed[i * 27 + 9:(i + 1) * 27]
            body = blocks[block_ids[i]] + tail
            point = b"\x0a" + varint(len(body)) + body  # NumberDataPoint as data_points (field 1)
            group = (instance, metric, kind, unit)
            cost = len(point) + (64 + len(metric) + len(unit) if group != last_group else 0)
            if pending and (len(pending) >= self.batch_size or size + cost + 256 > self.max_bytes):
                yield from self._requests(pending)
                pending, size, last_group = [], 0, None
                cost = len(point) + 64 + len(metric) + len(unit)
            last_group = group
            resource = self._resource(instance, address, port, version)
            pending.append((instance, resource, (metric, kind, unit), point, ids[i]))
            size += cost + (len(resource) + 64 if len(pending) == 1 or pending[-2][0] != instance else 0)
        if pending:
            yield from self._requests(pending)

    def _requests(self, items: list) -> Iterator[Batch]:
        """One request, or halves of it should the size estimate have fallen short."""
        batch = self._request(items)
        if len(batch.payload) <= self.max_bytes or len(items) == 1:
            yield batch
        else:
            half = len(items) // 2
            yield from self._requests(items[:half])
            yield from self._requests(items[half:])

    def _request(self, items: list) -> Batch:
        instances: dict[str, tuple[bytes, dict[tuple[str, str, str], _Group]]] = {}
        for instance, resource, (metric, kind, unit), point, _ in items:
            groups = instances.setdefault(instance, (resource, {}))[1]
            group = groups.get((metric, kind, unit))
            if group is None:
                group = groups[(metric, kind, unit)] = _Group(metric, kind, unit)
            group.points.append(point)
        payload = b"".join(
            wire.field_bytes(1, resource + wire.field_bytes(
                2, _SCOPE + b"".join(wire.field_bytes(2, g.encode()) for g in groups.values())))
            for resource, groups in instances.values()
        )
        return Batch(payload, len(items), tuple(i[4] for i in items))


def decode(payload: bytes) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(payload)
    return request
