"""The ``rf.*`` MLflow tags, once: every run rf writes is found and read again by these names,
and :func:`trial_status` decides the ``rf.status`` of a sweep's trial.

    from rf_distributed.tracking import tags as rf_tags
    client.search_runs(ids, f"tags.`{rf_tags.KIND}` = 'trial'")
    run.data.tags.get(rf_tags.STATUS)            # "finished", "stopped", "error", ...

Tag names are part of the MLflow pages and of every saved filter: renaming one orphans the
runs already logged.
"""

from __future__ import annotations

__all__ = [
    "BEST_METRIC", "BEST_MODE", "BEST_RUN_ID", "BEST_TRIAL_ID", "COMPARE_RUNS",
    "COMPARE_SELECTION", "DATASET", "DATASET_ID", "ERROR", "FINISHED", "KIND", "MODEL", "NODE",
    "OBJECT", "PRESET", "STATUS", "STOPPED", "SUPERSEDED_BY", "SWEEP_ID", "TRIALS",
    "TRIALS_ERRORED", "TRIALS_FINISHED", "TRIALS_STOPPED", "TRIAL_ID", "TRIAL_PATH",
    "trial_status",
]

# -- every run
KIND = "rf.kind"
"""What a run is: ``sweep``, ``trial``, ``dataset``, ``object`` or ``comparison``."""
STATUS = "rf.status"
"""How it ended: ``running``, ``finished``, ``stopped`` (a trial the scheduler ended early),
``error``/``failed``, ``unfinished`` (interrupted), ``finished_with_failures`` (a dataset)."""
ERROR = "rf.error"
"""The last line of a failed run's error (at most 500 characters)."""
PRESET = "rf.preset"
MODEL = "rf.model"

# -- sweeps and their trials
SWEEP_ID = "rf.sweep_id"
TRIAL_ID = "rf.trial_id"
TRIAL_PATH = "rf.trial_path"
"""The trial's Tune folder."""
TRIALS = "rf.trials"
TRIALS_FINISHED = "rf.trials_finished"
TRIALS_STOPPED = "rf.trials_stopped"
TRIALS_ERRORED = "rf.trials_errored"
BEST_METRIC = "rf.best_metric"
BEST_MODE = "rf.best_mode"
BEST_TRIAL_ID = "rf.best_trial_id"
BEST_RUN_ID = "rf.best_run_id"

# -- datasets and their objects
DATASET = "rf.dataset"
DATASET_ID = "rf.dataset_id"
OBJECT = "rf.object"
NODE = "rf.node"
"""The Ray node an object ran on."""
SUPERSEDED_BY = "rf.superseded_by"
"""On an object's older run: the run of the same object that finished later."""

# -- rf compare
COMPARE_SELECTION = "rf.compare.selection"
COMPARE_RUNS = "rf.compare.runs"

FINISHED = "finished"
STOPPED = "stopped"


def trial_status(step: object, steps: int | None, exported: bool = False) -> str:
    """``finished`` when a trial that ended without error ran all its steps, else ``stopped``
    (the scheduler ended it early).

    ``step`` is its last report's step and ``steps`` its ``recon.steps``. Where either is
    unknown (None), ``exported`` decides: whether the last report's checkpoint holds
    ``export/``, which ``train_trial`` writes with the report of the last step and no other.
    """
    if steps is not None and isinstance(step, (int, float)) and not isinstance(step, bool):
        return FINISHED if step >= steps else STOPPED
    return FINISHED if exported else STOPPED
