"""MLflow for sweeps, dataset runs and comparisons.

- ``store``: which store (:func:`resolve_tracking_uri`), whether it answers
  (:func:`check_tracking_uri`), where artifacts go, experiments got or created;
- ``names``: keys and values MLflow accepts (:func:`sanitize_name`, :func:`flatten_config`);
- ``runs``: batched logging, runs found again by tags (:func:`get_or_reopen_run`), each
  metric point logged once, :func:`log_finished_run`;
- ``dataset_tracker``: :class:`DatasetTracker`, a parent run per dataset and a run per object;
- ``sweep_callback``: ``MLflowSweepCallback``, the Ray Tune callback of ``rf sweep``. It is the
  one module here that imports Ray Tune, so it is not imported by this package: write
  ``from rf_distributed.tracking.sweep_callback import MLflowSweepCallback`` (``rf compare``
  starts without loading Ray).
"""

from rf_distributed.tracking.dataset_tracker import DatasetTracker
from rf_distributed.tracking.names import PARAM_VALUE_LIMIT, flatten_config, sanitize_name
from rf_distributed.tracking.runs import get_or_reopen_run, log_finished_run
from rf_distributed.tracking.store import (
    TrackingError,
    check_tracking_uri,
    default_tracking_uri,
    get_or_create_experiment,
    mlflow_command,
    resolve_tracking_uri,
    sweep_url_hint,
)

__all__ = [
    "PARAM_VALUE_LIMIT",
    "DatasetTracker",
    "TrackingError",
    "check_tracking_uri",
    "default_tracking_uri",
    "flatten_config",
    "get_or_create_experiment",
    "get_or_reopen_run",
    "log_finished_run",
    "mlflow_command",
    "resolve_tracking_uri",
    "sanitize_name",
    "sweep_url_hint",
]
