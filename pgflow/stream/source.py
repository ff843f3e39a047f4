"""The scrape source: each bytewax worker scrapes its share of the instances, each on a thread.

A partition never blocks its worker: the scrape runs on a thread of the worker's pool and
``next_batch`` returns nothing until it is done; ``next_awake`` says when to look again.
A slow or dead instance delays no other: the pool has a thread for every scrape and table
round that can be pending at once (two per instance), started only when one is needed, so a
worker whose scrapes are spread over the interval runs them on a few threads (issue 20: each
thread costs ~170 KB resident). A failed scrape is logged and counted, and the
next successful scrape's delta covers the gap. The whole source ends (EOF) after
``max_scrapes`` scrapes per instance, or when :data:`STOP` is set (SIGINT/SIGTERM).

Issue 20 (many instances): the sorted instances are dealt out to the workers in turn, and
each instance's snapshots are keyed so that its operators run on the worker that scraped it
(:mod:`pgflow.stream.routing`): an even split over a cluster, no snapshot crossing processes.
Each instance scrapes on its own slot of the interval grid (``k * interval + slot``, slots
spread over the first half of the interval): windows close on the first scrape after their
end, so an instance's windows leave ``slot`` plus the scrape's own time after they end, and
the instances' scrapes (and the worker's operator work) are spread over the interval instead
of arriving all at once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from bytewax.inputs import DynamicSource, StatefulSourcePartition, StatelessSourcePartition

from pgflow import telemetry
from pgflow.config import InstanceConfig, Settings
from pgflow.errors import PgflowError
from pgflow.logs import error_summary, kv
from pgflow.schema import Snapshot
from pgflow.scrape import Scraper
from pgflow.scrape.budget import ConnectionBudget, free_of, read_free
from pgflow.scrape.explain import PlanFingerprints, WindowPlans
from pgflow.scrape.health import HealthSchedule
from pgflow.scrape.sampler import sampler_for, with_samples
from pgflow.scrape.tables import TableScraper
from pgflow.stream.routing import placement, routing_key

log = logging.getLogger("pgflow.source")

STOP = threading.Event()  # set by the signal handlers: every source ends, every window is flushed
_POLL = timedelta(milliseconds=50)
_IDLE_WAKE = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SLOT_GUARD = timedelta(seconds=1)  # the earliest slot after the grid: a server clock a little behind still closes the window


class SnapshotRecorder:
    """Capture while collecting (`pgflow run --capture F`): scrape threads share one writer."""

    def __init__(self, path: str) -> None:
        from pgflow.capture import CaptureWriter

        self._writer = CaptureWriter(path)
        self._lock = threading.Lock()

    def write(self, snapshot: Snapshot) -> None:
        try:
            with self._lock:
                self._writer.write(snapshot)
        except Exception as exc:  # the capture is a side job: it never stops collecting
            log.error("capture write failed", extra=kv(instance=snapshot.instance, error=error_summary(exc)))

    def close(self) -> None:
        with self._lock:
            self._writer.close()


def _now() -> datetime:
    return datetime.now(UTC)


class ScrapePartition(StatefulSourcePartition[Snapshot, None]):
    """Scrapes one instance every ``collection_interval_secs`` on a private thread."""

    def __init__(
        self,
        instance: InstanceConfig,
        settings: Settings,
        health: telemetry.Health | None,
        recorder: SnapshotRecorder | None = None,
        slot: tuple[int, int] = (0, 1),
        pool: ThreadPoolExecutor | None = None,
        plan_fingerprints: PlanFingerprints | None = None,
    ) -> None:
        self.instance = instance
        self.interval = timedelta(seconds=settings.collection_interval_secs)
        self.slot, first = slot_of(self.interval, *slot)
        self.max_scrapes = settings.max_scrapes
        self.health = health
        self.recorder = recorder
        self.scraper = Scraper(
            instance.dsn,
            instance=instance.name,
            statement_timeout_ms=settings.statement_timeout_ms,
            connect_timeout_secs=settings.connect_timeout_secs,
            health=HealthSchedule.from_settings(settings),
        )  # issue 13
        self._own_pool = pool is None  # a partition built alone (tests) has a pool of its own
        self.pool = pool if pool is not None else ThreadPoolExecutor(max_workers=2, thread_name_prefix="scrape")
        self.attempts = 0
        self.next_at = _now() + first  # the baselines of many instances are spread as well
        self.pending: Future[Snapshot] | None = None
        self._last_stats = (0, 0)
        # issue 11: active-session sampling beside the scrape, on its own connection and thread
        self.sampler = sampler_for(instance.dsn, instance.name, settings)
        if self.sampler is not None:
            self.sampler.start()
        # issue 20: the scrape's and the sampler's connections are held; per-database work shares the rest
        self._conn_lock = threading.RLock()  # the scrape's connection: one user at a time
        self.budget = ConnectionBudget.from_settings(instance, settings, sampler=self.sampler is not None, probe=self._free_connections)
        self.plans = WindowPlans.for_instance(instance.dsn, instance.name, settings, self.budget, plan_fingerprints)  # None: plans off
        self.tables = (  # issue 13; first rounds spread over the table interval, by the same rank (issue 20)
            TableStatsThread(instance, settings, self.budget, self.pool, first=max(first, table_start(settings, *slot)))
            if settings.table_stats_enabled
            else None
        )

    def _free_connections(self) -> int:
        """The server's free connections, read on the scrape's own connection (never a new one)."""
        with self._conn_lock:
            return free_of(read_free(self.scraper._connection()))

    def next_batch(self) -> list[Snapshot]:
        if self.tables is not None:
            self.tables.poll()
        if self.pending is None:
            if STOP.is_set() or (self.max_scrapes is not None and self.attempts >= self.max_scrapes):
                raise StopIteration()
            if _now() < self.next_at:
                return []
            self.attempts += 1
            self.next_at = self._next_slot(_now())
            self.pending = self.pool.submit(self._scrape)
            return []
        if not self.pending.done():
            return []
        future, self.pending = self.pending, None
        snapshot = future.result()
        return [snapshot] if snapshot is not None else []

    def _next_slot(self, now: datetime) -> datetime:
        """The instance's next slot on the grid at least half an interval away: a scrape that
        ran late (a slow server) is followed by the next slot, never by a burst."""
        k = (now + self.interval / 2 - self.slot - _EPOCH) // self.interval + 1
        return _EPOCH + k * self.interval + self.slot

    def _scrape(self) -> Snapshot | None:
        with self._conn_lock:
            return self._scrape_locked()

    def _scrape_locked(self) -> Snapshot | None:
        name = self.instance.name
        started = _now()
        try:
            with telemetry.scrape_duration.labels(name).time():
                snapshot = self.scraper.scrape()
        except PgflowError as exc:
            telemetry.scrape_errors.labels(name, type(exc).__name__).inc()
            log.warning("scrape failed", extra=kv(instance=name, error=str(exc)))
            return None
        except Exception as exc:  # never let a scrape kill the flow
            telemetry.scrape_errors.labels(name, type(exc).__name__).inc()
            log.error("scrape failed unexpectedly", extra=kv(instance=name, error=error_summary(exc)))
            self.scraper.close()
            return None
        snapshot = with_samples(snapshot, self.sampler)  # issue 11
        if self.tables is not None:
            snapshot = self.tables.attach(snapshot)
        telemetry.rows_scraped.labels(name).inc(snapshot.statements.height)
        fetches, hits = self.scraper.stats.text_fetches, self.scraper.stats.texts_reused
        telemetry.text_fetches.labels(name).inc(fetches - self._last_stats[0])
        telemetry.text_cache_hits.labels(name).inc(hits - self._last_stats[1])
        self._last_stats = (fetches, hits)
        telemetry.last_scrape.labels(name).set(snapshot.scraped_at.timestamp())
        if self.health is not None:
            self.health.scraped()
        if self.plans is not None:  # issue 12: the closed window's plans ride on its next scrape
            snapshot = self.plans.attach(snapshot)
        if self.recorder is not None:
            self.recorder.write(snapshot)
        log.debug(
            "scraped", extra=kv(instance=name, rows=snapshot.statements.height, ms=round((_now() - started).total_seconds() * 1000, 1))
        )
        return snapshot

    def next_awake(self) -> datetime | None:
        if self.pending is not None:
            return _now() + _POLL
        if STOP.is_set():
            return None
        # Issue 20: once a second at most while idle (to notice STOP and a table round's end),
        # not four times: each wake-up is a call into Python per instance.
        wake = min(self.next_at, _now() + _IDLE_WAKE)
        due = self.tables.due() if self.tables is not None else None
        return wake if due is None else min(wake, max(due, _now()))

    def snapshot(self) -> None:
        return None  # scrapes are not replayable: the delta baseline lives in the ledger

    def close(self) -> None:
        self.budget.close()  # issue 20: a table round waiting for headroom ends now
        if self.pending is not None:
            self.pending.cancel()
        if self._own_pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.scraper.close()
        if self.sampler is not None:  # issue 11
            self.sampler.stop()
        if self.tables is not None:
            self.tables.close()


class TableStatsThread:
    """Issue 13: per-table statistics every ``table_stats_interval_secs`` on their own thread.

    ``poll`` (from the worker: never waits) starts a scrape when one is due; the result waits
    until ``attach`` puts it on the next successful snapshot (a ``tables`` frame), and no new
    scrape starts before then, so no frame is ever lost or sent twice.
    """

    def __init__(
        self,
        instance: InstanceConfig,
        settings: Settings,
        budget: ConnectionBudget | None = None,
        pool: ThreadPoolExecutor | None = None,
        first: timedelta = timedelta(0),
    ) -> None:
        self.name = instance.name
        self.interval = timedelta(seconds=settings.table_stats_interval_secs)
        self.scraper = TableScraper.for_instance(instance, settings, budget)
        self._late = False  # the last round was too long for its interval (said once)
        self._own_pool = pool is None
        self.pool = pool if pool is not None else ThreadPoolExecutor(max_workers=1, thread_name_prefix="tables")
        self.next_at = _now() + first
        self.pending: Future[None] | None = None
        self._ready = None
        self._lock = threading.Lock()
        self._counted: dict[str, int] = {}
        self._rows = 0

    def poll(self) -> None:
        if self.pending is not None and not self.pending.done():
            return
        with self._lock:
            waiting = self._ready is not None
        if waiting or _now() < self.next_at or STOP.is_set():
            return
        self.next_at = _now() + self.interval
        self.pending = self.pool.submit(self._scrape)

    def due(self) -> datetime | None:
        """When :meth:`poll` would start the next round (None: one is running or waiting to be attached)."""
        if self.pending is not None and not self.pending.done():
            return None
        with self._lock:
            return None if self._ready is not None else self.next_at

    def _scrape(self) -> None:
        try:
            with telemetry.table_scrape_duration.labels(self.name).time():
                frame = self.scraper.scrape(deadline=time.monotonic() + self.interval.total_seconds())
        except PgflowError as exc:
            telemetry.table_scrapes.labels(self.name, "error").inc()
            log.warning("table statistics scrape failed", extra=kv(instance=self.name, error=str(exc)))
            return
        except Exception as exc:  # never let it kill the flow
            telemetry.table_scrapes.labels(self.name, "error").inc()
            log.error("table statistics scrape failed unexpectedly", extra=kv(instance=self.name, error=error_summary(exc)))
            self.scraper.close()
            return
        stats = self.scraper.stats
        for outcome, n in stats.outcomes.items():
            telemetry.table_scrapes.labels(self.name, outcome).inc(n - self._counted.get(outcome, 0))
        self._counted = dict(stats.outcomes)
        telemetry.table_rows_fetched.labels(self.name).inc(stats.rows - self._rows)
        self._rows = stats.rows
        telemetry.tables_seen.labels(self.name).set(stats.tables_seen)
        self._count_late(stats.late)
        with self._lock:
            self._ready = frame

    def _count_late(self, late: int) -> None:
        """Issue 20: a round that could not visit every database within its interval: counted, said once."""
        if late:
            telemetry.table_rounds_late.labels(self.name).inc()
            telemetry.table_databases_late.labels(self.name).inc(late)
            if not self._late:
                log.warning(
                    "table statistics: the databases could not all be visited within "
                    "table_stats_interval_secs; every database is still read each round, later",
                    extra=kv(
                        instance=self.name,
                        late_databases=late,
                        interval_secs=self.interval.total_seconds(),
                        hint="raise PGFLOW_TABLE_STATS_INTERVAL_SECS or narrow PGFLOW_TABLE_STATS_DATABASES",
                    ),
                )
        elif self._late:
            log.info("table statistics: every database visited within its interval again", extra=kv(instance=self.name))
        self._late = bool(late)

    def attach(self, snapshot: Snapshot) -> Snapshot:
        with self._lock:
            frame, self._ready = self._ready, None
        return snapshot if frame is None else replace(snapshot, tables=frame)

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
        if self._own_pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.scraper.close()


def slot_of(interval: timedelta, index: int, count: int) -> tuple[timedelta, timedelta]:
    """Instance ``index`` of ``count``: its slot after each grid point, and its first scrape's delay.

    Slots are spread evenly from ``_SLOT_GUARD`` (a tenth of the interval at most) to half the
    interval; the first scrapes (the baselines) are spread the same way from the start.
    """
    guard = min(_SLOT_GUARD, interval / 10)
    slot = guard + (interval / 2 - guard) * index / max(count, 1)
    return slot, slot - guard


def table_start(settings: Settings, index: int, count: int) -> timedelta:
    """When instance ``index`` of ``count`` reads its tables first: the rounds of a fleet are
    spread over ``table_stats_interval_secs``, so their rows (a window's heaviest points on the
    operators' thread) do not all land in the first export window after a start."""
    return timedelta(seconds=settings.table_stats_interval_secs) * index / max(count, 1)


class WorkerScrapes(StatelessSourcePartition[tuple[str, Snapshot]]):
    """One worker's instances; each snapshot leaves keyed for this worker's operators."""

    def __init__(self, parts: dict[str, ScrapePartition], pool: ThreadPoolExecutor | None = None) -> None:
        self.parts = parts  # routing key -> the instance's partition
        self.pool = pool  # the threads the partitions share
        self.awake: dict[str, datetime | None] = dict.fromkeys(parts)  # None: look now

    def next_batch(self) -> list[tuple[str, Snapshot]]:
        now = _now()
        out: list[tuple[str, Snapshot]] = []
        for key, part in list(self.parts.items()):
            wake = self.awake[key]
            if wake is not None and now < wake:
                continue  # only the instances whose time has come: a call per instance per wake-up is not free
            try:
                out.extend((key, snapshot) for snapshot in part.next_batch())
            except StopIteration:
                part.close()
                del self.parts[key], self.awake[key]
                continue
            self.awake[key] = part.next_awake()
        if not self.parts:
            self._shutdown()
            raise StopIteration()
        return out

    def next_awake(self) -> datetime | None:
        wakes = list(self.awake.values())
        return None if not wakes or None in wakes else min(w for w in wakes if w is not None)

    def close(self) -> None:
        for part in self.parts.values():
            part.close()
        self.parts.clear()
        self.awake.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class ScrapeSource(DynamicSource[tuple[str, Snapshot]]):
    """Every configured instance, dealt out evenly over the workers of a bytewax cluster (issue 20).

    A ``DynamicSource`` (not one partition per instance) because only its ``build`` is told the
    worker's index and count, which the routing keys need (:mod:`pgflow.stream.routing`).
    """

    def __init__(self, settings: Settings, health: telemetry.Health | None = None, recorder: SnapshotRecorder | None = None) -> None:
        self.settings = settings
        self.instances = {i.name: i for i in settings.targets()}
        self.health = health
        self.recorder = recorder

    def build(self, step_id: str, worker_index: int, worker_count: int) -> WorkerScrapes:
        where = placement(list(self.instances), worker_count)
        order = sorted(self.instances)  # slots by the global order: two processes' scrapes of one server interleave too
        mine = [(i, name) for i, name in enumerate(order) if where[name] == worker_index]
        # Room for every instance's scrape and table round at once (none waits for another's
        # slow server); threads start only when that many are busy together.
        pool = ThreadPoolExecutor(max_workers=max(1, 2 * len(mine)), thread_name_prefix=f"scrape-w{worker_index}")
        fingerprints = WindowPlans.shared(self.settings)  # a text shared by instances is parsed once
        parts = {
            routing_key(name, worker_index, worker_count): ScrapePartition(
                self.instances[name],
                self.settings,
                self.health,
                self.recorder,
                slot=(i, len(order)),
                pool=pool,
                plan_fingerprints=fingerprints,
            )
            for i, name in mine
        }
        log.info("instances on this worker", extra=kv(worker=worker_index, workers=worker_count, instances=len(parts)))
        return WorkerScrapes(parts, pool)
