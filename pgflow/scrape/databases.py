"""pg_stat_database: per-database counters and wraparound ages for the non-template databases.

One row per database, every scrape (cheap: no sizes here, see ``scrape.health`` for those).
Columns a server version lacks (14's session counters) come back as typed nulls, and
``pg_stat_database_conflicts`` (meaningful on standbys) is joined in.
"""

from __future__ import annotations

from pgflow.schema import DATABASE_COUNTERS, DATABASE_TIME_COUNTERS

_SESSION_COUNTERS = ("sessions", "sessions_abandoned", "sessions_fatal", "sessions_killed")
_CONFLICTS = ("confl_tablespace", "confl_lock", "confl_snapshot", "confl_bufferpin", "confl_deadlock")


def _counter(name: str, version_num: int) -> str:
    if name in _SESSION_COUNTERS and version_num < 140000:
        return "NULL::int8"
    if name in _CONFLICTS:
        return f"c.{name}::int8"
    return f"d.{name}::int8"


def databases_sql(version_num: int) -> str:
    """The query for a server of ``version_num``; its columns follow ``schema.DATABASES``."""
    times = (
        ", ".join(f"d.{c}::float8" for c in DATABASE_TIME_COUNTERS)
        if version_num >= 140000
        else ", ".join("NULL::float8" for _ in DATABASE_TIME_COUNTERS)
    )
    return (
        "SELECT /*pgflow*/ d.datid::int8, d.datname::text, d.numbackends::int8, d.stats_reset, "
        + ", ".join(_counter(c, version_num) for c in DATABASE_COUNTERS)
        + ", age(db.datfrozenxid)::int8, mxid_age(db.datminmxid)::int8, "
        + times
        + " FROM pg_stat_database d JOIN pg_database db ON db.oid = d.datid"
        " LEFT JOIN pg_stat_database_conflicts c ON c.datid = d.datid"
        " WHERE d.datname IS NOT NULL AND d.datname NOT IN ('template0', 'template1')"
    )


DATABASES_SQL = databases_sql(130000)  # the columns every supported version has
