"""The docs a DBA reads stay findable and true: a short README, every old section kept in docs/,
every link resolving, every file and test they name existing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

# The headings of the README before it was cut to a page (issue 22): each lives on somewhere.
OLD_HEADINGS = [
    "Two commands",
    "Commands",
    "Configuration",
    "Monitoring role",
    "Check advice",
    "What is exported",
    "Every exported metric",
    "Identity",
    "Active sessions (sampling)",
    "Server health",
    "How it works",
    "Guarantees",
    "Plans and events",
    "Query samples",
    "Per-table statistics",
    "The toolkit (notebooks)",
    "The collector's own metrics",
    "Deploy",
    "Install",
    "Secrets",
    "systemd",
    "Kubernetes",
    "New Relic dashboard",
    "What the monitoring role needs, by feature",
    "Upgrading without losing the ledger",
    "Benchmarks",
]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^(?:pgflow|tests|scripts|bench|deploy|notebooks|datasets|flows|docs)/[\w./-]+$")


def _headings(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append(line.lstrip("#").strip())
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_the_readme_is_a_page_a_new_user_reads_to_the_end():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_section_of_the_old_readme_lives_on_in_docs():
    found = set()
    for page in PAGES:
        found |= set(_headings(page.read_text()))
    missing = [h for h in OLD_HEADINGS if h not in found]
    assert not missing, f"sections lost in the move to docs/: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page: Path):
    text = page.read_text()
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
            continue
        if anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest.read_text())}:
            broken.append(target)
    assert not broken, f"{page.name}: links that lead nowhere: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_and_test_named_exists(page: Path):
    """`pgflow/ops/tables.py`, `tests/test_x.py::test_y` and its follow-ups `::test_z` in the
    same paragraph name things that exist."""
    missing = []
    for paragraph in re.split(r"\n\s*\n", page.read_text()):
        current: Path | None = None
        for token in CODE.findall(paragraph):
            token = token.strip()
            name = None
            if token.startswith("::"):
                name = token[2:]
            else:
                path, sep, name = token.partition("::")
                if not PATH.match(path) or "*" in path or "<" in path:
                    continue
                if not (ROOT / path).exists():
                    missing.append(token)
                    continue
                if path.endswith(".py"):
                    current = ROOT / path
                if not sep:
                    continue
            name = re.split(r"[\[(\s]", name)[0]
            if current is None or not current.is_file() or not name:
                continue
            if not re.search(rf"^\s*(?:async\s+)?def {re.escape(name)}\b", current.read_text(), flags=re.M):
                missing.append(f"{current.relative_to(ROOT)}::{name}")
    assert not missing, f"{page.name} names what does not exist: {missing}"
