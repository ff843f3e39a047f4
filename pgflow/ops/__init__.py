"""The pure operators: polars frames in, polars frames out; no I/O, no bytewax.

``run`` feeds snapshots (of one or several instances) through the whole chain and returns
the points frame; it is what notebooks and tests call. The bytewax flow calls the same
``pipeline.step``/``pipeline.finish`` per instance.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from pgflow.ops.fingerprint import Fingerprinter
from pgflow.ops.pipeline import InstanceState, OpsSettings, finish, initial_state, step
from pgflow.schema import EVENTS, POINTS, Snapshot


def run(snapshots: Iterable[Snapshot], **settings: Any) -> pl.DataFrame:
    """Every point the collector would export for ``snapshots``, last windows closed at the end.

    ``settings`` are names of ``pgflow.config.Settings`` (``max_queries_tracked=...``,
    ``export_interval_secs=...``); anything else raises ConfigError.
    """
    ops = OpsSettings.of(**settings)
    fingerprinter = Fingerprinter(ops.fingerprint_cache_size, ops.fingerprint_cache_size)
    states: dict[str, InstanceState] = {}
    out: list[pl.DataFrame] = []
    for snapshot in snapshots:
        state = states.get(snapshot.instance) or initial_state(ops)
        states[snapshot.instance], frame = step(state, snapshot, fingerprinter, ops)
        out.append(frame)
    for instance, state in states.items():
        states[instance], frame = finish(state, ops)
        out.append(frame)
    out = [f for f in out if f.height]
    return pl.concat(out) if out else pl.DataFrame(schema=POINTS)


def run_events(snapshots: Iterable[Snapshot], **settings: Any) -> pl.DataFrame:
    """Every event (plans, query samples) the collector would export for ``snapshots``
    (``pgflow.schema.EVENTS``), in order; settings as for :func:`run` (issue 12)."""
    from pgflow.ops.pipeline import EventsState, events

    ops = OpsSettings.of(**settings)
    states: dict[str, EventsState] = {}
    out: list[pl.DataFrame] = []
    for snapshot in snapshots:
        states[snapshot.instance], frame = events(states.get(snapshot.instance), snapshot, ops)
        if frame.height:
            out.append(frame)
    return pl.concat(out) if out else pl.DataFrame(schema=EVENTS)


__all__ = ["run", "run_events", "Fingerprinter", "OpsSettings"]
