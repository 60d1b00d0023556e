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
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from ray import tune

from rf_core.config import read_yaml
from rf_distributed.tracking.names import (
    KEY_LIMIT,
    TUNE_KEYS,
    flatten_config,
    numeric_metrics,
    result_step,
    sanitize_name,
)
from rf_distributed.tracking.runs import (
    get_or_reopen_run,
    log_batch,
    log_new_metrics,
    log_new_params,
    reopen_run,
    search_all_runs,
)
from rf_distributed.tracking.store import check_tracking_uri, get_or_create_experiment

logger = logging.getLogger(__name__)

__all__ = ["MLflowSweepCallback"]


@contextmanager
def _local_export(checkpoint) -> Iterator[Path | None]:
    """The checkpoint's ``export/`` folder as a local path, downloading only that folder
    when the checkpoint lives on remote storage (``Checkpoint.filesystem`` not local)."""
    if checkpoint is None or getattr(checkpoint, "path", None) is None:
        yield None
        return
    fs = getattr(checkpoint, "filesystem", None)
    remote = f"{str(checkpoint.path).rstrip('/')}/export"
    if fs is None or type(fs).__name__ == "LocalFileSystem":
        yield Path(remote) if Path(remote).is_dir() else None
        return
    import pyarrow.fs

    if fs.get_file_info(remote).type != pyarrow.fs.FileType.Directory:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="rf-export-") as tmp:
        pyarrow.fs.copy_files(remote, tmp, source_filesystem=fs)
        yield Path(tmp)


# --------------------------------------------------------------------------- the callback


class MLflowSweepCallback(tune.Callback):
    """Logs a Tune sweep to MLflow from the driver: a parent run for the sweep, a child run per
    trial with its config as params, every numeric report as a metric history, and the final
    checkpoint's ``export/`` folder and ``export/metrics.json`` at the end.

    Args:
        tracking_uri: MLflow store (see :func:`resolve_tracking_uri`).
        experiment: MLflow experiment name, created if missing.
        sweep_name: the parent run's name.
        sweep_params: the search space / base config, logged flattened on the parent.
        tags: extra parent tags; ``rf.sweep_id`` here names the sweep like ``sweep_id``.
        sweep_id: stable id of this sweep. Reusing it (or restoring the Tuner, which unpickles
            this callback with its generated id) reopens the same parent and child runs.
        metric, mode: when both given, the best trial is summarised on the parent at the end.

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
    ):
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.sweep_params = dict(sweep_params)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.sweep_id = sweep_id or self.tags.get("rf.sweep_id") or uuid.uuid4().hex[:12]
        if "'" in self.sweep_id or "\\" in self.sweep_id:
            raise ValueError(f"sweep_id may not contain quotes or backslashes: {self.sweep_id!r}")
        self.metric, self.mode = metric, mode
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
        keep = "tracking_uri experiment sweep_name sweep_params tags sweep_id metric mode"
        return {k: self.__dict__[k] for k in keep.split()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
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
        parent, last, _ = get_or_reopen_run(
            client,
            self._experiment_id,
            f"tags.`rf.sweep_id` = '{self.sweep_id}' and tags.`rf.kind` = 'sweep'",
            run_name=self.sweep_name,
            tags={**self.tags, "rf.kind": "sweep", "rf.sweep_id": self.sweep_id},
        )
        self._steps[parent.info.run_id] = last
        self.parent_run_id = parent.info.run_id
        log_new_params(client, parent, flatten_config(self.sweep_params))
        log_batch(client, self.parent_run_id, tags={"rf.status": "running"})
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
            tag = getattr(trial, "experiment_tag", "") or ""
            run, last, _ = get_or_reopen_run(
                client,
                self._experiment_id,
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                f"and tags.`rf.trial_id` = '{trial_id}'",
                run_name=(f"{trial_id} ({tag})" if tag else trial_id)[:KEY_LIMIT],
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "rf.kind": "trial",
                    "rf.trial_id": trial_id,
                    "rf.sweep_id": self.sweep_id,
                    "rf.trial_path": str(getattr(trial, "path", None) or ""),
                },
            )
            self._steps[run.info.run_id] = last
        log_new_params(client, run, flatten_config(getattr(trial, "config", None) or {}))
        log_batch(client, run.info.run_id, tags={"rf.status": "running"})
        self._runs[trial_id] = run.info.run_id
        self._open.add(trial_id)
        return run.info.run_id

    def _finish(self, trial, status: str) -> None:
        client = self._start()
        if str(trial.trial_id) not in self._runs and not getattr(
            trial, "has_reported_at_least_once", True
        ):
            return  # a pending trial stopped before it ran: no run rather than an empty one
        run_id = self._child(trial)
        step = result_step(getattr(trial, "last_result", None))
        with _local_export(getattr(trial, "checkpoint", None)) as export:
            if export is not None:
                client.log_artifacts(run_id, str(export), artifact_path="export")
                final = export / "metrics.json"
                if final.is_file():
                    metrics = numeric_metrics(json.loads(final.read_text()))
                    log_new_metrics(client, run_id, self._steps[run_id], metrics, step)
                resolved = export / "config.yaml"
                if resolved.is_file():  # the trial's whole resolved config, as params
                    config = read_yaml(resolved)
                    log_new_params(client, client.get_run(run_id),
                                    flatten_config(config, prefix="config"))
        error_file = getattr(trial, "error_file", None) if status == "FAILED" else None
        tags = {"rf.status": "finished" if status == "FINISHED" else "error"}
        if error_file and Path(error_file).is_file():
            client.log_artifact(run_id, error_file)
            lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
            tags["rf.error"] = lines[-1][:500] if lines else ""
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
            if metrics:
                run_id = self._child(trial)
                log_new_metrics(self._start(), run_id, self._steps[run_id], metrics,
                                 result_step(result))

        self._safely("trial result", log)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely("trial complete", self._finish, trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely("trial error", self._finish, trial, "FAILED")

    def on_experiment_end(self, trials: list, **info) -> None:
        self._safely("experiment end", self._end, trials)

    def _end(self, trials: list) -> None:
        client = self._start()
        for trial_id in sorted(self._open):  # stopped before finishing: a restore reopens them
            log_batch(client, self._runs[trial_id], tags={"rf.status": "unfinished"})
            client.set_terminated(self._runs[trial_id], "KILLED")
        self._open.clear()
        statuses = [str(getattr(t, "status", "")) for t in trials]
        tags = {
            "rf.status": "finished",
            "rf.trials": len(trials),
            "rf.trials_finished": statuses.count("TERMINATED"),
            "rf.trials_errored": statuses.count("ERROR"),
        }
        metrics, step = {}, 0
        if self.metric and self.mode:
            best = self._best_child(client)
            if best is not None:
                key = sanitize_name(self.metric)
                metrics[f"best.{key}"] = best.data.metrics[key]
                # one point per session: the best so far after each (resumed) run
                step = self._steps[self.parent_run_id].get(f"best.{key}", -1) + 1
                tags["rf.best_metric"] = key
                tags["rf.best_mode"] = self.mode
                tags["rf.best_trial_id"] = best.data.tags.get("rf.trial_id", "")
                tags["rf.best_run_id"] = best.info.run_id
        log_new_metrics(client, self.parent_run_id, self._steps[self.parent_run_id], metrics,
                         step)
        log_batch(client, self.parent_run_id, tags=tags)
        client.set_terminated(self.parent_run_id, "FINISHED")

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
