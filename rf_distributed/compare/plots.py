"""Plots for ``rf compare``: metric vs hyperparameter, the metric over a 2-D grid, per-object
bars, learning curves.

Each plot is drawn only when the selected runs have the data for it; otherwise a note says
why it was skipped. Figures use matplotlib's Agg canvas directly (no pyplot, no GUI).

Made to be read without the table beside them: a swept param over decades gets a log axis
(:func:`axis_scale` has the rule) with its swept values as ticks; every point is labelled
with its run (the table's ``run`` column) and the best run is ringed; titles name the metric,
which way is better when the metric registry knows, and the sweep; legends sit outside the
axes and figures are saved with ``bbox_inches="tight"``, so no label is cut.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run

from rf_core.evaluation.metric_registry import METRICS, higher_is_better
from rf_core.files.atomic import atomic_write
from rf_distributed.compare.table import sortable_value

__all__ = ["PLOT_FILES", "axis_scale", "metric_heatmap_figure", "metric_vs_params_figure",
           "plot_comparison"]

_MAX_PANELS = 12  # hyperparameter scatter panels
_MAX_CURVES = 40  # learning curves (best first)
_MAX_LEGEND = 40  # legend entries; the legend is outside the axes, so it may be long
_RUN_COLOURS = 12  # learning curves: up to this many runs get a colour each, else per group
_MAX_LABELS = 40  # point labels per panel; beyond this only the best are labelled
_MAX_GRID = 30  # values per heatmap axis
_GRID_COVER = 0.75  # share of a 2-D grid's cells the runs must fill for a heatmap
_LOG_SPAN = 10.0  # max/min of a param's positive values before a log axis is considered
_LABEL_CHARS = 32  # a run named by two sampled values fits ("entropy=0.1 normal_smooth=1.0")
PLOT_FILES = ("metric_vs_params.png", "per_object.png", "learning_curves.png",
              "metric_heatmap.png")
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
    # tight: the legends outside the axes and the point labels are part of the image
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight",
                                                      pad_inches=0.1))


def _finite(value: Any) -> float | None:
    v = sortable_value(value)
    return v if isinstance(v, float) and math.isfinite(v) else None


def _groups(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["group"] for r in rows))


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _run_labels(rows: Sequence[dict]) -> dict[str, str]:
    """``{run_id: label}``: the table's ``run`` without Ray's experiment tag and the trial
    prefix all runs share (``3f2a1_00003 (3_lr=0.01)`` -> ``00003``)."""
    runs = {r["run_id"]: str(r.get("run") or r["run_id"]).split(" (")[0] for r in rows}
    prefix = os.path.commonprefix(list(runs.values())).rpartition("_")[0]
    cut = len(prefix) + 1 if prefix and len(runs) > 1 else 0
    return {k: _short(v[cut:] or v, _LABEL_CHARS) for k, v in runs.items()}


def _sweep_name(groups: Sequence[str]) -> str:
    groups = [_short(g, 40) for g in groups]
    if len(groups) <= 3:
        return ", ".join(groups)
    return f"{', '.join(groups[:2])} and {len(groups) - 2} more"


def _direction(metric: str) -> str | None:
    """``"higher is better"``/``"lower is better"`` when the registry (or the name: errors,
    losses, seconds) says so; None for names it only guesses, such as a sweep's objective,
    whose mode the runs do not record."""
    known = METRICS.get(metric) or METRICS.get(metric.split("/")[0])
    if known is None and higher_is_better(metric):
        return None
    return "higher is better" if higher_is_better(metric) else "lower is better"


def _metric_title(metric: str) -> str:
    direction = _direction(metric)
    return f"{metric} ({direction})" if direction else metric


def _unevenness(xs: Sequence[float]) -> float:
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    return max(gaps) / min(gaps)


def axis_scale(values: Iterable[float]) -> tuple[str, float | None]:
    """The axis scale for a swept param's ``values``: ``("log", None)``,
    ``("symlog", linthresh)`` or ``("linear", None)``.

    The rule, on the distinct values v (sorted):

    - **log** when all are positive, they span at least a decade (max/min >= 10; below that
      log and linear axes look alike and linear ticks read better) and either there are
      only two of them or their neighbouring gaps are more even on a log scale than on a
      linear one: (largest / smallest gap of log v) < (largest / smallest gap of v). So
      1e-4, 1e-3, 1e-2 and 1, 3, 10, 30 are log; 10, 20, ..., 100 and 1, 2, ..., 30 are not.
    - **symlog** when the same holds for the positive values and the only other value is 0
      (a weight switched off, then swept over decades). ``linthresh`` is the smallest
      positive value and the linear part [0, linthresh] is one decade wide, so 0 sits one
      even step left of it.
    - **linear** otherwise; negative values always keep a linear axis (a signed sweep is an
      offset, not a scale).
    """
    vs = sorted({float(v) for v in values if math.isfinite(v)})
    pos = [v for v in vs if v > 0]
    if not vs or vs[0] < 0 or len(pos) < 2 or pos[-1] / pos[0] < _LOG_SPAN:
        return "linear", None
    if len(pos) > 2 and not _unevenness([math.log(v) for v in pos]) < _unevenness(pos):
        return "linear", None
    return ("symlog", pos[0]) if vs[0] == 0 else ("log", None)


def _set_scale(ax, xs: Sequence[float]) -> None:
    from matplotlib.ticker import NullLocator

    scale, linthresh = axis_scale(xs)
    if scale == "linear":
        return
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh, linscale=1.0)
    else:
        ax.set_xscale("log")
    ticks = sorted(set(xs))
    if len(ticks) <= 10:  # log-spaced values are evenly spaced on screen: tick each one
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())


# Where a point's label may go, in points from it, tried in order until one is free.
_SPOTS = ((5, 2), (5, -9), (5, 11), (5, -18), (5, 20))


def _declutter(fig, labels: Sequence[tuple[Any, bool]]) -> None:
    """Move each label (best first) to the first of :data:`_SPOTS` where it overlaps no label
    placed before it, mirrored to the left of points at an axis' right edge."""
    fig.draw_without_rendering()  # the layout, so label boxes are in pixels
    renderer = fig.canvas.get_renderer()
    placed = []
    for text, left in labels:
        for dx, dy in _SPOTS:
            text.set_position((-dx if left else dx, dy))
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
        else:
            text.set_position((-5 if left else 5, 2))  # crowded everywhere: beside the point
            box = text.get_window_extent(renderer)
        placed.append(box)


