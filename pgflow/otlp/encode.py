"""Points frame → ExportMetricsServiceRequest bytes (the message of opentelemetry-proto).

One ResourceMetrics per PostgreSQL instance (``service.instance.id``: see :func:`instance_id`), one
scope ``pgflow``, one Metric per (name, kind, unit) holding its data points. Sums are
DELTA and monotonic; gauges carry the time they were observed. Counts travel as ``as_int``,
durations as ``as_double``. NaN and infinite values are dropped and counted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any
from urllib.parse import unquote

import numpy as np
import polars as pl
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from pgflow import __version__
from pgflow.config import is_local_address
from pgflow.ops.groups import Groups, group_rows
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


_FIXED = np.dtype([("t_start", "u1"), ("start", "<u8"), ("t_time", "u1"), ("time", "<u8"), ("t_value", "u1"), ("value", "<u8")])


def _fixed_fields(frame: pl.DataFrame) -> np.ndarray:
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
    return out.view(np.uint8).reshape(n, 27)


def _prefixes(fixed: np.ndarray, is_sum: np.ndarray, attr_len: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Per point: the data_points tag, the entry's length (varint) and its fixed fields;
    and each entry's whole size. Built as one matrix, right-aligned, sliced per point."""
    n = len(is_sum)
    fixed_len = np.where(is_sum, 27, 18)
    body = attr_len + fixed_len
    width = np.where(body < 1 << 7, 1, np.where(body < 1 << 14, 2, np.where(body < 1 << 21, 3, 4)))
    rows = np.arange(n)
    table = np.zeros((n, 32), np.uint8)
    table[:, 5:] = fixed
    at = 32 - fixed_len - width  # where the varint starts; the tag sits just before it
    table[rows, at - 1] = 0x0A
    for i in range(4):  # little-endian base-128, continuation bit on all but the last byte
        has = width > i
        byte = (body >> (7 * i)) & 0x7F | np.where(width > i + 1, 0x80, 0)
        table[rows[has], at[has] + i] = byte[has]
    flat = table.tobytes()
    starts = (rows * 32 + at - 1).tolist()
    ends = ((rows + 1) * 32).tolist()
    return [flat[a:z] for a, z in zip(starts, ends)], 1 + width + body


# pgflow's own resource keys: per instance, so a process-wide variable cannot set them.
OWN_RESOURCE_KEYS = (
    "service.instance.id",
    "server.address",
    "server.port",
    "db.system.name",
    "db.system.version",
    "postgresql.instance.name",
)


