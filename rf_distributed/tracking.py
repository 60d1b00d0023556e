"""MLflow plumbing shared by sweeps, dataset runs and comparisons: which store, whether it
answers, names and values MLflow accepts, and batched logging.

Store choice (:func:`resolve_tracking_uri`): an explicit URI, else ``$MLFLOW_TRACKING_URI``,
else the embedded store ``sqlite:///<cwd>/outputs/mlflow/mlflow.db`` with artifacts in
``outputs/mlflow/artifacts``. The sweep callback lives in ``sweep_tracking`` (it needs Ray
Tune; this module does not, so ``rf compare`` starts quickly); ``MLflowSweepCallback`` is
still importable from here.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from rf_core.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "PARAM_VALUE_LIMIT",
    "TrackingError",
    "check_tracking_uri",
    "default_tracking_uri",
    "flatten_config",
    "log_finished_run",
    "resolve_tracking_uri",
    "sanitize_name",
    "sweep_url_hint",
]

# mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in mlflow 3.x; longer values are an error
# unless MLFLOW_TRUNCATE_LONG_VALUES is set, so we truncate before logging.
PARAM_VALUE_LIMIT = 6000
# mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH: metric, param and tag keys.
_KEY_LIMIT = 250
_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH; metrics allow 1000 but 100 keeps requests small

_SERVER_FIX = (
    "start it (`make mlflow-server`) or unset MLFLOW_TRACKING_URI to use the local store"
)
# Keys Tune adds to every report (ray.tune.result.AUTO_RESULT_KEYS and friends): bookkeeping,
# not measurements. "step" is the x axis of the others.
_TUNE_KEYS = frozenset(
    "done trial_id experiment_tag date timestamp hostname node_ip pid config time_this_iter_s "
    "time_total_s time_since_restore timesteps_since_restore iterations_since_restore "
    "training_iteration timesteps_total episodes_total checkpoint_dir_name should_checkpoint "
    "step".split()
)


class TrackingError(UserError, ValueError):
    """The tracking store cannot be used; the message says which URI and what to do."""


# --------------------------------------------------------------------------- store URIs


def default_tracking_uri(project_root: Path | None = None) -> str:
    """The embedded store: ``sqlite:///<root>/outputs/mlflow/mlflow.db`` (root: the cwd)."""
    root = Path(project_root if project_root is not None else Path.cwd()).resolve()
    return f"sqlite:///{(root / 'outputs' / 'mlflow' / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` if given, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are cwd-relative)."""
    rest = uri[len("sqlite://") :].split("?", 1)[0]
    if not rest.startswith("/") or rest == "/":
        return None  # sqlite:// is an in-memory database
    return Path(rest[1:]).resolve()


def _artifact_root(uri: str) -> Path | None:
    """Where artifacts of a sqlite store live: ``artifacts/`` beside the database file.

    MLflow's own default for a sqlite store is ``./mlruns/<experiment_id>`` relative to the
    cwd of whichever process creates the experiment, which scatters artifacts; we pin it.
    """
    if not uri.startswith("sqlite:"):
        return None
    db = _sqlite_path(uri)
    return None if db is None else db.parent / "artifacts"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds with a one-line :class:`TrackingError` if ``uri`` is
    unusable: an http(s) server that does not answer, a sqlite/file path whose folder cannot
    be created, or a scheme MLflow cannot serve here."""
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+", 1)[0]
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is not None:
            _check_folder(db.parent, uri)
    elif scheme in ("file", ""):
        path = Path(uri[len("file://") :] if scheme == "file" else uri)
        _check_folder(path, uri)
        try:  # recent MLflow refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true
            mlflow.MlflowClient(uri)
        except MlflowException as e:
            reason = " ".join(str(e).split()).split(". ")[0]
            raise TrackingError(
                f"tracking URI {uri!r}: MLflow refuses it ({reason}); use "
                f"sqlite:///{path.resolve() / 'mlflow.db'}, or unset MLFLOW_TRACKING_URI to use "
                "the local store"
            ) from None
    elif scheme not in ("postgresql", "mysql", "mssql", "databricks"):
        raise TrackingError(
            f"tracking URI {uri!r} has an unknown scheme {scheme!r}: use http(s)://HOST:PORT, "
            "sqlite:///PATH.db, or unset MLFLOW_TRACKING_URI to use the local store"
        )


def _check_folder(folder: Path, uri: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingError(
            f"tracking URI {uri!r}: cannot create {folder} ({e.strerror or e}); pick a writable "
            "path or unset MLFLOW_TRACKING_URI to use the local store"
        ) from None
    if not os.access(folder, os.W_OK):
        raise TrackingError(
            f"tracking URI {uri!r}: {folder} is not writable; pick a writable path or unset "
            "MLFLOW_TRACKING_URI to use the local store"
        )


def _check_server(uri: str, timeout: float) -> None:
    """GET ``/health`` (MLflow's liveness route), then the search API if that route is
    missing (a proxy in front of the server); every request shares one deadline."""
    deadline = time.monotonic() + timeout
    base = uri.rstrip("/")
    reason = "no answer"
    for route in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"no answer within {timeout:g} s"
            break
        try:
            with urllib.request.urlopen(base + route, timeout=left) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return  # an MLflow server behind auth: reachable; credentials are MLflow's job
            reason = f"HTTP {e.code}"
        except OSError as e:  # URLError, TimeoutError, ConnectionRefusedError, ...
            inner = getattr(e, "reason", e)
            reason = "timed out" if isinstance(inner, TimeoutError) else str(inner)
            break  # nothing listens: the second route would fail the same way
    raise TrackingError(f"MLflow server {uri} is not reachable ({reason}); {_SERVER_FIX}")


def sweep_url_hint(uri: str) -> str:
    """How a person opens the runs of ``uri`` in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return uri
    root = _artifact_root(uri)
    artifacts = f" --default-artifact-root {shlex.quote(str(root))}" if root else ""
    return (
        f"mlflow ui --backend-store-uri {shlex.quote(uri)}{artifacts} --port 5000, "
        "then open http://127.0.0.1:5000"
    )


# --------------------------------------------------------------------------- names and values


def sanitize_name(name: str) -> str:
    """A metric/param key MLflow accepts: ASCII alphanumerics and ``_ - . space /`` (others
    become ``_``), no empty, ``.`` or ``..`` path parts (MLflow treats names as paths)."""
    cleaned = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))
    parts = ["_" if p.strip() in (".", "..") else p for p in cleaned.split("/") if p]
    return ("/".join(parts) or "_")[:_KEY_LIMIT]


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # YAML/JSON spelling: null, true, false
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=_value_text)
    if hasattr(value, "domain_str"):  # a Tune search space: Float(0.0001, 0.1) LogUniform
        sampler = str(value.get_sampler()) if hasattr(value, "get_sampler") else ""
        return f"{type(value).__name__}{value.domain_str}" + (
            f" {sampler}" if " object at " not in sampler else ""
        )
    return str(value)


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "text"}`` for MLflow params.

    Lists are their JSON text (``[0, 0.1, 1, 1000]``, also valid YAML), ``None``/bools are
    ``null``/``true``/``false``, and every value is cut to :data:`PARAM_VALUE_LIMIT`
    characters (ending in ``...`` when cut).
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name))
            continue
        text = "{}" if isinstance(value, Mapping) else _value_text(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        out[sanitize_name(name)] = text
    return out


def _numeric_metrics(d: Mapping[str, Any], prefix: str = "", skip=frozenset()) -> dict[str, float]:
    """Numbers of a nested dict under dotted, sanitized keys; bools and text are left out."""
    out: dict[str, float] = {}
    for key, value in d.items():
        if not prefix and key in skip:
            continue
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_numeric_metrics(value, name))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[sanitize_name(name)] = float(value)
    return out


