"""Writing MLflow runs: batched logging, runs found again by tags, and each point logged once.

Sweeps and dataset runs are resumable, so their runs are found again rather than duplicated:
:func:`get_or_reopen_run` returns the run a tag filter names (set RUNNING again) or a new one,
with the last logged step of each metric; :func:`log_new_metrics` and :func:`log_new_params`
then skip what the run already holds, so each (run, metric, step) lands once in a history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag

from rf_distributed.tracking.names import flatten_config, numeric_metrics
from rf_distributed.tracking.store import get_or_create_experiment

logger = logging.getLogger(__name__)

__all__ = [
    "BATCH_SIZE",
    "TAG_VALUE_LIMIT",
    "get_or_reopen_run",
    "last_logged_steps",
    "log_batch",
    "log_finished_run",
    "log_new_metrics",
    "log_new_params",
    "reopen_run",
    "search_all_runs",
]

BATCH_SIZE = 100
"""Entities per ``log_batch`` request: MAX_PARAMS_TAGS_PER_BATCH (metrics allow 1000, but 100
keeps requests small)."""
TAG_VALUE_LIMIT = 8000
"""mlflow.utils.validation.MAX_TAG_VAL_LENGTH: longer tag values are cut."""


def log_batch(
    client: mlflow.MlflowClient,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    """Log ``metrics`` (all at ``step``), ``params`` and ``tags`` (as text, cut to
    :data:`TAG_VALUE_LIMIT`) in requests of :data:`BATCH_SIZE` entities."""
    now = int(time.time() * 1000)
    entities = (
        [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        + [Param(k, v) for k, v in (params or {}).items()]
        + [RunTag(k, str(v)[:TAG_VALUE_LIMIT]) for k, v in (tags or {}).items()]
    )
    for i in range(0, len(entities), BATCH_SIZE):
        chunk = entities[i : i + BATCH_SIZE]
        client.log_batch(
            run_id,
            metrics=[e for e in chunk if isinstance(e, Metric)],
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
        )


def search_all_runs(client: mlflow.MlflowClient, experiment_id: str,
                    filter_string: str) -> list[Run]:
    """Every run of ``experiment_id`` matching ``filter_string``, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def last_logged_steps(client: mlflow.MlflowClient, run: Run) -> dict[str, int]:
    """The last logged step of each metric of ``run`` (one history request per key), so a
    reopened run can skip the steps a resumed trial or rerun reports again."""
    return {
        key: max(m.step for m in history)
        for key in run.data.metrics
        if (history := client.get_metric_history(run.info.run_id, key))
    }


def log_new_metrics(
    client: mlflow.MlflowClient,
    run_id: str,
    last: dict[str, int],
    metrics: Mapping[str, float],
    step: int,
) -> None:
    """Log the ``metrics`` whose key has no point at ``step`` or later yet (``last``: key ->
    last logged step, updated here): each (run, key, step) lands once in the history."""
    fresh = {k: v for k, v in metrics.items() if k not in last or step > last[k]}
    if fresh:
        log_batch(client, run_id, metrics=fresh, step=step)
        last.update(dict.fromkeys(fresh, step))


def log_new_params(client: mlflow.MlflowClient, run: Run, params: Mapping[str, str]) -> None:
    """Params are immutable in MLflow: on a reopened run, log only the missing ones (a changed
    value keeps the logged one, with a warning)."""
    old = run.data.params
    changed = sorted(k for k in params if k in old and old[k] != params[k])
    if changed:
        logger.warning(
            "run %s keeps its logged values of changed params %s", run.info.run_id, changed
        )
    log_batch(client, run.info.run_id, params={k: v for k, v in params.items() if k not in old})


def reopen_run(client: mlflow.MlflowClient, run: Run) -> None:
    """Set ``run`` RUNNING again unless it is."""
    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run.info.run_id, status="RUNNING")


def get_or_reopen_run(
    client: mlflow.MlflowClient,
    experiment_id: str,
    filter_string: str,
    *,
    run_name: str,
    tags: Mapping[str, Any],
) -> tuple[Run, dict[str, int], bool]:
    """The run a resumable writer owns: the oldest run of ``experiment_id`` matching
    ``filter_string`` (its identifying tags), set RUNNING again, else a new run ``run_name``
    with ``tags``.

    Returns ``(run, last, created)``: ``last`` maps each metric key to its last logged step
    (empty for a new run), ready for :func:`log_new_metrics`.
    """
    found = client.search_runs(
        [experiment_id], filter_string, order_by=["attributes.start_time ASC"], max_results=1
    )
    if found:
        run = found[0]
        reopen_run(client, run)
        return run, last_logged_steps(client, run), False
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    return run, {}, True


def log_finished_run(
    client_or_uri: mlflow.MlflowClient | str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    artifacts_dir: Path | None,
    tags: Mapping[str, Any] | None = None,
    *,
    artifact_path: str | None = None,
) -> str:
    """Record one finished reconstruction as a FINISHED run and return its run id.

    ``params`` are flattened (:func:`flatten_config`), numeric ``metrics`` flattened with dots,
    ``artifacts_dir``'s files go to ``artifact_path`` (the run's root by default). Put
    ``mlflow.parentRunId`` in ``tags`` to nest it under another run.
    """
    if isinstance(client_or_uri, str):
        uri, client = client_or_uri, mlflow.MlflowClient(client_or_uri)
    else:
        uri, client = client_or_uri.tracking_uri, client_or_uri
    run = client.create_run(
        get_or_create_experiment(client, experiment, uri), run_name=run_name,
        tags=dict(tags or {}),
    )
    run_id = run.info.run_id
    try:
        log_batch(client, run_id, metrics=numeric_metrics(metrics), params=flatten_config(params))
        if artifacts_dir is not None:
            client.log_artifacts(run_id, str(artifacts_dir), artifact_path=artifact_path)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
