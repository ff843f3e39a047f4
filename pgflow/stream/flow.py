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
from pgflow.stream.logic import logic_builder
from pgflow.stream.runtime import quiet_timers, runtime
from pgflow.stream.source import ScrapeSource, SnapshotRecorder


class _Discard(StatelessSinkPartition[object]):
    def write_batch(self, items: list[object]) -> None:
        pass


class DiscardSink(DynamicSink[object]):
    """Exports leave through the shipper; bytewax still wants every flow to end in a sink."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Discard:
        return _Discard()


def build_flow(settings: Settings, source: Source[Snapshot] | None = None, recorder: SnapshotRecorder | None = None) -> Dataflow:
    """The collector; ``source`` replaces the PostgreSQL scrapes (e.g. a capture replay), and
    ``recorder`` also writes every scrape to a capture."""
    flow = Dataflow("pgflow")
    keyed: op.KeyedStream[Snapshot]
    if source is None:
        # issue 20: the source keys each snapshot for the worker that scraped it (pgflow.stream.routing)
        keyed = op.input("scrape", flow, ScrapeSource(settings, runtime(settings).health, recorder))
        quiet_timers()  # issue 20: bytewax's 1 ms loops wake ~10 times a second when idle, not 2,000
    else:
        keyed = op.key_on("by_instance", op.input("scrape", flow, source), lambda s: s.instance)
    shipped = op.stateful("collect", keyed, logic_builder(settings))
    op.output("done", shipped, DiscardSink())
    return flow
