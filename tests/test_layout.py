"""The house stays acyclic and its rooms small: each module imports only from its own floor and
the floors below (data flows one way: scrape -> ops -> stream/otlp), and none grows past about
400 lines (CONTRIBUTING.md)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 420  # "about 400" lines of code: blank lines, comments and docstrings are not counted,
# so the measure does not move with the formatter's line breaks
DECLARATIONS = {"pgflow/metric_catalog.py"}  # the registry's data: one declaration per metric, no logic

# module prefix -> floor; the longest matching prefix wins
FLOORS = {
    "pgflow.errors": 0,
    "pgflow.logs": 0,
    "pgflow.lru": 0,
    "pgflow.schema": 0,
    "pgflow.telemetry": 0,
    "pgflow.config": 0,
    "pgflow.metrics": 0,
    "pgflow.pgserver": 0,
    "pgflow": 0,
    "pgflow.ops": 1,
    "pgflow.scrape": 2,
    "pgflow.otlp": 2,
    "pgflow.capture": 3,
    "pgflow.tune": 3,
    "pgflow.gendocs": 3,
    "pgflow.stream": 4,
    "pgflow.replay": 5,
    "pgflow.demo": 5,
    "flows": 5,
    "pgflow.cli": 5,
    "pgflow.__main__": 5,
}


def _floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def _modules() -> dict[str, Path]:
    out = {}
    for path in [*ROOT.glob("pgflow/**/*.py"), *ROOT.glob("flows/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] in ("pgflow", "flows")}


def test_no_module_imports_from_a_floor_above_its_own():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imports(path):
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]  # `from pgflow.ops import plans` names a module or a name
            if target in modules and target != "pgflow" and _floor(target) > _floor(name):
                wrong.append(f"{name} (floor {_floor(name)}) imports {target} (floor {_floor(target)})")
    assert not wrong, "\n".join(wrong)


def _code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    text = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_no_module_is_over_about_400_lines():
    big = {}
    for path in _modules().values():
        name = str(path.relative_to(ROOT))
        if name not in DECLARATIONS and (n := _code_lines(path)) > MAX_LINES:
            big[name] = n
    assert not big, f"split these along their seams: {big}"
