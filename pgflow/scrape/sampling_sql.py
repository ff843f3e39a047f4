"""The sampling query: one text-free look at every backend, then a read of the busy ones only.

One round trip per sample (simple protocol, one implicit transaction: the marked ``set_config``
of statement_timeout, lock_timeout and read-only, then ``EXECUTE`` of the sampling query,
prepared once per connection; no ``BEGIN`` or ``ROLLBACK``, issue 19). It never returns the
``query`` text, reads a backend's status row only when a text-free look says it may be busy
(see ``_SAMPLE_SQL``), and asks ``pg_blocking_pids()`` only for sessions waiting on a
heavyweight lock (the function takes the lock manager's locks). Here: the query, its version
variants (:func:`sample_sql`), the sessions known idle (:func:`with_known_idle`) and the
fields of its rows; :class:`pgflow.scrape.sampler.Sampler` sends it.
"""

from __future__ import annotations

# Rows worth a sample: not idle, not a background process idling in its main loop
# (wait_event_type Activity), not pgflow itself. The last column flags other roles' sessions
# that the monitoring role may not see (no state, no wait event): counted, never sampled.
# pg_stat_get_activity() rather than the pg_stat_activity view: the view's joins with
# pg_database and pg_authid cost planning and execution every second, for names that a
# client-side cache of oids gives for free (see Sampler._names).
#
# pg_stat_get_activity(NULL) builds a row for every backend, and most of a row's cost is its
# statement text (clipped character by character): idle sessions, usually most of them, cost
# as much as the busy ones. So the backends are sorted first with the per-backend functions,
# which read no text:
# - in a transaction, or waiting on anything but the client: a candidate;
# - idling in a main loop (wait event type Activity): never sampled;
# - waiting on ClientRead outside a transaction: idle, or idle in an aborted transaction (the
#   per-backend functions cannot tell these apart). Which of the two is fixed by the session's
#   last statement, (pid, its start): once a read has shown such a statement ended idle, the
#   sampler passes it back as known ($1 pids, $2 starts in microseconds) and the session is
#   not read again until it runs another statement. Unknown ones are candidates, and their
#   idle rows come back (flagged by state) so that the sampler learns them.
# The candidates are then read with pg_stat_get_activity(pid), one call each; but each such call
# walks every backend, so when a quarter or more are candidates one pg_stat_get_activity(NULL)
# is cheaper and is used instead (a one-time filter: only one branch runs). Both read the same
# per-transaction copy of the backends' status, and the final filter is the same either way.
_SAMPLE_SQL = """
WITH /*pgflow*/ backends AS MATERIALIZED (
  SELECT b, pg_stat_get_backend_pid(b) AS pid,
         CASE WHEN pg_stat_get_backend_xact_start(b) IS NOT NULL THEN 'busy'
              WHEN pg_stat_get_backend_wait_event(b) = 'ClientRead' THEN 'ended'
              WHEN pg_stat_get_backend_wait_event_type(b) = 'Activity' THEN 'loop'
              ELSE 'busy' END AS kind
  FROM pg_stat_get_backend_idset() b),
ended AS MATERIALIZED (
  SELECT e.pid FROM (SELECT pid, coalesce((date_part('epoch', pg_stat_get_backend_activity_start(b)) * 1000000)::int8, 0)
                     AS started FROM backends WHERE kind = 'ended') e
  LEFT JOIN unnest($1::int4[], $2::int8[]) AS k(pid, started) ON k.pid = e.pid AND k.started = e.started
  WHERE k.pid IS NULL),
candidates AS MATERIALIZED (SELECT pid FROM backends WHERE kind = 'busy' UNION ALL SELECT pid FROM ended),
many AS (SELECT count(*) * {ratio} >= (SELECT count(*) FROM backends) AS yes FROM candidates),
activity AS (
  SELECT * FROM pg_stat_get_activity(NULL) WHERE (SELECT yes FROM many)
  UNION ALL
  SELECT a.* FROM candidates c, LATERAL pg_stat_get_activity(c.pid) a WHERE NOT (SELECT yes FROM many))
SELECT /*pgflow*/ pid, datid::int8, usesysid::int8, NULL::text, NULL::text, backend_type, state,
       wait_event_type, wait_event, {query_id}, leader_pid,
       extract(epoch FROM now() - xact_start)::float8, age(backend_xmin)::int8,
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END,
       query = '<insufficient privilege>',
       query_start, extract(epoch FROM now() - query_start)::float8, now(),
       CASE WHEN state = 'idle' THEN coalesce((date_part('epoch', query_start) * 1000000)::int8, 0) END
FROM activity
WHERE pid <> pg_backend_pid()
  AND (state IS DISTINCT FROM 'idle' OR pid IN (SELECT pid FROM ended))
  AND state IS DISTINCT FROM 'disabled'
  AND wait_event_type IS DISTINCT FROM 'Activity'
  AND application_name IS DISTINCT FROM 'pgflow'
"""
# pg_stat_get_activity(NULL) when candidates x 4 >= backends: measured with 200 client backends
# on PostgreSQL 18, a row of the whole read costs about a quarter of a pg_stat_get_activity(pid).
WHOLE_READ_RATIO = 4
KNOWN_IDLE_MAX = 10_000  # (pid, start) pairs remembered; past that the map starts over (one full read)
NAMES_SQL = "SELECT /*pgflow*/ 'd', oid::int8, datname::text FROM pg_database UNION ALL SELECT 'u', oid::int8, rolname::text FROM pg_roles"
PREPARED_NAME = "pgflow_sample"
# Row fields of _SAMPLE_SQL after Sampler._names (database and user names filled in).
PID, DBID, USERID, DB, USER, BTYPE, STATE, WTYPE, WEVENT, QID, LEADER = range(11)
BLOCKERS, HIDDEN, QSTART, RUNNING, NOW, IDLE_SINCE = 13, 14, 15, 16, 17, 18


def sample_sql(version_num: int) -> str:
    """The sampling query for a server version (``query_id`` exists from PostgreSQL 14).

    Parameters: ``$1`` int4[] and ``$2`` int8[], the sessions known idle (pids, and the start of
    their last statement in microseconds); see :func:`with_known_idle` to send it unprepared.
    """
    return _SAMPLE_SQL.format(query_id="query_id" if version_num >= 140000 else "NULL::int8", ratio=WHOLE_READ_RATIO)


def known_idle_arrays(known: dict[int, int]) -> tuple[str, str]:
    """The known-idle sessions as two array literals (integers only): pids, starts."""
    return "'{" + ",".join(map(str, known)) + "}'", "'{" + ",".join(map(str, known.values())) + "}'"


def with_known_idle(sql: str, known: dict[int, int] | tuple[str, str]) -> str:
    """``sql`` (or ``EXECUTE name``) with the known-idle sessions (a dict, or its arrays) as literals."""
    pids, starts = known_idle_arrays(known) if isinstance(known, dict) else known
    if sql.startswith("EXECUTE"):
        return f"{sql}({pids}, {starts})"
    return sql.replace("$1", pids).replace("$2", starts)
