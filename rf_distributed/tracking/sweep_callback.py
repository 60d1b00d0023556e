"""The Ray Tune callback that logs a sweep to MLflow, written only by the Tune driver.

Trials never talk to MLflow: they ``tune.report(metrics, checkpoint=...)`` and
:class:`MLflowSweepCallback` turns reports and final checkpoints into one parent run per sweep
and one child run per trial. One writer means a local sqlite store never sees concurrent
writers, and worker nodes need no MLflow access. Runs can be reopened: the parent is found
again by its ``rf.sweep_id`` tag and each child by its ``rf.trial_id`` tag, so
``Tuner.restore`` continues the same runs instead of duplicating them. A restored trial
re-reports the steps after its last checkpoint; those a run already holds are skipped, so each
(run, metric, step) appears once in a history.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from ray import tune

from rf_core.files.fault_points import fault_point
from rf_distributed.tracking import tags as rf_tags
from rf_distributed.tracking.names import (
    TUNE_KEYS,
    flatten_config,
    numeric_metrics,
    result_step,
    sanitize_name,
    trial_run_name,
)
from rf_distributed.tracking.runs import (
    get_or_reopen_run,
    log_batch,
    log_new_metrics,
    log_new_params,
    reopen_run,
    search_all_runs,
)
from rf_distributed.tracking.store import (
    check_tracking_uri,
    get_or_create_experiment,
    sweep_url_hint,
)

logger = logging.getLogger(__name__)

__all__ = ["MODEL_TRAINING", "MLflowSweepCallback", "TABLE_VIEW", "save_table_view",
           "sweep_view_hint", "table_view_route"]


@contextmanager
def _local_folder(checkpoint, name: str) -> Iterator[Path | None]:
    """The checkpoint's ``name`` folder (``export``, ``preview``) as a local path, downloading
    only that folder when the checkpoint lives on remote storage (``Checkpoint.filesystem``
    not local); None when the checkpoint has no such folder."""
    if checkpoint is None or getattr(checkpoint, "path", None) is None:
        yield None
        return
    fs = getattr(checkpoint, "filesystem", None)
    remote = f"{str(checkpoint.path).rstrip('/')}/{name}"
    if fs is None or type(fs).__name__ == "LocalFileSystem":
        yield Path(remote) if Path(remote).is_dir() else None
        return
    import pyarrow.fs

    if fs.get_file_info(remote).type != pyarrow.fs.FileType.Directory:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"rf-{name}-") as tmp:
        pyarrow.fs.copy_files(remote, tmp, source_filesystem=fs)
        yield Path(tmp)


TABLE_VIEW = "rf-sweep"
"""Key of the experiment's saved runs-table view (tag ``mlflow.sharedViewState.<key>``)."""
MODEL_TRAINING = "workflowType=machine_learning"
"""MLflow 3.17's UI picks GenAI or model training per browser (default GenAI) or from this
URL parameter; links rf prints carry it."""


