"""Plots for ``rf compare``: metric vs hyperparameter, per-object bars, learning curves.

Each plot is drawn only when the selected runs have the data for it; otherwise a note says
why it was skipped. Figures use matplotlib's Agg canvas directly (no pyplot, no GUI).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run

from rf_core.atomic import atomic_write
from rf_distributed.compare.table import sortable_value

__all__ = ["PLOT_FILES", "plot_comparison"]

_MAX_PANELS = 12  # hyperparameter scatter panels
_MAX_CURVES = 40  # learning curves (best first)
_MAX_LEGEND = 12
PLOT_FILES = ("metric_vs_params.png", "per_object.png", "learning_curves.png")
"""The file names :func:`plot_comparison` may write, in its order."""


def _figure(width: float, height: float):
    # The Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(i: int, n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _finite(value: Any) -> float | None:
    v = sortable_value(value)
    return v if isinstance(v, float) and math.isfinite(v) else None


def _groups(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["group"] for r in rows))


def _plot_params(rows: Sequence[dict], params: Sequence[str], metric: str, path: Path,
                 notes: list[str]) -> Path | None:
    """``metric`` against each numeric varying param, one panel each, coloured by group."""
    scored = [r for r in rows if _finite(r.get(metric)) is not None]
    numeric = []
    for p in params:
        present = [r[p] for r in rows if r.get(p) is not None]
        xs = {_finite(r.get(p)) for r in scored} - {None}
        if present and all(_finite(v) is not None for v in present) and len(xs) > 1:
            numeric.append(p)  # a panel with a single x value would show nothing
    if not numeric:
        notes.append(f"no {metric}-vs-hyperparameter plot: no numeric param varies across "
                     f"the runs that have {metric}")
        return None
    if len(numeric) > _MAX_PANELS:
        notes.append(f"{metric}-vs-hyperparameter plot shows the first {_MAX_PANELS} of "
                     f"{len(numeric)} numeric params")
        numeric = numeric[:_MAX_PANELS]
    groups = _groups(rows)
    ncols = min(3, len(numeric))
    nrows = math.ceil(len(numeric) / ncols)
    fig = _figure(4.2 * ncols, 3.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, p in zip(axes, numeric):
        xs_all = []
        for gi, g in enumerate(groups):
            pts = [(_finite(r.get(p)), _finite(r.get(metric))) for r in rows if r["group"] == g]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                ax.scatter(*zip(*pts), color=_colour(gi, len(groups)), label=g, s=30, alpha=0.85)
                xs_all += [x for x, _ in pts]
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
            ax.set_xscale("log")  # learning rates, weights over decades
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(numeric):]:
        ax.set_visible(False)
    if len(groups) <= _MAX_LEGEND:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} against each varying hyperparameter")
    return _save(fig, path)


def _plot_objects(rows: Sequence[dict], metrics: Sequence[str], path: Path, notes: list[str]
                  ) -> Path | None:
    """Grouped bars of the first of ``metrics`` that object runs have: objects on x, one bar
    per group (the mean over repeated runs)."""
    objects = sorted({r["object"] for r in rows if r.get("object")})
    if not objects:
        notes.append("no per-object bars: no selected run is a dataset object (rf.object)")
        return None
    measured = [m for m in metrics
                if any(r.get("object") and _finite(r.get(m)) is not None for r in rows)]
    if not measured:
        notes.append(f"no per-object bars: no dataset object run has a finite "
                     f"{' or '.join(metrics)}")
        return None
    metric = measured[0]
    if metric != metrics[0]:
        notes.append(f"per-object bars show {metric}: no dataset object run has {metrics[0]}")
    values: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        y = _finite(r.get(metric))
        if r.get("object") and y is not None:
            values.setdefault((r["group"], r["object"]), []).append(y)
    groups = [g for g in _groups(rows) if any((g, o) in values for o in objects)]
    width = 0.8 / len(groups)
    fig = _figure(max(6.0, 1.0 + 0.3 * len(objects) * len(groups)), 4.2)
    ax = fig.subplots()
    for gi, g in enumerate(groups):
        xs = [i + (gi - (len(groups) - 1) / 2) * width for i in range(len(objects))]
        ys = [sum(values[g, o]) / len(values[g, o]) if (g, o) in values else math.nan
              for o in objects]
        ax.bar(xs, ys, width, label=g, color=_colour(gi, len(groups)))
    rotate = len(objects) > 6
    ax.set_xticks(range(len(objects)), objects, rotation=45 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) <= _MAX_LEGEND:
        ax.legend(fontsize=8)
    ax.set_title(f"{metric} per object")
    return _save(fig, path)


def _plot_curves(client: mlflow.MlflowClient | None, runs: Sequence[Run], rows: Sequence[dict],
                 metric: str | None, curve_metric: str, path: Path, notes: list[str]
                 ) -> Path | None:
    """One line per run (best first, at most ``_MAX_CURVES``) of ``curve_metric``'s history,
    else of ``metric``'s."""
    if client is None:
        notes.append("no learning curves: they need an MLflow client to read histories")
        return None
    key = curve_metric
    if not any(curve_metric in r.data.metrics for r in runs):
        if metric is None or not any(metric in r.data.metrics for r in runs):
            notes.append(f"no learning curves: no selected run logged {curve_metric}")
            return None
        notes.append(f"learning curves show {metric}: no selected run logged {curve_metric}")
        key = metric
    by_id = {r.info.run_id[:8]: r for r in runs}
    chosen = [row for row in rows if key in by_id[row["run_id"]].data.metrics]
    if len(chosen) > _MAX_CURVES:
        notes.append(f"learning curves show the first {_MAX_CURVES} of {len(chosen)} runs")
        chosen = chosen[:_MAX_CURVES]
    curves = []
    for row in chosen:
        history = client.get_metric_history(by_id[row["run_id"]].info.run_id, key)
        points = sorted((m.step, m.timestamp, m.value) for m in history)
        if len(points) >= 2:
            curves.append((row, [p[0] for p in points], [p[2] for p in points]))
    if not curves:
        notes.append(f"no learning curves: {key} has a single value per run")
        return None
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    groups = list(dict.fromkeys(row["group"] for row, _, _ in curves))
    per_run = len(curves) <= _MAX_LEGEND  # few runs: a colour each; many: a colour per group
    labelled = set()
    for i, (row, steps, values) in enumerate(curves):
        gi = groups.index(row["group"])
        if per_run:
            label = f"{row['group']} / {row['run']}"
            colour, label = _colour(i, len(curves)), label if len(label) <= 48 else label[:47] + "…"
        else:
            colour = _colour(gi, len(groups))
            label = row["group"] if row["group"] not in labelled and gi < _MAX_LEGEND else None
            labelled.add(row["group"])
        ax.plot(steps, values, color=colour, label=label, lw=1.2, alpha=0.9 if per_run else 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if not per_run and len(groups) > _MAX_LEGEND:
        notes.append(f"learning-curve legend names the first {_MAX_LEGEND} of {len(groups)} "
                     "groups")
    ax.set_title(f"{key} over training ({len(curves)} runs)")
    return _save(fig, path)


def plot_comparison(rows: Sequence[dict], runs: Sequence[Run], out_dir: str | os.PathLike, *,
                    params: Sequence[str], metrics: Sequence[str],
                    client: mlflow.MlflowClient | None = None,
                    curve_metric: str = "loss/total") -> tuple[list[Path], list[str]]:
    """Write the plots that the data allows into ``out_dir``; return (PNG paths, notes on
    plots skipped or changed, and why). The primary metric is ``metrics[0]``.

    - ``metric_vs_params.png``: the primary metric against each numeric param of ``params``,
      a panel each, coloured by group;
    - ``per_object.png``: per dataset object, a bar per group, of the primary metric (else
      the first of ``metrics`` that object runs have);
    - ``learning_curves.png``: ``curve_metric``'s history per run (the primary metric's if
      no run logged it), read through ``client``.
    """
    out = Path(out_dir)
    notes: list[str] = []
    paths = []
    metric = metrics[0] if metrics else None
    if metric is None:
        notes.append("no metric plots: the selected runs have no metrics")
    else:
        paths += [_plot_params(rows, params, metric, out / PLOT_FILES[0], notes),
                  _plot_objects(rows, metrics, out / PLOT_FILES[1], notes)]
    paths.append(_plot_curves(client, runs, rows, metric, curve_metric, out / PLOT_FILES[2], notes))
    return [p for p in paths if p is not None], notes


