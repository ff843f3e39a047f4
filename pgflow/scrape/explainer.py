"""One statement explained, safely: which texts may be explained, how (GENERIC_PLAN on 16+,
PREPARE and EXPLAIN EXECUTE with NULL parameters before), the optional SECURITY DEFINER helper,
and how a failure is classified (see :mod:`pgflow.scrape.explain` for the rules and the budget).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
import psycopg.conninfo
from pglast import parser as pg_parser
from psycopg import errors as pgerr

from pgflow.scrape.connection import guarded
from pgflow.scrape.statements import limits_sql

log = logging.getLogger("pgflow.explain")

ERROR_TTL_SECS = 24 * 3600
# A missing privilege is fixed by a GRANT, not by the statement changing: retried this soon, so
# plans resume after the DBA grants access, without a restart (issue 19).
PERMISSION_RETRY_SECS = 600.0


def _error_ttl(cause: str) -> float:
    return PERMISSION_RETRY_SECS if cause == "permission" else ERROR_TTL_SECS


EXPLAINABLE = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


def helper_sql() -> str:
    """The optional SECURITY DEFINER helper's SQL, shipped inside the package."""
    return resources.files("pgflow").joinpath("sql/explain_helper.sql").read_text(encoding="utf-8")


# pgflow's own statements: its helper, and the statistics views and functions it reads.
_PGFLOWS = re.compile(
    r'"(?:schemaname|sval|relname)": "(?:pgflow|pg_stat_\w*|pg_locks|pg_blocking_pids|'
    r'pg_prepared_statements|pg_wait_sampling\w*)"'
)


def explainable(text: str | None) -> str | None:
    """Why ``text`` must not be explained (``not_parsed``, ``replaced``, ``statements``, ``utility``,
    ``pgflow``, ``no_table``), or None."""
    if not text:
        return "not_parsed"
    if "\ufffd" in text:
        # Bytes the server's encoding could not give as text were replaced on reading: this is
        # not the statement the server holds, and a SQL_ASCII database cannot even be sent it.
        return "replaced"
    try:
        tree = json.loads(pg_parser.parse_sql_json(text))
    except Exception:
        return "not_parsed"
    stmts = tree.get("stmts") or []
    if len(stmts) != 1:
        return "statements"
    stmt = stmts[0].get("stmt") or {}
    kind = next(iter(stmt), "")
    if kind not in EXPLAINABLE:
        return "utility"
    if kind == "SelectStmt" and stmt[kind].get("intoClause"):
        return "utility"  # SELECT ... INTO creates a table
    if _PGFLOWS.search(json.dumps(tree)):
        return "pgflow"
    if not _user_relations(tree):
        return "no_table"  # a plan of functions and constants only (Result): nothing to learn; pgflow's own
    return None


def _user_relations(node: object) -> bool:
    """Whether the tree reads a relation outside the catalogs (pgflow reads only catalogs)."""
    if isinstance(node, dict):
        rel = node.get("RangeVar", node if "relname" in node else None)
        if isinstance(rel, dict) and isinstance(rel.get("relname"), str):
            schema = rel.get("schemaname") or ""
            if schema not in ("pg_catalog", "information_schema") and not rel["relname"].startswith("pg_"):
                return True
        return any(_user_relations(v) for v in node.values())
    if isinstance(node, list):
        return any(_user_relations(v) for v in node)
    return False


