"""Explaining the busiest statements: read-only, time-limited, budgeted, never executed.

For each window, the fingerprints with the most execution time are explained, at most
``explains_per_window`` of them, each at most once per ``explain_ttl_secs`` per database:
- PostgreSQL 16+: ``EXPLAIN (GENERIC_PLAN, FORMAT JSON)`` of pg_stat_statements' normalized
  ``$n`` text, no literal needed;
- 13–15: ``PREPARE`` + ``plan_cache_mode = force_generic_plan`` + ``EXPLAIN EXECUTE`` with NULL
  parameters + ``DEALLOCATE``;
always read-only with statement_timeout and lock_timeout set for the transaction (one implicit
transaction per round trip, no ``BEGIN`` or ``ROLLBACK`` to show as workload: issue 19),
never ``ANALYZE``, on a connection to the statement's own database, and only for a text
that pglast parses as exactly one SELECT, INSERT, UPDATE, DELETE or MERGE. When the optional
``pgflow.explain_generic`` helper (``pgflow/sql/explain_helper.sql``) is installed and usable
in that database, it is used instead, so plans of tables the monitoring role may not read work.

A deterministic failure (syntax, an undefined table from another ``search_path``, a missing
privilege) is remembered per (database, fingerprint) and counted once by cause: 24 hours, but a
missing privilege only 10 minutes (a GRANT fixes it); a timeout is retried at a later window. The plan is obfuscated (``pgflow.ops.plans``) before
it leaves this module, so no constant is ever held, captured or sent.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources

import polars as pl
import psycopg
import psycopg.conninfo
from pglast import parser as pg_parser
from psycopg import errors as pgerr

from pgflow.config import Settings
from pgflow.logs import kv
from pgflow.ops import plans
from pgflow.ops.explain_targets import explain_candidates
from pgflow.schema import PLANS, Snapshot
from pgflow.scrape.budget import ConnectionBudget, NoConnection
from pgflow.scrape.connection import guarded
from pgflow.scrape.statements import limits_sql

log = logging.getLogger("pgflow.explain")

ERROR_TTL_SECS = 24 * 3600
# A missing privilege is fixed by a GRANT, not by the statement changing: retried this soon, so
# plans resume after the DBA grants access, without a restart (issue 19).
PERMISSION_RETRY_SECS = 600.0


def _error_ttl(cause: str) -> float:
    return PERMISSION_RETRY_SECS if cause == "permission" else ERROR_TTL_SECS


_SLOT_WAIT_SECS = 5.0  # explains run on the scrape thread: wait this long at most for a budget slot
EXPLAINABLE = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


def helper_sql() -> str:
    """The optional SECURITY DEFINER helper's SQL, shipped inside the package."""
    return resources.files("pgflow").joinpath("sql/explain_helper.sql").read_text(encoding="utf-8")


# pgflow's own statements: its helper, and the statistics views and functions it reads.
_PGFLOWS = re.compile(r'"(?:schemaname|sval|relname)": "(?:pgflow|pg_stat_\w*|pg_locks|pg_blocking_pids|'
                      r'pg_prepared_statements|pg_wait_sampling\w*)"')


def explainable(text: str | None) -> str | None:
    """Why ``text`` must not be explained (``not_parsed``, ``statements``, ``utility``, ``pgflow``,
    ``no_table``), or None."""
    if not text:
        return "not_parsed"
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
    if isinstance(exc, (pgerr.UndefinedTable, pgerr.UndefinedColumn, pgerr.UndefinedFunction,
                        pgerr.UndefinedObject, pgerr.InvalidSchemaName)):
        return "undefined_object", True
    if isinstance(exc, (pgerr.SyntaxError, pgerr.AmbiguousParameter, pgerr.IndeterminateDatatype,
                        pgerr.UndefinedParameter, pgerr.DatatypeMismatch, pgerr.UndefinedFile)):
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

    def explain(self, conn: psycopg.Connection, text: str, server_version_num: int,
                helper: bool = False) -> tuple[list, str]:
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
                count = self._simple(conn, [
                    "PREPARE /*pgflow*/ pgflow_explain AS " + text,
                    "SELECT /*pgflow*/ coalesce(cardinality(parameter_types), 0) FROM pg_prepared_statements "
                    "WHERE name = 'pgflow_explain'"])[0][0]
                args = f"({', '.join(['NULL'] * count)})" if count else ""
                cur = conn.execute(f"{self._limits(**generic)}; "  # type: ignore[arg-type]
                                   f"EXPLAIN /*pgflow*/ (FORMAT JSON) EXECUTE pgflow_explain{args}")
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
            return "ok", ("explain helper not installed (optional): plans of tables the monitoring role may not "
                          "read need it; run pgflow/sql/explain_helper.sql in each database as the tables' owner")
        try:
            Explainer()._run(conn, "SELECT 1", "helper")  # a constant text: no check needed
        except ExplainFailed as exc:
            return "warn", (f"explain helper installed but not usable ({exc.cause}): "
                            "GRANT EXECUTE ON FUNCTION pgflow.explain_generic(text) TO the monitoring role")
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


