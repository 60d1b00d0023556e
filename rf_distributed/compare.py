"""``rf compare``: finished reconstructions side by side, from MLflow, as a table, plots and a run.

Sweeps (``rf sweep``) and dataset runs (``rf dataset``) log one child run per trial or object.
This module selects such runs across experiments (:func:`select_runs`), tabulates the settings
that differ and the final metrics (:func:`comparison_table`), writes ``table.csv``,
``table.md`` and PNG plots, and logs those files on an ``rf.kind=comparison`` run so the
comparison itself is tracked (:func:`run_compare`).

Tags read here (written by ``sweep_tracking.MLflowSweepCallback`` and the dataset runner):

- trial runs: ``rf.kind=trial``, ``mlflow.parentRunId``, ``rf.sweep_id``, ``rf.trial_id``,
  ``rf.status`` (finished, error, unfinished, running);
- object runs: ``rf.kind=object``, ``mlflow.parentRunId``, ``rf.dataset``, ``rf.object``,
  ``rf.status`` (finished, failed), ``rf.preset``, ``rf.model``;
- parents: ``rf.kind=sweep`` or ``dataset``.

Params are the swept dotted keys as they are plus the resolved config under ``config.``;
a run's metric value is its latest (final) one, and ``loss/*`` keep their histories.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import json
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from rf_core.errors import UserError
from rf_distributed.compare_plots import _PLOTS, plot_comparison
from rf_distributed.tracking import (
    _experiment_id,
    _sqlite_path,
    check_tracking_uri,
    resolve_tracking_uri,
    sweep_url_hint,
)

__all__ = [
    "CompareError",
    "CompareSelection",
    "PREFERRED_METRICS",
    "comparison_table",
    "format_compare",
    "format_table",
    "plot_comparison",
    "run_compare",
    "select_runs",
    "varying_params",
    "write_csv",
    "write_markdown",
]

PREFERRED_METRICS = (
    "objective", "input_psnr", "input_mask_iou", "heldout_psnr", "heldout_ssim",
    "heldout_mask_iou", "heldout_depth_error", "chamfer_l1", "fscore", "total_seconds",
)
"""Default metric columns, in this order, when present in any selected run."""
ID_COLUMNS = ("run_id", "run", "experiment", "group", "object", "status")

_LOWER_IS_BETTER = re.compile(r"error|chamfer|seconds|loss|lpips")
# Settings that say where or how often, not what was reconstructed.
_BOOKKEEPING_LEAVES = frozenset({"device", "embedding", "path", "dir", "out", "output"})
_BOOKKEEPING_SUFFIXES = ("_path", "_dir", "_file", "_every")
_PATH_VALUE = re.compile(r"^(/|~|\.\.?/|[A-Za-z]:[\\/])")
_PAGE = 1000  # runs per search request (MLflow's default page size)
_TAG_LIMIT = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_TERMINAL_PARAMS = 8  # param columns shown by format_compare; the files have all


class CompareError(UserError, ValueError):
    """The comparison cannot be made; the message says what was wrong and what to do."""


@dataclass
class CompareSelection:
    """Which MLflow runs to put side by side; every given criterion narrows the set."""

    experiments: list[str] = field(default_factory=list)
    """Experiment names to search; empty: every active experiment."""
    tags: dict[str, str] = field(default_factory=dict)
    """Exact tag matches, e.g. ``{"rf.preset": "fast"}``."""
    run_ids: list[str] = field(default_factory=list)
    """Exactly these runs: full ids or unique prefixes (the table's short ids)."""
    filter: str | None = None
    """Extra MLflow search filter joined with ``and``, e.g. ``"metrics.input_psnr > 20"``."""
    kinds: list[str] = field(default_factory=lambda: ["trial", "object"])
    """``rf.kind`` values to include (empty: any); ignored when ``run_ids`` are given."""
    statuses: list[str] = field(default_factory=lambda: ["finished"])
    """``rf.status`` values to include; empty: any (failed and unfinished runs too)."""

    def __post_init__(self):
        for name in ("experiments", "run_ids", "kinds", "statuses"):
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, str) else list(value))
        self.tags = {str(k): str(v) for k, v in dict(self.tags).items()}
        for key, value in self.tags.items():
            if "`" in key or ("'" in value and '"' in value):
                raise CompareError(f"tag {key}={value}: a tag name may not contain ` and a "
                                   "value not both kinds of quote; use filter= instead")

    def describe(self) -> str:
        """One line: what this selection searches."""
        parts = [f"experiments {', '.join(map(repr, self.experiments)) or 'all'}"]
        if self.run_ids:
            parts.append(f"run ids {', '.join(self.run_ids)}")
        else:
            parts.append(f"rf.kind in {self.kinds or 'any'}")
        parts.append(f"rf.status in {self.statuses}" if self.statuses else "any rf.status")
        parts += [f"tag {k}={v}" for k, v in self.tags.items()]
        if self.filter:
            parts.append(f"filter {self.filter!r}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- selection


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _tag_eq(key: str, value: str) -> str:
    return f"tags.`{key}` = {_quote(value)}"


def _search(client: mlflow.MlflowClient, experiment_ids: list[str], parts: Sequence[str],
            user_filter: str | None = None) -> list[Run]:
    """Every run matching all ``parts`` (and ``user_filter``), oldest first, page by page."""
    text = " and ".join([*parts, *([user_filter] if user_filter else [])])
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, text, max_results=_PAGE,
                                      order_by=["attributes.start_time ASC"], page_token=token)
        except MlflowException as e:
            if user_filter and e.error_code == "INVALID_PARAMETER_VALUE":
                reason = str(e.message).splitlines()[0]
                raise CompareError(
                    f"MLflow cannot search with filter {user_filter!r} ({reason}); use MLflow "
                    "search syntax, e.g. \"metrics.input_psnr > 20 and params.`recon.steps` = "
                    "'500'\"") from None
            raise
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiments(client: mlflow.MlflowClient, names: list[str]) -> dict[str, str]:
    """``{experiment_id: name}`` of ``names`` (all active experiments when empty)."""
    active, token = {}, None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE,
                                         page_token=token)
        active.update({e.name: e.experiment_id for e in page})
        token = page.token
        if not token:
            break
    if not active:
        raise CompareError(f"the MLflow store {client.tracking_uri} has no experiments; run "
                           "`rf sweep` or `rf dataset` first, or point the tracking URI at "
                           "the store that has them")
    unknown = [n for n in dict.fromkeys(names) if n not in active]
    if unknown:
        available = sorted(active)
        shown = ", ".join(available[:20]) + (f" (+{len(available) - 20} more)"
                                              if len(available) > 20 else "")
        raise CompareError(f"no MLflow experiment named {', '.join(map(repr, unknown))} at "
                           f"{client.tracking_uri}; available: {shown}")
    chosen = list(dict.fromkeys(names)) or sorted(active)
    return {active[n]: n for n in chosen}


