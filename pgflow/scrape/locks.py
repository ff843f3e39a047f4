"""pg_locks: lock counts by database, mode, type and granted; sessions blocked by others."""

from __future__ import annotations

LOCKS_SQL = """
SELECT /*pgflow*/ d.datname::text, l.mode, l.locktype, l.granted, count(*)::int8
FROM pg_locks l LEFT JOIN pg_database d ON d.oid = l.database
WHERE l.pid IS DISTINCT FROM pg_backend_pid()
GROUP BY 1, 2, 3, 4
"""


def blocked_sql(server_version_num: int) -> str:
    """Sessions blocked by another, per database, and the longest wait so far.

    ``pg_locks.waitstart`` exists from 14; before that the blocked query's start is the
    best available bound.
    """
    since = (
        "coalesce((SELECT min(l.waitstart) FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted), a.query_start)"
        if server_version_num >= 140000
        else "a.query_start"
    )
    return f"""
SELECT /*pgflow*/ a.datname::text, count(*)::int8, extract(epoch FROM max(clock_timestamp() - {since}))::float8
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND cardinality(pg_blocking_pids(a.pid)) > 0
GROUP BY 1
"""
