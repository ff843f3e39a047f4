"""Events frame → ExportLogsServiceRequest bytes (OTLP logs, protobuf wire format written directly).

One ResourceLogs per PostgreSQL instance, with exactly the resource the metrics encoder gives
that instance (so a backend attaches events and metrics to the same entity), one scope
``pgflow``, one LogRecord per event: ``event_name`` (also as the ``event.name`` attribute, for
backends that do not read the field yet), time and observed time, severity, body (a string)
and typed attributes. Attribute values are cut at 4,094 characters (what New Relic keeps
searchable) and bodies at 128 KiB (what it stores at all); both are counted (attributes once per
distinct value: a value is encoded once).
Requests stay under ``batch_size`` records and ``max_bytes`` bytes, exactly as for metrics.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from pgflow import __version__
from pgflow.otlp import wire
from pgflow.otlp.encode import MAX_REQUEST_BYTES, Batch, Encoder

MAX_ATTRIBUTE_CHARS = 4094  # New Relic: the first 4,094 characters of an attribute are searchable
MAX_BODY_BYTES = 128 * 1024  # New Relic: up to 128 KB more is stored, the rest is cut
SEVERITY_NUMBERS = {"TRACE": 1, "DEBUG": 5, "INFO": 9, "WARN": 13, "ERROR": 17, "FATAL": 21}

_SCOPE = wire.field_bytes(1, wire.field_bytes(1, b"pgflow") + wire.field_bytes(2, __version__.encode()))
_DOUBLE = struct.Struct("<d")
# Attributes whose values are new with almost every event: encoded, not kept.
_PER_EVENT = frozenset({"postgresql.pid", "postgresql.query_start", "postgresql.query.duration", "postgresql.blocking.root.pid"})


@dataclass
class LogEncodeStats:
    truncated_attributes: int = 0
    truncated_bodies: int = 0


def any_value(value: object) -> bytes:
    """An AnyValue message: strings, booleans, integers and floats typed; anything else as JSON text."""
    if isinstance(value, bool):
        return wire.field_varint(2, int(value))
    if isinstance(value, int):
        return wire.field_varint(3, value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, default=str)
    return wire.field_bytes(1, value.encode("utf-8", "replace"))


_TIME_FIXED = np.dtype([("t1", "u1"), ("time", "<u8"), ("t2", "u1"), ("observed", "<u8")])


def _stamps(frame: pl.DataFrame) -> list[bytes]:
    """Per event: time_unix_nano and observed_time_unix_nano (both the event's time), 18 bytes."""
    n = frame.height
    out = np.zeros(n, dtype=_TIME_FIXED)
    out["t1"], out["t2"] = (1 << 3) | 1, (11 << 3) | 1
    out["time"] = out["observed"] = frame["time"].dt.epoch("ns").fill_null(0).to_numpy().astype(np.uint64)
    flat = out.tobytes()
    return [flat[i : i + 18] for i in range(0, 18 * n, 18)]


def _numeric_entries(head: bytes, series: pl.Series) -> list[bytes]:
    """The ``attributes`` entries of an Int64 (int_value, varint) or Float64 (double_value) column,
    built as one byte matrix (left-aligned, sliced per row); nulls give b""."""
    n = len(series)
    is_float = series.dtype == pl.Float64
    if is_float:
        bits = series.fill_null(0).to_numpy().astype(np.float64).view(np.uint64)
        widths = np.full(n, 8)
    else:
        bits = series.fill_null(0).to_numpy().astype(np.int64).view(np.uint64)
        widths = np.ones(n, np.int64)
        for k in range(1, 10):
            widths += (bits >> np.uint64(7 * k)) != 0
    any_len = 1 + widths
    kv_len = len(head) + 1 + any_len
    fixed = 2 + len(head) + 2
    width = fixed + 10
    table = np.zeros((n, width), np.uint8)
    table[:, 0] = 0x32
    table[:, 1] = kv_len
    table[:, 2 : 2 + len(head)] = np.frombuffer(head, np.uint8)
    table[:, 2 + len(head)] = any_len
    table[:, 3 + len(head)] = 0x21 if is_float else 0x18
    if is_float:
        table[:, fixed : fixed + 8] = bits.view(np.uint8).reshape(n, 8)
    else:
        for k in range(10):
            byte = (bits >> np.uint64(7 * k)) & np.uint64(0x7F)
            more = np.where(widths > k + 1, 0x80, 0).astype(np.uint64)
            table[:, fixed + k] = np.where(widths > k, byte | more, 0).astype(np.uint8)
    flat = table.tobytes()
    ends = (np.arange(n) * width + fixed + widths).tolist()
    valid = series.is_not_null().to_list()
    return [flat[i * width : end] if ok else b"" for i, (end, ok) in enumerate(zip(ends, valid))]


@dataclass
class LogEncoder:
    """Turns events frames (``pgflow.schema.EVENTS``) into requests within both limits.

    Column by column: each distinct value of a column is encoded once (and kept, bounded, for
    the next frames: databases, users, texts and fingerprints repeat), then each record is
    joined from its columns' pieces.
    """

    service_name: str = "pgflow"
    batch_size: int = 1000
    max_bytes: int = MAX_REQUEST_BYTES
    stats: LogEncodeStats = field(default_factory=LogEncodeStats)

    def __post_init__(self) -> None:
        # The metrics encoder owns the resource of an instance; events reuse it verbatim.
        self._metrics = Encoder(service_name=self.service_name)
        self._pieces: dict[str, dict[Any, bytes]] = {}  # column → value → its encoded piece

    def _attribute(self, key: str, value: object) -> bytes:
        return self._attribute_encoder(key)(value)

    def _attribute_encoder(self, key: str) -> Callable[[object], bytes]:
        """A function value → the encoded ``attributes`` entry of ``key`` (key bytes made once)."""
        head = wire.field_bytes(1, key.encode()) + b"\x12"
        varint = wire.varint

        def encode(value: object) -> bytes:
            if isinstance(value, str):
                if len(value) > MAX_ATTRIBUTE_CHARS:
                    value = value[:MAX_ATTRIBUTE_CHARS]
                    self.stats.truncated_attributes += 1
                raw = value.encode("utf-8", "replace")
                any_bytes = b"\x0a" + varint(len(raw)) + raw
            else:
                any_bytes = any_value(value)
            kv = head + varint(len(any_bytes)) + any_bytes
            return b"\x32" + varint(len(kv)) + kv

        return encode

    def _body(self, body: str) -> bytes:
        raw = body.encode("utf-8", "replace")
        if len(raw) > MAX_BODY_BYTES:
            raw = raw[:MAX_BODY_BYTES].decode("utf-8", "ignore").encode()
            self.stats.truncated_bodies += 1
        return wire.field_bytes(5, wire.field_bytes(1, raw))

    @staticmethod
    def _severity(severity: str | None) -> bytes:
        text = (severity or "INFO").upper()
        return wire.field_varint(2, SEVERITY_NUMBERS.get(text, 9)) + wire.field_bytes(3, text.encode())

    def _column(self, name: str, values: list[Any], encode: Callable[[Any], bytes], keep: bool = True) -> list[bytes]:
        """Each value's piece (b"" for null), every distinct value encoded once."""
        cache = self._pieces.get(name) if keep else None
        if cache is None:
            cache = {None: b""}
            if keep:
                self._pieces[name] = cache
        elif len(cache) > 50_000:  # bounded: a long run sees ever new texts
            cache.clear()
            cache[None] = b""
        for value in set(values).difference(cache):
            cache[value] = encode(value)
        return list(map(cache.__getitem__, values))

    def records(self, events: pl.DataFrame) -> list[bytes]:
        """Each event's ``log_records`` entry of a ScopeLogs (tag, length, LogRecord), in frame order."""
        names = events["event_name"].to_list()
        columns = [
            _stamps(events),
            self._column("severity", events["severity"].to_list(), self._severity),
            self._column("body", events["body"].to_list(), self._body, keep=False),
            self._column("event.name", names, lambda v: self._attribute("event.name", v)),
        ]
        attrs = events["attributes"].struct.unnest()
        for key in attrs.columns:
            if attrs[key].null_count() == events.height:
                continue
            if attrs[key].dtype in (pl.Int64, pl.Float64) and key in _PER_EVENT:
                columns.append(_numeric_entries(wire.field_bytes(1, key.encode()) + b"\x12", attrs[key]))
            else:
                columns.append(self._column(key, attrs[key].to_list(), self._attribute_encoder(key), keep=key not in _PER_EVENT))
        columns.append(self._column("event_name", names, lambda v: wire.field_bytes(12, v.encode())))
        varint = wire.varint
        messages = [b"".join(parts) for parts in zip(*columns)]
        return [b"".join((b"\x12", varint(len(m)), m)) for m in messages]

    def batches(self, events: pl.DataFrame, row_id: str | None = None) -> Iterator[Batch]:
        """Requests carrying every event of ``events``, each within ``batch_size`` and ``max_bytes``.

        Each batch names the events it carries by ``row_id`` (a column) or by position.
        """
        if events.height == 0:
            return
        ids = events[row_id].to_list() if row_id else list(range(events.height))
        records = self.records(events)
        groups: dict[tuple[Any, ...], tuple[bytes, list[int]]] = {}
        heads = events.select("instance", "server_address", "server_port", "server_version_num").rows()
        for i, key in enumerate(heads):
            group = groups.get(key)
            if group is None:
                instance, address, port, version = key
                group = groups[key] = (self._metrics._resource(instance, address or "", port or 0, version or 0), [])
            group[1].append(i)
        yield from self._split(records, list(groups.values()), ids)

    def _split(self, records: list[bytes], groups: list[tuple[bytes, list[int]]], ids: list[int]) -> Iterator[Batch]:
        """Greedy requests, instance after instance: full by count or by bytes (sizes are exact,
        plus a little slack per resource for the varints of the enclosing lengths)."""
        current: list[tuple[bytes, list[int]]] = []
        size = count = 0
        for resource, rows in groups:
            overhead = len(resource) + len(_SCOPE) + 24
            taken: list[int] = []
            for i in rows:
                cost = len(records[i])
                fresh = overhead if not taken else 0
                if count and (count >= self.batch_size or size + cost + fresh > self.max_bytes):
                    if taken:
                        current.append((resource, taken))
                    yield self._request(records, current, ids)
                    current, taken, size, count, fresh = [], [], 0, 0, overhead
                taken.append(i)
                size += cost + fresh
                count += 1
            if taken:
                current.append((resource, taken))
        if current:
            yield self._request(records, current, ids)

    def _request(self, records: list[bytes], groups: list[tuple[bytes, list[int]]], ids: list[int]) -> Batch:
        pieces: list[bytes] = []
        carried: list[int] = []
        for resource, rows in groups:
            scope = [_SCOPE] + [records[i] for i in rows]
            scope_logs = wire.field_bytes(2, b"".join(scope))
            pieces.append(wire.field_bytes(1, resource + scope_logs))
            carried += [ids[i] for i in rows]
        return Batch(b"".join(pieces), len(carried), tuple(carried))


def events_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """An events frame from dicts (``attributes`` a dict of EVENT_ATTRIBUTE_TYPES keys); for producers and tests."""
    from pgflow.schema import EVENT_ATTRIBUTE_TYPES, EVENTS

    for row in rows:
        unknown = set(row.get("attributes") or {}) - set(EVENT_ATTRIBUTE_TYPES)
        if unknown:
            raise ValueError(f"unknown event attribute {sorted(unknown)[0]!r}: add it to schema.EVENT_ATTRIBUTE_TYPES")
    shaped = [dict(r, attributes={k: (r.get("attributes") or {}).get(k) for k in EVENT_ATTRIBUTE_TYPES}) for r in rows]
    return pl.DataFrame(shaped, schema=EVENTS) if shaped else pl.DataFrame(schema=EVENTS)


def decode(payload: bytes) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    request.ParseFromString(payload)
    return request