def _status_ok(run: Run, statuses: list[str]) -> bool:
    return not statuses or run.data.tags.get("rf.status", "") in statuses


def _select(client: mlflow.MlflowClient, selection: CompareSelection
            ) -> tuple[list[Run], list[Run]]:
    """(matching runs, runs that match all but ``statuses``)."""
    experiments = _experiments(client, selection.experiments)
    ids = list(experiments)
    parts = [_tag_eq(k, v) for k, v in selection.tags.items()]
    if selection.run_ids:
        return _select_ids(client, selection, experiments, parts), []
    if len(selection.kinds) == 1:  # MLflow has no IN for tags: one kind on the server
        parts.append(_tag_eq("rf.kind", selection.kinds[0]))
    runs = [r for r in _search(client, ids, parts, selection.filter)
            if not selection.kinds or r.data.tags.get("rf.kind", "") in selection.kinds]
    chosen = [r for r in runs if _status_ok(r, selection.statuses)]
    if not chosen:
        raise CompareError(_no_match(client, selection, experiments, parts))
    return chosen, [r for r in runs if not _status_ok(r, selection.statuses)]


def _select_ids(client: mlflow.MlflowClient, selection: CompareSelection,
                experiments: dict[str, str], parts: list[str]) -> list[Run]:
    where = (f"experiments {', '.join(map(repr, experiments.values()))}"
             if selection.experiments else "any active experiment")
    found: dict[str, Run] = {}
    missing = []
    for wanted in dict.fromkeys(i.strip().lower() for i in selection.run_ids):
        if not re.fullmatch(r"[0-9a-f]{1,32}", wanted):
            raise CompareError(f"{wanted!r} is not an MLflow run id (up to 32 hex digits)")
        op = f"= '{wanted}'" if len(wanted) == 32 else f"LIKE '{wanted}%'"
        hits = _search(client, list(experiments), [f"attributes.run_id {op}"])
        if len(hits) > 1:
            raise CompareError(f"run id prefix {wanted!r} matches {len(hits)} runs "
                               f"({', '.join(r.info.run_id[:12] for r in hits[:5])}, ...); "
                               "give more digits")
        if not hits:
            missing.append(wanted)
        for run in hits:
            found[run.info.run_id] = run
    if missing:
        raise CompareError(f"run ids not found in {where} at {client.tracking_uri}: "
                           f"{', '.join(missing)}; copy ids from the MLflow UI or a comparison "
                           "table, and check the experiments and tracking URI")
    kept = {r.info.run_id for r in found.values()}
    if parts or selection.filter:
        quoted = ", ".join(f"'{i}'" for i in found)
        matched = _search(client, list(experiments), [*parts, f"attributes.run_id IN ({quoted})"],
                          selection.filter)
        kept = {r.info.run_id for r in matched}
    dropped = []
    for run_id, run in found.items():
        status = run.data.tags.get("rf.status", "")
        if run_id not in kept:
            dropped.append(f"{run_id[:8]} (excluded by the tags/filter)")
        elif not _status_ok(run, selection.statuses):
            dropped.append(f"{run_id[:8]} (rf.status={status or 'unset'}, not in "
                           f"{selection.statuses}; an empty status list takes any)")
    if dropped:
        raise CompareError(f"runs asked for by id do not match the selection: "
                           f"{'; '.join(dropped)}; loosen the selection or leave those ids out")
    return list(found.values())


