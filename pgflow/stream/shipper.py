"""The shipper: one thread per process that sends outbox entries, so no worker ever waits on the network.

The operator hands it ``(instance, seq, frame, kind)``: a window's points, or events (plans,
query samples: issue 12) sent as OTLP logs through the logs exporter. It encodes and sends
batch by batch with the exporter's retries, and reports back through the instance's ledger:
acknowledged rows (made durable first), and entries to try again later when the endpoint stays
unreachable. Both kinds share the sequence numbers, the acknowledgements and the pauses'
rules: a refused key (401, 403) pauses both, since the same key sends both; a refused address
(404, UNIMPLEMENTED) pauses only its kind, so an endpoint that takes metrics but not logs never
holds the metrics back.

A refusal (401/403, 400, 413... anything the OTLP specification calls not retryable) gives
up nothing: the entry stays in the outbox and is tried again after ``refused_retry_secs``,
doubling while refusals go on (capped at ten minutes, or the setting if larger). A refusal
of the endpoint itself (bad key, wrong path: 401, 403, 404) pauses *every* entry, so a wrong
key costs one request per pause, not one per window; a refusal of one payload (400, 413)
pauses only that entry, so the others keep flowing. Fixing the key and restarting, or the
endpoint accepting again, sends everything kept.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import polars as pl

from pgflow import telemetry
from pgflow.logs import error_summary, kv
from pgflow.otlp import network
from pgflow.otlp.exporter import Exporter
from pgflow.schema import EVENTS
from pgflow.stream.ledger import ROW, Ledger

log = logging.getLogger("pgflow.ship")


@dataclass(frozen=True)
class Outgoing:
    """An outbox entry on its way to the endpoint: a window's points, or events (``kind``)."""

    instance: str
    seq: int
    points: pl.DataFrame  # the frame: POINTS, or EVENTS when kind == "events"
    kind: str = "points"  # "points" | "events"


