"""The exporter: encode points into batches, send each with retries, report what was acknowledged.

Non-retryable answers (refusals) give one clear log line naming the cause and are reported
at once, never retried here: the caller (the shipper) keeps the data and pauses the endpoint.
Retryable ones are retried as the OTLP spec says, up to ``retry_max_attempts``; a batch still
failing then is reported as not acknowledged, and the caller decides what happens to it.
``abort`` ends a send in flight (the shutdown's time is up).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from pgflow.config import Settings
from pgflow.logs import kv
from pgflow.otlp import network as netmod
from pgflow.otlp.encode import Batch, Encoder
from pgflow.otlp.retry import Attempt, RetryPolicy
from pgflow.otlp.transport import GrpcTransport, HttpTransport

log = logging.getLogger("pgflow.export")


@dataclass(frozen=True)
class SendResult:
    acknowledged: bool
    attempts: int
    cause: str = ""  # why it was not acknowledged
    retryable: bool = False  # the last failure could succeed later (endpoint down, throttled)
    rejected_points: int = 0


@dataclass
class ExportStats:
    batches_acked: int = 0
    batches_failed: int = 0
    points_acked: int = 0
    points_rejected: int = 0  # partial_success
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    last_success: float | None = None


def describe_rejection(cause: str, endpoint: str, detail: str) -> str:
    """One line saying why the endpoint refused a batch and what to do about it."""
    backend = "New Relic" if "nr-data.net" in endpoint else "the OTLP endpoint"
    code = cause.removeprefix("http_")
    if cause in ("http_401", "http_403", "UNAUTHENTICATED", "PERMISSION_DENIED"):
        return f"{backend} rejected the license key ({code}): check NEW_RELIC_API_KEY"
    if cause in ("http_413",):
        return f"{backend} refused the payload as too large ({code}): lower PGFLOW_BATCH_SIZE"
    if cause in ("http_400", "INVALID_ARGUMENT"):
        return f"{backend} rejected the payload as invalid ({code}): {detail or 'see the endpoint logs'}"
    return f"{backend} refused the batch ({code}): {detail or 'not retryable'}"


class Exporter:
    """Sends points to one OTLP endpoint (gRPC or HTTP) with the settings' retry policy."""

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] | None = None, signal: str = "metrics") -> None:
        self.endpoint = settings.endpoint
        self.signal = signal
        self.net = settings.network(signal)  # issue 21: TLS files, proxy, timeout, compression
        self.connection_state: str | None = None  # the TLS/proxy cause in force, logged once per change
        transport_cls = GrpcTransport if settings.otlp_protocol == "grpc" else HttpTransport
        self.transport = transport_cls(self.endpoint, settings.export_headers, self.net.timeout, self.net)
        self.encoder = Encoder(service_name=settings.service_name, batch_size=settings.batch_size)
        self.policy = RetryPolicy(settings.retry_initial_delay_secs, settings.retry_max_delay_secs, settings.retry_max_attempts)
        self._aborted = threading.Event()
        self.sleep = sleep or self._aborted.wait  # a pause between retries ends at once on abort()
        self.stats = ExportStats()

    def __repr__(self) -> str:
        return f"Exporter(endpoint={self.endpoint!r})"

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        """End the send in progress and refuse new ones (the shutdown's time is up).

        Closing the transport cancels an in-flight gRPC call and unblocks an HTTP read.
        """
        self._aborted.set()
        self.transport.close()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def send(self, batch: Batch) -> SendResult:
        """Send one batch, retrying retryable failures; never raises for a failed send."""
        attempt: Attempt | None = None
        for n in range(1, self.policy.max_attempts + 1):
            if self._aborted.is_set():
                return SendResult(False, n - 1, "shutdown", retryable=True)
            attempt = self.transport.send(batch.payload)
            if self._aborted.is_set() and not attempt.ok:
                return SendResult(False, n, "shutdown", retryable=True)
            self._connection_state(attempt)
            if attempt.ok:
                self.stats.batches_acked += 1
                self.stats.points_acked += batch.points - attempt.rejected_points
                self.stats.last_success = time.time()
                if attempt.rejected_points:
                    self.stats.points_rejected += attempt.rejected_points
                    log.warning("endpoint rejected some points", extra=kv(rejected=attempt.rejected_points, message=attempt.detail[:200]))
                return SendResult(True, n, rejected_points=attempt.rejected_points)
            if not attempt.retryable:
                self.stats.batches_failed += 1
                self.stats.failures[attempt.cause] += 1
                if attempt.cause not in netmod.CAUSES:  # a TLS/proxy cause has its line, once per change
                    log.error(describe_rejection(attempt.cause, self.endpoint, attempt.detail), extra=kv(points=batch.points, attempts=n))
                return SendResult(False, n, attempt.cause, retryable=False)
            if n < self.policy.max_attempts:
                delay = attempt.delay if attempt.delay is not None else self.policy.backoff(n)
                self.stats.retries[attempt.cause] += 1
                log.info("export failed, retrying", extra=kv(cause=attempt.cause, attempt=n, delay_s=round(delay, 3)))
                self.sleep(delay)
        assert attempt is not None
        self.stats.batches_failed += 1
        self.stats.failures[attempt.cause] += 1
        log.warning(
            "export failed after retries",
            extra=kv(cause=attempt.cause, attempts=self.policy.max_attempts, points=batch.points, endpoint=self.endpoint),
        )
        return SendResult(False, self.policy.max_attempts, attempt.cause, retryable=True)

    def _connection_state(self, attempt: Attempt) -> None:
        """Issue 21: one line when the connection's TLS/proxy state changes (not per retry or window):
        the cause and the setting to change; one line when it works again."""
        cause = attempt.cause if not attempt.ok and attempt.cause in netmod.CAUSES and attempt.cause != netmod.CONNECTION else None
        if attempt.ok or cause is not None:
            if cause != self.connection_state:
                if cause is not None:
                    log.error(
                        netmod.describe(cause, self.endpoint, self.net),
                        extra=kv(cause=cause, signal=self.signal, detail=attempt.detail[:160]),
                    )
                else:
                    log.info(
                        "export connection works again", extra=kv(signal=self.signal, endpoint=self.endpoint, was=self.connection_state)
                    )
            self.connection_state = cause

    def export(self, points: pl.DataFrame) -> list[tuple[Batch, SendResult]]:
        """Encode and send every point; returns each batch with its result, in order."""
        return [(batch, self.send(batch)) for batch in self.encoder.batches(points)]
