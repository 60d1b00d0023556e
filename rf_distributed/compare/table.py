"""The comparison table: the params that differ and the final metrics, one row per run, and
its terminal, CSV and Markdown forms.

Params are the swept dotted keys as they are plus the resolved config under ``config.``; a
run's metric value is its latest (final) one.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from rf_core.evaluation.metric_registry import column_metrics, higher_is_better, per_object_metrics
from rf_core.files.atomic import atomic_write
from rf_distributed.compare.select import CompareError
from rf_distributed.tracking import tags as rf_tags

__all__ = ["ID_COLUMNS", "PER_OBJECT_METRICS", "PREFERRED_METRICS", "comparison_table",
           "format_table", "markdown_table", "per_object_columns", "sortable_value",
           "table_columns", "varying_params", "write_csv", "write_markdown"]

PREFERRED_METRICS = ("objective", *column_metrics())
"""Default metric columns, in this order, when present in any selected run: a sweep's
``objective``, then the registry's columns (``rf_core.evaluation.metric_registry``)."""
ID_COLUMNS = ("run_id", "run", "experiment", "group", "object", "status")

# Settings that say where or how often, not what was reconstructed.
_BOOKKEEPING_LEAVES = frozenset({"device", "embedding", "path", "dir", "out", "output"})
_BOOKKEEPING_SUFFIXES = ("_path", "_dir", "_file", "_every")
_PATH_VALUE = re.compile(r"^(/|~|\.\.?/|[A-Za-z]:[\\/])")


def _param(run: Run, key: str) -> str | None:
    """``key``'s value; a swept key missing on this run falls back to its ``config.`` copy."""
    params = run.data.params
    if key in params:
        return params[key]
    return None if key.startswith("config.") else params.get(f"config.{key}")


def _bookkeeping(key: str, values: Iterable[str | None]) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _BOOKKEEPING_LEAVES or leaf.endswith(_BOOKKEEPING_SUFFIXES):
        return True
    present = [v for v in values if v is not None]
    return bool(present) and all(_PATH_VALUE.match(v) for v in present)


def varying_params(runs: Sequence[Run]) -> list[str]:
    """Param keys whose values differ across ``runs``: swept (un-prefixed) keys first, then
    differing ``config.*`` keys that no swept key already shows; paths, devices and
    cadences (``*_every``) are left out."""
    keys = set().union(*(r.data.params for r in runs))
    plain = sorted(k for k in keys if not k.startswith("config."))
    config = sorted(k for k in keys if k.startswith("config.") and k[7:] not in keys)
    out = []
    for key in plain + config:
        values = [_param(r, key) for r in runs]
        if len(set(values)) > 1 and not _bookkeeping(key, values):
            out.append(key)
    return out


