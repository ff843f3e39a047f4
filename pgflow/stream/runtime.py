"""What one collector process shares between its workers: settings, shipper, ledgers, health.

Built lazily inside the process that runs the flow (bytewax may run workers as threads of
one process, or several processes in a cluster); nothing here is pickled.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

from pgflow import telemetry
from pgflow.config import Settings
from pgflow.logs import kv
from pgflow.ops.pipeline import OpsSettings
from pgflow.otlp.exporter import Exporter
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

    def ledger(self, instance: str) -> Ledger:
        with self._lock:
            if instance not in self.ledgers:
                self.ledgers[instance] = Ledger(self.settings.state_dir, instance)
            return self.ledgers[instance]

    @property
    def shutdown_timeout(self) -> float:
        return max(10.0, self.settings.export_timeout_secs * 2)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime(settings: Settings) -> Runtime:
    """The process's runtime, created on first use (also starts /metrics once)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            health = telemetry.Health(settings.collection_interval_secs)
            shipper = Shipper(Exporter(settings), retry_after_secs=max(1.0, settings.retry_max_delay_secs))
            _runtime = Runtime(settings, OpsSettings.from_settings(settings), shipper, health)
            try:
                telemetry.serve(settings.metrics_addr, health)
            except OSError as exc:
                log.warning("metrics server not started", extra=kv(addr=settings.metrics_addr, error=exc.strerror))
        return _runtime


def reset() -> None:
    """Forget the process's runtime (a replay in a long-lived process builds its own)."""
    global _runtime
    with _runtime_lock:
        _runtime = None


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM end the sources; the flow then closes its windows and flushes."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, _frame: object) -> None:
        if not STOP.is_set():
            log.info("stopping: closing windows and flushing", extra=kv(signal=signal.Signals(signum).name))
        STOP.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