def _no_match(client: mlflow.MlflowClient, selection: CompareSelection,
              experiments: dict[str, str], parts: list[str]) -> str:
    """Why nothing matched, with what the searched experiments do hold."""
    base = f"no runs matched ({selection.describe()})"
    tag_parts = parts[: len(selection.tags)]
    present = _search(client, list(experiments), tag_parts, selection.filter)
    if not present:
        if selection.tags or selection.filter:
            return f"{base}: no run there has these tags/filter; loosen or drop them"
        return (f"{base}: these experiments hold no runs; run `rf sweep` or `rf dataset` "
                "first, or choose other experiments")
    counts = Counter((r.data.tags.get("rf.kind", "?"), r.data.tags.get("rf.status", "?"))
                     for r in present)
    held = ", ".join(f"{n} {kind}/{status}" for (kind, status), n in counts.most_common(6))
    return (f"{base}: the runs there are (rf.kind/rf.status) {held}; widen the selection "
            "(other kinds, an empty status list for any status, fewer tags)")


def select_runs(client: mlflow.MlflowClient, selection: CompareSelection) -> list[Run]:
    """The runs ``selection`` names, oldest first; raises :class:`CompareError` naming an
    unknown experiment (with those available) or, when nothing matches, what was searched
    and what the experiments hold instead."""
    return _select(client, selection)[0]


# --------------------------------------------------------------------------- the table


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


def _columns(runs: Sequence[Run], metrics: Sequence[str] | None, params: Sequence[str] | None,
             sort: str | None) -> tuple[list[str], list[str]]:
    """(param columns, metric columns) of the table."""
    present = set().union(*(r.data.metrics for r in runs))
    if metrics is None:
        chosen = [m for m in PREFERRED_METRICS if m in present]
        chosen = chosen or sorted(m for m in present if not m.startswith("loss/"))
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


