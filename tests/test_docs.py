"""The README's table of exported metrics lists every metric the operators can send."""

from __future__ import annotations

import re
from pathlib import Path

from pgflow import capture, ops
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


def _readme_table() -> str:
    text = (ROOT / "docs" / "exported.md").read_text()
    start = text.index("## Every exported metric")
    end = text.index("\n#", start + 1)
    return text[start:end]


def test_readme_lists_every_metric_the_operators_send():
    table = _readme_table()
    listed = set(re.findall(r"^\| `(postgresql\.[a-z_.]+)`", table, flags=re.M))
    sent = _operator_metric_names()
    assert sent, "no metric name found in pgflow/ops"
    assert not sent - listed, f"exported but not in the README's table: {sorted(sent - listed)}"