def _step(result: Mapping[str, Any] | None) -> int:
    result = result or {}
    step = result.get("step", result.get("training_iteration", 0))
    return int(step) if isinstance(step, numbers.Real) and math.isfinite(step) else 0


# --------------------------------------------------------------------------- MLflow helpers


def _experiment_id(client: mlflow.MlflowClient, name: str, uri: str) -> str:
    """Get or create ``name``; a sqlite store gets its artifacts beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = _artifact_root(uri)
        location = str(root / sanitize_name(name).replace("/", "_")) if root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else: another process won the race
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} at {uri} is deleted: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
            "or choose another experiment name"
        )
    return experiment.experiment_id


def _search_all(client: mlflow.MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _log(
    client: mlflow.MlflowClient,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    now = int(time.time() * 1000)
    entities = (
        [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        + [Param(k, v) for k, v in (params or {}).items()]
        + [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
    )
    for i in range(0, len(entities), _BATCH):
        chunk = entities[i : i + _BATCH]
        client.log_batch(
            run_id,
            metrics=[e for e in chunk if isinstance(e, Metric)],
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
        )


def _last_steps(client: mlflow.MlflowClient, run) -> dict[str, int]:
    """The last logged step of each metric of ``run`` (one history request per key), so a
    reopened run can skip the steps a resumed trial or rerun reports again."""
    return {
        key: max(m.step for m in history)
        for key in run.data.metrics
        if (history := client.get_metric_history(run.info.run_id, key))
    }


def _log_new_metrics(
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
        _log(client, run_id, metrics=fresh, step=step)
        last.update(dict.fromkeys(fresh, step))


def _log_new_params(client: mlflow.MlflowClient, run, params: Mapping[str, str]) -> None:
    """Params are immutable in MLflow: on a reopened run, log only the missing ones."""
    old = run.data.params
    changed = sorted(k for k in params if k in old and old[k] != params[k])
    if changed:
        logger.warning(
            "run %s keeps its logged values of changed params %s", run.info.run_id, changed
        )
    _log(client, run.info.run_id, params={k: v for k, v in params.items() if k not in old})


def _reopen(client: mlflow.MlflowClient, run) -> None:
    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run.info.run_id, status="RUNNING")


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
        _experiment_id(client, experiment, uri), run_name=run_name, tags=dict(tags or {})
    )
    run_id = run.info.run_id
    try:
        _log(client, run_id, metrics=_numeric_metrics(metrics), params=flatten_config(params))
        if artifacts_dir is not None:
            client.log_artifacts(run_id, str(artifacts_dir), artifact_path=artifact_path)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def __getattr__(name: str):
    # ``from rf_distributed.tracking import MLflowSweepCallback`` keeps working without making
    # every user of this module import Ray Tune.
    if name == "MLflowSweepCallback":
        from rf_distributed.sweep_tracking import MLflowSweepCallback

        return MLflowSweepCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
