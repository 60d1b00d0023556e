"""What `rf sweep` prints while it runs: one line per report, one per trial end.

Tune's own console (wide status tables every few seconds, a TensorBoard hint) is turned off
(``verbose=0``) and :class:`ConsoleReporter` prints instead::

    [02:13] entropy=0.1 normal_smooth=1.0  step  25/100  objective 16.4970  heldout_psnr 9.41
    [04:40] entropy=1.0 normal_smooth=0.1  stopped by the scheduler at step 50

At the end :func:`format_summary` prints the best trials as a table.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ray import tune

from rf_core.evaluation.metric_registry import per_object_metrics
from rf_distributed.tracking.names import trial_run_name
from rf_distributed.tracking.tags import FINISHED, trial_status

__all__ = ["ConsoleReporter", "format_summary", "per_object_table", "quiet_tune",
           "rank_trials", "result_loggers"]

_QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the old output flow is silent at verbose 0 (the new one
    # still prints its experiment box and a TensorBoard hint)
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no TensorBoard logger: result_loggers()
}
_SLOW_WARNING_S = 5.0
"""Tune warns of any driver step over 0.5 s; the MLflow callback's image logging takes that."""


@contextlib.contextmanager
def quiet_tune(enabled: bool = True) -> Iterator[None]:
    """Tune's console off (while ``tuner.fit()`` runs): no status tables, experiment box or
    TensorBoard hint; :class:`ConsoleReporter` prints instead."""
    from ray.tune.utils.util import warn_if_slow

    old = {k: os.environ.get(k) for k in _QUIET_ENV}
    threshold = warn_if_slow.DEFAULT_THRESHOLD  # read from the env once, at Tune's import
    if enabled:
        os.environ.update(_QUIET_ENV)
        warn_if_slow.DEFAULT_THRESHOLD = max(threshold, _SLOW_WARNING_S)
    try:
        yield
    finally:
        warn_if_slow.DEFAULT_THRESHOLD = threshold
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def result_loggers() -> list:
    """Tune's CSV and JSON result files (progress.csv, result.json), without the TensorBoard
    logger nobody here reads."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


class ConsoleReporter(tune.Callback):
    """Prints one line per trial report (name by sampled values, step, objective and the
    objective's terms) and one when a trial finishes, is stopped or fails.

    Args:
        metric: the key Tune optimises, printed first.
        terms: further reported keys to print when present (the objective's metrics).
        steps: the trials' step count, printed as ``step/steps`` (None: step alone).
        steps_of: one trial's step count from its Tune config (default: ``steps``), to tell
            finished from stopped (:func:`~rf_distributed.tracking.tags.trial_status`).
    """

    def __init__(self, metric: str, terms: list[str] = (), steps: int | None = None,
                 steps_of: Callable[[dict], int] | None = None):
        self.metric, self.terms, self.steps = metric, list(terms), steps
        self.steps_of = steps_of
        self._start = time.monotonic()

    def __setstate__(self, state: dict) -> None:  # a restored sweep counts from its restart
        self.__dict__.update({"steps_of": None, **state})  # older pickles lack steps_of
        self._start = time.monotonic()

    def _print(self, trial, text: str) -> None:
        elapsed = int(time.monotonic() - self._start)
        name = trial_run_name(getattr(trial, "config", None) or {}, str(trial.trial_id))
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {name}  {text}", flush=True,
              file=sys.stdout)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info) -> None:
        step = result.get("step", result.get("training_iteration", "?"))
        parts = [f"step {step:>5}" + (f"/{self.steps}" if self.steps else "")]
        for key in [self.metric, *self.terms]:
            value = result.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{key} {value:.4f}")
        self._print(trial, "  ".join(parts))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        step = (getattr(trial, "last_result", None) or {}).get("step", "?")
        steps = (self.steps_of(getattr(trial, "config", None) or {}) if self.steps_of
                 else self.steps or None)
        path = getattr(getattr(trial, "checkpoint", None), "path", None)
        exported = path is not None and (Path(str(path)) / "export").is_dir()
        self._print(trial, f"finished at step {step}" if trial_status(step, steps, exported)
                    == FINISHED else f"stopped by the scheduler at step {step}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = getattr(trial, "error_file", None)
        lines = (Path(error).read_text().strip().splitlines()
                 if error and Path(error).is_file() else [])
        self._print(trial, "failed: " + (lines[-1][:200] if lines else "see its error.txt"))


def per_object_table(metrics: dict, names: list[str]) -> dict[str, dict[str, float]]:
    """``{object: {metric: value}}`` from a report's ``<metric>/<object>`` keys."""
    table: dict[str, dict[str, float]] = {n: {} for n in names}
    for key, value in metrics.items():
        metric, _, name = key.rpartition("/")
        if name in table and "/" not in metric and not metric.startswith("loss"):
            table[name][metric] = value
    return table


def _format_objects(label: str, entry: dict, metric: str) -> list[str]:
    rows = entry["objects"]
    cols = [m for m in per_object_metrics() if any(m in r for r in rows.values())]
    value = entry.get(metric)
    head = (f"{label} trial ({' '.join(entry['overrides']) or 'base'}; {metric} "
            f"{value:.4f} at step {entry['step']}):" if isinstance(value, (int, float))
            else f"{label} trial:")
    width = max([6, *map(len, rows)])
    lines = [head, "  " + "object".ljust(width) + "".join(c.rjust(18) for c in cols)]
    for name, r in rows.items():
        lines.append("  " + name.ljust(width) + "".join(
            (f"{r[c]:.4f}" if c in r else "-").rjust(18) for c in cols))
    return lines


def rank_trials(results, metric: str, mode: str, steps_of, top: int = 5) -> list[dict]:
    """The ``top`` trials of a Tune ``ResultGrid`` by their last ``metric``, best first:
    ``[{"trial": run name, metric: value, "step": s, "status": finished|stopped}]``.
    ``steps_of(config)`` is a trial's step count (to tell finished from stopped)."""
    rows = []
    for r in results:
        value = (r.metrics or {}).get(metric)
        if r.error is not None or not isinstance(value, (int, float)):
            continue
        step = r.metrics.get("step")
        rows.append({"trial": trial_run_name(r.config or {}, str(r.metrics.get("trial_id"))),
                     metric: float(value), "step": step,
                     "status": trial_status(step, steps_of(r.config or {}))})
    rows.sort(key=lambda row: row[metric], reverse=mode == "max")
    return rows[:top]


def _format_ranking(rows: list[dict], metric: str) -> list[str]:
    width = max(len("trial"), *(len(r["trial"]) for r in rows))
    lines = [f"best trials ({metric}):",
             f"  {'#':>2}  {'trial'.ljust(width)}  {metric:>12}  {'step':>6}  status"]
    for i, r in enumerate(rows, 1):
        lines.append(f"  {i:>2}  {r['trial'].ljust(width)}  {r[metric]:>12.4f}  "
                     f"{r['step']!s:>6}  {r['status']}")
    return lines


def format_summary(summary: dict) -> str:
    """The end-of-sweep text: trial counts, the ranking of the best trials, the best config,
    per-object tables of the best and the worst trial, where the results are."""
    lines = [f"sweep {summary['sweep']}: {summary['trials']} trials: {summary['finished']} "
             f"finished, {summary['stopped']} stopped early, {summary['errors']} failed"
             + (f", {summary['unfinished']} not run" if summary.get("unfinished") else "")]
    if "best_metric" in summary:
        lines.append(f"best objective: {summary['best_metric']:.4f}")
        lines.append("best config: " + (" ".join(summary["best_overrides"]) or "(base)"))
    if summary.get("ranking"):
        lines += _format_ranking(summary["ranking"], summary.get("metric", "objective"))
    for label, entry in summary.get("per_object", {}).items():
        lines += _format_objects(label, entry, summary.get("metric", "objective"))
    lines.append(f"results: {summary['folder']}")
    lines.append(f"MLflow: {summary['mlflow']}")
    return "\n".join(lines)
