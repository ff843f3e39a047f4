"""pg_stat_activity: connections by database, user, state, wait event and backend type."""

from __future__ import annotations

ACTIVITY_SQL = """
SELECT /*pgflow*/ datname::text, usename::text, state, wait_event_type, backend_type, count(*)::int8
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
GROUP BY 1, 2, 3, 4, 5
"""

# Ages of the oldest open transaction and the oldest running query of client backends.
AGES_SQL = """
SELECT /*pgflow*/ extract(epoch FROM max(clock_timestamp() - xact_start))::float8,
       extract(epoch FROM max(clock_timestamp() - query_start) FILTER (WHERE state = 'active'))::float8
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
