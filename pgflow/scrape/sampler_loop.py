"""One thread samples every instance of the process (issue 20), and a dead server cannot stall it.

Each started :class:`~pgflow.scrape.sampler.Sampler` is put on one schedule. The thread
``pgflow-sampler`` wakes once per tick: the ticks lie on one grid per period
(multiples of the period on the monotonic clock), so every instance sampled each second is
due at the same moment and the thread wakes once a second for all of them, not once per
instance. There it takes the due samples one after the other, each on its instance's own held
connection (one round trip, about a millisecond on a healthy server).

What keeps one server from delaying the others (the sampler's connection is a
:class:`DeadlineConnection`):

- every round trip on that connection has a client-side deadline, the sample's
  ``statement_timeout`` plus :data:`MARGIN_SECS`: a server that stops answering (stopped,
  hung host, lost network) costs the shared thread that much once, then the sample fails
  (counted, logged once per outage) and its connection is closed;
- an instance that is not *healthy* (no open connection, its last sample failed, or it took
  more than a quarter of the period) is not sampled on the shared thread: its sample (and so
  its reconnect, bounded by ``connect_timeout_secs``, or its name resolution) runs on a small
  side lane (at most :data:`SIDE_THREADS` threads, started when needed and gone when idle).
  While its previous attempt is still running there, its ticks are counted as skipped. A
  sample that succeeds there brings the instance back to the shared thread.

So at steady state the process has one sampler thread, whatever the number of instances;
a hung server costs the others at most one round-trip deadline, once per outage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import psycopg

from pgflow.errors import ScrapeTimeout
from pgflow.logs import error_summary, kv

if TYPE_CHECKING:
    from pgflow.scrape.sampler import Sampler

log = logging.getLogger("pgflow.sampler")

MARGIN_SECS = 0.5  # past the server's own statement_timeout: a server that answers late says so itself
SIDE_THREADS = 4  # connects and slow or failing instances: at most this many at once
THREAD_NAME = "pgflow-sampler"


class DeadlineConnection(psycopg.Connection):
    """A connection whose every round trip ends by ``round_trip_secs`` (None: no client deadline).

    ``statement_timeout`` only helps when the server runs: a stopped server (or a host that
    went away without a reset) never answers, and psycopg would wait for ever.
    """

    round_trip_secs: float | None = None

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        limit = self.round_trip_secs
        if limit is not None and (timeout is None or timeout > limit):
            timeout = limit
        try:
            return super().wait(gen, interval, timeout)
        except psycopg.errors._WaitTimeout:
            self.pgconn.finish()  # the server is in the middle of something we no longer read
            raise ScrapeTimeout(f"no answer from the server within {timeout:g} s") from None


class SamplerLoop:
    """The process's sampling schedule: one thread for every instance, a side lane for the unwell."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._due: dict[Sampler, float] = {}  # sampler -> its next tick (monotonic)
        self._busy: set[Sampler] = set()  # on the side lane now
        self._side: deque[Sampler] = deque()
        self._side_threads = 0
        self._thread: threading.Thread | None = None

    # Registration -------------------------------------------------------------------

    def add(self, sampler: Sampler) -> None:
        with self._lock:
            period = sampler.period
            self._due[sampler] = (math.floor(time.monotonic() / period) + 1) * period  # the shared grid
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, sampler: Sampler) -> None:
        with self._lock:
            self._due.pop(sampler, None)
        self._wake.set()

    def threads(self) -> int:
        """Threads sampling now: the shared one (0 or 1) and the side lane's."""
        with self._lock:
            return (self._thread is not None) + self._side_threads

    # The shared thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                if not self._due:
                    self._thread = None  # an add() after this starts a new one
                    return
                now = time.monotonic()
                due = sorted((t, i, s) for i, (s, t) in enumerate(self._due.items()) if t <= now)
                wait = min(self._due.values()) - now
            if not due:
                self._wake.wait(wait)
                continue
            for tick, _, sampler in due:
                self._take(sampler, tick)

    def _take(self, sampler: Sampler, tick: float) -> None:
        """The sample due at ``tick``: here when the instance is healthy, else on the side lane."""
        with self._lock:
            if sampler not in self._due:
                return  # stopped meanwhile
            if sampler in self._busy:  # its previous attempt still runs on the side lane
                sampler.skip(1)
                self._due[sampler] = tick + sampler.period
                return
            inline = sampler.healthy()
            if not inline:
                self._busy.add(sampler)
                self._side.append(sampler)
                if self._side_threads < SIDE_THREADS:
                    self._side_threads += 1
                    threading.Thread(target=self._side_lane, name=f"{THREAD_NAME}-side", daemon=True).start()
                self._due[sampler] = tick + sampler.period
                return
        sampler.sample()
        self._reschedule(sampler, tick)

    def _reschedule(self, sampler: Sampler, tick: float) -> None:
        """The tick after ``tick``; the ticks the sample ran past are counted, never burst."""
        period = sampler.period
        next_at = tick + period
        now = time.monotonic()
        if now >= next_at:
            missed = int((now - next_at) // period) + 1
            sampler.skip(missed)
            next_at += missed * period
        with self._lock:
            if sampler in self._due:
                self._due[sampler] = next_at

    # The side lane ------------------------------------------------------------------

    def _side_lane(self) -> None:
        while True:
            with self._lock:
                if not self._side:
                    self._side_threads -= 1
                    return
                sampler = self._side.popleft()
            try:
                if sampler.running():
                    sampler.sample()
            except Exception as exc:  # sample() counts its own failures; never lose the lane
                log.error("activity sampling failed unexpectedly", extra=kv(instance=sampler.instance, error=error_summary(exc)))
            finally:
                with self._lock:
                    self._busy.discard(sampler)


_loop: SamplerLoop | None = None
_loop_lock = threading.Lock()


def sampler_loop() -> SamplerLoop:
    """The process's one :class:`SamplerLoop` (created on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = SamplerLoop()
        return _loop
