"""Query samples → ``db.server.query_sample`` events (pure; the sampler feeds it).

Four steps, each a pure function:
- :func:`sample_text`: a ``pg_stat_activity.query`` text as it may leave the collector: normalized
  with pglast (no literal, no comment) and fingerprinted like the statement metrics; a text cut by
  ``track_activity_query_size`` or one pglast cannot parse becomes a marker, never raw text.
  The sampler (:mod:`pgflow.scrape.sampler`) calls it the moment it reads a text, so a raw text
  is never held anywhere else; its rows ride on the Snapshot as the ``query_samples`` frame.
- :func:`named_by_query_id`: a sample (and its blocking root) takes the fingerprint and text of the
  statement its query id names in ``pg_stat_statements``, the ones the metrics carry (issue 19):
  the activity text of ``begin; update ...; select pg_sleep(2); commit;`` is the whole batch, while
  its query id names the statement running now (a ``<truncated>`` or ``<unparsable>`` marker stays,
  with the statement's fingerprint). A query id pg_stat_statements does not show yet
  keeps the text's own fingerprint, or ``unknown`` for a multi-statement text (which statement
  runs is not known).
- :func:`limit_samples`: one row per execution (pid, query_start), only executions running longer
  than ``sample_min_duration_ms``, at most ``samples_per_fingerprint_per_hour`` per fingerprint and
  ``max_samples_per_window`` per export window (the longest-running first); the state
  (:class:`SampleLimits`) is a small, immutable, picklable value carried from snapshot to snapshot.
- :func:`sample_events`: the kept rows as events with the OpenTelemetry receiver's attribute names.

:func:`query_sample_events` composes them for one Snapshot: the one call the events path makes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl

from pgflow.ops.events import event_frame
from pgflow.ops.fingerprint import fallback_info, parse_info, query_info, statement_count
from pgflow.schema import EVENTS, QUERY_SAMPLES, Snapshot, conform

QUERY_SAMPLE = "db.server.query_sample"
TRUNCATED, UNPARSABLE = "<truncated>", "<unparsable>"
UNKNOWN = "unknown"  # a multi-statement text whose running statement no query id names (as the activity's)
SKIP_REASONS = ("short", "seen", "window", "fingerprint")  # the limiter's; the sampler adds its own
HOUR = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

__all__ = [
    "QUERY_SAMPLE",
    "QUERY_SAMPLES",
    "TRUNCATED",
    "UNPARSABLE",
    "SampleLimits",
    "SampleText",
    "limit_samples",
    "named_by_query_id",
    "query_sample_events",
    "sample_events",
    "sample_text",
]


@dataclass(frozen=True)
class SampleText:
    fingerprint: str
    text: str  # normalized, or TRUNCATED / UNPARSABLE
    truncated: bool
    unparsable: bool


def sample_text(raw: str | None, track_activity_query_size: int = 1024) -> SampleText:
    """What may leave the collector of one activity text. Truncated: at least
    ``track_activity_query_size - 7`` bytes (PostgreSQL keeps size - 1 bytes, cut on a character)."""
    raw = raw or ""
    if len(raw.encode("utf-8", "surrogatepass")) >= track_activity_query_size - 7:
        return SampleText(fallback_info(raw).fingerprint, TRUNCATED, True, False)
    try:
        info = parse_info(raw)
        several = statement_count(raw) > 1
    except Exception:
        return SampleText(fallback_info(raw).fingerprint, UNPARSABLE, False, True)
    return SampleText(UNKNOWN if several else info.fingerprint, info.text, False, False)


def _statement_names(statements: pl.DataFrame, query_ids: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The fingerprint and text of each query id pg_stat_statements shows: by (database, user,
    queryid), and by queryid alone (another database or user ran it; the smallest fingerprint,
    then text, so every path picks alike)."""
    rows = statements.filter(pl.col("queryid").is_in(query_ids.implode()) & pl.col("query").is_not_null()).select(
        "database", "user", "queryid", "toplevel", "query"
    )
    infos = [query_info(q) for q in rows.get_column("query").to_list()]
    rows = rows.drop("query").with_columns(
        pl.Series("named_fp", [i.fingerprint for i in infos], dtype=pl.String),
        pl.Series("named_text", [i.text for i in infos], dtype=pl.String),
    )
    rows = rows.sort(["queryid", "toplevel", "named_fp", "named_text"], descending=[False, True, False, False], nulls_last=True)
    exact = rows.unique(["database", "user", "queryid"], keep="first", maintain_order=True).drop("toplevel")
    anywhere = rows.unique(["queryid"], keep="first", maintain_order=True).select(
        "queryid", pl.col("named_fp").alias("any_fp"), pl.col("named_text").alias("any_text")
    )
    return exact, anywhere


