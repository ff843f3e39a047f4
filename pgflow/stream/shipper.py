"""The shipper: one thread per process that sends outbox entries, so no worker ever waits on the network.

The operator hands it ``(instance, seq, points)``; it encodes and sends batch by batch with
the exporter's retries, and reports back through the instance's ledger: acknowledged rows
(made durable first), rows given up after a non-retryable answer (counted, never resent),
and entries to try again later when the endpoint stays unreachable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import polars as pl

from pgflow import telemetry
from pgflow.logs import kv
from pgflow.otlp.exporter import Exporter
from pgflow.stream.ledger import ROW, Ledger

log = logging.getLogger("pgflow.ship")


@dataclass(frozen=True)
class Outgoing:
    """An outbox entry on its way to the endpoint."""

    instance: str
    seq: int
    points: pl.DataFrame


class Shipper:
    def __init__(self, exporter: Exporter, retry_after_secs: float) -> None:
        self.exporter = exporter
        self.retry_after_secs = retry_after_secs
        self._queue: queue.Queue[tuple[Outgoing, Ledger] | None] = queue.Queue()
        self._lock = threading.Lock()
        self.failed: dict[tuple[str, int], float] = {}  # (instance, seq) -> when to try again
        self.in_flight: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._run, name="pgflow-shipper", daemon=True)
        self._thread.start()

    def submit(self, item: Outgoing, ledger: Ledger) -> None:
        with self._lock:
            key = (item.instance, item.seq)
            if key in self.in_flight:
                return
            self.in_flight.add(key)
            self.failed.pop(key, None)
        self._queue.put((item, ledger))

    def busy(self, instance: str, seq: int) -> bool:
        with self._lock:
            return (instance, seq) in self.in_flight

    def retry_due(self, instance: str, seq: int) -> bool:
        """Whether a failed entry may be sent again (it is not in flight and its pause is over)."""
        with self._lock:
            key = (instance, seq)
            return key not in self.in_flight and self.failed.get(key, 0.0) <= time.monotonic()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self.exporter.close()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            item, ledger = job
            try:
                self._ship(item, ledger)
            except Exception as exc:  # a bug here must not stop shipping for good
                log.error("shipping failed unexpectedly", extra=kv(instance=item.instance, error=repr(exc)[:300]))
                self._mark_failed(item)
            finally:
                with self._lock:
                    self.in_flight.discard((item.instance, item.seq))

    def _mark_failed(self, item: Outgoing) -> None:
        with self._lock:
            self.failed[(item.instance, item.seq)] = time.monotonic() + self.retry_after_secs

    def _ship(self, item: Outgoing, ledger: Ledger) -> None:
        encoder = self.exporter.encoder
        dropped_before = encoder.stats.dropped_non_finite
        sent_rows: list[int] = []
        for batch in encoder.batches(item.points, row_id=ROW):
            started = time.monotonic()
            retries_before = dict(self.exporter.stats.retries)
            result = self.exporter.send(batch)
            telemetry.export_duration.observe(time.monotonic() - started)
            for cause, count in self.exporter.stats.retries.items():
                if count > retries_before.get(cause, 0):
                    telemetry.export_retries.labels(cause).inc(count - retries_before.get(cause, 0))
            if result.acknowledged:
                ledger.record_ack(item.seq, list(batch.rows))
                telemetry.points_exported.inc(batch.points - result.rejected_points)
                telemetry.last_export.set(time.time())
                if result.rejected_points:
                    telemetry.points_dropped.labels("rejected_by_endpoint").inc(result.rejected_points)
                sent_rows.extend(batch.rows)
            elif not result.retryable:
                telemetry.export_failures.labels(result.cause).inc()
                telemetry.points_dropped.labels(f"refused_{result.cause}").inc(batch.points)
                ledger.record_ack(item.seq, list(batch.rows))  # given up: never sent again
                sent_rows.extend(batch.rows)
            else:
                telemetry.export_failures.labels(result.cause).inc()
                log.warning("endpoint unreachable; the window stays queued", extra=kv(
                    instance=item.instance, seq=item.seq, cause=result.cause, retry_in_s=self.retry_after_secs))
                self._mark_failed(item)
                return
        dropped = encoder.stats.dropped_non_finite - dropped_before
        if dropped:
            telemetry.points_dropped.labels("non_finite").inc(dropped)
        # Rows never put in a batch (non-finite values) are done as well.
        rest = item.points.filter(~pl.col(ROW).is_in(sent_rows))[ROW].to_list()
        if rest:
            ledger.record_ack(item.seq, rest)