def table_view_route(experiment_id: str) -> str:
    """The UI route (after the server's address) of the experiment's saved table view."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={TABLE_VIEW}&{MODEL_TRAINING}"


def sweep_view_hint(tracking_uri: str, experiment: str) -> str:
    """How to open the sweep's saved table view: ``sweep_url_hint`` and the view's route."""
    hint = sweep_url_hint(tracking_uri)
    try:
        found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - a hint, never a failure
        found = None
    return f"{hint}/{table_view_route(found.experiment_id)}" if found else hint


def save_table_view(client: mlflow.MlflowClient, experiment_id: str, metrics: Sequence[str],
                    params: Sequence[str], sort: str | None = None,
                    descending: bool = True) -> None:
    """Save a runs-table view in the experiment (MLflow 3.17 reads it from the tag
    ``mlflow.sharedViewState.<key>``; open it with :func:`table_view_route`): the run name,
    ``metrics`` and ``params`` as columns, sorted by ``sort``. MLflow's default table shows
    no metric or param column whatever the experiment holds."""
    cols = ([f"metrics.`{m}`" for m in dict.fromkeys(metrics)]
            + [f"params.`{p}`" for p in dict.fromkeys(params)])
    state = {"selectedColumns": cols,
             "columnOrder": ["attributes.`Run Name`", *cols, "runDateAndNestInfo", "duration"],
             "columnWidths": {"attributes.`Run Name`": 280}}
    if sort:
        state.update(orderByKey=f"metrics.`{sort}`", orderByAsc=not descending)
    now = int(time.time() * 1000)
    view = {"name": "Sweep trials" + (f" by {sort}" if sort else ""), "createdAt": now,
            "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{TABLE_VIEW}",
                              json.dumps(view))


PREVIEW_IMAGES = ("heldout.png", "views.png")
"""Images of a report's ``preview/`` folder logged with ``log_image`` at the report's step
(MLflow's image slider): the held-out strip (GT above ours) and orbit views."""


# --------------------------------------------------------------------------- the callback


class MLflowSweepCallback(tune.Callback):
    """Logs a Tune sweep to MLflow from the driver: a parent run for the sweep, a child run per
    trial named by its sampled values (``entropy=1.0 normal_smooth=0.1``) with those values and
    ``identity`` as params, every numeric report as a metric history, each report's preview
    images (``preview/heldout.png``, ``views.png``) with ``log_image`` at its step, and at the
    end the last checkpoint's ``preview/`` files at the artifact root (orbit.gif,
    mesh_preview.png, config.yaml: the same for stopped and finished trials) and, for a trial
    that ran to its last step, its ``export/`` folder and final metrics. ``rf.status`` is
    ``finished``, ``stopped`` (by the scheduler), ``error`` or ``unfinished``.

    Args:
        tracking_uri: MLflow store (see :func:`resolve_tracking_uri`).
        experiment: MLflow experiment name, created if missing.
        sweep_name: the parent run's name.
        sweep_params: the search space / base config, logged flattened on the parent.
        tags: extra parent tags; ``rf.sweep_id`` here names the sweep like ``sweep_id``.
        sweep_id: stable id of this sweep. Reusing it (or restoring the Tuner, which unpickles
            this callback with its generated id) reopens the same parent and child runs.
        metric, mode: when both given, the best trial is summarised on the parent at the end
            (tags, a ``best.`` metric and the run's description, linking the best trial).
        identity: a few settings every trial logs as params besides its sampled values (the
            model, the objects, the step count), so a run page says what was reconstructed.
            The whole resolved config is the ``config.yaml`` artifact, not params.
        table: (metrics, params) the experiment's saved runs-table view shows, sorted by
            ``metric`` (:func:`save_table_view`); MLflow's default table shows none.
        steps_of: a trial's step count from its Tune config, to tell finished from stopped
            (:func:`~rf_distributed.tracking.tags.trial_status`); None: by its ``export/``.

    Once a hook fails (store gone mid-sweep) logging stops with one warning, so a tracking
    outage never fails trials or stalls the driver on retries; Tune's own results remain.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep_name: str,
        sweep_params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        *,
        sweep_id: str | None = None,
        metric: str | None = None,
        mode: str | None = None,
        identity: Mapping[str, Any] | None = None,
        table: tuple[Sequence[str], Sequence[str]] | None = None,
        steps_of: Callable[[dict], int] | None = None,
    ):
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.sweep_params = dict(sweep_params)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.sweep_id = sweep_id or self.tags.get(rf_tags.SWEEP_ID) or uuid.uuid4().hex[:12]
        if "'" in self.sweep_id or "\\" in self.sweep_id:
            raise ValueError(f"sweep_id may not contain quotes or backslashes: {self.sweep_id!r}")
        self.metric, self.mode = metric, mode
        self.identity = dict(identity or {})
        self.table = (list(table[0]), list(table[1])) if table else None
        self.steps_of = steps_of
        self._reset()

    def _reset(self) -> None:
        self._client: mlflow.MlflowClient | None = None
        self._experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # trial_id -> child run id
        self._open: set[str] = set()  # trial ids whose child run this session left RUNNING
        self._steps: dict[str, dict[str, int]] = {}  # run id -> metric key -> last logged step
        self._disabled = False

    # Tune pickles the callback into tuner.pkl; the client and run state are per session.
    def __getstate__(self) -> dict:
        keep = ("tracking_uri experiment sweep_name sweep_params tags sweep_id metric mode "
                "identity table steps_of")
        return {k: self.__dict__[k] for k in keep.split()}

    def __setstate__(self, state: dict) -> None:
        # older pickles lack the later arguments
        self.__dict__.update({"identity": {}, "table": None, "steps_of": None, **state})
        self._reset()

    # ---- run bookkeeping

    def _start(self) -> mlflow.MlflowClient:
        """Connect, get the experiment and create or reopen the parent run (idempotent)."""
        if self._client is not None:
            return self._client
        check_tracking_uri(self.tracking_uri)
        client = mlflow.MlflowClient(self.tracking_uri)
        self._experiment_id = get_or_create_experiment(client, self.experiment,
                                                       self.tracking_uri)
        if self.table is not None:
            save_table_view(client, self._experiment_id, *self.table,
                            sort=self.metric, descending=self.mode != "min")
        parent, last, _ = get_or_reopen_run(
            client,
            self._experiment_id,
            f"tags.`{rf_tags.SWEEP_ID}` = '{self.sweep_id}' and tags.`{rf_tags.KIND}` = 'sweep'",
            run_name=self.sweep_name,
            tags={**self.tags, rf_tags.KIND: "sweep", rf_tags.SWEEP_ID: self.sweep_id},
        )
        self._steps[parent.info.run_id] = last
        self.parent_run_id = parent.info.run_id
        log_new_params(client, parent, flatten_config(self.sweep_params))
        log_batch(client, self.parent_run_id, tags={rf_tags.STATUS: "running"})
        self._client = client
        return client

    def _child(self, trial) -> str:
        """The child run of ``trial``: this session's, an existing one under the parent
        (restored sweep), or a new one; it is RUNNING on return."""
        client = self._start()
        trial_id = str(trial.trial_id)
        run_id = self._runs.get(trial_id)
        if run_id is not None and trial_id in self._open:
            return run_id
        if run_id is not None:  # this session's run, finished and now reported on again
            run = client.get_run(run_id)
            reopen_run(client, run)
        else:  # an earlier session's run (restored sweep), or a new one
            run, last, _ = get_or_reopen_run(
                client,
                self._experiment_id,
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                f"and tags.`{rf_tags.TRIAL_ID}` = '{trial_id}'",
                run_name=trial_run_name(getattr(trial, "config", None) or {}, trial_id),
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    rf_tags.KIND: "trial",
                    rf_tags.TRIAL_ID: trial_id,
                    rf_tags.SWEEP_ID: self.sweep_id,
                    rf_tags.TRIAL_PATH: str(getattr(trial, "path", None) or ""),
                },
            )
            self._steps[run.info.run_id] = last
        log_new_params(client, run, {**flatten_config(getattr(trial, "config", None) or {}),
                                     **flatten_config(self.identity)})
        log_batch(client, run.info.run_id, tags={rf_tags.STATUS: "running"})
        self._runs[trial_id] = run.info.run_id
        self._open.add(trial_id)
        return run.info.run_id

    def _finish(self, trial, status: str) -> None:
        fault_point("sweep.finishing_trial")
        client = self._start()
        if str(trial.trial_id) not in self._runs and not getattr(
            trial, "has_reported_at_least_once", True
        ):
            return  # a pending trial stopped before it ran: no run rather than an empty one
        run_id = self._child(trial)
        step = result_step(getattr(trial, "last_result", None))
        checkpoint = getattr(trial, "checkpoint", None)
        exported = False
        with _local_folder(checkpoint, "preview") as preview:
            if preview is not None:  # every report's: stopped and finished trials alike
                client.log_artifacts(run_id, str(preview))
        with _local_folder(checkpoint, "export") as export:
            if export is not None:  # only the last report exports (full-size video, mesh)
                exported = True
                client.log_artifacts(run_id, str(export), artifact_path="export")
                final = export / "metrics.json"
                if final.is_file():
                    metrics = numeric_metrics(json.loads(final.read_text()))
                    log_new_metrics(client, run_id, self._steps[run_id], metrics, step)
        error_file = getattr(trial, "error_file", None) if status == "FAILED" else None
        if status != "FINISHED":
            state = "error"
        else:
            config = getattr(trial, "config", None) or {}
            state = rf_tags.trial_status(step, self.steps_of(config) if self.steps_of else None,
                                         exported)
        tags = {rf_tags.STATUS: state}
        if error_file and Path(error_file).is_file():
            client.log_artifact(run_id, error_file)
            lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
            tags[rf_tags.ERROR] = lines[-1][:500] if lines else ""
        log_batch(client, run_id, tags=tags)
        client.set_terminated(run_id, status)
        self._open.discard(str(trial.trial_id))

    def _safely(self, what: str, fn, *args) -> None:
        # Tune fails a trial when a callback raises; tracking is best effort after setup.
        if self._disabled:
            return
        try:
            fn(*args)
        except Exception:
            self._disabled = True
            logger.warning(
                "MLflow logging to %s stopped at %s; the sweep goes on and Tune keeps its own "
                "results",
                self.tracking_uri,
                what,
                exc_info=True,
            )

    # ---- Tune hooks

    def setup(self, **info) -> None:
        self._start()  # raises TrackingError: better to stop before any trial runs

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely("trial start", self._child, trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        def log() -> None:
            metrics = numeric_metrics(result, skip=TUNE_KEYS)
            if self.metric in metrics:  # logged first: MLflow's compare plot defaults to it
                metrics = {self.metric: metrics.pop(self.metric), **metrics}
            if metrics:
                run_id = self._child(trial)
                log_new_metrics(self._start(), run_id, self._steps[run_id], metrics,
                                 result_step(result))

        self._safely("trial result", log)
        fault_point("sweep.trial_result")

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        self._safely("checkpoint", self._log_preview_images, trial, checkpoint)

    def _log_preview_images(self, trial, checkpoint) -> None:
        """A report's preview images, with ``log_image`` at the report's step."""
        with _local_folder(checkpoint, "preview") as preview:
            if preview is None:
                return
            from PIL import Image

            report = preview / "metrics.json"
            step = result_step(json.loads(report.read_text()) if report.is_file() else
                               getattr(trial, "last_result", None))
            run_id = self._child(trial)
            for name in PREVIEW_IMAGES:
                if (preview / name).is_file():
                    with Image.open(preview / name) as image:
                        self._start().log_image(run_id, image.convert("RGB"),
                                                key=Path(name).stem, step=step)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely("trial complete", self._finish, trial, "FINISHED")
        fault_point("sweep.trial_complete")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely("trial error", self._finish, trial, "FAILED")

    def on_experiment_end(self, trials: list, **info) -> None:
        self._safely("experiment end", self._end, trials)

    def _end(self, trials: list) -> None:
        client = self._start()
        for trial_id in sorted(self._open):  # stopped before finishing: a restore reopens them
            log_batch(client, self._runs[trial_id], tags={rf_tags.STATUS: "unfinished"})
            client.set_terminated(self._runs[trial_id], "KILLED")
        self._open.clear()
        statuses = [str(getattr(t, "status", "")) for t in trials]
        # Tune's TERMINATED covers finished and scheduler-stopped trials; the runs tell them apart
        ended = [r.data.tags.get(rf_tags.STATUS) for r in search_all_runs(
            client, self._experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'")]
        tags = {
            rf_tags.STATUS: "finished",
            rf_tags.TRIALS: len(trials),
            rf_tags.TRIALS_FINISHED: ended.count(rf_tags.FINISHED),
            rf_tags.TRIALS_STOPPED: ended.count(rf_tags.STOPPED),
            rf_tags.TRIALS_ERRORED: statuses.count("ERROR"),
        }
        metrics, step = {}, 0
        if self.metric and self.mode:
            best = self._best_child(client)
            if best is not None:
                key = sanitize_name(self.metric)
                metrics[f"best.{key}"] = best.data.metrics[key]
                # one point per session: the best so far after each (resumed) run
                step = self._steps[self.parent_run_id].get(f"best.{key}", -1) + 1
                tags[rf_tags.BEST_METRIC] = key
                tags[rf_tags.BEST_MODE] = self.mode
                tags[rf_tags.BEST_TRIAL_ID] = best.data.tags.get(rf_tags.TRIAL_ID, "")
                tags[rf_tags.BEST_RUN_ID] = best.info.run_id
            tags["mlflow.note.content"] = self._description(client, best)
        log_new_metrics(client, self.parent_run_id, self._steps[self.parent_run_id], metrics,
                         step)
        log_batch(client, self.parent_run_id, tags=tags)
        client.set_terminated(self.parent_run_id, "FINISHED")

    def _description(self, client: mlflow.MlflowClient, best) -> str:
        """The parent run's description (Markdown): the best trial, linked, and the top
        trials with their status, so the run page answers "which settings won"."""
        key = sanitize_name(self.metric)
        children = search_all_runs(
            client, self._experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        )
        sign = 1.0 if self.mode == "max" else -1.0
        ranked = sorted((r for r in children if key in r.data.metrics),
                        key=lambda r: -sign * r.data.metrics[key])

        def link(run) -> str:
            name = (run.info.run_name or run.info.run_id).replace("]", ")").replace("[", "(")
            return (f"[{name}](#/experiments/{self._experiment_id}/runs/{run.info.run_id}"
                    f"?{MODEL_TRAINING})")

        def step(run) -> str:
            history = client.get_metric_history(run.info.run_id, key)
            return str(max((m.step for m in history), default=0))

        statuses = [r.data.tags.get(rf_tags.STATUS, "?") for r in children]
        order = ["finished", "stopped", "error", "unfinished", "running"]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in
                           sorted(set(statuses), key=lambda s: (s not in order, order.index(s)
                                                                if s in order else 0, s)))
        lines = [f"**Best trial: {link(best)}**, {key} = {best.data.metrics[key]:.4g} "
                 f"({'higher' if self.mode == 'max' else 'lower'} is better) at step "
                 f"{step(best)}.", "", f"{len(children)} trials: {counts}. Each trial's "
                 "artifacts hold orbit.gif, mesh_preview.png and config.yaml. [All trials by "
                 f"{key}]({table_view_route(self._experiment_id)}).", "",
                 f"| rank | trial | {key} | step | status |", "|---|---|---|---|---|"]
        for rank, run in enumerate(ranked[:10], 1):
            lines.append(f"| {rank} | {link(run)} | {run.data.metrics[key]:.4g} | {step(run)} "
                         f"| {run.data.tags.get(rf_tags.STATUS, '?')} |")
        return "\n".join(lines)

    def _best_child(self, client: mlflow.MlflowClient):
        """The child run whose latest ``metric`` is best; reads MLflow, so a restored sweep
        ranks the trials of earlier sessions too."""
        key = sanitize_name(self.metric)
        children = search_all_runs(
            client, self._experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        )
        scored = [r for r in children if not math.isnan(r.data.metrics.get(key, math.nan))]
        if not scored:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return max(scored, key=lambda r: sign * r.data.metrics[key])