def _suggest(wanted: str, present: Iterable[str]) -> str:
    close = difflib.get_close_matches(wanted, sorted(present), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def table_columns(runs: Sequence[Run], metrics: Sequence[str] | None,
                  params: Sequence[str] | None, sort: str | None
                  ) -> tuple[list[str], list[str]]:
    """(param columns, metric columns) of the table of ``runs``: the given ``metrics`` (default
    :data:`PREFERRED_METRICS` present, else every metric but ``loss/*``, then the per-object
    columns of a sweep over objects, see :func:`per_object_columns`) plus ``sort`` when it
    is a metric, and the given ``params`` (default :func:`varying_params`); a name no run has
    is a :class:`CompareError` with close matches."""
    present = set().union(*(r.data.metrics for r in runs))
    if metrics is None:
        chosen = [m for m in PREFERRED_METRICS if m in present]
        chosen = chosen or sorted(m for m in present if not m.startswith("loss/")
                                  and "/" not in m)
        chosen += per_object_columns(present)
    else:
        chosen = list(dict.fromkeys(metrics))
        for m in chosen:
            if m not in present:
                raise CompareError(f"no selected run has metric {m!r}{_suggest(m, present)}; "
                                   f"they have: {', '.join(sorted(present)) or 'none'}")
    if sort and sort not in chosen and sort in present:
        chosen.append(sort)
    if params is None:
        keys = varying_params(runs)
    else:
        keys = list(dict.fromkeys(params))
        known = set().union(*(r.data.params for r in runs))
        for p in keys:
            if all(_param(r, p) is None for r in runs):
                raise CompareError(f"no selected run has param {p!r}{_suggest(p, known)}; "
                                   "params are the swept keys and config.* keys")
    keys = [k for k in keys if k not in ID_COLUMNS and k not in chosen]
    return keys, chosen


PER_OBJECT_METRICS = per_object_metrics()
"""Which metric's per-object columns a sweep over objects shows: the first one reported."""


def per_object_columns(present: Iterable[str]) -> list[str]:
    """``<metric>/<object>`` columns (and ``<metric>/worst`` last) of the first metric of
    :data:`PER_OBJECT_METRICS` that a sweep over objects reports per object: held-out PSNR
    when there is ground truth, CLIP similarity to the photo or input PSNR otherwise."""
    present = set(present)
    for metric in PER_OBJECT_METRICS:
        objects = sorted(m for m in present if m.startswith(f"{metric}/")
                         and m != f"{metric}/worst")
        if objects:
            return objects + ([f"{metric}/worst"] if f"{metric}/worst" in present else [])
    return []


def sortable_value(value: Any) -> float | str | None:
    """A number where the value reads as one, else text; ``None`` for missing and NaN."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return None if math.isnan(number) else number


def _sort_rows(rows: list[dict], key: str, descending: bool) -> list[dict]:
    """Rows by ``key``: numbers, then text, then missing and NaN values (in table order)."""
    keyed = [(sortable_value(row.get(key)), row) for row in rows]
    numbers = sorted((kv for kv in keyed if isinstance(kv[0], float)), key=lambda kv: kv[0],
                     reverse=descending)
    texts = sorted((kv for kv in keyed if isinstance(kv[0], str)), key=lambda kv: kv[0],
                   reverse=descending)
    return [row for _, row in numbers + texts] + [row for v, row in keyed if v is None]


def _experiment_names(client: mlflow.MlflowClient | None,
                      runs: Sequence[Run]) -> dict[str, str]:
    names = {}
    for exp_id in {r.info.experiment_id for r in runs}:
        names[exp_id] = exp_id  # unless the store can still name it (not deleted)
        if client is not None:
            with contextlib.suppress(MlflowException):
                names[exp_id] = client.get_experiment(exp_id).name
    return names


def _group_labels(client: mlflow.MlflowClient | None, runs: Sequence[Run],
                  experiments: dict[str, str]) -> dict[str, str]:
    """``{run_id: group}``: the dataset name, else the parent run's name, else the sweep id.

    Groups are told apart by their parent run; two parents with one name (a dataset run
    with two presets) get the first of rf.preset, rf.model, rf.sweep_id, rf.dataset_id that
    differs between them appended, else the parent's short id."""
    parent_names: dict[str, str | None] = {}

    def parent_name(parent_id: str) -> str | None:
        if client is not None and parent_id not in parent_names:
            try:
                parent_names[parent_id] = client.get_run(parent_id).info.run_name
            except MlflowException:
                parent_names[parent_id] = None
        return parent_names.get(parent_id)

    key_of, label_of, first_run = {}, {}, {}
    for run in runs:
        tags = run.data.tags
        parent = tags.get("mlflow.parentRunId")
        key = (parent or tags.get(rf_tags.SWEEP_ID) or tags.get(rf_tags.DATASET)
               or f"experiment:{run.info.experiment_id}")
        key_of[run.info.run_id] = key
        first_run.setdefault(key, run)
        label_of.setdefault(key, tags.get(rf_tags.DATASET) or (parent and parent_name(parent))
                            or tags.get(rf_tags.SWEEP_ID) or experiments[run.info.experiment_id])
    by_label: dict[str, list[str]] = {}
    for key, label in label_of.items():
        by_label.setdefault(label, []).append(key)
    for label, keys in by_label.items():
        if len(keys) < 2:
            continue
        for tag in (rf_tags.PRESET, rf_tags.MODEL, rf_tags.SWEEP_ID, rf_tags.DATASET_ID):
            values = [first_run[k].data.tags.get(tag) for k in keys]
            if None not in values and len(set(values)) == len(keys):
                break
        else:
            values = [k.removeprefix("experiment:")[:8] for k in keys]
        for key, value in zip(keys, values):
            label_of[key] = f"{label} [{value}]"
    return {run_id: label_of[key] for run_id, key in key_of.items()}


def comparison_table(runs: Sequence[Run], metrics: Sequence[str] | None = None,
                     params: Sequence[str] | None = None, sort: str | None = None, *,
                     client: mlflow.MlflowClient | None = None) -> list[dict]:
    """One row per run: ``run_id`` (8 characters), ``run``, ``experiment``, ``group``,
    ``object`` (when any run is a dataset object), ``status`` (``rf.status``, when the runs'
    differ), then the params (text, ``None`` when missing) and metrics (final values,
    ``None`` when missing).

    Args:
        metrics: metric columns; default: :data:`PREFERRED_METRICS` present in any run.
        params: param columns; default: :func:`varying_params`. A swept key missing on a run
            shows that run's ``config.<key>``.
        sort: column to sort by; default: the first metric. Metrics sort best first (higher
            is better except errors, chamfer, losses and seconds), others ascending; missing
            values last.
        client: looks up experiment and parent run names (ids are shown without it).
    """
    if not runs:
        raise CompareError("no runs to compare; select some first")
    param_cols, metric_cols = table_columns(runs, metrics, params, sort)
    experiments = _experiment_names(client, runs)
    groups = _group_labels(client, runs, experiments)
    has_object = any(rf_tags.OBJECT in r.data.tags for r in runs)
    has_status = len({r.data.tags.get(rf_tags.STATUS, "") for r in runs}) > 1
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id[:8], "run": run.info.run_name or "",
               "experiment": experiments[run.info.experiment_id],
               "group": groups[run.info.run_id]}
        if has_object:
            row["object"] = run.data.tags.get(rf_tags.OBJECT, "")
        if has_status:
            row["status"] = run.data.tags.get(rf_tags.STATUS, "")
        row.update({p: _param(run, p) for p in param_cols})
        row.update({m: run.data.metrics.get(m) for m in metric_cols})
        rows.append(row)
    key = sort or (metric_cols[0] if metric_cols else None)
    if key is None:
        return rows
    if key not in rows[0]:
        known = [*rows[0], *set().union(*(r.data.metrics for r in runs))]
        raise CompareError(f"cannot sort by {key!r}: it is neither a metric of these runs nor a "
                           f"table column{_suggest(key, known)}")
    return _sort_rows(rows, key, descending=key in metric_cols and higher_is_better(key))


