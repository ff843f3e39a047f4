"""The few protobuf wire-format primitives the encoder needs (proto3, opentelemetry-proto's field numbers).

Writing bytes directly lets the encoder reuse the encoded attribute block of a series for
every metric of that series, which message classes cannot do. Tests decode every request
with the official opentelemetry-proto classes.
"""

from __future__ import annotations


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_SMALL = [_varint(i) for i in range(1 << 14)]


def varint(n: int) -> bytes:
    """Unsigned LEB128; sizes under 16 KiB come from a table."""
    return _SMALL[n] if n < 16384 else _varint(n)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, embedded messages)."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def string_kv(key: str, value: str) -> bytes:
    """KeyValue{key, AnyValue{string_value}} as a repeated ``attributes`` entry's payload."""
    return field_bytes(1, key.encode()) + field_bytes(2, field_bytes(1, value.encode("utf-8", "replace")))


def int_kv(key: str, value: int) -> bytes:
    return field_bytes(1, key.encode()) + field_bytes(2, field_varint(3, value & 0xFFFFFFFFFFFFFFFF))
