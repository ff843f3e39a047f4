"""Plans frame → ``db.server.query_plan`` events (pure: a Snapshot's ``plans`` in, EVENTS out).

One event per plan: time = when it was explained, body = the obfuscated plan JSON, attributes
``db.system.name``, ``db.namespace``, ``postgresql.query.fingerprint`` (the key of the statement's
metrics), ``postgresql.query_id``, ``postgresql.plan.hash`` and ``postgresql.plan.generic``.
The plans were obfuscated where they were taken; nothing here reads a statement text.
"""

from __future__ import annotations

import polars as pl

from pgflow.ops.events import event_frame
from pgflow.schema import PLANS, Snapshot, conform

QUERY_PLAN = "db.server.query_plan"


def plan_events(
    plans: pl.DataFrame, *, instance: str, server_address: str = "", server_port: int = 0, server_version_num: int = 0
) -> pl.DataFrame:
    """The events of one instance's plans frame, in its order."""
    plans = conform(plans, PLANS)
    given = {
        "db.system.name": pl.lit("postgresql"),
        "db.namespace": pl.col("database"),
        "postgresql.query.fingerprint": pl.col("fingerprint"),
        "postgresql.query_id": pl.col("queryid"),
        "postgresql.plan.hash": pl.col("plan_hash"),
        "postgresql.plan.generic": pl.lit(True),
    }
    return event_frame(
        plans,
        event_name=QUERY_PLAN,
        time=pl.col("explained_at"),
        body=pl.col("body"),
        given=given,
        instance=instance,
        server_address=server_address,
        server_port=server_port,
        server_version_num=server_version_num,
    )


def snapshot_plan_events(snapshot: Snapshot) -> pl.DataFrame:
    """The plan events a snapshot carries (none when it has no plans)."""
    return plan_events(
        snapshot.plans,
        instance=snapshot.instance,
        server_address=snapshot.server_address,
        server_port=snapshot.server_port,
        server_version_num=snapshot.server_version_num,
    )
