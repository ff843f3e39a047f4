"""The collector dataflow: scrape source → key by instance → operators + ledger → shipper.

Wiring only; the logic lives in the operators (pgflow.ops) and the parts beside this file.
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from pgflow.config import Settings
from pgflow.schema import Snapshot
from pgflow.stream.logic import CollectorLogic
from pgflow.stream.runtime import runtime
from pgflow.stream.source import ScrapeSource, SnapshotRecorder


class _Discard(StatelessSinkPartition[object]):
    def write_batch(self, items: list[object]) -> None:
        pass


class DiscardSink(DynamicSink[object]):
    """Exports leave through the shipper; bytewax still wants every flow to end in a sink."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Discard:
        return _Discard()


def _builder(settings: Settings):  # type: ignore[no-untyped-def]
    def build(resume_state: None) -> "_Deferred":
        return _Deferred(settings)

    return build


class _Deferred(CollectorLogic):
    """Builds the instance's logic on its first snapshot: bytewax's builder is not told the key."""

    def __init__(self, settings: Settings) -> None:  # noqa: D107 - initialised on first item
        self._settings = settings
        self._ready = False

    def _init(self, instance: str) -> None:
        rt = runtime(self._settings)
        super().__init__(instance, rt.ops, rt.ledger(instance), rt.shipper, rt.shutdown_timeout)
        self._ready = True

    def on_item(self, value: Snapshot):  # type: ignore[no-untyped-def]
        if not self._ready:
            self._init(value.instance)
        return super().on_item(value)

    def on_notify(self):  # type: ignore[no-untyped-def]
        return super().on_notify() if self._ready else ([], False)

    def on_eof(self):  # type: ignore[no-untyped-def]
        return super().on_eof() if self._ready else ([], False)

    def notify_at(self):  # type: ignore[no-untyped-def]
        return super().notify_at() if self._ready else None


def build_flow(settings: Settings, source: Source[Snapshot] | None = None,
               recorder: SnapshotRecorder | None = None) -> Dataflow:
    """The collector; ``source`` replaces the PostgreSQL scrapes (e.g. a capture replay), and
    ``recorder`` also writes every scrape to a capture."""
    if source is None:
        source = ScrapeSource(settings, runtime(settings).health, recorder)
    flow = Dataflow("pgflow")
    snapshots = op.input("scrape", flow, source)
    keyed = op.key_on("by_instance", snapshots, lambda s: s.instance)
    shipped = op.stateful("collect", keyed, _builder(settings))
    op.output("done", shipped, DiscardSink())
    return flow
