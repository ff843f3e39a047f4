"""Issue 19 items 4 and 5: every chart of every notebook shows something on the shipped datasets.

Each notebook runs headless (nbclient, as a new user would run it) against its default capture
in ``datasets/``. A first injected cell keeps every figure the notebook shows; a last one looks at
what was drawn, artist by artist (matplotlib's own data: lines' y values, bars' lengths, filled
areas' vertices, scatter offsets), and fails on a chart with nothing in it or a series that is one
value from end to end. A chart that cannot say anything on real data is removed or replaced, not
excused here.

AAS: the explore notebook's "average active sessions" stack must hold exactly the session-seconds
the capture's raw samples record for the ``active`` state, and its idle-in-transaction chart
those of ``idle in transaction`` (ground truth from the capture's ``samples`` frames, not from
the operators).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

from pgflow import capture

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["explore_workload", "server_health", "replay_check", "tune_limits"]


def _keep_figures() -> None:
    """Injected first: every figure shown is kept (the inline backend closes them after each cell)."""
    import matplotlib.pyplot as plt

    global _shown
    _shown = []
    show = plt.show

    def keep(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        _shown.extend(plt.figure(n) for n in plt.get_fignums() if plt.figure(n) not in _shown)
        return show(*args, **kwargs)

    plt.show = keep


def _describe_drawn() -> list[str]:
    """Injected last: one line per problem (empty chart, empty or constant series) in the figures shown."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import PathCollection, PolyCollection
    from matplotlib.container import BarContainer

    problems: list[str] = []
    figures = list(_shown) + [plt.figure(n) for n in plt.get_fignums() if plt.figure(n) not in _shown]
    for fig in figures:
        for ax in fig.axes:
            title = ax.get_title() or ax.get_ylabel() or ax.get_xlabel() or "(untitled)"
            series = 0
            for line in ax.lines:
                y = np.asarray(line.get_ydata(), dtype=float)
                y = y[np.isfinite(y)]
                series += 1
                if y.size == 0:
                    problems.append(f"{title}: line {line.get_label()!r} has no value")
                elif y.size > 1 and np.ptp(y) == 0:
                    problems.append(f"{title}: line {line.get_label()!r} is {y[0]:g} from end to end")
            bars = [c for c in ax.containers if isinstance(c, BarContainer)]
            for container in bars:
                values = np.asarray(container.datavalues, dtype=float)
                series += 1
                if values.size == 0 or not np.any(values):
                    problems.append(f"{title}: bars {container.get_label()!r} are empty or all 0")
            if len(bars) == 1 and len(bars[0].datavalues) > 1 and np.ptp(np.asarray(bars[0].datavalues, float)) == 0:
                problems.append(f"{title}: every bar has the same length {bars[0].datavalues[0]:g}")
            if len(bars) > 1:  # stacked: the totals must differ
                totals = np.sum([np.asarray(c.datavalues, float) for c in bars], axis=0)
                if totals.size > 1 and np.ptp(totals) == 0:
                    problems.append(f"{title}: every stacked bar has the same length {totals[0]:g}")
            if bars and getattr(bars[0], "orientation", None) == "horizontal":
                # A horizontal bar chart is a ranking: the longest bar on top, each one below no longer.
                totals: dict[float, float] = {}
                for container in bars:
                    for patch in container.patches:
                        y = round(patch.get_y() + patch.get_height() / 2, 6)
                        totals[y] = totals.get(y, 0.0) + patch.get_width()
                ranked = [totals[y] for y in sorted(totals)]
                if len(ranked) < sum(len(c.patches) for c in bars) / len(bars):
                    problems.append(f"{title}: two bars share one label (drawn over each other)")
                if any(a > b for a, b in zip(ranked, ranked[1:])):
                    problems.append(f"{title}: bars not ranked (bottom to top: {[round(v, 3) for v in ranked]})")
            for collection in ax.collections:
                if isinstance(collection, PathCollection):
                    series += 1
                    if len(collection.get_offsets()) == 0:
                        problems.append(f"{title}: a scatter with no point")
                elif isinstance(collection, PolyCollection):
                    series += 1
                    vertices = [p.vertices for p in collection.get_paths() if len(p.vertices)]
                    ys = np.concatenate([v[:, 1] for v in vertices]) if vertices else np.zeros(0)
                    if ys.size == 0 or np.ptp(ys) == 0:
                        problems.append(f"{title}: area {collection.get_label()!r} is empty or flat")
            if series == 0:
                problems.append(f"{title}: nothing drawn")
    if not figures:
        problems.append("the notebook showed no figure")
    return problems


