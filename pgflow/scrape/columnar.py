"""The statements scrape's columns: the columnar row decoded into arrays, no Python object per value (issue 20).

:func:`~pgflow.scrape.statements.statements_columnar_sql` sends each counter as one bytea of
binary send forms; :func:`columnar` turns them into exact int64 / float64 / bool arrays. Also
the empty frames a snapshot shares, built once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import polars as pl

from pgflow.errors import ScrapeError
from pgflow.schema import STATEMENT_INT_COUNTERS, STATEMENT_TIME_COUNTERS, STATEMENTS, Snapshot
from pgflow.scrape.statements import COLUMNAR_PREFIX, PG_EPOCH_US, columnar_width

_EMPTY: dict[int, pl.DataFrame] = {}


def frame(rows: list[tuple], schema: pl.Schema) -> pl.DataFrame:
    if rows:
        return pl.DataFrame(rows, schema=schema, orient="row")
    empty = _EMPTY.get(id(schema))  # the schemas are module constants: one empty frame each, shared
    if empty is None:
        empty = _EMPTY[id(schema)] = pl.DataFrame(schema=schema)
    return empty


_EMPTIES: dict[str, pl.DataFrame] = {}
_SCRAPED = ("statements", "activity", "locks", "blocked", "databases")  # filled by every scrape


def empty_frames() -> dict[str, pl.DataFrame]:
    """One empty frame per frame field of Snapshot the scrape does not fill, built once and
    shared (frames are immutable): building ~14 empty frames per scrape cost ~1.5 ms."""
    if not _EMPTIES:
        for f in dataclasses.fields(Snapshot):
            if f.default_factory is not dataclasses.MISSING and f.name in Snapshot.FRAMES and f.name not in _SCRAPED:
                _EMPTIES[f.name] = f.default_factory()
    return _EMPTIES


NULL_BOOL = 2  # toplevel unknown (PostgreSQL 13)


@dataclass(frozen=True)
class Columns:
    """One scrape's statements as arrays (no query text), from the columnar row."""

    hidden: int
    n: int
    dbid: np.ndarray
    userid: np.ndarray
    queryid: np.ndarray
    toplevel: np.ndarray  # uint8: 0, 1, or NULL_BOOL
    since: pl.Series
    counters: list[pl.Series]
    names: tuple[list, list, list, list]  # database oids, names; role oids, names


@dataclass(frozen=True)
class Last:
    """What the previous scrape's statements frame reuses when the keys have not changed."""

    keys: tuple[np.ndarray, ...]
    query: pl.Series
    own: np.ndarray | None
    names: tuple[list, list, list, list]
    database: pl.Series
    user: pl.Series
    pending: np.ndarray | None = None  # the keys whose text is not decided yet (tried again next scrape)

    @property
    def complete(self) -> bool:
        """Every key's text (or own mark) decided: nothing to try again."""
        return self.pending is None