def _higher_is_better(metric: str) -> bool:
    return not _LOWER_IS_BETTER.search(metric)


def _sortable(value: Any) -> float | str | None:
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
    keyed = [(_sortable(row.get(key)), row) for row in rows]
    numbers = sorted((kv for kv in keyed if isinstance(kv[0], float)), key=lambda kv: kv[0],
                     reverse=descending)
    texts = sorted((kv for kv in keyed if isinstance(kv[0], str)), key=lambda kv: kv[0],
                   reverse=descending)
    return [row for _, row in numbers + texts] + [row for v, row in keyed if v is None]


def _experiment_names(client: mlflow.MlflowClient | None, runs: Sequence[Run]) -> dict[str, str]:
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
        key = (parent or tags.get("rf.sweep_id") or tags.get("rf.dataset")
               or f"experiment:{run.info.experiment_id}")
        key_of[run.info.run_id] = key
        first_run.setdefault(key, run)
        label_of.setdefault(key, tags.get("rf.dataset") or (parent and parent_name(parent))
                            or tags.get("rf.sweep_id") or experiments[run.info.experiment_id])
    by_label: dict[str, list[str]] = {}
    for key, label in label_of.items():
        by_label.setdefault(label, []).append(key)
    for label, keys in by_label.items():
        if len(keys) < 2:
            continue
        for tag in ("rf.preset", "rf.model", "rf.sweep_id", "rf.dataset_id"):
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
    param_cols, metric_cols = _columns(runs, metrics, params, sort)
    experiments = _experiment_names(client, runs)
    groups = _group_labels(client, runs, experiments)
    has_object = any("rf.object" in r.data.tags for r in runs)
    has_status = len({r.data.tags.get("rf.status", "") for r in runs}) > 1
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id[:8], "run": run.info.run_name or "",
               "experiment": experiments[run.info.experiment_id],
               "group": groups[run.info.run_id]}
        if has_object:
            row["object"] = run.data.tags.get("rf.object", "")
        if has_status:
            row["status"] = run.data.tags.get("rf.status", "")
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
    return _sort_rows(rows, key, descending=key in metric_cols and _higher_is_better(key))


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
    return bool(values) and all(isinstance(_sortable(v), float) or v != v for v in values)


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


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write through a hidden temporary file beside ``path``, then rename over it, so a
    reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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

    return _atomic(path, write)


def _markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
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
    text = _markdown(rows, columns)
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- the command


def _open_store(tracking_uri: str | None) -> tuple[str, mlflow.MlflowClient]:
    uri = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is not None and not db.is_file():  # a new, empty database would compare nothing
        raise CompareError(f"no MLflow store at {db}: run `rf sweep` or `rf dataset` first, or "
                           "pass the tracking URI of the store that has the runs")
    check_tracking_uri(uri)
    return uri, mlflow.MlflowClient(uri)