REFUSAL_CAP_SECS = 600.0
# Refusals of the endpoint as a whole (credentials, address), not of one payload.
ENDPOINT_REFUSALS = frozenset({"http_401", "http_403", "http_404", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"}) | {
    c for c in network.CAUSES if c != network.CONNECTION
}
# A TLS or proxy failure: the exporter logs it once per change of state, naming the setting to change.
NETWORK_REFUSALS = frozenset(network.CAUSES) - {network.CONNECTION}
# Of those, the refusals of the credentials: they pause points and events alike (issue 12).
KEY_REFUSALS = frozenset({"http_401", "http_403", "UNAUTHENTICATED", "PERMISSION_DENIED"})


KINDS = ("points", "events")


class Shipper:
    def __init__(
        self, exporter: Exporter, retry_after_secs: float, refused_retry_secs: float = 60.0, logs_exporter: Exporter | None = None
    ) -> None:
        self.exporter = exporter
        self.logs_exporter = logs_exporter  # issue 12: events as OTLP logs (a LogsExporter)
        self.retry_after_secs = retry_after_secs
        self.refused_retry_secs = refused_retry_secs
        self._queue: queue.Queue[tuple[Outgoing, Ledger] | None] = queue.Queue()
        self._lock = threading.Lock()
        self.failed: dict[tuple[str, int], float] = {}  # (instance, seq) -> when to try again
        self.in_flight: set[tuple[str, int]] = set()
        # monotonic, per kind: the endpoint refused that kind; none of it is sent before then
        self.paused_until: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        self.refusals: dict[str, int] = dict.fromkeys(KINDS, 0)  # consecutive refusals (the pause doubles)
        self.entry_refusals: dict[tuple[str, int], int] = {}  # consecutive refusals of one entry's payload
        self.refused: dict[str, str] = {}  # instance -> cause of the last refusal of its data
        self._thread = threading.Thread(target=self._run, name="pgflow-shipper", daemon=True)
        self._thread.start()

    def submit(self, item: Outgoing, ledger: Ledger) -> None:
        """Queue an entry, unless it is in flight or acknowledged since the operator last took acks.

        The shipper records an acknowledgement before it lets go of the entry; the operator may have
        read its outbox (and taken the acks) just before. Without the second check an entry whose
        send ended between the two would be sent again with its stale frame: a duplicate.
        """
        with self._lock:
            key = (item.instance, item.seq)
            if key in self.in_flight or ledger.acked_since_taken(item.seq):
                return
            self.in_flight.add(key)
            self.failed.pop(key, None)
        self._queue.put((item, ledger))

    def busy(self, instance: str, seq: int) -> bool:
        with self._lock:
            return (instance, seq) in self.in_flight

    def retry_due(self, instance: str, seq: int, kind: str = "points") -> bool:
        """Whether an entry may be sent (not in flight, its pause and the endpoint's are over)."""
        with self._lock:
            key = (instance, seq)
            now = time.monotonic()
            return key not in self.in_flight and self.failed.get(key, 0.0) <= now and self.paused_until[kind] <= now

    def _exporters(self) -> list[Exporter]:
        return [e for e in (self.exporter, self.logs_exporter) if e is not None]

    def abort(self) -> None:
        """The shutdown's time is up: end the send in flight, send nothing more."""
        for exporter in self._exporters():
            exporter.abort()

    def close(self, deadline: float | None = None) -> None:
        """Stop the thread: it finishes what it is sending, until ``deadline`` (monotonic) at most."""
        self._queue.put(None)
        self._thread.join(timeout=5 if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.abort()
            self._thread.join(timeout=2)
        for exporter in self._exporters():
            exporter.close()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            item, ledger = job
            try:
                paused = self.paused_until[item.kind]
                if self.exporter.aborted or paused > time.monotonic():
                    self._mark_failed(item, at=paused)  # not sent: tried when the pause is over
                elif item.kind == "events" and self.logs_exporter is None:
                    log.error(
                        "events queued but no logs exporter configured; they stay in the ledger",
                        extra=kv(instance=item.instance, seq=item.seq),
                    )
                    self._mark_failed(item)
                else:
                    self._ship(item, ledger)
            except Exception as exc:  # a bug here must not stop shipping for good
                log.error("shipping failed unexpectedly", extra=kv(instance=item.instance, error=error_summary(exc)))
                self._mark_failed(item)
            finally:
                with self._lock:
                    self.in_flight.discard((item.instance, item.seq))

    def _mark_failed(self, item: Outgoing, at: float | None = None) -> None:
        with self._lock:
            self.failed[(item.instance, item.seq)] = at or time.monotonic() + self.retry_after_secs

    def _refused(self, item: Outgoing, cause: str) -> float:
        """Pause the endpoint (or only this entry) after a refusal; returns the pause in seconds."""
        key = (item.instance, item.seq)
        with self._lock:
            if cause in ENDPOINT_REFUSALS:
                self.refusals[item.kind] += 1
                count = self.refusals[item.kind]
            else:
                count = self.entry_refusals[key] = self.entry_refusals.get(key, 0) + 1
            cap = max(REFUSAL_CAP_SECS, self.refused_retry_secs)
            pause = min(cap, self.refused_retry_secs * 2 ** min(count - 1, 30))
            self.failed[key] = time.monotonic() + pause
            if cause in ENDPOINT_REFUSALS:
                for kind in KINDS if cause in KEY_REFUSALS else (item.kind,):
                    self.paused_until[kind] = max(self.paused_until[kind], self.failed[key])
            self.refused[item.instance] = cause
        return pause

    def _accepted(self, item: Outgoing) -> None:
        with self._lock:
            self.refusals[item.kind] = 0
            self.entry_refusals.pop((item.instance, item.seq), None)
            self.refused.pop(item.instance, None)

    def _ship(self, item: Outgoing, ledger: Ledger) -> None:
        events = item.kind == "events"
        exporter = self.logs_exporter if events else self.exporter
        assert exporter is not None
        encoder = exporter.encoder
        what = "events" if events else "window"
        dropped_before = getattr(encoder.stats, "dropped_non_finite", 0)
        sent_rows: list[int] = []
        frame = item.points.select(*EVENTS, ROW) if events else item.points
        for batch in encoder.batches(frame, row_id=ROW):
            started = time.monotonic()
            retries_before = dict(exporter.stats.retries)
            result = exporter.send(batch)
            telemetry.export_duration.observe(time.monotonic() - started)
            for cause, count in exporter.stats.retries.items():
                if count > retries_before.get(cause, 0):
                    telemetry.export_retries.labels(cause).inc(count - retries_before.get(cause, 0))
            if result.acknowledged:
                ledger.record_ack(item.seq, list(batch.rows))
                self._accepted(item)
                (telemetry.events_exported if events else telemetry.points_exported).inc(batch.points - result.rejected_points)
                telemetry.last_export.set(time.time())
                if result.rejected_points:
                    (telemetry.events_dropped if events else telemetry.points_dropped).labels("rejected_by_endpoint").inc(
                        result.rejected_points
                    )
                sent_rows.extend(batch.rows)
            elif not result.retryable:
                telemetry.export_failures.labels(result.cause).inc()
                pause = self._refused(item, result.cause)
                (log.debug if result.cause in NETWORK_REFUSALS else log.warning)(
                    f"endpoint refused the {what}; it stays in the ledger",
                    extra=kv(instance=item.instance, seq=item.seq, cause=result.cause, retry_in_s=round(pause, 1)),
                )
                return
            else:
                telemetry.export_failures.labels(result.cause).inc()
                log.warning(
                    f"endpoint unreachable; the {what} stays queued",
                    extra=kv(instance=item.instance, seq=item.seq, cause=result.cause, retry_in_s=self.retry_after_secs),
                )
                self._mark_failed(item)
                return
        dropped = getattr(encoder.stats, "dropped_non_finite", 0) - dropped_before
        if dropped:
            telemetry.points_dropped.labels("non_finite").inc(dropped)
        # Rows never put in a batch (non-finite values) are done as well.
        rest = item.points.filter(~pl.col(ROW).is_in(sent_rows))[ROW].to_list()
        if rest:
            ledger.record_ack(item.seq, rest)