def _packed(keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """Each key (dbid, userid, queryid, toplevel) as one 17-byte string, comparable in numpy."""
    out = np.empty(len(keys[0]), dtype=[("ids", ">u8"), ("queryid", ">i8"), ("toplevel", "u1")])
    out["ids"] = (keys[0].astype(np.uint64) << np.uint64(32)) | keys[1].astype(np.uint64)  # two oids
    out["queryid"] = keys[2]
    out["toplevel"] = keys[3]
    return out.view("S17")


def positions(keys: tuple[np.ndarray, ...], previous: tuple[np.ndarray, ...]) -> np.ndarray:
    """For each key of ``keys``, its row in ``previous`` (keys are unique), or -1 when it is new.

    In numpy, a sort and a binary search (issue 20): a scrape whose keys changed (a new
    statement, an eviction) reuses every other key's text from the previous scrape's column
    without a Python object per key.
    """
    if not len(previous[0]):
        return np.full(len(keys[0]), -1, np.int64)
    old, new = _packed(previous), _packed(keys)
    order = np.argsort(old, kind="stable")
    ranked = old[order]
    at = np.minimum(np.searchsorted(ranked, new), len(ranked) - 1)
    return np.where(ranked[at] == new, order[at], -1).astype(np.int64)


def _ints(raw: bytes | None, n: int, what: str) -> np.ndarray:
    if raw is None:
        if n:
            raise ScrapeError(f"pg_stat_statements returned no {what} for {n} entries", "report this as a bug")
        return np.empty(0, np.int64)
    if len(raw) != 8 * n:
        raise ScrapeError(f"pg_stat_statements returned {len(raw) // 8} values of {what} for {n} entries", "report this as a bug")
    return np.frombuffer(raw, ">i8").astype(np.int64)


def columnar_row(rows: list[tuple]) -> tuple:
    """The columnar layout back in order from the query's rows ``(i, n, b, o, t)``: each row's value
    is in the one column of its type (all NULL: the value is NULL)."""
    width = columnar_width()
    if len(rows) != width:
        raise ScrapeError(f"the statements query returned {len(rows)} rows instead of {width}", "report this as a bug")
    out: list[object] = [None] * width
    for i, *values in rows:
        out[i] = next((v for v in values if v is not None), None)
    return tuple(out)


def columnar(row: tuple) -> Columns:
    """Decode the columnar statements row: every value an exact int64 / float64 / bool, no Python object per value."""
    prefix, rest = row[: len(COLUMNAR_PREFIX)], row[len(COLUMNAR_PREFIX) :]
    hidden, n, dbid, userid, queryid, toplevel, since = prefix
    n = int(n)
    counters = []
    for name, raw in zip(STATEMENT_INT_COUNTERS, rest):
        counters.append(
            pl.Series(name, _ints(raw, n, name)) if raw is not None else pl.repeat(None, n, dtype=pl.Int64, eager=True).alias(name)
        )
    for name, raw in zip(STATEMENT_TIME_COUNTERS, rest[len(STATEMENT_INT_COUNTERS) :]):
        if raw is not None and len(raw) != 8 * n:
            raise ScrapeError(f"pg_stat_statements returned {len(raw) // 8} values of {name} for {n} entries", "report this as a bug")
        values = np.frombuffer(raw, ">f8").astype(np.float64) if raw is not None else None
        counters.append(pl.Series(name, values) if values is not None else pl.repeat(None, n, dtype=pl.Float64, eager=True).alias(name))
    names = tuple(list(v or []) for v in rest[len(STATEMENT_INT_COUNTERS) + len(STATEMENT_TIME_COUNTERS) :])
    if toplevel is None:
        top = np.full(n, NULL_BOOL, np.uint8)
    else:
        top = np.frombuffer(toplevel, np.uint8).copy()
        if len(top) != n:
            raise ScrapeError(f"pg_stat_statements returned {len(top)} values of toplevel for {n} entries", "report this as a bug")
    if since is None:
        since_series = pl.repeat(None, n, dtype=STATEMENTS["stats_since"], eager=True).alias("stats_since")
    else:
        raw_since = _ints(since, n, "stats_since")
        nulls = raw_since == np.iinfo(np.int64).min  # -infinity: no stats_since
        since_series = pl.Series("stats_since", raw_since + PG_EPOCH_US)
        if nulls.any():
            since_series = pl.select(pl.when(pl.lit(pl.Series(~nulls))).then(since_series)).to_series().alias("stats_since")
        since_series = since_series.cast(STATEMENTS["stats_since"])
    return Columns(
        int(hidden),
        n,
        _ints(dbid, n, "dbid"),
        _ints(userid, n, "userid"),
        _ints(queryid, n, "queryid"),
        top,
        since_series,
        counters,
        names,  # type: ignore[arg-type]
    )


def toplevel_series(values: np.ndarray) -> pl.Series:
    if len(values) and values[0] == NULL_BOOL:
        return pl.repeat(None, len(values), dtype=pl.Boolean, eager=True).alias("toplevel")
    return pl.Series("toplevel", values.astype(bool))
