"""Distinct statements for the benchmarks: ``n`` entries in pg_stat_statements on every version.

Statements that differ only in aliases or constants share one entry before PostgreSQL 18 (the
query id ignores aliases; constants are normalised), so the benchmarks' "2,000 statements" were
40 entries on 15. Each statement here reads its own table (``load_<k>``) with one of nine
column lists: distinct relations give distinct query ids on every version.
"""

from __future__ import annotations

import psycopg

SHAPES = 9  # column lists per table


def table_count(n: int) -> int:
    return (n + SHAPES - 1) // SHAPES


def statement(i: int, literal: int | None = None) -> str:
    """The ``i``-th statement; ``literal`` varies the constant (the same entry)."""
    cols = ", ".join(f"v + {j} AS c{j}" for j in range(i % SHAPES + 1))
    return f"SELECT {cols} FROM load_{i // SHAPES} WHERE id = {i if literal is None else literal}"


def make_statements(dsn: str, n: int) -> None:
    """Create the tables, forget their DDL (pg_stat_statements_reset), run each statement once."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for k in range(table_count(n)):
            conn.execute(f"CREATE TABLE IF NOT EXISTS load_{k} (id int PRIMARY KEY, v int)")  # type: ignore[arg-type]
        conn.execute("SELECT pg_stat_statements_reset()")
        for i in range(n):
            conn.execute(statement(i))  # type: ignore[arg-type]
