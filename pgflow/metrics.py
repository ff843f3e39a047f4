"""The metric registry: one declaration per metric and per event pgflow exports.

What the OpenTelemetry Collector's receivers keep in ``metadata.yaml``: name, instrument kind,
unit, value type, attributes (with their allowed values where pgflow fixes them), description,
statistics source, lowest PostgreSQL version, and the feature or health group it belongs to.
``docs/metrics.md`` is generated from it (``scripts/gen-docs``), the dashboard's NRQL is checked
against it, and :func:`check_points` / :func:`check_events` refuse a frame holding anything it does
not declare. The declarations themselves are in :mod:`pgflow.metric_catalog`.

Sums are DELTA and monotonic over the export window; gauges are the value last observed.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import Literal

import polars as pl

Kind = Literal["sum", "gauge"]
ValueType = Literal["int", "double"]


@dataclass(frozen=True)
class Attribute:
    """A point or event attribute. ``values``: the only values pgflow sends (checked); empty: any
    value (``examples`` are documentation only)."""

    key: str
    description: str
    values: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()

    def only(self, *values: str) -> Attribute:
        """The same attribute, restricted to ``values`` on one metric (``type`` of a checkpoint)."""
        return replace(self, values=tuple(values))


@dataclass(frozen=True)
class Metric:
    """One exported metric (a Points row's ``metric``, ``kind``, ``unit``, ``monotonic``, ``is_int``)."""

    name: str
    kind: Kind
    unit: str
    value_type: ValueType
    description: str
    source: str
    group: str
    attributes: tuple[Attribute, ...] = ()
    min_version: int = 130000  # server_version_num: PostgreSQL 13 is the oldest pgflow supports
    otel: bool = False  # name, unit and attributes are the OpenTelemetry postgresqlreceiver's

    @property
    def monotonic(self) -> bool:
        return self.kind == "sum"

    @property
    def temporality(self) -> str | None:
        return "DELTA" if self.kind == "sum" else None

    @property
    def is_int(self) -> bool:
        return self.value_type == "int"

    @property
    def attribute_keys(self) -> frozenset[str]:
        return frozenset(a.key for a in self.attributes) | {DB_SYSTEM.key}

    def attribute(self, key: str) -> Attribute | None:
        if key == DB_SYSTEM.key:
            return DB_SYSTEM
        return next((a for a in self.attributes if a.key == key), None)


@dataclass(frozen=True)
class Event:
    """One event (an OTLP log record: EVENTS frame row). ``body``: what the body holds; None: no body."""

    name: str
    description: str
    attributes: tuple[Attribute, ...]
    body: str | None
    source: str
    group: str
    min_version: int = 130000


@dataclass(frozen=True)
class Group:
    """A feature or health group: the heading metrics are listed under in ``docs/metrics.md``."""

    name: str
    title: str
    description: str
    health_group: bool = False  # a name of ``health_groups_disabled`` / ``health_group_intervals``


# ``db.system.name = postgresql`` may ride on any point (it is on every resource, too).
DB_SYSTEM = Attribute("db.system.name", "Always `postgresql`.", values=("postgresql",))


def version_label(version_num: int) -> str:
    """``130000`` -> ``13``, ``90600`` -> ``9.6``."""
    major, minor = divmod(version_num, 10000)
    return str(major) if major >= 10 else f"{major}.{minor // 100}"


# Lookups -----------------------------------------------------------------------------------------


def _catalog() -> types.ModuleType:  # imported late: the catalog imports the classes above
    from pgflow import metric_catalog

    return metric_catalog


@cache
def _fixed_keys() -> frozenset[str]:
    """Attribute keys some metric declares fixed values for."""
    return frozenset(a.key for m in metrics().values() for a in (DB_SYSTEM, *m.attributes) if a.values)


@cache
def metrics() -> Mapping[str, Metric]:
    """Every declared metric by name, in declaration order (read-only: built once)."""
    return types.MappingProxyType({m.name: m for m in _catalog().METRICS})


@cache
def events() -> Mapping[str, Event]:
    return types.MappingProxyType({e.name: e for e in _catalog().EVENTS})


def groups() -> dict[str, Group]:
    return {g.name: g for g in _catalog().GROUPS}


def resource_attributes() -> dict[str, Attribute]:
    return {a.key: a for a in _catalog().RESOURCE_ATTRIBUTES}


def metric(name: str) -> Metric:
    """The declaration of ``name``; KeyError names the registry when it is not declared."""
    try:
        return metrics()[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not declared in pgflow/metric_catalog.py") from None


def point_attributes() -> dict[str, Attribute]:
    """Every point attribute key any metric declares (the first declaration of each key)."""
    out: dict[str, Attribute] = {DB_SYSTEM.key: DB_SYSTEM}
    for m in _catalog().METRICS:
        for a in m.attributes:
            out.setdefault(a.key, a)
    return out


# Checks ------------------------------------------------------------------------------------------


class UndeclaredPoint(ValueError):
    """A points or events frame holds something the registry does not declare."""


def point_problems(points: pl.DataFrame) -> list[str]:
    """One line per (metric, problem) of a POINTS frame against the registry; empty: all declared.

    Checked: the metric name, kind, unit, monotonic flag and value type (``is_int``), that every
    attribute present (non-null) is declared for the metric, and that an attribute with fixed
    values has one of them. Cost: one ``unique`` over the frame's layouts, whatever its height,
    then a lookup per distinct layout (:func:`_layout_problems`).
    """
    if points.height == 0:
        return []
    # Issue 20: a point's layout is its signature, which attributes it carries and its values of
    # the attributes with fixed values. A window holds a few dozen distinct layouts, the same from
    # window to window (the query points' is fixed by code): each is checked once, then remembered.
    # An attribute null on every point is carried by none, one set on every point by all: only
    # the others need a flag per point (~3 ms a window to ~0.6).
    attributes = points.get_column("attributes").struct.unnest()
    height, fixed_keys = attributes.height, _fixed_keys()
    nulls = {c.name: c.null_count() for c in attributes.iter_columns()}  # (no query engine: a frame's null_count is one)
    everywhere = tuple(k for k, n in nulls.items() if n == 0)
    somewhere = tuple(k for k, n in nulls.items() if 0 < n < height)
    fixed = tuple(k for k, n in nulls.items() if n < height and k in fixed_keys)
    columns = [points.get_column(c) for c in ("metric", "kind", "unit", "monotonic", "is_int")]
    if somewhere:
        columns += [c.alias(f"__present_{i}") for i, c in enumerate(attributes.select_seq(pl.col(somewhere).is_not_null()).iter_columns())]
    columns += [attributes.get_column(k).alias(f"__value_{i}") for i, k in enumerate(fixed)]
    signature: set[tuple[str, str]] = set()
    attribute: set[tuple[tuple[str, str], str]] = set()
    value: set[tuple[tuple[str, str, str], str]] = set()
    for layout in pl.DataFrame(columns).unique().rows():
        found = _layout_problems(everywhere, somewhere, fixed, layout)
        signature.update(found[0])
        attribute.update(found[1])
        value.update(found[2])
    return [p for _, p in sorted(signature)] + [p for _, p in sorted(attribute)] + [p for _, p in sorted(value)]


_Problems = tuple[tuple[tuple[str, str], ...], tuple[tuple[tuple[str, str], str], ...], tuple[tuple[tuple[str, str, str], str], ...]]
_LAYOUTS_REMEMBERED = 4096  # distinct layouts (their problems; empty for a good one), then forgotten all at once
_layouts: dict[tuple[object, ...], _Problems] = {}


def _layout_problems(
    everywhere: tuple[str, ...], somewhere: tuple[str, ...], fixed: tuple[str, ...], layout: tuple[object, ...]
) -> _Problems:
    """The problems of one layout: ``layout`` is (metric, kind, unit, monotonic, is_int, a flag per
    attribute of ``somewhere``, a value per attribute of ``fixed``); the attributes of
    ``everywhere`` are present too. Each problem comes with its sort key. Computed once per
    distinct layout and remembered (the registry does not change in a process)."""
    key = (everywhere, somewhere, fixed, *layout)
    known = _layouts.get(key)
    if known is not None:
        return known
    name, kind, unit, monotonic, is_int = layout[:5]
    flags, values = layout[5 : 5 + len(somewhere)], layout[5 + len(somewhere) :]
    present = [*everywhere, *(k for k, on in zip(somewhere, flags) if on)]
    m = metrics().get(str(name))
    signature: list[tuple[str, str]] = []
    attribute: list[tuple[tuple[str, str], str]] = []
    value: list[tuple[tuple[str, str, str], str]] = []
    if m is None:
        signature.append((str(name), f"{name}: not declared in pgflow/metric_catalog.py"))
    else:
        for what, got, want in (
            ("kind", kind, m.kind),
            ("unit", unit, m.unit),
            ("monotonic", monotonic, m.monotonic),
            ("is_int", is_int, m.is_int),
        ):
            if got != want:
                signature.append((m.name, f"{m.name}: {what} {got!r}, declared {want!r}"))
        allowed = m.attribute_keys
        attribute.extend(((m.name, k), f"{m.name}: attribute {k!r} not declared") for k in present if k not in allowed)
        for k, v in zip(fixed, values):
            a = m.attribute(k) if v is not None else None
            if a is not None and a.values and v not in a.values:
                value.append(((m.name, k, str(v)), f"{m.name}: {k}={v!r}, declared values {list(a.values)}"))
    problems: _Problems = (tuple(signature), tuple(attribute), tuple(value))
    if len(_layouts) >= _LAYOUTS_REMEMBERED:
        _layouts.clear()
    _layouts[key] = problems
    return problems


def check_points(points: pl.DataFrame) -> pl.DataFrame:
    """``points`` unchanged when everything in it is declared; else UndeclaredPoint naming each problem."""
    problems = point_problems(points)
    if problems:
        raise UndeclaredPoint(f"{len(problems)} undeclared in the points: " + "; ".join(problems[:10]))
    return points


def event_problems(events_frame: pl.DataFrame) -> list[str]:
    """As :func:`point_problems`, for an EVENTS frame: name, attributes present, fixed values, body."""
    if events_frame.height == 0:
        return []
    declared = events()
    problems: list[str] = []
    attrs = events_frame.select("event_name", pl.col("body").is_not_null().alias("__body"), pl.col("attributes").struct.unnest())
    keys = [c for c in attrs.columns if c not in ("event_name", "__body")]
    present = attrs.group_by("event_name").agg(
        pl.col("__body").any(), pl.col("__body").all().alias("__all_body"), *(pl.col(k).is_not_null().any() for k in keys)
    )
    for row in present.sort("event_name").iter_rows(named=True):
        e = declared.get(row["event_name"])
        if e is None:
            problems.append(f"{row['event_name']}: event not declared in pgflow/metric_catalog.py")
            continue
        allowed = {a.key for a in e.attributes}
        extra = sorted(k for k in keys if row[k] and k not in allowed)
        if extra:
            problems.append(f"{e.name}: attributes {extra} not declared")
        if e.body is None and row["__body"]:
            problems.append(f"{e.name}: has a body, declared without one")
        if e.body is not None and not row["__all_body"]:
            problems.append(f"{e.name}: an event without a body, declared with one")
    for e in declared.values():
        for a in e.attributes:
            if not a.values or a.key not in keys:
                continue
            seen = attrs.filter((pl.col("event_name") == e.name) & pl.col(a.key).is_not_null()).get_column(a.key)
            for value in sorted({_text(v) for v in seen.unique().to_list()} - set(a.values)):
                problems.append(f"{e.name}: {a.key}={value!r}, declared values {list(a.values)}")
    return problems


def _text(value: object) -> str:
    """An attribute value as it is sent: booleans as ``true`` / ``false``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_events(events_frame: pl.DataFrame) -> pl.DataFrame:
    """``events_frame`` unchanged when everything in it is declared; else UndeclaredPoint."""
    problems = event_problems(events_frame)
    if problems:
        raise UndeclaredPoint(f"{len(problems)} undeclared in the events: " + "; ".join(problems[:10]))
    return events_frame


def received_problems(points: pl.DataFrame, logs: pl.DataFrame | None = None) -> list[str]:
    """As :func:`point_problems`, for what an OTLP receiver stored (pgflow.otlp.store: ``points`` and
    ``logs`` tables, attributes as JSON): name, kind, unit, temporality, monotonic flag, attribute
    keys and fixed values of each metric; name, attribute keys and fixed values of each event."""
    declared, problems = metrics(), []
    seen = points.select("metric", "kind", "temporality", "monotonic", "unit", "attributes").unique()
    for name, kind, temporality, monotonic, unit, attributes in seen.sort("metric").iter_rows():
        m = declared.get(name)
        if m is None:
            problems.append(f"{name}: not declared in pgflow/metric_catalog.py")
            continue
        for what, got, want in (
            ("kind", kind, m.kind),
            ("unit", unit, m.unit),
            ("monotonic", monotonic, m.monotonic),
            ("temporality", temporality.upper() if temporality else None, m.temporality),
        ):
            if got != want:
                problems.append(f"{name}: {what} {got!r}, declared {want!r}")
        for key, value in json.loads(attributes or "{}").items():
            a = m.attribute(key)
            if a is None:
                problems.append(f"{name}: attribute {key!r} not declared")
            elif a.values and _text(value) not in a.values:
                problems.append(f"{name}: {key}={_text(value)!r}, declared values {list(a.values)}")
    known = events()
    for name, attributes in [] if logs is None else logs.select("event_name", "attributes").unique().iter_rows():
        e = known.get(name)
        if e is None:
            problems.append(f"{name}: event not declared in pgflow/metric_catalog.py")
            continue
        allowed = {a.key: a for a in e.attributes}
        for key, value in json.loads(attributes or "{}").items():
            if key not in allowed:
                problems.append(f"{name}: attribute {key!r} not declared")
            elif allowed[key].values and _text(value) not in allowed[key].values:
                problems.append(f"{name}: {key}={_text(value)!r}, declared values {list(allowed[key].values)}")
    return sorted(set(problems))


__all__ = [
    "Attribute",
    "DB_SYSTEM",
    "Event",
    "Group",
    "Metric",
    "UndeclaredPoint",
    "check_events",
    "check_points",
    "event_problems",
    "events",
    "groups",
    "metric",
    "metrics",
    "point_attributes",
    "point_problems",
    "received_problems",
    "resource_attributes",
    "version_label",
]