def _legend(ax, handles: list) -> None:
    """Beside ``ax``, right of it from its top: the layout makes room, nothing covers data
    or the title."""
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0, fontsize=8, ncols=math.ceil(len(handles) / 20))


def _marker(colour, label: str, **kw):
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="", marker="o", color=colour, label=label, **kw)


def metric_vs_params_figure(rows: Sequence[dict], params: Sequence[str], metric: str,
                            notes: list[str]):
    """``metric`` against each numeric varying param, one panel each, coloured by group, each
    point labelled with its run and the best run ringed; None (with a note) when no numeric
    param varies."""
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
    # best first, as the table sorts: the best is ringed, the best keep their labels
    ranked = sorted(scored, key=lambda r: _finite(r.get(metric)),
                    reverse=higher_is_better(metric))
    best = ranked[0]
    ncols = min(3, len(numeric))
    nrows = math.ceil(len(numeric) / ncols)
    fig = _figure(4.2 * ncols + 1.6, 3.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    names, labels, unlabelled = _run_labels(scored), [], False
    for ax, p in zip(axes, numeric):
        points = [(_finite(r.get(p)), _finite(r.get(metric)), r) for r in ranked]
        points = [pt for pt in points if pt[0] is not None]
        for gi, g in enumerate(groups):
            mine = [(x, y) for x, y, r in points if r["group"] == g]
            if mine:
                ax.scatter(*zip(*mine), color=_colour(gi, len(groups)), s=30, alpha=0.85)
        xs = [x for x, _, _ in points]
        if _finite(best.get(p)) is not None:
            ax.scatter([_finite(best[p])], [_finite(best[metric])], s=170, facecolors="none",
                       edgecolors="black", linewidths=1.6, zorder=3)
        _set_scale(ax, xs)
        ax.margins(x=0.08, y=0.12)
        unlabelled |= len(points) > _MAX_LABELS
        for x, y, row in points[:_MAX_LABELS]:
            left = x == max(xs)  # at the right edge: labelled on the left, inside the axes
            text = ax.annotate(names[row["run_id"]], (x, y), (-5 if left else 5, 2),
                               textcoords="offset points",
                               fontsize=7, ha="right" if left else "left", va="bottom",
                               fontweight="bold" if row is best else "normal")
            text.set_in_layout(False)  # the tight save keeps it; the layout need not make room
            labels.append((text, left))
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(numeric):]:
        ax.set_visible(False)
    if unlabelled:
        notes.append(f"{PLOT_FILES[0]} labels the best {_MAX_LABELS} runs of each panel")
    shown = [g for g in groups if any(r["group"] == g for r in scored)]
    if len(shown) > _MAX_LEGEND:
        notes.append(f"{PLOT_FILES[0]} legend names the first {_MAX_LEGEND} of {len(shown)} "
                     "groups")
    handles = [_marker(_colour(groups.index(g), len(groups)), _short(g, 40))
               for g in shown[:_MAX_LEGEND]]
    handles.append(_marker("none", f"best: {names[best['run_id']]} ({_finite(best[metric]):.4g})",
                           markersize=12, markeredgecolor="black", markeredgewidth=1.6))
    _legend(axes[ncols - 1], handles)
    fig.suptitle(f"{_metric_title(metric)} against each swept param\n"
                 f"{_sweep_name(_groups(scored))}")
    _declutter(fig, labels)
    return fig


