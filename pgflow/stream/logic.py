"""The per-instance stateful step of the flow: the operators, the ledger and the outbox.

For each snapshot: ``pipeline.step`` (the operators, nothing else), closed windows' points
into the outbox, ``pipeline.events`` (plans, query samples) into the events outbox, the ledger
saved, then both handed to the shipper. Points and events entries share one sequence, the
acknowledgements and the retries. The outbox is bounded: past ``max_pending_windows`` entries
the two oldest are merged (sums add up, the older gauges are dropped, both counted and
logged); events cannot be merged, so past ``max_pending_events`` waiting events the oldest
are dropped (counted in ``pgflow_events_dropped_total`` and logged). Memory stays flat however
long the endpoint is down. At EOF (``--scrapes N``, SIGINT, SIGTERM) the open windows are closed
(each ending at its last scrape) and the outbox is flushed, until ``shutdown_timeout_secs``
after the shutdown began at most, retry pauses respected; what is left stays in the ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import polars as pl
from bytewax.operators import StatefulLogic

from pgflow import telemetry
from pgflow.config import Settings
from pgflow.logs import kv
from pgflow.ops.fingerprint import Fingerprinter
from pgflow.ops.merge import merge_windows
from pgflow.ops.pipeline import OpsSettings, events, finish, initial_state, step
from pgflow.schema import Snapshot
from pgflow.stream import runtime as runtime_module
from pgflow.stream.ledger import ROW, Ledger, Record
from pgflow.stream.runtime import runtime
from pgflow.stream.shipper import Outgoing, Shipper

log = logging.getLogger("pgflow.flow")

MAX_PENDING_WINDOWS = 120
MAX_PENDING_EVENTS = 10_000  # issue 12: events waiting per instance (plans, query samples)
_local = threading.local()


def _fingerprinter(size: int) -> Fingerprinter:
    """One per worker thread: bytewax runs several workers as threads of one process. A new
    run in the same process (a replay after a replay) starts a new one, so the labels a run
    exports never depend on what an earlier run saw."""
    fp = getattr(_local, "fingerprinter", None)
    if fp is None or getattr(_local, "generation", None) != runtime_module.generation:
        fp = _local.fingerprinter = Fingerprinter(size, size)
        _local.generation = runtime_module.generation
    return fp


class CollectorLogic(StatefulLogic[Snapshot, Outgoing, None]):
    """Everything one instance carries, made durable by its :class:`Ledger`."""

    def __init__(
        self,
        instance: str,
        ops: OpsSettings,
        ledger: Ledger,
        shipper: Shipper,
        shutdown_timeout: float,
        max_pending: int = MAX_PENDING_WINDOWS,
        max_pending_events: int = MAX_PENDING_EVENTS,
    ) -> None:
        self.instance = instance
        self.ops = ops
        self.ledger = ledger
        self.shipper = shipper
        self.shutdown_timeout = shutdown_timeout
        self.max_pending = max_pending
        self.max_pending_events = max_pending_events
        record = ledger.load()
        if record is not None:
            log.info(
                "resuming from the ledger",
                extra=kv(instance=instance, queued_windows=len(record.outbox), queued_events=sum(f.height for f in record.events.values())),
            )
        self._saved = record is not None and record.state is not None  # a baseline is on disk
        self.record = record or Record(initial_state(ops))
        if self.record.state is None:
            self.record.state = initial_state(ops)
        self._submit()

    # bytewax callbacks ------------------------------------------------------------------

    def on_item(self, value: Snapshot) -> tuple[list[Outgoing], bool]:
        fp = _fingerprinter(self.ops.fingerprint_cache_size)
        hits, misses = fp.key_hits, fp.key_misses
        evicted = self.record.state.cap.evictions["queries"]  # type: ignore[union-attr]
        state, points = step(self.record.state, value, fp, self.ops)  # type: ignore[arg-type]
        telemetry.series_evicted.labels(self.instance).inc(state.cap.evictions["queries"] - evicted)
        telemetry.fingerprint_cache.labels("hit").inc(fp.key_hits - hits)
        telemetry.fingerprint_cache.labels("miss").inc(fp.key_misses - misses)
        self.record.state = state
        telemetry.series_tracked.labels(self.instance).set(len(state.cap.queries))
        telemetry.tables_rolled_up.labels(self.instance).set(state.tables.rolled_up)  # issue 13
        queued = self._queue(points) | self._queue_events(value)  # (both run)
        self._apply_acks()
        # Durable before anything of this scrape is sent. A scrape that queues nothing (mid-window)
        # is not saved (issue 20: the save was a third of on_item): nothing of it has left the
        # process, and after a kill -9 the next scrape's delta from the saved baseline covers it.
        if queued or not self._saved:
            self.ledger.save(self.record)
            self._saved = True
        self._submit()
        return [], StatefulLogic.RETAIN

    def on_notify(self) -> tuple[list[Outgoing], bool]:
        self._apply_acks()
        self._submit()
        return [], StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[Outgoing], bool]:
        deadline = self.deadline()
        state, points = finish(self.record.state, self.ops)  # type: ignore[arg-type]
        self.record.state = state
        self._queue(points)
        self._apply_acks()
        self.ledger.save(self.record)
        # Wait for acknowledgements until the shutdown's deadline; entries whose retry pause
        # runs past it are not sent again (they stay in the ledger for the next start).
        while self._pending() and time.monotonic() < deadline:
            self._submit()
            time.sleep(0.05)
            self._apply_acks()
        if self._pending():
            self.shipper.abort()  # time is up: an export still in flight must not outlive the shutdown
        self._apply_acks()
        self.ledger.save(self.record)
        self.report(self._pending())
        if self._pending():
            refused = self.shipper.refused.get(self.instance)
            waiting = sum(f.height for f in self.record.events.values())
            log.warning(
                "stopping with windows not acknowledged; they are kept in the ledger and sent on the next start",
                extra=kv(
                    instance=self.instance,
                    windows=len(self.record.outbox),
                    **({"events": waiting} if waiting else {}),
                    **({"refused": refused} if refused else {}),
                ),
            )
        else:
            log.info("flushed", extra=kv(instance=self.instance))
        return [], StatefulLogic.RETAIN

    def deadline(self) -> float:
        """When the shutdown must end (monotonic); the runtime's, shared by every instance."""
        return time.monotonic() + self.shutdown_timeout

    def report(self, unacknowledged: int) -> None:
        """Tell the process how the shutdown ended (the exit code depends on it)."""

    def notify_at(self) -> datetime | None:
        if self._pending():
            return datetime.now(UTC) + timedelta(milliseconds=200)
        return None

    def snapshot(self) -> None:
        return None  # the ledger, not bytewax recovery, carries the state (bytewax's lags the sink)

    # Outbox -------------------------------------------------------------------------------

    def _pending(self) -> int:
        """Entries (windows and events) not yet acknowledged."""
        return len(self.record.outbox) + len(self.record.events)

    def _queue_events(self, snapshot: Snapshot) -> bool:
        """The snapshot's events into the events outbox, under their own sequence number (True: some were)."""
        before = self.record.events_state
        self.record.events_state, frame = events(before, snapshot, self.ops)
        if before is None or self.record.events_state.samples is not before.samples:
            telemetry.count_query_samples(
                self.instance, *self.record.events_state.samples.counts_since(before.samples if before is not None else None)
            )
        if not frame.height:
            return False
        seq = self.record.next_seq
        self.record.next_seq += 1
        self.record.events[seq] = frame.with_row_index(ROW)
        self._bound_events()
        telemetry.events_queued.labels(self.instance).set(sum(f.height for f in self.record.events.values()))
        return True

    def _bound_events(self) -> None:
        """Past ``max_pending_events`` waiting events, drop the oldest (of idle entries)."""
        excess = sum(f.height for f in self.record.events.values()) - self.max_pending_events
        dropped = 0
        for seq in sorted(self.record.events):
            if excess <= 0:
                break
            if self.shipper.busy(self.instance, seq):
                continue
            frame = self.record.events[seq]
            n = min(frame.height, excess)
            if n == frame.height:
                del self.record.events[seq]
            else:
                self.record.events[seq] = frame.slice(n)
            excess -= n
            dropped += n
        if dropped:
            telemetry.events_dropped.labels("backlog").inc(dropped)
            log.warning(
                "endpoint backlog at its bound: dropped the oldest events",
                extra=kv(instance=self.instance, bound=self.max_pending_events, events_dropped=dropped),
            )

    def _queue(self, points: pl.DataFrame) -> bool:
        """A closed window's points into the outbox (True: there were some)."""
        if not points.height:
            return False
        seq = self.record.next_seq
        self.record.next_seq += 1
        self.record.outbox[seq] = points.with_row_index(ROW)
        self._bound()
        telemetry.queue_depth.labels(self.instance).set(len(self.record.outbox))
        return True

    def _bound(self) -> None:
        """Merge the two oldest idle entries while the outbox is over its bound."""
        while len(self.record.outbox) > self.max_pending:
            idle = [s for s in sorted(self.record.outbox) if not self.shipper.busy(self.instance, s)]
            if len(idle) < 2:
                return
            older, newer = idle[0], idle[1]
            merged, dropped_gauges = merge_windows(self.record.outbox.pop(older).drop(ROW), self.record.outbox.pop(newer).drop(ROW))
            self.record.outbox[newer] = merged.with_row_index(ROW)
            telemetry.points_dropped.labels("merged_gauges").inc(dropped_gauges)
            log.warning(
                "endpoint backlog at its bound: merged the two oldest windows",
                extra=kv(instance=self.instance, bound=self.max_pending, gauges_dropped=dropped_gauges),
            )

    def _apply_acks(self) -> None:
        acked = self.ledger.take_acks()
        if not acked:
            return
        for seq, rows in acked.items():
            box = self.record.outbox if seq in self.record.outbox else self.record.events
            frame = box.get(seq)
            if frame is None:
                continue
            if rows is None:
                del box[seq]
                continue
            frame = frame.filter(~pl.col(ROW).is_in(list(rows)))
            if frame.height:
                box[seq] = frame
            else:
                del box[seq]
        telemetry.queue_depth.labels(self.instance).set(len(self.record.outbox))
        telemetry.events_queued.labels(self.instance).set(sum(f.height for f in self.record.events.values()))

    def _submit(self, force: bool = False) -> None:
        entries = [(seq, "points", frame) for seq, frame in self.record.outbox.items()]
        entries += [(seq, "events", frame) for seq, frame in self.record.events.items()]
        for seq, kind, frame in sorted(entries, key=lambda e: e[0]):
            if force or self.shipper.retry_due(self.instance, seq, kind):  # submit skips what is in flight
                self.shipper.submit(Outgoing(self.instance, seq, frame, kind), self.ledger)


