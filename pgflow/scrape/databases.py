"""pg_stat_database: per-database counters for the non-template databases."""

from __future__ import annotations

from pgflow.schema import DATABASE_COUNTERS

DATABASES_SQL = (
    "SELECT /*pgflow*/ datid::int8, datname::text, numbackends::int8, stats_reset, "
    + ", ".join(f"{c}::int8" for c in DATABASE_COUNTERS)
    + " FROM pg_stat_database WHERE datname IS NOT NULL AND datname NOT IN ('template0', 'template1')"
)