def _log_comparison(client: mlflow.MlflowClient, uri: str, experiment: str,
                    selection: CompareSelection, runs: Sequence[Run], files: Sequence[Path],
                    markdown: str) -> str:
    tags = {
        "rf.kind": "comparison",
        "rf.compare.selection": json.dumps(dataclasses.asdict(selection)),
        "rf.compare.runs": str(len(runs)),
        # The run's description in the MLflow UI.
        "mlflow.note.content": markdown if len(markdown) <= _TAG_LIMIT else
        markdown[: _TAG_LIMIT - 60].rsplit("\n", 1)[0] + "\n\n(cut; see table.md)\n",
    }
    tags = {k: v[:_TAG_LIMIT] for k, v in tags.items()}
    run = client.create_run(_experiment_id(client, experiment, uri),
                            run_name=f"compare {len(runs)} runs", tags=tags)
    run_id = run.info.run_id
    try:
        for f in files:
            client.log_artifact(run_id, str(f))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run_compare(selection: CompareSelection, *, tracking_uri: str | None = None,
                out_dir: str | os.PathLike = "outputs/compare",
                metrics: Sequence[str] | None = None, params: Sequence[str] | None = None,
                sort: str | None = None, log_to_mlflow: bool = True,
                log_experiment: str = "comparisons") -> dict:
    """Select runs, tabulate them, write ``table.csv``, ``table.md``, ``selection.json``
    (the selection and full run ids) and plots into ``out_dir``, and log those files on a
    FINISHED ``rf.kind=comparison`` run in ``log_experiment``.

    Returns a summary: ``rows``, ``columns``, ``params``, ``metrics``, ``sort``, ``out_dir``,
    ``files``, ``plots``, ``notes``, ``comparison_run_id`` (None without logging),
    ``tracking_uri`` and ``mlflow`` (how to open the MLflow UI).
    """
    uri, client = _open_store(tracking_uri)
    runs, left_out = _select(client, selection)
    param_cols, metric_cols = _columns(runs, metrics, params, sort)
    rows = comparison_table(runs, metric_cols, param_cols, sort, client=client)
    columns = list(rows[0])
    primary = metric_cols[0] if metric_cols else None
    notes = []
    if left_out:
        counts = Counter(r.data.tags.get("rf.status", "unset") for r in left_out)
        notes.append(f"left out {len(left_out)} run{'s' * (len(left_out) != 1)} with rf.status "
                     f"{', '.join(f'{s} ({n})' for s, n in sorted(counts.items()))}; an empty "
                     "status list includes them")
    out = Path(out_dir)
    selected = {"selection": dataclasses.asdict(selection), "tracking_uri": uri,
                "run_ids": [r.info.run_id for r in runs]}
    files = [write_csv(rows, out / "table.csv", columns),
             write_markdown(rows, out / "table.md", columns),
             _atomic(out / "selection.json",
                     lambda tmp: tmp.write_text(json.dumps(selected, indent=2) + "\n"))]
    plots, plot_notes = plot_comparison(rows, runs, out, params=param_cols,
                                        metrics=metric_cols, client=client)
    notes += plot_notes
    for name in _PLOTS:  # a plot this comparison skipped must not show an older one
        if out / name not in plots:
            (out / name).unlink(missing_ok=True)
    files += plots
    run_id = None
    if log_to_mlflow:
        run_id = _log_comparison(client, uri, log_experiment, selection, runs, files,
                                 _markdown(rows, columns))
    return {
        "rows": rows, "columns": columns, "params": param_cols, "metrics": metric_cols,
        "sort": sort or primary, "out_dir": str(out), "files": [str(f) for f in files],
        "plots": [str(p) for p in plots], "notes": notes, "comparison_run_id": run_id,
        "experiment": log_experiment if log_to_mlflow else None, "tracking_uri": uri,
        "mlflow": sweep_url_hint(uri),
    }


def format_compare(summary: dict) -> str:
    """What ``rf compare`` prints: the table (at most 8 param columns, the experiment column
    only when it varies), where the files went and how to open MLflow."""
    rows, params = summary["rows"], summary["params"]
    hidden = set(params[_TERMINAL_PARAMS:])
    if len({r["experiment"] for r in rows}) == 1:
        hidden.add("experiment")
    lines = [format_table(rows, [c for c in summary["columns"] if c not in hidden]), ""]
    order = ""
    if summary["sort"] in summary["metrics"]:
        order = f", best ({'highest' if _higher_is_better(summary['sort']) else 'lowest'}) first"
    lines.append(f"{len(rows)} runs, sorted by {summary['sort']}{order}"
                 if summary["sort"] else f"{len(rows)} runs")
    if len(params) > _TERMINAL_PARAMS:
        lines.append(f"{len(params) - _TERMINAL_PARAMS} more differing params are in table.csv")
    lines.append(f"wrote {', '.join(Path(f).name for f in summary['files'])} to "
                 f"{summary['out_dir']}")
    lines += [f"note: {n}" for n in summary["notes"]]
    if summary["comparison_run_id"]:
        lines.append(f"logged as run {summary['comparison_run_id']} in MLflow experiment "
                     f"{summary['experiment']!r}")
    lines.append(f"MLflow: {summary['mlflow']}")
    return "\n".join(lines)
