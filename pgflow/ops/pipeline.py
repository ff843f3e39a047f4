"""The operator chain for one instance: delta (+ fingerprint) → window (aggregate) → cap → points.

``step`` and ``finish`` are the only composition of the operators; ``pgflow.ops.run``,
the notebook replay and the bytewax flow all call them, so every path gives the same points.
``events`` is the same for events (plans, query samples): ``pgflow.ops.run_events``, the replay
and the flow call it once per snapshot, beside ``step``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import polars as pl

from pgflow.config import Settings
from pgflow.ops import activity as act
from pgflow.ops import window as win
from pgflow.ops.cap import CapState, cap
from pgflow.ops.delta import DeltaState, delta
from pgflow.ops.fingerprint import Fingerprinter
from pgflow.ops.plan_events import snapshot_plan_events
from pgflow.ops.points import points
from pgflow.ops.query_samples import QUERY_SAMPLES, SampleLimits, limit_samples, sample_events
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


def initial_state(settings: OpsSettings) -> InstanceState:
    return InstanceState(None, win.WindowState(timedelta(seconds=settings.export_interval_secs)), CapState())


def _emit(state: InstanceState, closed: list[win.Window], settings: OpsSettings) -> tuple[InstanceState, pl.DataFrame]:
    frames = []
    cap_state = state.cap
    activity = getattr(state, "activity", None) or act.ActivityState()  # ledgers written before issue 11 lack it
    for window in closed:
        cap_state, series = cap(
            cap_state,
            window.series(),
            max_queries_tracked=settings.max_queries_tracked,
            max_users_tracked=settings.max_users_tracked,
            max_databases_tracked=settings.max_databases_tracked,
            slow_query_threshold_ms=settings.slow_query_threshold_ms,
        )
        frames.append(points(window, series))
        activity, sampled = act.close(activity, window, cap_state, state.delta.rows if state.delta else None,
                                      max_users_tracked=settings.max_users_tracked,
                                      max_databases_tracked=settings.max_databases_tracked)
        if sampled is not None:
            frames.append(sampled)
    out = pl.concat(frames) if frames else _NO_POINTS
    return replace(state, cap=cap_state, activity=activity), out


def step(state: InstanceState, snapshot: Snapshot, fingerprinter: Fingerprinter,
         settings: OpsSettings) -> tuple[InstanceState, pl.DataFrame]:
    """Feed one snapshot; return the new state and the points of windows it closed."""
    def label(rows: pl.DataFrame) -> pl.DataFrame:  # raw texts never enter the state
        return fingerprinter.apply(snapshot.instance, rows).drop("query")

    delta_state, deltas = delta(state.delta, snapshot, label)
    if delta_state is state.delta:  # a snapshot from the past: ignored whole
        return state, _NO_POINTS
    window_state, closed = win.close_until(state.window, snapshot.scraped_at)
    window_state = win.add(window_state, snapshot, deltas)
    activity = act.add(getattr(state, "activity", None) or act.ActivityState(), snapshot, state.window.length)
    state = replace(state, delta=delta_state, window=window_state, scrapes=state.scrapes + 1, activity=activity)
    return _emit(state, closed, settings)


def finish(state: InstanceState, settings: OpsSettings) -> tuple[InstanceState, pl.DataFrame]:
    """Close every open window (end of stream, shutdown); each ends at its last scrape.

    A window closed before its nominal end must not claim time not yet observed: after a
    restart the same period continues in a window that starts where this one ended.
    """
    window_state, closed = win.close_all(state.window)
    return _emit(replace(state, window=window_state), closed, settings)


# Issue 12: events ------------------------------------------------------------------------------

_NO_EVENTS = pl.DataFrame(schema=EVENTS)
_NO_SAMPLES = pl.DataFrame(schema=QUERY_SAMPLES)


@dataclass(frozen=True)
class EventsState:
    """What the events carry from snapshot to snapshot: the query-sample limiter (at most an hour
    of sent samples' times and executions) and how many samples the current window has sent.
    Small and picklable; kept beside the operators' state in the ledger."""

    samples: SampleLimits = field(default_factory=SampleLimits)
    window: int | None = None  # export window (index) of the last samples sent
    sent_in_window: int = 0


def events(state: EventsState | None, snapshot: Snapshot, settings: OpsSettings) -> tuple[EventsState, pl.DataFrame]:
    """The events one snapshot gives (``pgflow.schema.EVENTS``): its plans as ``db.server.query_plan``
    and its query samples, limited, as ``db.server.query_sample``; and the new state.

    Independent of ``step``: an event is a fact of the moment it was taken, whatever the counters
    do. Every path (``pgflow run``, ``pgflow replay``, ``pgflow.ops.run_events``) calls it once per
    snapshot, in order, so all give the same events.
    """
    state = state or EventsState()
    # Query samples: ``snapshot.query_samples`` here (QUERY_SAMPLES) once the sampler puts them on the Snapshot.
    samples = _NO_SAMPLES
    if snapshot.plans.height == 0 and samples.height == 0:
        return state, _NO_EVENTS
    frames = [snapshot_plan_events(snapshot)] if snapshot.plans.height else []
    if samples.height:
        state, sampled = query_sample_events(state, samples, snapshot, settings)
        frames.append(sampled)
    frames = [f for f in frames if f.height]
    return state, (pl.concat(frames) if frames else _NO_EVENTS)


def query_sample_events(state: EventsState, samples: pl.DataFrame, snapshot: Snapshot,
                        settings: OpsSettings) -> tuple[EventsState, pl.DataFrame]:
    """A snapshot's query samples (``QUERY_SAMPLES``) through the limits, as events.

    ``max_samples_per_window`` holds per export window (of the snapshot's time), however many
    snapshots the window has; the limiter's state is copied, never changed in place.
    """
    window = int(snapshot.scraped_at.timestamp() // settings.export_interval_secs)
    sent = state.sent_in_window if state.window == window else 0
    kept, limits = limit_samples(samples, copy.deepcopy(state.samples),
                                 sample_min_duration_ms=settings.sample_min_duration_ms,
                                 samples_per_fingerprint_per_hour=settings.samples_per_fingerprint_per_hour,
                                 max_samples_per_window=max(0, settings.max_samples_per_window - sent))
    out = sample_events(kept, instance=snapshot.instance, server_address=snapshot.server_address,
                        server_port=snapshot.server_port, server_version_num=snapshot.server_version_num)
    return EventsState(limits, window, sent + kept.height), out
