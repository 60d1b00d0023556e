"""Named moments where a test may stop the process: ``fault_point("checkpoint.written")``.

The fault-injection tests (``tests/test_faults.py``) kill or interrupt an ``rf`` command at an
exact moment, the same on every run, by arming one of these points in its environment::

    RF_FAULT_POINT="checkpoint.between_renames:2:SIGKILL"

makes the process send itself SIGKILL (or SIGINT: Ctrl-C) the 2nd time it reaches
``checkpoint.between_renames``. The setting is read once, when this module is imported, and
removed from the environment, so the processes this one starts (Ray workers) are not armed.
Unarmed, :func:`fault_point` is a function that does nothing; armed, one dict lookup per call.

Every point, and where it is (:data:`POINTS`; a name not listed here cannot be armed):
"""

from __future__ import annotations

import os
import signal

POINTS: dict[str, str] = {
    # textual inversion (rf_core.prior.inversion)
    "inversion.step": "each inversion step, after its random draws, before its backward pass",
    "inversion.checkpoint.tensors_written": "an inversion checkpoint's tensors are written",
    "inversion.checkpoint.written": "an inversion checkpoint is written, not yet renamed in",
    "inversion.checkpoint.between_renames": "between an inversion checkpoint's two renames",
    # reconstruction checkpoints (rf_core.files.checkpoint)
    "checkpoint.tensors_written": "a checkpoint's state.safetensors is written, nothing else",
    "checkpoint.written": "a checkpoint's files are written, not yet renamed in",
    "checkpoint.between_renames": "the old checkpoint moved to .prev, the new not yet in place",
    # learned embeddings (rf_core.prior.embeddings.save_embedding)
    "embedding.before_save": "an embedding file is about to be written",
    "embedding.saved": "an embedding file was written",
    # the fitting loop and rf reconstruct (rf_core.fitting.engine, rf_core.jobs)
    "fit.step": "after each Reconstructor step, before the callbacks (history, checkpoint)",
    "run.before_marker": "a finished run's metrics are written, its marker not yet",
    "run.before_rename": "a finished run is marked, not yet renamed to --out",
    # export (rf_core.jobs.export_job)
    "export.rendered": "the orbit video's frames are rendered, not yet written",
    "export.video_written": "the orbit video is written, the mesh not yet",
    "export.before_mesh": "the mesh is about to be extracted and written",
    # folder swaps (rf_core.files.run_folder)
    "folder.linking": "each file hard-linked (or copied) into a stage folder",
    "folder.before_swap": "a folder is about to replace another (replace_folder)",
    "folder.after_swap": "a folder replaced another, the old one not yet removed",
    # rf sweep's driver (rf_distributed.sweep, .tracking.sweep_callback)
    "sweep.trial_result": "the MLflow callback handled a trial's result",
    "sweep.trial_complete": "the MLflow callback handled a finished trial",
    "sweep.finishing_trial": "the MLflow callback is about to record a trial's end",
    "sweep.fitted": "Tune's fit returned, the summary not yet made",
    # rf dataset's driver (rf_distributed.dataset_run, .tracking.dataset_tracker)
    "dataset.before_record": "an object's result is about to be recorded (MLflow, result.json)",
    "dataset.recorded": "an object's result is recorded",
    "dataset.run_created": "an object's MLflow run was created, nothing logged to it yet",
    "dataset.logged": "an object's MLflow run is complete, result.json not yet written",
    "dataset.before_finish": "every object is done, the summary not yet written",
}
"""Every fault point: name -> the moment it marks."""

ENV = "RF_FAULT_POINT"
"""``NAME:N:SIGNAL``: send SIGNAL (SIGKILL or SIGINT) at the Nth time NAME is reached."""


class FaultPointError(ValueError):
    """An ``RF_FAULT_POINT`` setting that names no point or is malformed."""


def parse(setting: str) -> tuple[str, int, signal.Signals]:
    """``"NAME:N:SIGNAL"`` -> (name, n, signal)."""
    try:
        name, nth, sig = setting.rsplit(":", 2)
        n, signum = int(nth), signal.Signals[sig]
    except (ValueError, KeyError):
        raise FaultPointError(f"{ENV}={setting!r}: expected NAME:N:SIGNAL, e.g. "
                              "checkpoint.written:2:SIGKILL") from None
    if name not in POINTS or n < 1:
        raise FaultPointError(f"{ENV}={setting!r}: no fault point {name!r} (see "
                              "rf_core.files.fault_points.POINTS), or N < 1")
    return name, n, signum


def fault_point(name: str) -> None:
    """Mark the moment ``name`` (one of :data:`POINTS`); does nothing unless ``RF_FAULT_POINT``
    armed a point in this process (then this name is replaced by the armed version)."""


def _armed(name: str) -> None:
    if name == _NAME:
        _SEEN[0] += 1
        if _SEEN[0] == _N:
            os.kill(os.getpid(), _SIGNAL)


_SETTING = os.environ.pop(ENV, None)
if _SETTING:
    _NAME, _N, _SIGNAL = parse(_SETTING)
    _SEEN = [0]
    fault_point = _armed  # noqa: F811 - armed: count and signal
