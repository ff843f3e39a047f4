"""What to explain: the statements with the most execution time between two scrapes (pure).

The explain step runs beside the scrape source (it needs I/O), once per export window, and
ranks statements by the execution time they gained since the scrape of the previous window.
It ranks; it does not count: a statement reset in between counts its current total, a new
one its whole total. The candidates frame is what :class:`pgflow.scrape.explain.PlanSource`
takes: ``database, user, fingerprint, queryid, query, exec_time`` (milliseconds), one row per
(database, fingerprint): the text of its busiest queryid.

Only the ``rows`` busiest statements are fingerprinted (issue 20): a parse costs about a
millisecond, and on a busy server most of pg_stat_statements gains time every window, so
fingerprinting all of them cost up to a second of CPU per window per instance (on the scrape
thread, holding Python's lock against the operators) to choose five plans.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from pgflow.ops.fingerprint import query_info
from pgflow.schema import STATEMENT_KEY

CANDIDATES = pl.Schema(
    {"database": pl.String, "user": pl.String, "fingerprint": pl.String, "queryid": pl.Int64, "query": pl.String, "exec_time": pl.Float64}
)


def explain_candidates(
    previous: pl.DataFrame | None,
    current: pl.DataFrame,
    limit: int = 1000,
    fingerprint: Callable[[str], str] = lambda text: query_info(text).fingerprint,
    rows: int = 200,
) -> pl.DataFrame:
    """The ``limit`` busiest (database, fingerprint) pairs of ``current`` since ``previous``
    (statements frames of one instance), busiest first, from its ``rows`` busiest statements."""
    cols = [*STATEMENT_KEY, "database", "user", "query", "total_exec_time"]
    now = current.select(cols).filter(pl.col("query").is_not_null())
    if previous is not None and previous.height:
        before = previous.select(*STATEMENT_KEY, pl.col("total_exec_time").alias("before"))
        now = now.join(before, on=list(STATEMENT_KEY), how="left", nulls_equal=True)
        gained = pl.col("total_exec_time") - pl.col("before").fill_null(0)
        now = now.with_columns(pl.when(gained < 0).then(pl.col("total_exec_time")).otherwise(gained).alias("exec_time"))
    else:
        now = now.with_columns(pl.col("total_exec_time").alias("exec_time"))
    now = now.filter(pl.col("exec_time") > 0)
    if now.height > rows:
        now = now.top_k(rows, by="exec_time")
    if now.height == 0:
        return pl.DataFrame(schema=CANDIDATES)
    texts = now["query"].unique().to_list()
    fps = pl.DataFrame(
        {"query": texts, "fingerprint": [fingerprint(t) for t in texts]}, schema={"query": pl.String, "fingerprint": pl.String}
    )
    ranked = now.join(fps, on="query", how="left").sort("exec_time", descending=True, maintain_order=True)
    totals = ranked.group_by("database", "fingerprint", maintain_order=True).agg(
        pl.col("user").first(), pl.col("queryid").first(), pl.col("query").first(), pl.col("exec_time").sum()
    )
    return (
        totals.sort("exec_time", descending=True, maintain_order=True).head(limit).select(list(CANDIDATES)).cast(dict(CANDIDATES))  # type: ignore[arg-type]
    )
