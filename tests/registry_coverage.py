"""pytest plugin: what the tests' receivers stored is declared, and every declared metric is produced.

Every OTLP receiver a test runs (pgflow.otlp.receiver.Receiver, through its PointStore) is read
just before it closes: an undeclared metric, unit, kind, temporality, attribute or fixed value
fails the session, naming it (``metrics.received_problems``). The metrics stored there and those
``pgflow.ops.run`` produced are collected; with ``PGFLOW_TEST_REGISTRY_COVERAGE=1`` (the full run of
``scripts/test``) a declared metric that no test produced fails the session too.

Load it for every run with ``pytest_plugins = ["registry_coverage"]`` in tests/conftest.py, or for
one run with ``PYTHONPATH=tests pytest -p registry_coverage ...``. What was seen is kept in
pytest's cache (``registry-coverage``), so ``pytest --cache-show registry-coverage/*`` shows it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from pgflow import metrics, ops
from pgflow.otlp import store

SEEN: set[str] = set()
PROBLEMS: dict[str, str] = {}  # problem -> the test that first showed it
_current = ["(outside a test)"]


def _record_store(point_store: store.PointStore) -> None:
    try:
        points, logs = point_store.points(), point_store.logs()
    except Exception:  # a store already closed or broken: its test reports that itself
        return
    SEEN.update(points.get_column("metric").unique().to_list())
    for problem in metrics.received_problems(points, logs):
        PROBLEMS.setdefault(problem, _current[0])


def pytest_configure(config: pytest.Config) -> None:
    original_close, original_run = store.PointStore.close, ops.run

    def close(self: store.PointStore) -> None:
        _record_store(self)
        original_close(self)

    def run(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        points = original_run(*args, **kwargs)
        SEEN.update(points.get_column("metric").unique().to_list())
        return points

    store.PointStore.close = close  # type: ignore[method-assign]
    ops.run = run
    config.add_cleanup(lambda: (setattr(store.PointStore, "close", original_close), setattr(ops, "run", original_run)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    _current[0] = item.nodeid
    try:
        return (yield)
    finally:
        _current[0] = "(outside a test)"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    unseen = sorted(set(metrics.metrics()) - SEEN)
    cache = getattr(session.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        cache.set("registry-coverage/seen", sorted(SEEN))
        cache.set("registry-coverage/unseen", unseen)
        cache.set("registry-coverage/problems", PROBLEMS)
    failed = bool(PROBLEMS) or (os.environ.get("PGFLOW_TEST_REGISTRY_COVERAGE") == "1" and bool(unseen))
    if failed and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    unseen = sorted(set(metrics.metrics()) - SEEN)
    write = terminalreporter.write_line
    terminalreporter.section("metric registry")
    for problem, test in sorted(PROBLEMS.items()):
        write(f"UNDECLARED {problem} (first seen in {test})")
    listed = unseen and os.environ.get("PGFLOW_TEST_REGISTRY_COVERAGE") == "1"  # a partial run produces few: say how many
    write(
        f"{len(SEEN & set(metrics.metrics()))} of {len(metrics.metrics())} declared metrics produced"
        + (f"; not produced: {', '.join(unseen)}" if listed else "")
    )