@dataclass
class ExplainStats:
    explained: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count
    failed: dict[str, int] = field(default_factory=dict)  # cause → count


class PlanSource:
    """Chooses, per window, what to explain within the budget and caches, and explains it.

    ``connect(database)`` opens an autocommit connection to that database of the instance.
    State (the TTL and error caches) is a cache: losing it costs at most one explain more.
    """

    def __init__(self, connect: Callable[[str], psycopg.Connection], *, instance: str = "",
                 explains_per_window: int = 5, explain_ttl_secs: float = 3600, own_user: str | None = None,
                 explainer: Explainer | None = None, clock: Callable[[], float] = time.time) -> None:
        self.connect = connect
        self.instance = instance
        self.explains_per_window = explains_per_window
        self.ttl = explain_ttl_secs
        self.own_user = own_user
        self.explainer = explainer or Explainer()
        self.clock = clock
        self.explained_at: dict[tuple[str, str], float] = {}  # (database, fingerprint) → last success
        self.errors: dict[tuple[str, str], tuple[float, str]] = {}  # → (when, cause): deterministic only
        self.stats = ExplainStats()

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
        _count("skipped", self.instance, reason)

    def choose(self, candidates: pl.DataFrame) -> pl.DataFrame:
        """The rows to explain this window: by execution time, eligible ones only, within the budget.

        ``candidates``: ``database, user, fingerprint, queryid, query, exec_time`` (the window's).
        """
        if self.explains_per_window <= 0 or candidates.height == 0:
            return candidates.clear()
        now = self.clock()
        best = (candidates.sort("exec_time", descending=True, maintain_order=True)
                .unique(["database", "fingerprint"], keep="first", maintain_order=True))
        chosen = []
        for i, row in enumerate(best.iter_rows(named=True)):
            key = (row["database"], row["fingerprint"])
            if self.own_user is not None and row.get("user") == self.own_user:
                self._skip("own")
            elif now - self.explained_at.get(key, -1e18) < self.ttl:
                self._skip("ttl")
            elif key in self.errors and now - self.errors[key][0] < _error_ttl(self.errors[key][1]):
                self._skip("error_cached")
            elif explainable(row["query"]) is not None:
                self.errors[key] = (now, "not_explainable")
                self._skip("not_explainable")
            elif len(chosen) >= self.explains_per_window:
                self._skip("budget")
            else:
                chosen.append(i)
        return best[chosen]

    def run(self, candidates: pl.DataFrame, server_version_num: int) -> pl.DataFrame:
        """Explain this window's chosen candidates; a ``PLANS`` frame of what succeeded."""
        chosen = self.choose(candidates)
        rows: list[dict] = []
        for database in chosen["database"].unique(maintain_order=True).to_list():
            todo = chosen.filter(pl.col("database") == database)
            opened = ExitStack()  # a Connection closes on exit; a budget's connection gives its slot back
            try:
                conn = opened.enter_context(self.connect(database))
            except NoConnection as exc:  # issue 20: no slot, or too few connections free: a later window
                for _ in range(todo.height):
                    self._skip(f"connections_{exc.reason}")
                continue
            except Exception as exc:  # unreachable database: retried at a later window
                for _ in range(todo.height):
                    self._fail("connection", False, database, "", str(exc))
                continue
            with opened:
                helper = _has_helper(conn)
                for row in todo.iter_rows(named=True):
                    rows += self._one(conn, row, server_version_num, helper)
        return pl.DataFrame(rows, schema=PLANS) if rows else pl.DataFrame(schema=PLANS)

    def _one(self, conn: psycopg.Connection, row: dict, version: int, helper: bool) -> list[dict]:
        key = (row["database"], row["fingerprint"])
        try:
            raw, method = self.explainer.explain(conn, row["query"], version, helper=helper)
        except ExplainFailed as exc:
            self._fail(exc.cause, exc.deterministic, *key, str(exc))
            return []
        normalized = plans.normalize(raw)
        now = self.clock()
        self.explained_at[key] = now
        self.stats.explained += 1
        _count("explained", self.instance, "")
        return [{"database": row["database"], "fingerprint": row["fingerprint"], "queryid": row["queryid"],
                 "plan_hash": normalized.hash, "body": normalized.body, "method": method,
                 "explained_at": datetime.fromtimestamp(now, timezone.utc)}]

    def _fail(self, cause: str, deterministic: bool, database: str, fingerprint: str, detail: str) -> None:
        self.stats.failed[cause] = self.stats.failed.get(cause, 0) + 1
        _count("failed", self.instance, cause)
        if deterministic:
            self.errors[(database, fingerprint)] = (self.clock(), cause)
            retry = _error_ttl(cause)
            log.info(f"explain failed; retried in {retry / 3600:g} h" if retry >= 3600 else
                     f"explain failed; retried in {retry / 60:g} min", extra=kv(
                         instance=self.instance, database=database, fingerprint=fingerprint, cause=cause))
        else:
            log.debug("explain failed; retried later", extra=kv(instance=self.instance, cause=cause))