# --------------------------------------------------------------------------- writers


def _text(value: Any) -> str:
    """A cell for people: floats to 4 significant digits, missing as ``-``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _numeric_column(rows: Sequence[dict], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) not in (None, "")]
    return bool(values) and all(isinstance(sortable_value(v), float) or v != v for v in values)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, *,
                 max_width: int = 32) -> str:
    """An aligned terminal table: numbers right-aligned, floats to 4 significant digits,
    missing values ``-``, cells longer than ``max_width`` cut with ``…``."""
    if not rows:
        return "(no runs)"
    columns = list(columns if columns is not None else rows[0])
    cells = [[_shorten(c, max_width) for c in columns]]
    cells += [[_shorten(_text(r.get(c)), max_width) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    right = [_numeric_column(rows, c) for c in columns]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(cell.rjust(w) if r else cell.ljust(w)
                               for cell, w, r in zip(line, widths, right)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_atomic(path: str | os.PathLike, write) -> Path:
    """:func:`rf_core.files.atomic.atomic_write` into ``path``'s folder, created if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def write_csv(rows: Sequence[dict], path: str | os.PathLike,
              columns: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV; floats at full precision (``float(cell)`` gives them back), missing
    values empty."""
    columns = list(columns if columns is not None else (rows[0] if rows else []))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])

    return _write_atomic(path, write)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """``rows`` as GitHub markdown text (numeric columns right-aligned, ``|`` escaped)."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "|".join("---:" if _numeric_column(rows, c) else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(_text(r.get(c))) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict], path: str | os.PathLike,
                   columns: Sequence[str] | None = None) -> Path:
    """``rows`` as a GitHub markdown table (floats to 4 significant digits, missing ``-``)."""
    columns = list(columns if columns is not None else (rows[0] if rows else []))
    text = markdown_table(rows, columns)
    return _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
