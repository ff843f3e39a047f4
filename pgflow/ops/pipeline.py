"""The operator chain for one instance: delta (+ fingerprint) → window (aggregate) → cap → points.

``step`` and ``finish`` are the only composition of the operators; ``pgflow.ops.run``,
the notebook replay and the bytewax flow all call them, so every path gives the same points.
``events`` is the same for events (plans, query samples): ``pgflow.ops.run_events``, the replay
and the flow call it once per snapshot, beside ``step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import polars as pl

from pgflow import metrics
from pgflow.config import Settings
from pgflow.ops import activity as act
from pgflow.ops import health
from pgflow.ops import tables as tbl
from pgflow.ops import window as win
from pgflow.ops.cap import CapState, cap
from pgflow.ops.delta import DeltaState, delta, server_changed
from pgflow.ops.fingerprint import Fingerprinter
from pgflow.ops.plan_events import snapshot_plan_events
from pgflow.ops.points import points
from pgflow.ops.query_samples import SampleLimits, query_sample_events
from pgflow.schema import EVENTS, POINTS, Snapshot

_NO_POINTS = pl.DataFrame(schema=POINTS)  # built once: an empty frame with a struct column costs ~1 ms


@dataclass(frozen=True)
class OpsSettings:
    """The settings the operators read (names and validation as in pgflow.config)."""

    export_interval_secs: float = 60.0
    max_queries_tracked: int = 1000
    max_users_tracked: int = 100
    max_databases_tracked: int = 100
    slow_query_threshold_ms: float = 0.0
    fingerprint_cache_size: int = 50_000
    max_tables_tracked: int = 300  # issue 13
    # issue 12: events (query samples' limits; plans are budgeted where they are explained)
    sample_min_duration_ms: float = 100.0
    samples_per_fingerprint_per_hour: int = 15
    max_samples_per_window: int = 100

    @classmethod
    def from_settings(cls, settings: Settings) -> OpsSettings:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    @classmethod
    def of(cls, **overrides: Any) -> OpsSettings:
        """Validate ``overrides`` exactly as the collector's configuration would."""
        return cls.from_settings(Settings.load(**overrides))


@dataclass(frozen=True)
class InstanceState:
    """Everything one instance carries between scrapes: small, immutable, picklable."""

    delta: DeltaState | None
    window: win.WindowState
    cap: CapState
    scrapes: int = 0
    activity: act.ActivityState | None = None  # issue 11: active-session samples per open window
    health: health.HealthState | None = None  # issue 13: per-database and instance health
    tables: tbl.TableState = field(default_factory=tbl.TableState)  # issue 13: per-table statistics

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("tables", tbl.TableState())  # a ledger written before issue 13 has none
        self.__dict__.update(state)


def initial_state(settings: OpsSettings) -> InstanceState:
    return InstanceState(None, win.WindowState(timedelta(seconds=settings.export_interval_secs)), CapState())


def _emit(state: InstanceState, closed: list[win.Window], settings: OpsSettings) -> tuple[InstanceState, pl.DataFrame]:
    frames = []
    cap_state = state.cap
    activity = getattr(state, "activity", None) or act.ActivityState()  # ledgers written before issue 11 lack it
    labels = state.delta.rows if state.delta else None
    for window in closed:
        cap_state, series = cap(
            cap_state,
            window.series(),
            max_queries_tracked=settings.max_queries_tracked,
            max_users_tracked=settings.max_users_tracked,
            max_databases_tracked=settings.max_databases_tracked,
            slow_query_threshold_ms=settings.slow_query_threshold_ms,
            sampled=act.sampled(activity, window, labels),  # long statements compete for a name too
        )
        frames.append(points(window, series))
        activity, sampled = act.close(
            activity,
            window,
            cap_state,
            labels,
            max_users_tracked=settings.max_users_tracked,
            max_databases_tracked=settings.max_databases_tracked,
        )
        if sampled is not None:
            frames.append(sampled)
        if window.period not in _tables(state).open:
            continue  # no table statistics in this window (tbl.emit would make an empty frame: ~0.4 ms)
        table_state, table_points = tbl.emit(_tables(state), window, settings.max_tables_tracked)
        state = replace(state, tables=table_state)
        if table_points.height:
            frames.append(table_points)
    out = pl.concat(frames) if frames else _NO_POINTS
    return replace(state, cap=cap_state, activity=activity), out


def _tables(state: InstanceState) -> tbl.TableState:
    return state.tables


