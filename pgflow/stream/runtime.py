"""What one collector process shares between its workers: settings, shipper, ledgers, health.

Built lazily inside the process that runs the flow (bytewax may run workers as threads of
one process, or several processes in a cluster); nothing here is pickled.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from pgflow import telemetry
from pgflow.config import Settings
from pgflow.errors import ConfigError
from pgflow.logs import kv
from pgflow.ops.pipeline import OpsSettings
from pgflow.otlp.exporter import Exporter
from pgflow.otlp.logs_export import LogsExporter
from pgflow.stream.ledger import Ledger
from pgflow.stream.shipper import Shipper
from pgflow.stream.source import STOP

log = logging.getLogger("pgflow.run")


@dataclass
class Runtime:
    settings: Settings
    ops: OpsSettings
    shipper: Shipper
    health: telemetry.Health
    ledgers: dict[str, Ledger] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    metrics_served: bool = False
    scraped: set[str] = field(default_factory=set)  # instances with at least one snapshot this run
    unacknowledged: dict[str, int] = field(default_factory=dict)  # instance -> windows left at shutdown

    def ledger(self, instance: str) -> Ledger:
        with self._lock:
            if instance not in self.ledgers:
                self.ledgers[instance] = Ledger(self.settings.state_dir, instance)
            return self.ledgers[instance]

    @property
    def shutdown_timeout(self) -> float:
        return self.settings.shutdown_timeout_secs

    def shutdown_deadline(self) -> float:
        """When the shutdown must be over (monotonic): ``shutdown_timeout_secs`` after it began."""
        return begin_shutdown() + self.settings.shutdown_timeout_secs


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()
_shutdown_began: float | None = None


def begin_shutdown() -> float:
    """Note when the shutdown began (the signal, or the first source's end); returns it."""
    global _shutdown_began
    with _runtime_lock:
        if _shutdown_began is None:
            _shutdown_began = time.monotonic()
        return _shutdown_began


def runtime(settings: Settings, *, require_metrics: bool = False) -> Runtime:
    """The process's runtime, created on first use (also starts /metrics once).

    ``require_metrics``: a ``metrics_addr`` that cannot be bound (another collector on the
    host) is a ConfigError; otherwise (under ``bytewax.run``) it is an error line and the
    collector runs without /metrics.
    """
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            health = telemetry.Health(settings.collection_interval_secs)
            shipper = Shipper(
                Exporter(settings),
                retry_after_secs=max(1.0, settings.retry_max_delay_secs),
                refused_retry_secs=settings.refused_retry_secs,
                logs_exporter=LogsExporter(settings),
            )  # issue 12: events
            _runtime = Runtime(settings, OpsSettings.from_settings(settings), shipper, health)
        rt = _runtime
        if not rt.metrics_served:
            rt.metrics_served = True
            try:
                telemetry.serve(settings.metrics_addr, rt.health)
            except OSError as exc:
                if require_metrics:
                    rt.shipper.close(deadline=time.monotonic())
                    _runtime = None
                    raise ConfigError(
                        f"cannot serve /metrics on metrics_addr {settings.metrics_addr} ({exc.strerror})",
                        "another collector on this host may use it: set PGFLOW_METRICS_ADDR to a free port (port 0 picks one)",
                    ) from None
                log.error(
                    "metrics server not started: this collector runs without /metrics and /healthz",
                    extra=kv(addr=settings.metrics_addr, error=exc.strerror, hint="set PGFLOW_METRICS_ADDR to a free port"),
                )
        return rt


generation = 0  # bumped by reset(): per-thread caches of an earlier run are not reused


def reset() -> None:
    """Forget the process's runtime (a replay in a long-lived process builds its own)."""
    global _runtime, _shutdown_began, generation
    with _runtime_lock:
        _runtime = None
        _shutdown_began = None
        generation += 1


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM end the sources; the flow then closes its windows and flushes.

    SIGHUP (``systemctl reload``, a closed terminal) is logged and ignored: settings are read
    once at start, so applying new ones takes a restart (which loses nothing: the ledger).
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, _frame: object) -> None:
        begin_shutdown()
        if not STOP.is_set():
            log.info("stopping: closing windows and flushing", extra=kv(signal=signal.Signals(signum).name))
        STOP.set()

    def hangup(signum: int, _frame: object) -> None:
        log.warning("SIGHUP ignored: settings are read only at start; restart pgflow to apply new ones", extra=kv(signal="SIGHUP"))

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hangup)


# Issue 20: how late a timed wait of this process may end. bytewax 0.21.1 never sleeps longer
# than 1 ms: its worker loop is ``step_or_park(Some(1 ms))`` and its main thread checks signals
# every 1 ms (a GIL acquisition each), whatever the sources' ``next_awake`` says (bytewax issue
# #161). Those 2,000 wake-ups a second were most of an idle collector's CPU. With a timer slack
# the kernel may end each 1 ms timeout up to this much later (coalescing it with other wake-ups):
# about 10 wake-ups a second when idle (measured side by side, one instance at defaults: 0.50% of a
# core at 20 ms, 0.33-0.38% at 100 ms, 0.32% at 250 ms). A busy worker does not park, so this
# delays nothing that has work. Nothing of pgflow's waits on a timer that needs finer precision:
# scrapes every 30 s, samples on a 1 s grid (a late sample does not move the next one; its
# timestamp is read when it runs), exports every 60 s.
TIMER_SLACK_NS = 100_000_000
_PR_SET_TIMERSLACK = 29


def quiet_timers(slack_ns: int = TIMER_SLACK_NS) -> bool:
    """Let this thread's (and the threads it starts after this: bytewax's workers) timed waits end
    up to ``slack_ns`` late. Linux only; True when set. Call in the thread that runs the flow."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(slack_ns), 0, 0, 0) == 0
    except Exception:  # no prctl: the flow runs as before, only busier
        return False
