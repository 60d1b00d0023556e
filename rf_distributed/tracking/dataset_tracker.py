"""MLflow for dataset runs: one parent run per dataset, one child run per object.

Only the ``rf dataset`` driver writes (as in sweeps), so a local sqlite store has one writer.
Runs are found again by tags, which is what makes results exactly-once across reruns and
driver crashes: the parent by ``rf.dataset_id``, an object's result by ``rf.dataset_id`` +
``rf.object`` + ``rf.status = finished``. Tags: ``rf.kind`` (dataset | object), ``rf.dataset``,
``rf.object``, ``rf.status`` (finished | failed), ``rf.preset``, ``rf.model``, ``rf.node``.
Metric histories hold each (run, key, step) once: an object's loss curve keeps the last row of
a step that a retried task wrote again, and the parent's summary gets one new step per rerun.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric

from rf_core.files.fault_points import fault_point
from rf_distributed.tracking import tags as rf_tags
from rf_distributed.tracking.names import flatten_config, numeric_metrics, sanitize_name
from rf_distributed.tracking.runs import (
    BATCH_SIZE,
    get_or_reopen_run,
    log_batch,
    log_new_metrics,
    search_all_runs,
)
from rf_distributed.tracking.store import check_tracking_uri, get_or_create_experiment

__all__ = ["DatasetTracker"]


def _quote(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"names used in MLflow filters may not contain quotes: {value!r}")
    return value


class DatasetTracker:
    """Writes one dataset's runs; every method is idempotent where a rerun may repeat it."""

    def __init__(self, tracking_uri: str, experiment: str, dataset: str, dataset_id: str,
                 tags: Mapping[str, Any] | None = None):
        self.uri, self.experiment, self.dataset = tracking_uri, experiment, dataset
        self.dataset_id = _quote(dataset_id)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client: mlflow.MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self._parent_steps: dict[str, int] = {}  # metric key -> last step on the parent

    def start(self, params: Mapping[str, Any]) -> str:
        """Create or reopen the dataset's parent run; returns its id."""
        check_tracking_uri(self.uri)
        client = mlflow.MlflowClient(self.uri)
        self.experiment_id = get_or_create_experiment(client, self.experiment, self.uri)
        parent, self._parent_steps, created = get_or_reopen_run(
            client,
            self.experiment_id,
            f"tags.`{rf_tags.DATASET_ID}` = '{self.dataset_id}' "
            f"and tags.`{rf_tags.KIND}` = 'dataset'",
            run_name=self.dataset,
            tags={**self.tags, rf_tags.KIND: "dataset", rf_tags.DATASET: self.dataset,
                  rf_tags.DATASET_ID: self.dataset_id})
        if created:
            log_batch(client, parent.info.run_id, params=flatten_config(params))
        log_batch(client, parent.info.run_id, tags={rf_tags.STATUS: "running"})
        self.client, self.parent_id = client, parent.info.run_id
        return self.parent_id

    def _object_runs(self, name: str, status: str | None = None) -> list:
        query = (f"tags.`{rf_tags.DATASET_ID}` = '{self.dataset_id}' "
                 f"and tags.`{rf_tags.KIND}` = 'object' "
                 f"and tags.`{rf_tags.OBJECT}` = '{_quote(name)}'")
        if status:
            query += f" and tags.`{rf_tags.STATUS}` = '{status}'"
        return search_all_runs(self.client, self.experiment_id, query)

    def finished_run(self, name: str) -> str | None:
        """The id of the object's finished run, if it has one."""
        runs = self._object_runs(name, "finished")
        return runs[0].info.run_id if runs else None

    def _new_run(self, name: str, status: str, extra: Mapping[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **self.tags, "mlflow.parentRunId": self.parent_id, rf_tags.KIND: "object",
            rf_tags.DATASET: self.dataset, rf_tags.DATASET_ID: self.dataset_id,
            rf_tags.OBJECT: name, rf_tags.STATUS: status, **{k: str(v) for k, v in extra.items()}})
        fault_point("dataset.run_created")
        return run.info.run_id

    def log_finished(self, name: str, folder: Path, metrics: Mapping[str, Any],
                     config: Mapping[str, Any], tags: Mapping[str, Any] | None = None) -> str:
        """The object's one finished run (an existing one is returned, not duplicated):
        the config as ``config.*`` params, the loss curves of ``history.jsonl``, the final
        metrics, and the result folder (video, mesh, metrics, config) as artifacts."""
        existing = self.finished_run(name)
        if existing is not None:
            return existing
        # A run still "running" was being logged by a driver that died (the dataset folder's
        # lock makes this driver the only one): half of a record, so it goes.
        for stale in self._object_runs(name, "running"):
            self.client.delete_run(stale.info.run_id)
        run_id = self._new_run(name, "running", tags or {})
        try:
            log_batch(self.client, run_id, params=flatten_config(config, prefix="config"))
            history = folder / "history.jsonl"
            if history.is_file():
                self._log_history(run_id, history)
            log_batch(self.client, run_id, metrics=numeric_metrics(metrics))
            for item in sorted(folder.iterdir()):
                if item.name == "checkpoint":
                    continue  # weights stay in the result folder; `rf export` reads them there
                if item.is_dir():
                    self.client.log_artifacts(run_id, str(item), artifact_path=item.name)
                else:
                    self.client.log_artifact(run_id, str(item))
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        for old in self._object_runs(name, "failed"):  # earlier attempts that failed
            log_batch(self.client, old.info.run_id, tags={rf_tags.SUPERSEDED_BY: run_id})
        log_batch(self.client, run_id, tags={rf_tags.STATUS: "finished"})
        self.client.set_terminated(run_id, "FINISHED")
        fault_point("dataset.logged")
        return run_id

    def _log_history(self, run_id: str, history: Path) -> None:
        """Every row of ``history.jsonl`` as metric points, many steps per request (one
        request per row would be thousands for a paper-length run). A task retried after a
        lost worker resumes from its checkpoint and appends the steps since then again: the
        last row of a step wins, as the result continued from it."""
        now = int(time.time() * 1000)
        latest: dict[tuple[str, int], float] = {}
        for line in history.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            step = int(row.get("step", 0))
            for k, v in numeric_metrics(row, skip=frozenset({"step"})).items():
                latest.pop((k, step), None)  # re-insert: points stay in the order written
                latest[(k, step)] = v
        points = [Metric(k, v, now, step) for (k, step), v in latest.items()]
        for i in range(0, len(points), BATCH_SIZE):
            self.client.log_batch(run_id, metrics=points[i:i + BATCH_SIZE])

    def log_failed(self, name: str, error: str, tags: Mapping[str, Any] | None = None) -> str:
        """A FAILED run carrying the one-line error (each failed attempt keeps its own)."""
        run_id = self._new_run(name, "failed", {rf_tags.ERROR: error[:500], **(tags or {})})
        self.client.set_terminated(run_id, "FAILED")
        return run_id

    def end(self, summary: Mapping[str, Any]) -> None:
        counts = {k: summary[k] for k in ("objects", "finished", "failed") if k in summary}
        metrics = {sanitize_name(f"mean.{k}"): v for k, v in summary.get("means", {}).items()}
        step = max(self._parent_steps.values(), default=-1) + 1  # one step per (re)run
        log_new_metrics(self.client, self.parent_id, self._parent_steps,
                         {**counts, **metrics}, step)
        log_batch(self.client, self.parent_id, tags={
            rf_tags.STATUS: "finished" if not summary.get("failed") else "finished_with_failures"})
        self.client.set_terminated(self.parent_id, "FINISHED")