def _ordered(keys: Iterable[float | str]) -> list[float | str]:
    """Numbers ascending, then text: the order of a categorical axis."""
    keys = list(keys)
    return (sorted(k for k in keys if isinstance(k, float))
            + sorted(k for k in keys if isinstance(k, str)))


def _tick(key: float | str) -> str:
    return f"{key:g}" if isinstance(key, float) else _short(key, 24)


def metric_heatmap_figure(rows: Sequence[dict], params: Sequence[str], metric: str,
                          notes: list[str]):
    """``metric`` over the grid of the two params of ``params`` that vary among the runs that
    have it: values in order along each axis (the param with more values across), each cell
    annotated with its value (the mean of its runs, their count when more than one), the
    best cell outlined, better always the bright end of the colour bar.

    None when other than two params vary; None with a note when the runs fill under 75% of
    the grid's cells (a one-at-a-time sweep: the scatter shows it) or an axis has over 30
    values.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    scored = [r for r in rows if _finite(r.get(metric)) is not None]
    values = {p: {sortable_value(r.get(p)) for r in scored} - {None} for p in params}
    varying = [p for p in params if len(values[p]) > 1]
    if len(varying) != 2:
        return None
    px, py = sorted(varying, key=lambda p: -len(values[p]))  # stable: param order on ties
    xs, ys = _ordered(values[px]), _ordered(values[py])
    cells: dict[tuple[int, int], list[float]] = {}
    for r in scored:
        kx, ky = sortable_value(r.get(px)), sortable_value(r.get(py))
        if kx is not None and ky is not None:
            cells.setdefault((ys.index(ky), xs.index(kx)), []).append(_finite(r[metric]))
    size, what = len(xs) * len(ys), f"{metric} heatmap over {px} × {py}"
    if len(cells) < _GRID_COVER * size:
        notes.append(f"no {what}: the runs fill {len(cells)} of its {size} cells (a heatmap "
                     f"needs {_GRID_COVER:.0%})")
        return None
    if max(len(xs), len(ys)) > _MAX_GRID:
        notes.append(f"no {what}: {max(len(xs), len(ys))} values on one axis (at most "
                     f"{_MAX_GRID})")
        return None
    grid = np.full((len(ys), len(xs)), np.nan)
    for (i, j), vs in cells.items():
        grid[i, j] = sum(vs) / len(vs)
    higher = higher_is_better(metric)
    cmap = colormaps["viridis" if higher else "viridis_r"].with_extremes(bad="0.92")
    fig = _figure(2.6 + 0.95 * len(xs), 1.7 + 0.6 * len(ys))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto")
    rotate = len(xs) > 8
    ax.set_xticks(range(len(xs)), [_tick(k) for k in xs], rotation=45 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_yticks(range(len(ys)), [_tick(k) for k in ys])
    ax.set_xlabel(px)
    ax.set_ylabel(py)
    best = (np.nanargmax if higher else np.nanargmin)(grid)
    bi, bj = divmod(int(best), len(xs))
    for i in range(len(ys)):
        for j in range(len(xs)):
            if (i, j) not in cells:
                ax.text(j, i, "no run", ha="center", va="center", fontsize=7, color="0.4")
                continue
            red, green, blue, _ = cmap(image.norm(grid[i, j]))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            n = len(cells[i, j])
            ax.text(j, i, f"{grid[i, j]:.4g}" + (f"\nn={n}" if n > 1 else ""), ha="center",
                    va="center", fontsize=8, color="white" if dark else "black",
                    fontweight="bold" if (i, j) == (bi, bj) else "normal")
    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="black", lw=3))
    fig.colorbar(image, ax=ax).set_label(_metric_title(metric))
    ax.set_title(f"{metric} over {px} × {py} (best outlined)\n{_sweep_name(_groups(scored))}",
                 fontsize=10)
    return fig


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
    fig = _figure(max(6.0, 1.0 + 0.3 * len(objects) * len(groups)) + 1.6, 4.2)
    ax = fig.subplots()
    for gi, g in enumerate(groups):
        xs = [i + (gi - (len(groups) - 1) / 2) * width for i in range(len(objects))]
        ys = [sum(values[g, o]) / len(values[g, o]) if (g, o) in values else math.nan
              for o in objects]
        ax.bar(xs, ys, width, label=_short(g, 40), color=_colour(gi, len(groups)))
    rotate = len(objects) > 6
    ax.set_xticks(range(len(objects)), objects, rotation=45 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, ax.get_legend_handles_labels()[0][:_MAX_LEGEND])
    ax.set_title(f"{_metric_title(metric)} per object\n{_sweep_name(groups)}")
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
    fig = _figure(9.0, 4.5)
    ax = fig.subplots()
    groups = list(dict.fromkeys(row["group"] for row, _, _ in curves))
    per_run = len(curves) <= _RUN_COLOURS
    labelled = set()
    for i, (row, steps, values) in enumerate(curves):
        gi = groups.index(row["group"])
        if per_run:
            colour, label = _colour(i, len(curves)), _short(f"{row['group']} / {row['run']}", 48)
        else:
            colour = _colour(gi, len(groups))
            label = _short(row["group"], 40) if row["group"] not in labelled else None
            labelled.add(row["group"])
        ax.plot(steps, values, color=colour, label=label, lw=1.2, alpha=0.9 if per_run else 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > _MAX_LEGEND:
        notes.append(f"learning-curve legend names the first {_MAX_LEGEND} of {len(handles)} "
                     "groups")
    _legend(ax, handles[:_MAX_LEGEND])
    ax.set_title(f"{_metric_title(key)} over training ({len(curves)} runs)\n"
                 f"{_sweep_name(groups)}")
    return _save(fig, path)


def plot_comparison(rows: Sequence[dict], runs: Sequence[Run], out_dir: str | os.PathLike, *,
                    params: Sequence[str], metrics: Sequence[str],
                    client: mlflow.MlflowClient | None = None,
                    curve_metric: str = "loss/total") -> tuple[list[Path], list[str]]:
    """Write the plots that the data allows into ``out_dir``; return (PNG paths, notes on
    plots skipped or changed, and why). The primary metric is ``metrics[0]``.

    - ``metric_vs_params.png``: the primary metric against each numeric param of ``params``,
      a panel each, coloured by group (:func:`metric_vs_params_figure`);
    - ``per_object.png``: per dataset object, a bar per group, of the primary metric (else
      the first of ``metrics`` that object runs have);
    - ``learning_curves.png``: ``curve_metric``'s history per run (the primary metric's if
      no run logged it), read through ``client``;
    - ``metric_heatmap.png``: when exactly two of ``params`` vary and the runs fill most of
      their grid, the primary metric over it (:func:`metric_heatmap_figure`).
    """
    out = Path(out_dir)
    notes: list[str] = []
    paths: list[Path | None] = []
    metric = metrics[0] if metrics else None
    heatmap = None
    if metric is None:
        notes.append("no metric plots: the selected runs have no metrics")
    else:
        fig = metric_vs_params_figure(rows, params, metric, notes)
        paths.append(_save(fig, out / PLOT_FILES[0]) if fig is not None else None)
        heatmap = metric_heatmap_figure(rows, params, metric, notes)
        paths.append(_plot_objects(rows, metrics, out / PLOT_FILES[1], notes))
    paths.append(_plot_curves(client, runs, rows, metric, curve_metric, out / PLOT_FILES[2], notes))
    paths.append(_save(heatmap, out / PLOT_FILES[3]) if heatmap is not None else None)
    return [p for p in paths if p is not None], notes