def env_resource_attributes() -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` (``k1=v1,k2=v2``, values URL-encoded) and ``OTEL_SERVICE_NAME``."""
    out: dict[str, str] = {}
    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[unquote(key.strip())] = unquote(value.strip())
    if os.environ.get("OTEL_SERVICE_NAME", "").strip():
        out["service.name"] = os.environ["OTEL_SERVICE_NAME"].strip()
    return out


def instance_id(instance: str, address: str) -> str:
    """``service.instance.id``: the instance's name (configured, or ``host:port`` of the DSN),
    and ``@<this host's name>`` when the address is loopback or a socket, which names no host:
    every sidecar reaching ``localhost:5432`` would otherwise be one New Relic entity."""
    return f"{instance}@{socket.gethostname()}" if is_local_address(address) else instance


def resource_attributes(instance: str, address: str, port: int, version_num: int, service_name: str) -> dict[str, object]:
    """The resource of one PostgreSQL instance (New Relic keys its entity on service.instance.id).

    Precedence: pgflow's per-instance keys (:data:`OWN_RESOURCE_KEYS`) always; then
    ``OTEL_RESOURCE_ATTRIBUTES`` (and ``OTEL_SERVICE_NAME`` for ``service.name``) over pgflow's
    default ``service.name``; a ``service_name`` set in pgflow's settings wins over both.
    """
    major, minor = divmod(int(version_num or 0), 10000)
    env = env_resource_attributes()
    attrs: dict[str, object] = {k: v for k, v in env.items() if k not in OWN_RESOURCE_KEYS}
    if service_name != "pgflow" or "service.name" not in env:
        attrs["service.name"] = service_name
    attrs.update(
        {
            "service.instance.id": instance_id(instance, address) if instance else f"{address}:{port}",
            "server.address": address,
            "server.port": int(port) if port else None,
            "db.system.name": "postgresql",
            "db.system.version": f"{major}.{minor}" if version_num else "",
            "postgresql.instance.name": instance,
        }
    )
    if is_local_address(address) and "host.name" not in attrs:
        attrs["host.name"] = socket.gethostname()
    return {k: v for k, v in attrs.items() if v not in (None, "")}


def _resource_bytes(attrs: dict[str, object]) -> bytes:
    encoded = b"".join(
        wire.field_bytes(1, wire.int_kv(k, v) if isinstance(v, int) else wire.string_kv(k, str(v))) for k, v in attrs.items()
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
        self._blocks: dict[tuple[str, ...], dict[tuple[int, int], bytes]] = {}
        self._resources: dict[tuple[str, str, int, int], bytes] = {}

    def _encode_block(self, keys: tuple[str, ...], values: tuple[str | None, ...]) -> bytes:
        """The encoded ``attributes`` entries of ``keys`` = ``values`` (None: absent)."""
        entries = []
        for key, value in zip(keys, values):
            if value is None:
                continue
            if len(value) > MAX_ATTRIBUTE_LENGTH:
                value = value[:MAX_ATTRIBUTE_LENGTH]
                self.stats.truncated_attributes += 1
            entries.append(wire.field_bytes(7, wire.string_kv(key, value)))
        return b"".join(entries)

    def _blocks_of(self, keys: tuple[str, ...], values: pl.DataFrame, sets: Groups) -> list[bytes]:
        """The block of each distinct set; sets seen in earlier windows come from the cache,
        keyed by the 128 bits of the two row hashes, so their values are not even read."""
        if sets.digest is None:  # grouped by value (a hash collision): encode, cache nothing
            return [self._encode_block(keys, v) for v in values[sets.first].iter_rows()]
        cache = self._blocks.setdefault(keys, {})
        if len(cache) > 100_000:  # bounded: a long-running exporter sees ever new texts
            cache.clear()
        digests = list(zip(sets.digest[:, 0].tolist(), sets.digest[:, 1].tolist()))
        missing = [g for g, d in enumerate(digests) if d not in cache]
        if missing:
            for g, v in zip(missing, values[sets.first[missing]].iter_rows()):
                cache[digests[g]] = self._encode_block(keys, v)
        return [cache[d] for d in digests]

    def _resource(self, instance: str, address: str, port: int, version: int) -> bytes:
        key = (instance, address, port, version)
        block = self._resources.get(key)
        if block is None:
            block = self._resources[key] = _resource_bytes(resource_attributes(instance, address, port, version, self.service_name))
        return block

    def batches(self, points: pl.DataFrame, row_id: str | None = None) -> Iterator[Batch]:
        """Requests carrying every finite point of ``points``, each within both limits.

        Each batch names the points it carries by ``row_id`` (a column of ``points``) or,
        without one, by position, so a caller can tell exactly which points were sent.
        """
        if row_id is None:
            points = points.with_row_index("__position")
            row_id = "__position"
        values = points["value"].to_numpy()
        finite = np.isfinite(values)
        if not finite.all():
            self.stats.dropped_non_finite += int(len(finite) - finite.sum())
            points = points.filter(pl.Series(finite))
        if points.height == 0:
            return
        frame, runs = self._grouped(points)
        # Attributes in two halves, each encoded once per distinct value set: the series' own
        # (shared by all its metrics) and the metric's (block kind, io direction, ...).
        n = frame.height
        attrs = frame["attributes"].struct.unnest()
        attr_len = np.zeros(n, np.int64)
        halves = []
        for keys in (_SERIES_KEYS, _POINT_KEYS):
            key_values = attrs.select(keys)
            sets = group_rows(key_values)
            blocks = self._blocks_of(keys, key_values, sets)
            attr_len += np.array([len(b) for b in blocks], np.int64)[sets.of_row]
            halves.append(list(map(blocks.__getitem__, sets.of_row.tolist())))
        is_sum = (frame["kind"] == "sum").to_numpy()
        prefixes, sizes = _prefixes(_fixed_fields(frame), is_sum, attr_len)
        # One NumberDataPoint after another: its fixed fields first (protobuf fields may come
        # in any order), then the two attribute blocks.
        blob = b"".join(chain.from_iterable(zip(prefixes, *halves)))
        yield from self._split(_Points(memoryview(blob), np.concatenate([[0], np.cumsum(sizes)]), runs, frame[row_id].to_list()))

    def _grouped(self, points: pl.DataFrame) -> tuple[pl.DataFrame, list[_Run]]:
        """``points`` with the points of each metric of each instance contiguous (one Metric
        message each), in first-seen order; rows are moved only if a metric comes back later."""
        keys = ["instance", "metric", "kind", "unit", "server_address", "server_port", "server_version_num"]
        run_of_row = points.select(pl.struct(keys[:4]).rle_id()).to_series().to_numpy()
        starts = np.flatnonzero(np.diff(run_of_row, prepend=-1))
        ends = np.append(starts[1:], points.height)
        heads = points.select(keys)[starts].rows()
        order: dict[tuple[Any, ...], list[int]] = {}
        for r, head in enumerate(heads):
            order.setdefault(head[:4], []).append(r)
        if len(order) < len(heads):  # a metric in two places: gather its rows
            perm = np.concatenate([np.arange(starts[r], ends[r]) for rs in order.values() for r in rs])
            points = points[perm]
        runs, at = [], 0
        for rs in order.values():
            instance, metric, kind, unit, address, port, version = heads[rs[0]]
            size = int(sum(ends[r] - starts[r] for r in rs))
            runs.append(_Run(instance, metric, kind, unit, self._resource(instance, address, port, version), at, at + size))
            at += size
        return points, runs

    def _split(self, points: _Points) -> Iterator[Batch]:
        """Greedy batches in point order: full by count or by bytes.

        A run's Metric header (and its instance's resource) is counted with its first point;
        a batch that starts inside a run gets room for one more of each.
        """
        sizes, runs = np.diff(points.offsets), points.runs
        seen: set[str] = set()
        for run in runs:
            sizes[run.start] += 64 + len(run.metric) + len(run.unit) + (len(run.resource) + 64 if run.instance not in seen else 0)
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
        varint, offsets, blob = wire.varint, points.offsets, points.blob
        instances: dict[str, tuple[bytes, list[tuple[list[bytes | memoryview], int]]]] = {}
        for run in points.runs:
            a, b = max(run.start, start), min(run.end, end)
            if a >= b:
                continue
            tail = _SUM_TAIL if run.kind == "sum" else b""
            data_len = int(offsets[b] - offsets[a]) + len(tail)
            head = (
                wire.field_bytes(1, run.metric.encode())
                + wire.field_bytes(3, run.unit.encode())
                + varint(((7 if run.kind == "sum" else 5) << 3) | 2)
                + varint(data_len)
            )
            instances.setdefault(run.instance, (run.resource, []))[1].append(
                ([head, blob[offsets[a] : offsets[b]], tail], len(head) + data_len)
            )
        pieces: list[bytes | memoryview] = []
        for resource, metrics in instances.values():
            scope_len = len(_SCOPE) + sum(1 + len(varint(n)) + n for _, n in metrics)
            pieces += [
                b"\x0a",
                varint(len(resource) + 1 + len(varint(scope_len)) + scope_len),
                resource,
                b"\x12",
                varint(scope_len),
                _SCOPE,
            ]
            for metric, n in metrics:
                pieces += [b"\x12", varint(n)]
                pieces += metric
        return Batch(b"".join(pieces), end - start, tuple(points.ids[start:end]))


@dataclass(frozen=True)
class _Points:
    """One frame's points, encoded, in request order."""

    blob: memoryview  # every data_points entry, one after another
    offsets: np.ndarray  # where entry i starts (and, last, where the blob ends)
    runs: list[_Run]
    ids: list[int]  # the ``row_id`` column's values (or positions)


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
