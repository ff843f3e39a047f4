"""Events frame → ExportLogsServiceRequest bytes (OTLP logs, protobuf wire format written directly).

One ResourceLogs per PostgreSQL instance, with exactly the resource the metrics encoder gives
that instance (so a backend attaches events and metrics to the same entity), one scope
``pgflow``, one LogRecord per event: ``event_name`` (also as the ``event.name`` attribute, for
backends that do not read the field yet), time and observed time, severity, body (a string)
and typed attributes. Attribute values are cut at 4,094 characters (what New Relic keeps
searchable) and bodies at 128 KiB (what it stores at all); both are counted.
Requests stay under ``batch_size`` records and ``max_bytes`` bytes, exactly as for metrics.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import polars as pl
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from pgflow import __version__
from pgflow.otlp import wire
from pgflow.otlp.encode import MAX_REQUEST_BYTES, Batch, Encoder

MAX_ATTRIBUTE_CHARS = 4094  # New Relic: the first 4,094 characters of an attribute are searchable
MAX_BODY_BYTES = 128 * 1024  # New Relic: up to 128 KB more is stored, the rest is cut
SEVERITY_NUMBERS = {"TRACE": 1, "DEBUG": 5, "INFO": 9, "WARN": 13, "ERROR": 17, "FATAL": 21}

_SCOPE = wire.field_bytes(1, wire.field_bytes(1, b"pgflow") + wire.field_bytes(2, __version__.encode()))
_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_TIME_TAG = wire.varint((1 << 3) | 1)
_OBSERVED_TAG = wire.varint((11 << 3) | 1)
_ATTR_TAG = wire.varint((6 << 3) | 2)


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


@dataclass
class LogEncoder:
    """Turns events frames (``pgflow.schema.EVENTS``) into requests within both limits."""

    service_name: str = "pgflow"
    batch_size: int = 1000
    max_bytes: int = MAX_REQUEST_BYTES
    stats: LogEncodeStats = field(default_factory=LogEncodeStats)

    def __post_init__(self) -> None:
        # The metrics encoder owns the resource of an instance; events reuse it verbatim.
        self._metrics = Encoder(service_name=self.service_name)
        self._keys: dict[str, bytes] = {}

    def _key(self, key: str) -> bytes:
        encoded = self._keys.get(key)
        if encoded is None:
            encoded = self._keys[key] = wire.field_bytes(1, key.encode())
        return encoded

    def _attribute(self, key: str, value: object) -> bytes:
        if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_CHARS:
            value = value[:MAX_ATTRIBUTE_CHARS]
            self.stats.truncated_attributes += 1
        kv = self._key(key) + wire.field_bytes(2, any_value(value))
        return _ATTR_TAG + wire.varint(len(kv)) + kv

    def record(self, event_name: str, time_ns: int, severity: str | None, body: str | None,
               attributes: dict[str, object]) -> bytes:
        """One LogRecord message (without its tag and length)."""
        severity = (severity or "INFO").upper()
        stamp = _FIXED64.pack(time_ns & 0xFFFFFFFFFFFFFFFF)
        parts = [_TIME_TAG, stamp, _OBSERVED_TAG, stamp,
                 wire.field_varint(2, SEVERITY_NUMBERS.get(severity, 9)), wire.field_bytes(3, severity.encode())]
        if body is not None:
            raw = body.encode("utf-8", "replace")
            if len(raw) > MAX_BODY_BYTES:
                raw = raw[:MAX_BODY_BYTES].decode("utf-8", "ignore").encode()
                self.stats.truncated_bodies += 1
            parts.append(wire.field_bytes(5, wire.field_bytes(1, raw)))
        if "event.name" not in attributes:
            parts.append(self._attribute("event.name", event_name))
        for key, value in attributes.items():
            if value is not None:
                parts.append(self._attribute(key, value))
        parts.append(wire.field_bytes(12, event_name.encode()))
        return b"".join(parts)

    def batches(self, events: pl.DataFrame, row_id: str | None = None) -> Iterator[Batch]:
        """Requests carrying every event of ``events``, each within ``batch_size`` and ``max_bytes``.

        Each batch names the events it carries by ``row_id`` (a column) or by position.
        """
        if events.height == 0:
            return
        ids = events[row_id].to_list() if row_id else list(range(events.height))
        times = events["time"].dt.epoch("ns").fill_null(0).to_list()
        groups: dict[tuple, tuple[bytes, list[int]]] = {}
        records: list[bytes] = []
        columns = ("instance", "server_address", "server_port", "server_version_num", "event_name", "severity",
                   "body", "attributes")
        for i, (instance, address, port, version, name, severity, body, attributes) in enumerate(
                events.select(columns).iter_rows()):
            records.append(self.record(name, times[i], severity, body, json.loads(attributes) if attributes else {}))
            key = (instance, address, port, version)
            group = groups.get(key)
            if group is None:
                group = groups[key] = (self._metrics._resource(instance, address or "", port or 0, version or 0), [])
            group[1].append(i)
        yield from self._split(records, list(groups.values()), ids)

    def _split(self, records: list[bytes], groups: list[tuple[bytes, list[int]]], ids: list) -> Iterator[Batch]:
        """Greedy requests, instance after instance: full by count or by bytes (sizes are exact,
        plus a little slack per resource for the varints of the enclosing lengths)."""
        current: list[tuple[bytes, list[int]]] = []
        size = count = 0
        for resource, rows in groups:
            overhead = len(resource) + len(_SCOPE) + 24
            taken: list[int] = []
            for i in rows:
                cost = len(records[i]) + 6
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

    def _request(self, records: list[bytes], groups: list[tuple[bytes, list[int]]], ids: list) -> Batch:
        pieces: list[bytes] = []
        carried: list = []
        for resource, rows in groups:
            scope = [_SCOPE] + [wire.field_bytes(2, records[i]) for i in rows]
            scope_logs = wire.field_bytes(2, b"".join(scope))
            pieces.append(wire.field_bytes(1, resource + scope_logs))
            carried += [ids[i] for i in rows]
        return Batch(b"".join(pieces), len(carried), tuple(carried))


def events_frame(rows: list[dict]) -> pl.DataFrame:
    """An events frame from dicts (``attributes`` as a dict); for producers and tests."""
    from pgflow.schema import EVENTS

    shaped = [dict(r, attributes=json.dumps(r.get("attributes") or {}, sort_keys=True, default=str)) for r in rows]
    return pl.DataFrame(shaped, schema=EVENTS) if shaped else pl.DataFrame(schema=EVENTS)


def decode(payload: bytes) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    request.ParseFromString(payload)
    return request
