"""MLflow tracking for sweeps and single runs, written only by the Ray Tune driver.

Trials never talk to MLflow: they ``tune.report(metrics, checkpoint=...)`` and the driver's
:class:`MLflowSweepCallback` turns reports and final checkpoints into one parent run per sweep
and one child run per trial. One writer means a local sqlite store never sees concurrent
writers, and worker nodes need no MLflow access.

Store choice (:func:`resolve_tracking_uri`): an explicit URI, else ``$MLFLOW_TRACKING_URI``,
else the embedded store ``sqlite:///<cwd>/outputs/mlflow/mlflow.db`` with artifacts in
``outputs/mlflow/artifacts``. Runs can be reopened: the parent is found again by its
``rf.sweep_id`` tag and each child by its ``rf.trial_id`` tag, so ``Tuner.restore`` continues
the same runs instead of duplicating them.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import shlex
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

logger = logging.getLogger(__name__)

__all__ = [
    "MLflowSweepCallback",
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


class TrackingError(ValueError):
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
        self._experiment_id = _experiment_id(client, self.experiment, self.tracking_uri)
        found = client.search_runs(
            [self._experiment_id],
            f"tags.`rf.sweep_id` = '{self.sweep_id}' and tags.`rf.kind` = 'sweep'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            parent = found[0]
            _reopen(client, parent)
        else:
            tags = {**self.tags, "rf.kind": "sweep", "rf.sweep_id": self.sweep_id}
            parent = client.create_run(self._experiment_id, run_name=self.sweep_name, tags=tags)
        self.parent_run_id = parent.info.run_id
        _log_new_params(client, parent, flatten_config(self.sweep_params))
        _log(client, self.parent_run_id, tags={"rf.status": "running"})
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
        if run_id is not None:
            run = client.get_run(run_id)
        else:
            found = client.search_runs(
                [self._experiment_id],
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                f"and tags.`rf.trial_id` = '{trial_id}'",
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            if found:
                run = found[0]
            else:
                tag = getattr(trial, "experiment_tag", "") or ""
                run = client.create_run(
                    self._experiment_id,
                    run_name=(f"{trial_id} ({tag})" if tag else trial_id)[:_KEY_LIMIT],
                    tags={
                        "mlflow.parentRunId": self.parent_run_id,
                        "rf.kind": "trial",
                        "rf.trial_id": trial_id,
                        "rf.sweep_id": self.sweep_id,
                        "rf.trial_path": str(getattr(trial, "path", None) or ""),
                    },
                )
        _reopen(client, run)
        _log_new_params(client, run, flatten_config(getattr(trial, "config", None) or {}))
        _log(client, run.info.run_id, tags={"rf.status": "running"})
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
        step = _step(getattr(trial, "last_result", None))
        with _local_export(getattr(trial, "checkpoint", None)) as export:
            if export is not None:
                client.log_artifacts(run_id, str(export), artifact_path="export")
                final = export / "metrics.json"
                if final.is_file():
                    metrics = _numeric_metrics(json.loads(final.read_text()))
                    _log(client, run_id, metrics=metrics, step=step)
                resolved = export / "config.yaml"
                if resolved.is_file():  # the trial's whole resolved config, as params
                    config = yaml.safe_load(resolved.read_text()) or {}
                    _log_new_params(client, client.get_run(run_id),
                                    flatten_config(config, prefix="config"))
        error_file = getattr(trial, "error_file", None) if status == "FAILED" else None
        tags = {"rf.status": "finished" if status == "FINISHED" else "error"}
        if error_file and Path(error_file).is_file():
            client.log_artifact(run_id, error_file)
            lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
            tags["rf.error"] = lines[-1][:500] if lines else ""
        _log(client, run_id, tags=tags)
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
            metrics = _numeric_metrics(result, skip=_TUNE_KEYS)
            if metrics:
                _log(self._start(), self._child(trial), metrics=metrics, step=_step(result))

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
            _log(client, self._runs[trial_id], tags={"rf.status": "unfinished"})
            client.set_terminated(self._runs[trial_id], "KILLED")
        self._open.clear()
        statuses = [str(getattr(t, "status", "")) for t in trials]
        tags = {
            "rf.status": "finished",
            "rf.trials": len(trials),
            "rf.trials_finished": statuses.count("TERMINATED"),
            "rf.trials_errored": statuses.count("ERROR"),
        }
        metrics = {}
        if self.metric and self.mode:
            best = self._best_child(client)
            if best is not None:
                key = sanitize_name(self.metric)
                metrics[f"best.{key}"] = best.data.metrics[key]
                tags["rf.best_metric"] = key
                tags["rf.best_mode"] = self.mode
                tags["rf.best_trial_id"] = best.data.tags.get("rf.trial_id", "")
                tags["rf.best_run_id"] = best.info.run_id
        _log(client, self.parent_run_id, metrics=metrics, tags=tags)
        client.set_terminated(self.parent_run_id, "FINISHED")

    def _best_child(self, client: mlflow.MlflowClient):
        """The child run whose latest ``metric`` is best; reads MLflow, so a restored sweep
        ranks the trials of earlier sessions too."""
        key = sanitize_name(self.metric)
        children = _search_all(
            client, self._experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        )
        scored = [r for r in children if not math.isnan(r.data.metrics.get(key, math.nan))]
        if not scored:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return max(scored, key=lambda r: sign * r.data.metrics[key])
