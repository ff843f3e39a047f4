"""Query samples → ``db.server.query_sample`` events (pure; the sampler of issue 11 feeds it).

Three steps, each a pure function:
- :func:`sample_text`: a ``pg_stat_activity.query`` text as it may leave the collector: normalized
  with pglast (no literal, no comment) and fingerprinted like the statement metrics; a text cut by
  ``track_activity_query_size`` or one pglast cannot parse becomes a marker, never raw text.
  The sampler calls it the moment it reads a text, so a raw text is never held anywhere else.
- :func:`limit_samples`: one row per execution (pid, query_start), only executions running longer
  than ``sample_min_duration_ms``, at most ``samples_per_fingerprint_per_hour`` per fingerprint and
  ``max_samples_per_window`` per window (the longest-running first); the state is a small,
  picklable value carried from window to window.
- :func:`sample_events`: the kept rows as events with the OpenTelemetry receiver's attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import polars as pl

from pgflow.ops.fingerprint import fallback_info, parse_info
from pgflow.schema import EVENT_ATTRIBUTE_TYPES, EVENTS, UTC_TS

QUERY_SAMPLE = "db.server.query_sample"
TRUNCATED, UNPARSABLE = "<truncated>", "<unparsable>"

# What the sampler hands over, one row per execution seen (proposed contract for issue 11's sampler).
QUERY_SAMPLES = pl.Schema({
    "seen_at": UTC_TS,  # the sample that saw it (the server's clock)
    "database": pl.String,
    "user": pl.String,
    "pid": pl.Int64,
    "query_start": UTC_TS,
    "duration_secs": pl.Float64,  # how long it had run when seen
    "state": pl.String,
    "wait_event_type": pl.String,
    "wait_event": pl.String,
    "query_id": pl.Int64,  # PostgreSQL 14+
    "application_name": pl.String,
    "client_addr": pl.String,
    "fingerprint": pl.String,  # from sample_text
    "text": pl.String,  # from sample_text: normalized, or a marker
    "truncated": pl.Boolean,
    "unparsable": pl.Boolean,
    "blocking_root_pid": pl.Int64,  # for a blocked session: its root blocker
    "blocking_root_state": pl.String,
    "blocking_root_fingerprint": pl.String,
})


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
    except Exception:
        return SampleText(fallback_info(raw).fingerprint, UNPARSABLE, False, True)
    return SampleText(info.fingerprint, info.text, False, False)


@dataclass
class SampleLimits:
    """The limiter's state: when each fingerprint was last sampled, and executions already sent."""

    sent: dict[str, list] = field(default_factory=dict)  # fingerprint → times of samples in the last hour
    executions: dict[tuple, object] = field(default_factory=dict)  # (pid, query_start) → seen_at
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count (cumulative)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n


def limit_samples(samples: pl.DataFrame, state: SampleLimits | None = None, *, sample_min_duration_ms: float = 100,
                  samples_per_fingerprint_per_hour: int = 15, max_samples_per_window: int = 100,
                  ) -> tuple[pl.DataFrame, SampleLimits]:
    """The samples to send this window, and the new state (see the module's docstring)."""
    state = state or SampleLimits()
    if samples.height == 0:
        return samples, state
    longest = (samples.sort("duration_secs", descending=True, maintain_order=True)
               .unique(["pid", "query_start"], keep="first", maintain_order=True))
    slow = longest.filter(pl.col("duration_secs") * 1000 >= sample_min_duration_ms)
    state.skip("short", longest.height - slow.height)
    now = samples["seen_at"].max()
    hour_ago = now - timedelta(hours=1)  # type: ignore[operator]
    for fp in list(state.sent):
        state.sent[fp] = [t for t in state.sent[fp] if t > hour_ago]
        if not state.sent[fp]:
            del state.sent[fp]
    state.executions = {k: t for k, t in state.executions.items() if t > hour_ago}  # type: ignore[operator]
    kept = []
    for i, row in enumerate(slow.select("pid", "query_start", "fingerprint", "seen_at").iter_rows()):
        pid, start, fp, seen = row
        if (pid, start) in state.executions:
            state.skip("seen")
        elif len(kept) >= max_samples_per_window:
            state.skip("window")
        elif len(state.sent.get(fp, ())) >= samples_per_fingerprint_per_hour:
            state.skip("fingerprint")
        else:
            kept.append(i)
            state.sent.setdefault(fp, []).append(seen)
            state.executions[(pid, start)] = seen
    return slow[kept], state


def sample_events(samples: pl.DataFrame, *, instance: str, server_address: str = "", server_port: int = 0,
                  server_version_num: int = 0) -> pl.DataFrame:
    """The kept samples as ``db.server.query_sample`` events (time: when the sample saw them)."""
    if samples.height == 0:
        return pl.DataFrame(schema=EVENTS)
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
    attributes = pl.struct(*[(given[k] if k in given else pl.lit(None)).cast(t).alias(k)
                             for k, t in EVENT_ATTRIBUTE_TYPES.items()])
    return samples.select(
        pl.lit(instance).alias("instance"), pl.lit(QUERY_SAMPLE).alias("event_name"), pl.col("seen_at").alias("time"),
        pl.lit("INFO").alias("severity"), pl.lit(None, pl.String).alias("body"), attributes.alias("attributes"),
        pl.lit(server_address).alias("server_address"), pl.lit(server_port).alias("server_port"),
        pl.lit(server_version_num).alias("server_version_num"),
    ).cast(dict(EVENTS))  # type: ignore[arg-type]