def _has_helper(conn: psycopg.Connection) -> bool:
    return _helper(conn)[1]


def _count(kind: str, instance: str, label: str) -> None:
    from pgflow import telemetry

    if kind == "explained":
        telemetry.explains_taken.labels(instance).inc()
    elif kind == "skipped":
        telemetry.explains_skipped.labels(instance, label).inc()
    else:
        telemetry.explains_failed.labels(instance, label).inc()


def database_connector(dsn: str, connect_timeout: int = 5,
                       budget: ConnectionBudget | None = None) -> Callable[[str], AbstractContextManager]:
    """``connect(database)`` for PlanSource: the instance's DSN with another dbname, autocommit,
    no prepared statements of psycopg's own (pgbouncer-safe), ``application_name=pgflow``.

    With the instance's ``budget`` (issue 20) the connection takes one of its slots (waiting
    at most a few seconds for one) and only while the server has headroom; it raises
    :class:`~pgflow.scrape.budget.NoConnection` otherwise."""
    if budget is not None:
        return lambda database: budget.connection(database, slot_wait_secs=_SLOT_WAIT_SECS)

    def connect(database: str) -> psycopg.Connection:
        return psycopg.connect(psycopg.conninfo.make_conninfo(dsn, dbname=database), autocommit=True,
                               connect_timeout=connect_timeout, application_name="pgflow", prepare_threshold=None)

    return connect


class WindowPlans:
    """The explain step beside the scrape source: at the first scrape of each export window, the
    busiest statements of the window that just closed are explained (within PlanSource's budget
    and caches) and their plans ride on that scrape's Snapshot (``plans``), so capture, replay
    and the operators see exactly what was explained. Runs on the scrape thread, after the
    scrape: it never delays a worker, and a failure here never loses a scrape.
    """

    def __init__(self, source: PlanSource, export_interval_secs: float) -> None:
        self.source = source
        self.interval = export_interval_secs
        self._window: int | None = None
        self._base: pl.DataFrame | None = None  # statements at the first scrape of the current window

    @classmethod
    def for_instance(cls, dsn: str, instance: str, settings: Settings,
                     budget: ConnectionBudget | None = None) -> WindowPlans | None:
        """None when plans are off (``explains_per_window = 0``)."""
        if settings.explains_per_window <= 0:
            return None
        statement_timeout = min(settings.statement_timeout_ms, Explainer.statement_timeout_ms)
        return cls(PlanSource(database_connector(dsn, settings.connect_timeout_secs, budget), instance=instance,
                              explains_per_window=settings.explains_per_window,
                              explain_ttl_secs=settings.explain_ttl_secs,
                              explainer=Explainer(statement_timeout_ms=statement_timeout)),
                   settings.export_interval_secs)

    def attach(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with the plans of the window that just closed (none within a window)."""
        window = int(snapshot.scraped_at.timestamp() // self.interval)
        if self._window is None or window == self._window:
            if self._window is None:
                self._window, self._base = window, snapshot.statements
            return snapshot
        base, self._window, self._base = self._base, window, snapshot.statements
        try:
            candidates = explain_candidates(base, snapshot.statements)
            found = self.source.run(candidates, snapshot.server_version_num)
        except Exception as exc:  # explaining is a side job: the scrape goes on without plans
            log.error("explaining failed unexpectedly", extra=kv(instance=self.source.instance, error=repr(exc)[:300]))
            return snapshot
        return replace(snapshot, plans=found) if found.height else snapshot
