"""Every metric name the operators can send is declared in the registry (pgflow/metric_catalog.py),
from which docs/metrics.md is generated."""

from __future__ import annotations

import re
from pathlib import Path

from pgflow import capture, metrics, ops
from pgflow.schema import ATTRIBUTE_KEYS, EVENT_ATTRIBUTE_TYPES

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r'"(postgresql\.[a-z_.]+)"')


def _operator_metric_names() -> set[str]:
    """Every ``postgresql.*`` string literal in the operators that is not an attribute key, and
    every metric the shipped datasets replay to (names built at run time included)."""
    names: set[str] = set()
    for path in (ROOT / "pgflow" / "ops").glob("*.py"):
        names |= set(NAME.findall(path.read_text()))
    for dataset in sorted((ROOT / "datasets").glob("*.duckdb")):
        names |= set(ops.run(capture.read(dataset), export_interval_secs=10)["metric"].unique())
    return names - set(ATTRIBUTE_KEYS) - set(EVENT_ATTRIBUTE_TYPES)  # attributes, not metrics


def test_the_registry_declares_every_metric_the_operators_send():
    sent = _operator_metric_names()
    assert sent, "no metric name found in pgflow/ops"
    undeclared = sent - set(metrics.metrics())
    assert not undeclared, f"sent but not declared in pgflow/metric_catalog.py: {sorted(undeclared)}"


def test_the_metrics_page_names_every_declared_metric():
    page = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in metrics.metrics() if f"`{name}`" not in page]
    assert not missing, f"run scripts/gen-docs: docs/metrics.md lacks {missing}"