class _Deferred(CollectorLogic):
    """Builds the instance's logic on its first snapshot: bytewax's builder is not told the key."""

    def __init__(self, settings: Settings) -> None:  # noqa: D107 - initialised on first item
        self._settings = settings
        self._ready = False

    def _init(self, instance: str) -> None:
        self._rt = rt = runtime(self._settings)
        super().__init__(instance, rt.ops, rt.ledger(instance), rt.shipper, rt.shutdown_timeout)
        self._ready = True

    def deadline(self) -> float:
        return self._rt.shutdown_deadline()

    def report(self, unacknowledged: int) -> None:
        self._rt.unacknowledged[self.instance] = unacknowledged

    def on_item(self, value: Snapshot) -> tuple[list[Outgoing], bool]:
        if not self._ready:
            self._init(value.instance)
        self._rt.scraped.add(value.instance)
        return super().on_item(value)

    def on_notify(self) -> tuple[list[Outgoing], bool]:
        return super().on_notify() if self._ready else ([], StatefulLogic.RETAIN)

    def on_eof(self) -> tuple[list[Outgoing], bool]:
        return super().on_eof() if self._ready else ([], StatefulLogic.RETAIN)

    def notify_at(self) -> datetime | None:
        return super().notify_at() if self._ready else None


def logic_builder(settings: Settings) -> Callable[[None], CollectorLogic]:
    """The builder ``op.stateful`` calls for each new instance key."""

    def build(resume_state: None) -> CollectorLogic:
        return _Deferred(settings)

    return build