def named_by_query_id(samples: pl.DataFrame, statements: pl.DataFrame | None) -> pl.DataFrame:
    """``samples`` (QUERY_SAMPLES) with the fingerprint and text of the statement each query id
    names, and the blocking root's fingerprint likewise, wherever ``statements`` (a snapshot's
    pg_stat_statements rows, with their texts) knows the query id."""
    if statements is None or not samples.height or not statements.height or "query" not in statements.columns:
        return samples
    ids = pl.concat([samples.get_column("query_id"), samples.get_column("blocking_root_query_id")]).drop_nulls()
    if not ids.len():
        return samples
    exact, anywhere = _statement_names(statements, ids.unique())
    if not exact.height:
        return samples
    c = pl.col
    out = (
        samples.join(
            exact, left_on=["database", "user", "query_id"], right_on=["database", "user", "queryid"], how="left", maintain_order="left"
        )
        .join(anywhere, left_on="query_id", right_on="queryid", how="left", maintain_order="left")
        .with_columns(
            pl.coalesce("named_fp", "any_fp", "fingerprint").alias("fingerprint"),
            pl.when(c("truncated").fill_null(False) | c("unparsable").fill_null(False))
            .then(c("text"))  # a marker stays a marker: the sample's own text was not read whole
            .otherwise(pl.coalesce("named_text", "any_text", "text"))
            .alias("text"),
        )
        .drop("named_fp", "named_text", "any_fp", "any_text")
    )
    root = anywhere.select(c("queryid").alias("blocking_root_query_id"), c("any_fp").alias("root_fp"))
    out = (
        out.join(root, on="blocking_root_query_id", how="left", maintain_order="left")
        .with_columns(pl.coalesce("root_fp", "blocking_root_fingerprint").alias("blocking_root_fingerprint"))
        .drop("root_fp")
    )
    return out.select(samples.columns)


def _secs(t: datetime) -> float:
    return (t - _EPOCH).total_seconds()


def _micros(t: datetime | None) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1) if t is not None else 0


@dataclass(frozen=True)
class SampleLimits:
    """The limiter's state, carried from snapshot to snapshot (and kept in the ledger).

    Immutable (every call returns a new value) and bounded: ``sent`` holds one small tuple per
    sample sent within the last hour, so at most ``max_samples_per_window`` x windows per hour
    entries (6,000 with the defaults; typically a few dozen), pruned at every call.
    ``taken``/``skipped`` are cumulative counts for ``/metrics``: the caller publishes the
    difference between the state it passed and the one it got (:meth:`counts_since`).
    """

    # (sent at: epoch seconds, fingerprint, pid, query_start: epoch microseconds), oldest first
    sent: tuple[tuple[float, str, int, int], ...] = ()
    window: int | None = None  # the export window (index since the epoch) the budget below counts for
    window_sent: int = 0
    taken: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count; never mutated once built

    def counts_since(self, previous: SampleLimits | None) -> tuple[int, dict[str, int]]:
        """Samples taken and skipped (by reason) between ``previous`` and this state."""
        before = previous.skipped if previous is not None else {}
        skipped = {r: n - before.get(r, 0) for r, n in self.skipped.items() if n - before.get(r, 0) > 0}
        return self.taken - (previous.taken if previous is not None else 0), skipped


def limit_samples(
    samples: pl.DataFrame,
    state: SampleLimits | None = None,
    *,
    sample_min_duration_ms: float = 100,
    samples_per_fingerprint_per_hour: int = 15,
    max_samples_per_window: int = 100,
    window: int | None = None,
    now: datetime | None = None,
) -> tuple[pl.DataFrame, SampleLimits]:
    """The samples to send, and the new state (``state`` is never changed).

    ``window``: the export window these samples count against (samples of one window share
    ``max_samples_per_window``); None: a window of their own. ``now`` (default: the latest
    ``seen_at``) ages the per-fingerprint hour. Executions are deduplicated on (pid, query_start):
    within the frame (the longest observation is kept) and against the last hour's samples
    (a sampler that restarted sees a still-running execution again).
    """
    state = state or SampleLimits()
    samples = conform(samples, QUERY_SAMPLES)
    if samples.height == 0:
        return samples, state
    now = now or samples["seen_at"].max()  # type: ignore[assignment]
    horizon = _secs(now) - HOUR.total_seconds()  # type: ignore[arg-type]
    sent = [s for s in state.sent if s[0] > horizon]
    window_sent = state.window_sent if window is not None and window == state.window else 0
    skipped = dict(state.skipped)

    def skip(reason: str, n: int = 1) -> None:
        if n:
            skipped[reason] = skipped.get(reason, 0) + n

    longest = samples.sort("duration_secs", descending=True, nulls_last=True, maintain_order=True).unique(
        ["pid", "query_start"], keep="first", maintain_order=True
    )
    slow = longest.filter(pl.col("duration_secs") * 1000 >= sample_min_duration_ms)
    skip("short", longest.height - slow.height)
    per_fingerprint = Counter(s[1] for s in sent)
    executions = {(s[2], s[3]) for s in sent}
    kept = []
    for i, (pid, start, fp, seen) in enumerate(slow.select("pid", "query_start", "fingerprint", "seen_at").iter_rows()):
        execution = (pid, _micros(start))
        if execution in executions:
            skip("seen")
        elif window_sent >= max_samples_per_window:
            skip("window")
        elif per_fingerprint[fp] >= samples_per_fingerprint_per_hour:
            skip("fingerprint")
        else:
            kept.append(i)
            window_sent += 1
            per_fingerprint[fp] += 1
            executions.add(execution)
            sent.append((_secs(seen), fp, pid, execution[1]))
    sent.sort(key=lambda s: s[0])
    new = SampleLimits(tuple(sent), window, window_sent, state.taken + len(kept), skipped)
    return slow[kept], new