def _source(function) -> str:  # noqa: ANN001
    return inspect.getsource(function)


def execute(name: str, *extra_cells: str) -> nbformat.NotebookNode:
    """Run notebook ``name`` on its default (shipped) capture; ``extra_cells`` run after its own cells."""
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    first = nbformat.v4.new_code_cell(_source(_keep_figures) + "\n_keep_figures()")
    notebook.cells.insert(0, first)
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return notebook


def last_output(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in notebook.cells[-1].get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_chart_shows_something_on_the_shipped_data(name):
    notebook = execute(name, _source(_describe_drawn) + "\nimport json\nprint(json.dumps(_describe_drawn()))")
    problems = json.loads(last_output(notebook).strip().splitlines()[-1])
    assert not problems, f"{name}: " + "; ".join(problems)
    default = next(c.source for c in notebook.cells if "CAPTURE = os.environ.get" in c.source)
    assert "../datasets/" in default  # the shipped data, not whatever the environment pointed at


def _sampled_seconds(path: Path) -> dict[str | None, float]:
    """Session-seconds by state, straight from the capture's raw samples (count x period)."""
    frames = [s.samples for s in capture.read(path) if s.samples.height]
    samples = pl.concat(frames)
    return {
        state: float(seconds)
        for state, seconds in samples.group_by("state").agg((pl.col("count") * pl.col("period_secs")).sum()).iter_rows()
    }


def test_explore_notebook_counts_active_sessions_only_and_idle_in_transaction_apart():
    """Issue 19 item 4: the AAS stack is the active state and nothing else; idle in transaction is drawn apart."""
    notebook = execute(
        "explore_workload",
        "import json\nprint(json.dumps({"
        "'capture': CAPTURE, "
        "'aas_session_seconds': float(aas.join(active.group_by('end').agg(pl.col('window_s').first()), "
        "on='end').select(pl.sum_horizontal(*waits) * pl.col('window_s')).sum().item()), "
        "'idle_session_seconds': float(idle_by_db.join(idle.group_by('end').agg(pl.col('window_s')"
        ".first()), on='end').select(pl.col('sessions') * pl.col('window_s')).sum().item()), "
        "'states_in_aas': active['state'].unique().to_list()}))",
    )
    drawn = json.loads(last_output(notebook).strip().splitlines()[-1])
    truth = _sampled_seconds((ROOT / "notebooks" / drawn["capture"]).resolve())
    assert truth.get("active", 0) > 0 and truth.get("idle in transaction", 0) > 0, truth  # the data has both
    assert drawn["states_in_aas"] == ["active"]
    assert drawn["aas_session_seconds"] == pytest.approx(truth["active"], rel=1e-9)
    assert drawn["idle_session_seconds"] == pytest.approx(truth["idle in transaction"], rel=1e-9)
    assert truth["idle in transaction"] > 0.1 * truth["active"]  # counting both as AAS would show


def test_notebook_chart_code_filters_the_active_state():
    """The explore notebook's AAS chart code names the state it draws (read, not run)."""
    notebook = nbformat.read(ROOT / "notebooks" / "explore_workload.ipynb", as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert 'active = activity.filter(pl.col("state") == "active")' in code
    assert "aas = (active.group_by(" in code and "by_query = labelled(active.group_by(" in code
    assert 'idle = activity.filter(pl.col("state") == "idle in transaction")' in code
