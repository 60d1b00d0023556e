"""Which MLflow store, whether it answers, where its artifacts go, and its experiments.

Store choice (:func:`resolve_tracking_uri`): an explicit URI, else ``$MLFLOW_TRACKING_URI``,
else the embedded store ``sqlite:///<cwd>/outputs/mlflow/mlflow.db`` with artifacts in
``outputs/mlflow/artifacts``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from rf_core.errors import UserError
from rf_distributed.tracking.names import sanitize_name

__all__ = [
    "TrackingError",
    "EXPERIMENT_KIND",
    "artifact_root",
    "check_tracking_uri",
    "default_tracking_uri",
    "mlflow_command",
    "get_or_create_experiment",
    "resolve_tracking_uri",
    "sqlite_path",
    "sweep_url_hint",
]

_SERVER_FIX = (
    "start it (`make mlflow-server`) or unset MLFLOW_TRACKING_URI to use the local store"
)


class TrackingError(UserError, ValueError):
    """The tracking store cannot be used; the message says which URI and what to do."""


def default_tracking_uri(project_root: Path | None = None) -> str:
    """The embedded store: ``sqlite:///<root>/outputs/mlflow/mlflow.db`` (root: the cwd)."""
    root = Path(project_root if project_root is not None else Path.cwd()).resolve()
    return f"sqlite:///{(root / 'outputs' / 'mlflow' / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` if given, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are cwd-relative); ``None``
    for an in-memory database (``sqlite://``)."""
    rest = uri[len("sqlite://") :].split("?", 1)[0]
    if not rest.startswith("/") or rest == "/":
        return None
    return Path(rest[1:]).resolve()


def artifact_root(uri: str) -> Path | None:
    """Where artifacts of a sqlite store live: ``artifacts/`` beside the database file;
    ``None`` for other stores (the server decides).

    MLflow's own default for a sqlite store is ``./mlruns/<experiment_id>`` relative to the
    cwd of whichever process creates the experiment, which scatters artifacts; we pin it.
    """
    if not uri.startswith("sqlite:"):
        return None
    db = sqlite_path(uri)
    return None if db is None else db.parent / "artifacts"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds with a one-line :class:`TrackingError` if ``uri`` is
    unusable: an http(s) server that does not answer, a sqlite/file path whose folder cannot
    be created, or a scheme MLflow cannot serve here."""
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+", 1)[0]
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme == "sqlite":
        db = sqlite_path(uri)
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


def mlflow_command() -> str:
    """The ``mlflow`` executable as a person can type it: ``mlflow`` when it is on PATH, else
    its path beside this Python (a virtualenv that is not activated)."""
    beside = Path(sys.executable).parent / "mlflow"
    on_path = shutil.which("mlflow")
    if on_path and (not beside.exists() or Path(on_path).resolve() == beside.resolve()):
        return "mlflow"
    return shlex.quote(str(beside)) if beside.exists() else "mlflow"


def sweep_url_hint(uri: str) -> str:
    """How a person opens the runs of ``uri`` in the MLflow UI: the project's own store is
    ``make ui``; any other is the full ``mlflow ui`` command."""
    if uri.startswith(("http://", "https://")):
        return uri
    if uri == default_tracking_uri():
        return "make ui, then open http://127.0.0.1:5000"
    root = artifact_root(uri)
    artifacts = f" --default-artifact-root {shlex.quote(str(root))}" if root else ""
    return (
        f"{mlflow_command()} ui --backend-store-uri {shlex.quote(uri)}{artifacts} --port 5000, "
        "then open http://127.0.0.1:5000"
    )


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment tag that marks an experiment as model training (runs, metrics, artifacts)
rather than a GenAI app (traces, evaluations), as MLflow's own examples set it. MLflow
3.17's UI takes the mode from a per-browser switch instead (default GenAI), so the links rf
prints also carry ``workflowType=machine_learning`` (``sweep_callback.MODEL_TRAINING``)."""


def get_or_create_experiment(client: mlflow.MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name`` at ``uri``, created if missing (a sqlite store gets its
    artifacts beside the database) as a model-training experiment (:data:`EXPERIMENT_KIND`);
    a deleted one is a :class:`TrackingError`."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(uri)
        location = str(root / sanitize_name(name).replace("/", "_")) if root else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags=EXPERIMENT_KIND)
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
    if not experiment.tags.get("mlflow.experimentKind"):  # made by an older rf
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id