class ExplainFailed(Exception):
    """One explain failed; ``deterministic`` failures are not retried before ERROR_TTL_SECS."""

    def __init__(self, cause: str, deterministic: bool, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.deterministic = deterministic


def _cause(exc: psycopg.Error) -> tuple[str, bool]:
    if isinstance(exc, pgerr.LockNotAvailable):
        return "lock_timeout", False
    if isinstance(exc, pgerr.QueryCanceled):
        return "statement_timeout", False
    if isinstance(exc, pgerr.InsufficientPrivilege):
        return "permission", True
    if isinstance(
        exc, (pgerr.UndefinedTable, pgerr.UndefinedColumn, pgerr.UndefinedFunction, pgerr.UndefinedObject, pgerr.InvalidSchemaName)
    ):
        return "undefined_object", True
    if isinstance(
        exc,
        (
            pgerr.SyntaxError,
            pgerr.AmbiguousParameter,
            pgerr.IndeterminateDatatype,
            pgerr.UndefinedParameter,
            pgerr.DatatypeMismatch,
            pgerr.UndefinedFile,
        ),
    ):
        return "syntax", True
    if isinstance(exc, psycopg.OperationalError):
        return "connection", False
    return f"sqlstate_{getattr(exc, 'sqlstate', None) or 'unknown'}", True


_FIRST_WORD = re.compile(r"^(\s*[A-Za-z]+)")


def marked(text: str) -> str:
    """``text`` with pgflow's mark after its first keyword. EXPLAIN runs the statement's executor
    start and end, so with ``pg_stat_statements.track = all`` the explained statement is
    counted as a nested call (one per explain) under the text it was given: the mark makes
    that entry pgflow's own, left out like every other statement pgflow sends."""
    return _FIRST_WORD.sub(r"\1 /*pgflow*/", text, count=1)


@dataclass
class Explainer:
    """One explain at a time on a given connection (autocommit), whatever the server version."""

    statement_timeout_ms: int = 2000
    lock_timeout_ms: int = 100

    def _limits(self, **extra: str) -> str:
        """The first statement of each round trip: read-only, time-limited (no BEGIN: issue 19)."""
        return limits_sql(self.statement_timeout_ms, self.lock_timeout_ms, **extra)

    def _simple(self, conn: psycopg.Connection, statements: list[str]) -> list[tuple]:
        """``statements`` after the limits as one simple-protocol query (one implicit transaction,
        no BEGIN or ROLLBACK to show in pg_stat_statements); the last statement's rows."""
        cur = conn.execute("; ".join([self._limits(), *statements]))  # type: ignore[arg-type]
        while cur.nextset():
            pass
        return cur.fetchall()

    def explain(self, conn: psycopg.Connection, text: str, server_version_num: int, helper: bool = False) -> tuple[list, str]:
        """The raw EXPLAIN JSON of ``text`` and the method used; raises ExplainFailed.

        ``conn`` is in autocommit: this method opens and always ends its own read-only transaction.
        """
        reason = explainable(text)
        if reason is not None:
            raise ExplainFailed(f"not_explainable_{reason}", True)
        method = "helper" if helper else ("generic_plan" if server_version_num >= 160000 else "prepare")
        return self._run(conn, marked(text), method), method

    def _run(self, conn: psycopg.Connection, text: str, method: str) -> list:
        """The read-only transaction of one explain, for a text already checked."""
        prepared = False
        try:
            if method == "helper":
                # A bound parameter: the text is a value here, never part of the command.
                cur = conn.cursor()
                with guarded(conn, self.statement_timeout_ms, self.lock_timeout_ms):
                    cur.execute("SELECT /*pgflow*/ pgflow.explain_generic(%s)", (text,))
                plan = cur.fetchone()[0]  # type: ignore[index]
            elif method == "generic_plan":
                # Simple protocol (no parameters), so $n stay placeholders for GENERIC_PLAN.
                plan = self._simple(conn, ["EXPLAIN /*pgflow*/ (GENERIC_PLAN, FORMAT JSON) " + text])[0][0]
            else:
                generic = {"plan_cache_mode": "force_generic_plan"}
                prepared = True  # a prepared statement outlives its transaction: deallocated below
                count = self._simple(
                    conn,
                    [
                        "PREPARE /*pgflow*/ pgflow_explain AS " + text,
                        "SELECT /*pgflow*/ coalesce(cardinality(parameter_types), 0) FROM pg_prepared_statements "
                        "WHERE name = 'pgflow_explain'",
                    ],
                )[0][0]
                args = f"({', '.join(['NULL'] * count)})" if count else ""
                cur = conn.execute(
                    f"{self._limits(**generic)}; "  # type: ignore[arg-type]
                    f"EXPLAIN /*pgflow*/ (FORMAT JSON) EXECUTE pgflow_explain{args}"
                )
                while cur.nextset():
                    pass
                plan = cur.fetchone()[0]  # type: ignore[index]
                conn.execute("DEALLOCATE pgflow_explain")  # not recorded by pg_stat_statements
                prepared = False
        except psycopg.Error as exc:
            cause, deterministic = _cause(exc)
            _end(conn, prepared)
            raise ExplainFailed(cause, deterministic, str(exc).strip().splitlines()[0][:200]) from None
        return json.loads(plan) if isinstance(plan, str) else plan


def _end(conn: psycopg.Connection, prepared: bool) -> None:
    """After a failure: end the transaction, and drop the prepared statement (PREPARE is not
    undone by ROLLBACK)."""
    if conn.closed:
        return
    try:
        conn.rollback()  # autocommit: sends ROLLBACK only if a transaction is still open
        if prepared:
            conn.execute("DEALLOCATE pgflow_explain")
    except psycopg.Error:
        pass


def helper_status(conn: psycopg.Connection) -> tuple[str, str]:
    """(level, detail) for ``pgflow check``: is the explain helper installed and usable here?

    Usable means: it explains ``SELECT 1`` for this role inside a read-only transaction.
    """
    was_autocommit = conn.autocommit
    if not was_autocommit:
        conn.rollback()
        conn.autocommit = True
    try:
        if not _installed(conn):
            return "ok", (
                "explain helper not installed (optional): plans of tables the monitoring role may not "
                "read need it; run pgflow/sql/explain_helper.sql in each database as the tables' owner"
            )
        try:
            Explainer()._run(conn, "SELECT 1", "helper")  # a constant text: no check needed
        except ExplainFailed as exc:
            return "warn", (
                f"explain helper installed but not usable ({exc.cause}): "
                "GRANT EXECUTE ON FUNCTION pgflow.explain_generic(text) TO the monitoring role"
            )
        return "ok", "explain helper installed and usable"
    finally:
        if not was_autocommit:
            conn.autocommit = False


_HELPER_SQL = """
SELECT /*pgflow*/ count(*) > 0, coalesce(bool_or(has_schema_privilege(n.oid, 'USAGE') AND has_function_privilege(p.oid, 'EXECUTE')),
                              false)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'pgflow' AND p.proname = 'explain_generic'
"""


def _helper(conn: psycopg.Connection) -> tuple[bool, bool]:
    """(installed, this role may call it), from the catalogs (readable whatever the grants)."""
    try:
        row = conn.execute(_HELPER_SQL).fetchone()
        return (bool(row[0]), bool(row[1])) if row else (False, False)
    except psycopg.Error:
        return False, False


def explain_helper_finding(conn: psycopg.Connection) -> tuple[str, str, str]:
    """``pgflow check``'s line about the helper: (level, name, detail)."""
    level, detail = helper_status(conn)
    return level, "explain helper", detail


def _installed(conn: psycopg.Connection) -> bool:
    return _helper(conn)[0]
