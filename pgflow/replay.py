"""Replay a capture through the operators: with polars alone, or through the bytewax flow itself.

Both paths call the same operators (``pipeline.step`` / ``finish``, and ``pipeline.events`` for
the events: plans and query samples a capture holds), so for the same capture and settings they
give identical points and events; tests hold them to it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from pgflow import capture, ops
from pgflow.config import Settings
from pgflow.otlp.encode import Encoder, decode
from pgflow.otlp.store import POINTS_SCHEMA, request_rows
from pgflow.schema import Snapshot


def replay(path: str | Path, **settings: Any) -> pl.DataFrame:
    """The points the collector would export for a capture, computed with polars alone."""
    return ops.run(capture.read(path), **settings)


def replay_events(path: str | Path, **settings: Any) -> pl.DataFrame:
    """The events (``pgflow.schema.EVENTS``) the collector would export for a capture, with polars alone."""
    return ops.run_events(capture.read(path), **settings)


def as_received(points: pl.DataFrame, service_name: str = "pgflow") -> pl.DataFrame:
    """Points as the receiver would store them (encoded, decoded, flattened), for comparisons."""
    frames = [
        request_rows(decode(b.payload), received_at=None)  # type: ignore[arg-type]
        for b in Encoder(service_name=service_name, batch_size=100_000, max_bytes=1 << 40).batches(points)
    ]
    return pl.concat(frames) if frames else pl.DataFrame(schema=POINTS_SCHEMA)


def events_as_received(events: pl.DataFrame, service_name: str = "pgflow") -> pl.DataFrame:
    """Events as the receiver would store them in its ``logs`` table (encoded, decoded, flattened)."""
    from pgflow.otlp.logs import LogEncoder
    from pgflow.otlp.logs import decode as decode_logs
    from pgflow.otlp.store import LOGS_SCHEMA, log_rows

    frames = [
        log_rows(decode_logs(b.payload), received_at=None)  # type: ignore[arg-type]
        for b in LogEncoder(service_name=service_name, batch_size=100_000, max_bytes=1 << 40).batches(events)
    ]
    return pl.concat(frames) if frames else pl.DataFrame(schema=LOGS_SCHEMA)


class _ReplayPartition(StatefulSourcePartition[Snapshot, int]):
    def __init__(self, path: Path, instance: str, resume: int | None) -> None:
        self._snapshots = list(capture.read(path, instance=instance))
        self._next = resume or 0

    def next_batch(self) -> list[Snapshot]:
        if self._next >= len(self._snapshots):
            raise StopIteration()
        item = self._snapshots[self._next]
        self._next += 1
        return [item]

    def snapshot(self) -> int:
        return self._next


class ReplaySource(FixedPartitionedSource[Snapshot, int]):
    """A capture's snapshots, one partition per instance, in order and as fast as possible."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.instances = sorted({s.instance for s in capture.read(self.path)})

    def list_parts(self) -> list[str]:
        return self.instances

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _ReplayPartition:
        return _ReplayPartition(self.path, for_part, resume_state)


def replay_flow(path: str | Path, settings: Settings, out: str | Path | None = None, report: bool = False) -> int | tuple[int, int]:
    """Run a capture through the bytewax collector flow, to the endpoint or into ``out`` (DuckDB).

    With ``out``, an in-process receiver on a free port takes the endpoint's place, so the
    points and events go through the same encoders and land in the receiver's tables
    (``points``, ``logs``). Returns the points stored in ``out``; with ``report``, also the windows the endpoint never acknowledged
    (they are lost: a replay's ledger is temporary and removed at the end).
    """
    from bytewax.testing import run_main

    from pgflow.otlp.receiver import Receiver
    from pgflow.stream import runtime as rt
    from pgflow.stream.flow import build_flow

    state_dir = Path(tempfile.mkdtemp(prefix="pgflow-replay-"))  # a replay never resumes a collector's ledger
    receiver = Receiver(out, grpc_port=0, http_port=None).start() if out else None
    try:
        overrides: dict[str, Any] = {"state_dir": state_dir, "metrics_addr": "127.0.0.1:0"}
        if receiver is not None:
            overrides |= {"otlp_endpoint": receiver.grpc_endpoint, "otlp_protocol": "grpc"}
        run_settings = settings.model_copy(update=overrides)
        rt.reset()
        run_main(build_flow(run_settings, source=ReplaySource(path)))
        runtime = rt.runtime(run_settings)
        runtime.shipper.close(deadline=runtime.shutdown_deadline())
        for ledger in runtime.ledgers.values():
            ledger.close()
        unacknowledged = sum(runtime.unacknowledged.values())
        rt.reset()
        stored = int(receiver.store.points().height) if receiver else 0
        return (stored, unacknowledged) if report else stored
    finally:
        if receiver is not None:
            receiver.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
