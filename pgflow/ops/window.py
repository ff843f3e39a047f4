"""Tumbling export windows aligned to the clock (every minute on the minute, by default).

A delta goes to the window in which its scrape ended; deltas are summed per series per
window. Gauges keep the last value observed in the window. A window closes when a scrape
at or after its end arrives (event time: ``scraped_at``, the server's clock), or when the
caller says time has passed (``close_until``) or the stream ends (``close_all``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import polars as pl

from pgflow.ops.aggregate import aggregate
from pgflow.schema import Snapshot

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Gauges:
    """The last observation of the gauge sources in a window."""

    observed_at: datetime
    activity: pl.DataFrame
    locks: pl.DataFrame
    blocked: pl.DataFrame
    databases: list[str]
    max_connections: int | None

    @classmethod
    def of(cls, snapshot: Snapshot) -> Gauges:
        return cls(snapshot.scraped_at, snapshot.activity, snapshot.locks, snapshot.blocked,
                   snapshot.databases["database"].to_list(), snapshot.max_connections)


@dataclass(frozen=True)
class Resource:
    """What identifies an instance to the backend (OTLP resource attributes)."""

    instance: str
    server_address: str
    server_port: int
    server_version_num: int

    @classmethod
    def of(cls, snapshot: Snapshot) -> Resource:
        return cls(snapshot.instance, snapshot.server_address, snapshot.server_port, snapshot.server_version_num)


@dataclass(frozen=True)
class Window:
    """One instance's export window: ``[start, end)``; its series are summed when closed."""

    resource: Resource
    start: datetime
    end: datetime
    parts: tuple[pl.DataFrame, ...] = ()
    deallocated: int = 0
    gauges: Gauges | None = None

    def series(self) -> pl.DataFrame:
        """The window's deltas, one row per series (aggregated once, when the window closes)."""
        if not self.parts:
            return pl.DataFrame()
        # Every part keeps the server's row order (the joins upstream keep their left side's
        # order), so floating-point sums add up in the same order on every path.
        return aggregate(pl.concat(self.parts, how="vertical_relaxed"))


@dataclass(frozen=True)
class WindowState:
    length: timedelta
    open: dict[datetime, Window] = field(default_factory=dict)


def window_bounds(at: datetime, length: timedelta) -> tuple[datetime, datetime]:
    """The aligned window ``[start, end)`` that contains ``at``."""
    n = (at - _EPOCH) // length
    start = _EPOCH + n * length
    return start, start + length


def add(state: WindowState, snapshot: Snapshot, series: pl.DataFrame | None, deallocated: int) -> WindowState:
    """Put one scrape's fingerprinted deltas and gauges into the window that contains its end."""
    start, end = window_bounds(snapshot.scraped_at, state.length)
    current = state.open.get(end) or Window(Resource.of(snapshot), start, end)
    parts = current.parts + ((series,) if series is not None and series.height else ())
    updated = replace(current, resource=Resource.of(snapshot), parts=parts,
                      deallocated=current.deallocated + deallocated, gauges=Gauges.of(snapshot))
    return replace(state, open={**state.open, end: updated})


def close_until(state: WindowState, watermark: datetime) -> tuple[WindowState, list[Window]]:
    """Close every window that ends at or before ``watermark``, oldest first."""
    due = sorted(end for end in state.open if end <= watermark)
    if not due:
        return state, []
    closed = [state.open[end] for end in due]
    return replace(state, open={e: w for e, w in state.open.items() if e > watermark}), closed


def close_all(state: WindowState) -> tuple[WindowState, list[Window]]:
    closed = [state.open[end] for end in sorted(state.open)]
    return replace(state, open={}), closed
