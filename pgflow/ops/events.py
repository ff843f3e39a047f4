"""One builder for the events frame (OTLP log records): plans and query samples both use it."""

from __future__ import annotations

import polars as pl

from pgflow.schema import EVENT_ATTRIBUTE_TYPES, EVENTS


def event_frame(
    rows: pl.DataFrame,
    *,
    event_name: str,
    time: pl.Expr,
    body: pl.Expr,
    given: dict[str, pl.Expr],
    instance: str,
    server_address: str = "",
    server_port: int = 0,
    server_version_num: int = 0,
) -> pl.DataFrame:
    """``rows`` as events named ``event_name``; attributes not in ``given`` are absent (null)."""
    if rows.height == 0:
        return pl.DataFrame(schema=EVENTS)
    attributes = pl.struct(*[(given[k] if k in given else pl.lit(None)).cast(t).alias(k) for k, t in EVENT_ATTRIBUTE_TYPES.items()])
    return rows.select(
        pl.lit(instance).alias("instance"),
        pl.lit(event_name).alias("event_name"),
        time.alias("time"),
        pl.lit("INFO").alias("severity"),
        body.alias("body"),
        attributes.alias("attributes"),
        pl.lit(server_address).alias("server_address"),
        pl.lit(server_port).alias("server_port"),
        pl.lit(server_version_num).alias("server_version_num"),
    ).cast(dict(EVENTS))  # type: ignore[arg-type]