def window_index(at: datetime, export_interval_secs: float) -> int:
    """The export window ``at`` falls in (windows are aligned to the epoch, as pgflow.ops.window's)."""
    return math.floor(_secs(at) / export_interval_secs)


def query_sample_events(
    limits: SampleLimits | None,
    snapshot: Snapshot,
    *,
    sample_min_duration_ms: float = 100,
    samples_per_fingerprint_per_hour: int = 15,
    max_samples_per_window: int = 100,
    export_interval_secs: float = 60.0,
) -> tuple[SampleLimits, pl.DataFrame]:
    """The ``db.server.query_sample`` events of one snapshot, and the limiter's new state.

    The one call the events path makes per snapshot (pure: the same snapshots and settings give
    the same events live, in replay and in a notebook). A snapshot's samples count against the
    export window its scrape falls in, like its metrics. ``limits`` None: a fresh state.
    """
    limits = limits or SampleLimits()
    samples = getattr(snapshot, "query_samples", None)  # a Snapshot pickled before issue 12 has none
    if samples is None or samples.height == 0:
        return limits, pl.DataFrame(schema=EVENTS)
    samples = named_by_query_id(conform(samples, QUERY_SAMPLES), snapshot.statements)
    kept, limits = limit_samples(
        samples,
        limits,
        sample_min_duration_ms=sample_min_duration_ms,
        samples_per_fingerprint_per_hour=samples_per_fingerprint_per_hour,
        max_samples_per_window=max_samples_per_window,
        window=window_index(snapshot.scraped_at, export_interval_secs),
        now=snapshot.scraped_at,
    )
    return limits, sample_events(
        kept,
        instance=snapshot.instance,
        server_address=snapshot.server_address,
        server_port=snapshot.server_port,
        server_version_num=snapshot.server_version_num,
    )


def sample_events(
    samples: pl.DataFrame, *, instance: str, server_address: str = "", server_port: int = 0, server_version_num: int = 0
) -> pl.DataFrame:
    """The kept samples as ``db.server.query_sample`` events (time: when the sample saw them)."""
    given = {
        "db.system.name": pl.lit("postgresql"),
        "db.namespace": pl.col("database"),
        "user.name": pl.col("user"),
        "db.query.text": pl.col("text"),
        "postgresql.query.fingerprint": pl.col("fingerprint"),
        "postgresql.query_id": pl.col("query_id"),
        "postgresql.pid": pl.col("pid"),
        "postgresql.state": pl.col("state"),
        "postgresql.wait_event": pl.col("wait_event"),
        "postgresql.wait_event_type": pl.col("wait_event_type"),
        "postgresql.application_name": pl.col("application_name"),
        "postgresql.query_start": pl.col("query_start").dt.to_string("%Y-%m-%dT%H:%M:%S%.6fZ"),
        "postgresql.query.duration": pl.col("duration_secs"),
        "postgresql.query.truncated": pl.when(pl.col("truncated")).then(True),
        "postgresql.query.unparsable": pl.when(pl.col("unparsable")).then(True),
        "postgresql.blocking.root.pid": pl.col("blocking_root_pid"),
        "postgresql.blocking.root.state": pl.col("blocking_root_state"),
        "postgresql.blocking.root.fingerprint": pl.col("blocking_root_fingerprint"),
        "network.peer.address": pl.col("client_addr"),
    }
    return event_frame(
        samples,
        event_name=QUERY_SAMPLE,
        time=pl.col("seen_at"),
        body=pl.lit(None, pl.String),
        given=given,
        instance=instance,
        server_address=server_address,
        server_port=server_port,
        server_version_num=server_version_num,
    )
