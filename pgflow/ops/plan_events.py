"""Plans frame → ``db.server.query_plan`` events (pure: a Snapshot's ``plans`` in, EVENTS out).

One event per plan: time = when it was explained, body = the obfuscated plan JSON, attributes
``db.system.name``, ``db.namespace``, ``postgresql.query.fingerprint`` (the key of the statement's
metrics), ``postgresql.query_id``, ``postgresql.plan.hash`` and ``postgresql.plan.generic``.
The plans were obfuscated where they were taken; nothing here reads a statement text.
"""

from __future__ import annotations

import polars as pl

from pgflow.schema import EVENT_ATTRIBUTE_TYPES, EVENTS, PLANS, Snapshot, conform

QUERY_PLAN = "db.server.query_plan"


def plan_events(plans: pl.DataFrame, *, instance: str, server_address: str = "", server_port: int = 0,
                server_version_num: int = 0) -> pl.DataFrame:
    """The events of one instance's plans frame, in its order."""
    plans = conform(plans, PLANS)
    if plans.height == 0:
        return pl.DataFrame(schema=EVENTS)
    given = {
        "db.system.name": pl.lit("postgresql"),
        "db.namespace": pl.col("database"),
        "postgresql.query.fingerprint": pl.col("fingerprint"),
        "postgresql.query_id": pl.col("queryid"),
        "postgresql.plan.hash": pl.col("plan_hash"),
        "postgresql.plan.generic": pl.lit(True),
    }
    attributes = pl.struct(*[(given[k] if k in given else pl.lit(None)).cast(t).alias(k)
                             for k, t in EVENT_ATTRIBUTE_TYPES.items()])
    return plans.select(
        pl.lit(instance).alias("instance"),
        pl.lit(QUERY_PLAN).alias("event_name"),
        pl.col("explained_at").alias("time"),
        pl.lit("INFO").alias("severity"),
        pl.col("body"),
        attributes.alias("attributes"),
        pl.lit(server_address).alias("server_address"),
        pl.lit(server_port).alias("server_port"),
        pl.lit(server_version_num).alias("server_version_num"),
    ).cast(dict(EVENTS))  # type: ignore[arg-type]


def snapshot_plan_events(snapshot: Snapshot) -> pl.DataFrame:
    """The plan events a snapshot carries (none when it has no plans)."""
    return plan_events(snapshot.plans, instance=snapshot.instance, server_address=snapshot.server_address,
                       server_port=snapshot.server_port, server_version_num=snapshot.server_version_num)
