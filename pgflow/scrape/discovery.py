"""Which databases of an instance to open a connection to (per-table statistics live in each one's catalog).

Templates, databases that refuse connections (``datallowconn`` false) and the cloud providers'
own maintenance databases are skipped; ``table_stats_databases`` (names or globs; empty: all)
and ``table_stats_exclude_databases`` filter the rest; at most ``max_databases_tracked`` are
kept, in creation (oid) order so the choice is stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import psycopg

DATABASES_SQL = "SELECT /*pgflow*/ datname::text, datallowconn, datistemplate FROM pg_database ORDER BY oid"

# Databases a managed service keeps for itself: never ours to watch (peers learnt this the hard way).
PROVIDER_DATABASES = ("rdsadmin", "azure_maintenance", "cloudsqladmin", "alloydbadmin")


@dataclass(frozen=True)
class Discovered:
    """The databases to scrape, and why the others are not (name -> reason)."""

    chosen: tuple[str, ...]
    skipped: dict[str, str]


def choose(rows: list[tuple[str, bool, bool]], *, include: list[str], exclude: list[str], limit: int) -> Discovered:
    """Apply the rules to ``pg_database`` rows (name, allows connections, is template)."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, allow, template in rows:
        if template:
            skipped[name] = "template"
        elif not allow:
            skipped[name] = "refuses connections (datallowconn = false)"
        elif name in PROVIDER_DATABASES:
            skipped[name] = "provider maintenance database"
        elif include and not any(fnmatchcase(name, p) for p in include):
            skipped[name] = "not in table_stats_databases"
        elif any(fnmatchcase(name, p) for p in exclude):
            skipped[name] = "in table_stats_exclude_databases"
        elif len(chosen) >= limit:
            skipped[name] = "over max_databases_tracked"
        else:
            chosen.append(name)
    return Discovered(tuple(chosen), skipped)


def discover(conn: psycopg.Connection, *, include: list[str], exclude: list[str], limit: int) -> Discovered:
    """Read ``pg_database`` on ``conn`` (any database of the instance) and choose."""
    from pgflow.scrape.connection import guarded

    cur = conn.cursor()
    with guarded(conn, 10_000):  # read-only and time-limited, no BEGIN (issue 19)
        cur.execute(DATABASES_SQL)
    rows = cur.fetchall()
    return choose(rows, include=include, exclude=exclude, limit=limit)  # type: ignore[arg-type]
