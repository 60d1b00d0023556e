"""``rf compare``: select runs, tabulate them, write the table and plots, and log the
comparison as an ``rf.kind=comparison`` run (:func:`run_compare`); :func:`format_compare` is
what the command prints."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow.entities import Run

from rf_core.evaluation.metric_registry import higher_is_better
from rf_core.files.atomic import atomic_write_json
from rf_distributed.compare.plots import PLOT_FILES, plot_comparison
from rf_distributed.compare.select import CompareError, CompareSelection, select_with_left_out
from rf_distributed.compare.table import (
    comparison_table,
    format_table,
    markdown_table,
    table_columns,
    write_csv,
    write_markdown,
)
from rf_distributed.tracking import tags as rf_tags
from rf_distributed.tracking.runs import TAG_VALUE_LIMIT
from rf_distributed.tracking.store import (
    check_tracking_uri,
    get_or_create_experiment,
    resolve_tracking_uri,
    sqlite_path,
    sweep_url_hint,
)

__all__ = ["TERMINAL_PARAMS", "format_compare", "run_compare"]

TERMINAL_PARAMS = 8
"""Param columns :func:`format_compare` shows; the files have all."""


def _open_store(tracking_uri: str | None) -> tuple[str, mlflow.MlflowClient]:
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is not None and not db.is_file():  # a new, empty database would compare nothing
        raise CompareError(f"no MLflow store at {db}: run `rf sweep` or `rf dataset` first, or "
                           "pass the tracking URI of the store that has the runs")
    check_tracking_uri(uri)
    return uri, mlflow.MlflowClient(uri)


def _log_comparison(client: mlflow.MlflowClient, uri: str, experiment: str,
                    selection: CompareSelection, runs: Sequence[Run], files: Sequence[Path],
                    markdown: str) -> str:
    tags = {
        rf_tags.KIND: "comparison",
        rf_tags.COMPARE_SELECTION: json.dumps(dataclasses.asdict(selection)),
        rf_tags.COMPARE_RUNS: str(len(runs)),
        # The run's description in the MLflow UI.
        "mlflow.note.content": markdown if len(markdown) <= TAG_VALUE_LIMIT else
        markdown[: TAG_VALUE_LIMIT - 60].rsplit("\n", 1)[0] + "\n\n(cut; see table.md)\n",
    }
    tags = {k: v[:TAG_VALUE_LIMIT] for k, v in tags.items()}
    run = client.create_run(get_or_create_experiment(client, experiment, uri),
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
    runs, left_out = select_with_left_out(client, selection)
    param_cols, metric_cols = table_columns(runs, metrics, params, sort)
    rows = comparison_table(runs, metric_cols, param_cols, sort, client=client)
    columns = list(rows[0])
    primary = metric_cols[0] if metric_cols else None
    notes = []
    if left_out:
        counts = Counter(r.data.tags.get(rf_tags.STATUS, "unset") for r in left_out)
        notes.append(f"left out {len(left_out)} run{'s' * (len(left_out) != 1)} with rf.status "
                     f"{', '.join(f'{s} ({n})' for s, n in sorted(counts.items()))}; an empty "
                     "status list includes them")
    out = Path(out_dir)
    selected = {"selection": dataclasses.asdict(selection), "tracking_uri": uri,
                "run_ids": [r.info.run_id for r in runs]}
    files = [write_csv(rows, out / "table.csv", columns),
             write_markdown(rows, out / "table.md", columns),
             atomic_write_json(out / "selection.json", selected)]
    plots, plot_notes = plot_comparison(rows, runs, out, params=param_cols,
                                        metrics=metric_cols, client=client)
    notes += plot_notes
    for name in PLOT_FILES:  # a plot this comparison skipped must not show an older one
        if out / name not in plots:
            (out / name).unlink(missing_ok=True)
    files += plots
    run_id = None
    if log_to_mlflow:
        run_id = _log_comparison(client, uri, log_experiment, selection, runs, files,
                                 markdown_table(rows, columns))
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
    hidden = set(params[TERMINAL_PARAMS:])
    if len({r["experiment"] for r in rows}) == 1:
        hidden.add("experiment")
    lines = [format_table(rows, [c for c in summary["columns"] if c not in hidden]), ""]
    order = ""
    if summary["sort"] in summary["metrics"]:
        order = f", best ({'highest' if higher_is_better(summary['sort']) else 'lowest'}) first"
    lines.append(f"{len(rows)} runs, sorted by {summary['sort']}{order}"
                 if summary["sort"] else f"{len(rows)} runs")
    if len(params) > TERMINAL_PARAMS:
        lines.append(f"{len(params) - TERMINAL_PARAMS} more differing params are in table.csv")
    lines.append(f"wrote {', '.join(Path(f).name for f in summary['files'])} to "
                 f"{summary['out_dir']}")
    lines += [f"note: {n}" for n in summary["notes"]]
    if summary["comparison_run_id"]:
        lines.append(f"logged as run {summary['comparison_run_id']} in MLflow experiment "
                     f"{summary['experiment']!r}")
    lines.append(f"MLflow: {summary['mlflow']}")
    return "\n".join(lines)
