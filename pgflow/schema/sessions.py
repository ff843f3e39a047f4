"""What the active-session sampler found since the previous scrape (issue 11)."""

from __future__ import annotations

import polars as pl

# issue 11: active-session samples taken since the previous scrape (pgflow/scrape/sampler.py).
# One row per distinct (database, user, backend_type, state, wait_event_type, wait_event,
# query_id) seen by the samples; ``count`` samples of ``period_secs`` each (session-seconds =
# count x period). ``dbid``/``userid`` (datid, usesysid) pair query_id with pg_stat_statements'
# key; ``query_id`` is null on PostgreSQL 13 and for statements without one. ``source`` is
# ``pg_stat_activity`` or ``pg_wait_sampling``.
SAMPLES = pl.Schema(
    {
        "dbid": pl.Int64,
        "userid": pl.Int64,
        "database": pl.String,
        "user": pl.String,
        "backend_type": pl.String,
        "state": pl.String,
        "wait_event_type": pl.String,
        "wait_event": pl.String,
        "query_id": pl.Int64,
        "source": pl.String,
        "count": pl.Int64,
        "period_secs": pl.Float64,
    }
)

# issue 11: what the samples since the previous scrape found beyond waits, in long form.
# ``stat`` is one of:
#   blocked_secs      session-seconds spent blocked (samples x period), by the ROOT blocker:
#                     database, state = root's state, query_id/dbid/userid = root's statement
#   root_count        max number of root blockers in one sample, by database (gauge)
#   chain_depth_max   max blocking chain depth (root = 0), by database (gauge)
#   xact_age_max      oldest open transaction in seconds, by database and state (gauge)
#   xmin_age_max      oldest backend_xmin in transactions, by database and state (gauge)
#   hidden_sessions   max sessions in one sample the role may not see (no pg_read_all_stats)
#   samples_taken / samples_failed / samples_skipped / period_secs   the sampler's own counts
SESSION_STATS = pl.Schema(
    {
        "stat": pl.String,
        "database": pl.String,
        "state": pl.String,
        "query_id": pl.Int64,
        "dbid": pl.Int64,
        "userid": pl.Int64,
        "value": pl.Float64,
    }
)