def step(
    state: InstanceState, snapshot: Snapshot, fingerprinter: Fingerprinter, settings: OpsSettings
) -> tuple[InstanceState, pl.DataFrame]:
    """Feed one snapshot; return the new state and the points of windows it closed."""

    def label(rows: pl.DataFrame) -> pl.DataFrame:  # raw texts never enter the state
        return fingerprinter.apply(snapshot.instance, rows).drop("query")

    changed = state.delta is not None and server_changed(state.delta, snapshot) is not None
    delta_state, deltas = delta(state.delta, snapshot, label)
    if delta_state is state.delta:  # a snapshot from the past: ignored whole
        return state, _NO_POINTS
    window_state, closed = win.close_until(state.window, snapshot.scraped_at)
    window_state = win.add(window_state, snapshot, deltas)
    activity = act.add(getattr(state, "activity", None) or act.ActivityState(), snapshot, state.window.length)
    table_state = tbl.add(_tables(state), snapshot.tables, win.window_bounds(snapshot.scraped_at, window_state.length)[1])
    state = replace(state, delta=delta_state, window=window_state, scrapes=state.scrapes + 1, activity=activity, tables=table_state)
    state, out = _emit(state, closed, settings)
    health_state = _health_state(state)
    if changed:  # another server: its instance counters are a new baseline too
        health_state = health.without_baselines(health_state)
    return _with_health(state, out, *health.step(health_state, snapshot, deltas, closed_until=getattr(state.window, "closed_until", None)))


def finish(state: InstanceState, settings: OpsSettings) -> tuple[InstanceState, pl.DataFrame]:
    """Close every open window (end of stream, shutdown); each ends at its last scrape.

    A window closed before its nominal end must not claim time not yet observed: after a
    restart the same period continues in a window that starts where this one ended.
    """
    window_state, closed = win.close_all(state.window)
    state, out = _emit(replace(state, window=window_state), closed, settings)
    return _with_health(state, out, *health.finish(_health_state(state)))


def _health_state(state: InstanceState) -> health.HealthState:
    return state.health if state.health is not None else health.initial(state.window.length)


def _with_health(
    state: InstanceState, out: pl.DataFrame, health_state: health.HealthState, health_points: pl.DataFrame
) -> tuple[InstanceState, pl.DataFrame]:
    state = replace(state, health=health_state)
    if health_points.height:
        out = pl.concat([out, health_points]) if out.height else health_points
    # Every point leaves through here: one the registry does not declare is a bug, never sent.
    return state, (metrics.check_points(out) if out.height else out)


# Issue 12: events ------------------------------------------------------------------------------

_NO_EVENTS = pl.DataFrame(schema=EVENTS)


@dataclass(frozen=True)
class EventsState:
    """What the events carry from snapshot to snapshot: the query-sample limiter
    (:class:`SampleLimits`: the last hour's samples, this window's budget). Small, immutable and
    picklable; kept in the ledger beside the operators' state, so a restart sends no execution twice."""

    samples: SampleLimits = field(default_factory=SampleLimits)


def events(state: EventsState | None, snapshot: Snapshot, settings: OpsSettings) -> tuple[EventsState, pl.DataFrame]:
    """The events one snapshot gives (``pgflow.schema.EVENTS``): its plans as ``db.server.query_plan``
    and its query samples, limited, as ``db.server.query_sample``; and the new state.

    Independent of ``step``: an event is a fact of the moment it was taken, whatever the counters
    do. Every path (``pgflow run``, ``pgflow replay``, ``pgflow.ops.run_events``) calls it once per
    snapshot, in order, so all give the same events.
    """
    state = state or EventsState()
    frames = [snapshot_plan_events(snapshot)] if snapshot.plans.height else []
    if getattr(snapshot, "query_samples", _NO_EVENTS).height:  # (skipped when empty: an empty frame costs ~1 ms)
        limits, samples = query_sample_events(
            state.samples,
            snapshot,
            sample_min_duration_ms=settings.sample_min_duration_ms,
            samples_per_fingerprint_per_hour=settings.samples_per_fingerprint_per_hour,
            max_samples_per_window=settings.max_samples_per_window,
            export_interval_secs=settings.export_interval_secs,
        )
        state = replace(state, samples=limits)
        frames.append(samples)
    frames = [f for f in frames if f.height]
    if not frames:
        return state, _NO_EVENTS
    return state, metrics.check_events(frames[0] if len(frames) == 1 else pl.concat(frames))
