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

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import polars as pl
import psycopg
import psycopg.conninfo

from pgflow.config import Settings
from pgflow.logs import error_summary, kv
from pgflow.ops import plans
from pgflow.ops.explain_targets import explain_candidates
from pgflow.ops.fingerprint import Fingerprinter
from pgflow.schema import PLANS, STATEMENT_KEY, Snapshot
from pgflow.scrape.budget import ConnectionBudget, NoConnection
from pgflow.scrape.explainer import (
    ERROR_TTL_SECS,
    PERMISSION_RETRY_SECS,
    Explainer,
    ExplainFailed,
    _error_ttl,
    _helper,
    explain_helper_finding,
    explainable,
    helper_sql,
    helper_status,
)

log = logging.getLogger("pgflow.explain")

_SLOT_WAIT_SECS = 5.0  # explains run on the scrape thread: wait this long at most for a budget slot

# What callers import from here (one statement's explaining lives in pgflow.scrape.explainer).
__all__ = [
    "ERROR_TTL_SECS",
    "PERMISSION_RETRY_SECS",
    "ExplainFailed",
    "Explainer",
    "PlanSource",
    "WindowPlans",
    "database_connector",
    "explain_helper_finding",
    "explainable",
    "helper_sql",
    "helper_status",
]


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

    def __init__(
        self,
        connect: Callable[[str], psycopg.Connection],
        *,
        instance: str = "",
        explains_per_window: int = 5,
        explain_ttl_secs: float = 3600,
        own_user: str | None = None,
        explainer: Explainer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
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
        best = candidates.sort("exec_time", descending=True, maintain_order=True).unique(
            ["database", "fingerprint"], keep="first", maintain_order=True
        )
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
        except UnicodeEncodeError:  # the text has characters the database's encoding lacks
            self._fail("text_unencodable", True, *key, "")
            return []
        normalized = plans.normalize(raw)
        now = self.clock()
        self.explained_at[key] = now
        self.stats.explained += 1
        _count("explained", self.instance, "")
        return [
            {
                "database": row["database"],
                "fingerprint": row["fingerprint"],
                "queryid": row["queryid"],
                "plan_hash": normalized.hash,
                "body": normalized.body,
                "method": method,
                "explained_at": datetime.fromtimestamp(now, UTC),
            }
        ]

    def _fail(self, cause: str, deterministic: bool, database: str, fingerprint: str, detail: str) -> None:
        self.stats.failed[cause] = self.stats.failed.get(cause, 0) + 1
        _count("failed", self.instance, cause)
        if deterministic:
            self.errors[(database, fingerprint)] = (self.clock(), cause)
            retry = _error_ttl(cause)
            log.info(
                f"explain failed; retried in {retry / 3600:g} h" if retry >= 3600 else f"explain failed; retried in {retry / 60:g} min",
                extra=kv(instance=self.instance, database=database, fingerprint=fingerprint, cause=cause),
            )
        else:
            log.debug("explain failed; retried later", extra=kv(instance=self.instance, cause=cause))


def _candidate_rows(explains_per_window: int) -> int:
    """How many of a window's busiest statements are fingerprinted to choose its plans."""
    return max(200, 10 * explains_per_window)


def _ranking_base(statements: pl.DataFrame) -> pl.DataFrame:
    """What the next window's ranking needs of a scrape: its keys and execution time. Issue 20:
    the whole frame (texts, every counter) held for a window cost ~1.7 MB per instance."""
    return statements.select(*STATEMENT_KEY, "total_exec_time")


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


def database_connector(
    dsn: str, connect_timeout: int = 5, budget: ConnectionBudget | None = None
) -> Callable[[str], AbstractContextManager]:
    """``connect(database)`` for PlanSource: the instance's DSN with another dbname, autocommit,
    no prepared statements of psycopg's own (pgbouncer-safe), ``application_name=pgflow``.

    With the instance's ``budget`` (issue 20) the connection takes one of its slots (waiting
    at most a few seconds for one) and only while the server has headroom; it raises
    :class:`~pgflow.scrape.budget.NoConnection` otherwise."""
    if budget is not None:
        return lambda database: budget.connection(database, slot_wait_secs=_SLOT_WAIT_SECS)

    def connect(database: str) -> psycopg.Connection:
        return psycopg.connect(
            psycopg.conninfo.make_conninfo(dsn, dbname=database),
            autocommit=True,
            connect_timeout=connect_timeout,
            application_name="pgflow",
            prepare_threshold=None,
        )

    return connect


class PlanFingerprints:
    """The busiest statements' fingerprints by text, shared by the instances of a worker (issue 20).

    Instances that are databases of one server, or servers of one application, hold the same
    texts: each is parsed once (~1 ms) per process, not once per instance (200 such instances
    spent ~40 s of CPU on their first windows' parses). Holds twice the candidate rows of each
    instance that joined; the scrape threads share it, hence the lock.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._instances = 0
        self._cache = Fingerprinter(text_cache_size=2 * rows)
        self._lock = threading.Lock()

    def join(self) -> PlanFingerprints:
        """One more instance: room for its busiest statements too."""
        with self._lock:
            self._instances += 1
            self._cache._by_text.resize(2 * self.rows * self._instances)
        return self

    def fingerprint(self, text: str) -> str:
        with self._lock:
            return self._cache.info(text).fingerprint

    @property
    def parses(self) -> int:
        return self._cache.parses

    @property
    def hits(self) -> int:
        return self._cache._by_text.hits


class WindowPlans:
    """The explain step beside the scrape source: at the first scrape of each export window, the
    busiest statements of the window that just closed are explained (within PlanSource's budget
    and caches) and their plans ride on that scrape's Snapshot (``plans``), so capture, replay
    and the operators see exactly what was explained. Runs on the scrape thread, after the
    scrape: it never delays a worker, and a failure here never loses a scrape.
    """

    def __init__(self, source: PlanSource, export_interval_secs: float, fingerprints: PlanFingerprints | None = None) -> None:
        self.source = source
        self.interval = export_interval_secs
        self._window: int | None = None
        self._rows = _candidate_rows(source.explains_per_window)
        # the busiest statements' fingerprints, by text: the same ones, window after window
        self._fingerprints = (fingerprints or PlanFingerprints(self._rows)).join()
        self._base: pl.DataFrame | None = None  # keys and execution time at the first scrape of the current window

    @classmethod
    def for_instance(
        cls,
        dsn: str,
        instance: str,
        settings: Settings,
        budget: ConnectionBudget | None = None,
        fingerprints: PlanFingerprints | None = None,
    ) -> WindowPlans | None:
        """None when plans are off (``explains_per_window = 0``); ``fingerprints``: the cache the
        instances of a worker share (:meth:`shared`), else one of its own."""
        if settings.explains_per_window <= 0:
            return None
        statement_timeout = min(settings.statement_timeout_ms, Explainer.statement_timeout_ms)
        return cls(
            PlanSource(
                database_connector(dsn, settings.connect_timeout_secs, budget),
                instance=instance,
                explains_per_window=settings.explains_per_window,
                explain_ttl_secs=settings.explain_ttl_secs,
                explainer=Explainer(statement_timeout_ms=statement_timeout),
            ),
            settings.export_interval_secs,
            fingerprints,
        )

    @staticmethod
    def shared(settings: Settings) -> PlanFingerprints:
        """A fingerprint cache for the plans of several instances (one bytewax worker's)."""
        return PlanFingerprints(_candidate_rows(settings.explains_per_window))

    def attach(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with the plans of the window that just closed (none within a window)."""
        window = int(snapshot.scraped_at.timestamp() // self.interval)
        if self._window is None or window == self._window:
            if self._window is None:
                self._window, self._base = window, _ranking_base(snapshot.statements)
            return snapshot
        base, self._window, self._base = self._base, window, _ranking_base(snapshot.statements)
        try:
            candidates = explain_candidates(base, snapshot.statements, fingerprint=self._fingerprints.fingerprint, rows=self._rows)
            found = self.source.run(candidates, snapshot.server_version_num)
        except Exception as exc:  # explaining is a side job: the scrape goes on without plans
            log.error("explaining failed unexpectedly", extra=kv(instance=self.source.instance, error=error_summary(exc)))
            return snapshot
        return replace(snapshot, plans=found) if found.height else snapshot
