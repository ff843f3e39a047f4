"""The blocking tree of one sample: who waits on whom, down to the root blockers.

``pg_blocking_pids()`` gives each session waiting on a heavyweight lock the sessions it waits
on. A root blocker blocks others and waits on nothing; a waiter's blocked time goes to exactly
one root it leads to, so it is never counted twice. The sampler keeps, per database, blocked
session-seconds by root and the number of roots and the deepest chain seen in one sample
(:func:`blocked_by_root`); a query sample names its blocked statement's root (:func:`reach`,
:func:`root_of`).
"""

from __future__ import annotations

from collections import defaultdict

from pgflow.scrape.sampling_sql import DB, DBID, QID, STATE, USERID

PREPARED = "prepared transaction"  # pg_blocking_pids() reports a prepared transaction's locks as pid 0
UNKNOWN_STATE = "unknown"  # the root blocker was not in the sample (or a cycle, before deadlock detection)


def reach(waiting: dict[int, list[int]]):  # noqa: ANN202 (a closure over one sample's waits)
    """``reach(pid)``: the root blockers ``pid`` leads to and the longest chain above it.

    Roots block others and wait on nothing; a cycle (before the deadlock detector breaks it)
    leads to no root.
    """
    memo: dict[int, tuple[frozenset[int], int]] = {}

    def walk(pid: int, path: frozenset[int]) -> tuple[frozenset[int], int]:
        if pid in memo:
            return memo[pid]
        blockers = waiting.get(pid)
        if not blockers:
            return frozenset({pid}), 0
        roots: set[int] = set()
        hops = 0
        for b in blockers:
            if b in path:
                continue  # a cycle: the deadlock detector will break it
            r, h = walk(b, path | {b})
            roots |= r
            hops = max(hops, h + 1)
        memo[pid] = (frozenset(roots), hops)
        return memo[pid]

    return lambda pid: walk(pid, frozenset({pid}))


def root_of(roots: frozenset[int], by_pid: dict[int, tuple]) -> int | None:
    """The one root a waiter's time goes to: a sampled session first, then the lowest pid."""
    return min(roots, key=lambda r: (r == 0, r not in by_pid, r)) if roots else None


def blocked_by_root(by_pid: dict[int, tuple], waiting: dict[int, list[int]]) -> tuple[list[tuple], dict[str | None, tuple[int, int]]]:
    """Root blockers (blocking others, waiting on nothing), chain depth, blocked time by root.

    ``by_pid``: one sample's rows by pid; ``waiting``: pid -> the pids it waits on. Returns, per
    waiter, the key its blocked time goes to (database, and the root's state, query id, database
    and user oids), and per database (root blockers, deepest chain). Depth is the longest path
    from a root (depth 0) down to a waiter; a waiter's time goes to one root it leads to (the
    lowest pid: deterministic), so it is never counted twice.
    """
    reach_of = reach(waiting)
    roots_by_db: dict[str | None, set[int]] = defaultdict(set)
    depth: dict[str | None, int] = defaultdict(int)
    keys: list[tuple] = []
    for pid in waiting:
        database = by_pid[pid][DB]
        roots, hops = reach_of(pid)
        depth[database] = max(depth[database], hops)
        roots_by_db[database] |= roots
        root = root_of(roots, by_pid)
        if root is None:
            key = (database, UNKNOWN_STATE, None, None, None)
        elif root == 0:
            key = (database, PREPARED, None, None, None)
        elif root in by_pid:
            r = by_pid[root]
            key = (database, r[STATE] or UNKNOWN_STATE, r[QID] or None, r[DBID], r[USERID])
        else:  # blocking from outside the sample (e.g. an idle-looking background process)
            key = (database, UNKNOWN_STATE, None, None, None)
        keys.append(key)
    return keys, {database: (len(roots_by_db[database]), depth[database]) for database in depth}
