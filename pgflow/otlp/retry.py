"""Retry decisions exactly as the OTLP specification gives them, and the backoff between tries.

gRPC: UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, DATA_LOSS are
retryable; RESOURCE_EXHAUSTED only when the server sent RetryInfo. HTTP: 429, 502, 503 and
504 are retryable, every other 4xx/5xx is not. A server-given delay (Retry-After, RetryInfo)
is honoured; otherwise exponential backoff with jitter. Refused and reset connections are
retried too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRYABLE_GRPC = frozenset({"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "DATA_LOSS"})
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Attempt:
    """The outcome of one send."""

    ok: bool
    cause: str = ""  # "UNAVAILABLE", "http_503", "connection", ...
    retryable: bool = False
    delay: float | None = None  # what the server asked us to wait
    rejected_points: int = 0  # partial_success
    detail: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 1.0
    max_delay: float = 30.0
    max_attempts: int = 5

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``retry`` (1-based): exponential, capped, with equal jitter."""
        ceiling = min(self.max_delay, self.initial_delay * (2.0 ** (retry - 1)))  # int ** int is Any to mypy
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def grpc_retryable(code_name: str, has_retry_info: bool) -> bool:
    return code_name in RETRYABLE_GRPC or (code_name == "RESOURCE_EXHAUSTED" and has_retry_info)


def http_retryable(status: int) -> bool:
    return status in RETRYABLE_HTTP


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
