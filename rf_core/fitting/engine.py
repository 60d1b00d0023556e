"""One fitting loop for every caller: ``fit(recon, steps, callbacks)``.

``rf reconstruct``, the Tune trainable and the dataset task all step a ``Reconstructor`` through
this function; what differs between them (a history file, checkpoints, a progress bar, Tune
reports, live progress on a Ray actor, a deliberate stop in a test) is a callback::

    result = fit(recon, cfg.recon.steps, [
        HistoryLog(work / "history.jsonl", every=10, total=cfg.recon.steps),
        Checkpointer(work / "checkpoint", every=500, total=cfg.recon.steps, config_text=text),
        ProgressBar(cfg.recon.steps),  # silent inside rf_core.progress.quiet()
    ])

Callbacks run in the order given, after every step. Any of them may ask the loop to stop
early by returning True from ``on_step``; ``on_end`` then sees ``finished=False`` (the
``Checkpointer`` saves the state there, so the run resumes from exactly that step).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rf_core.files.atomic import atomic_write_text
from rf_core.files.checkpoint import save_checkpoint
from rf_core.files.fault_points import fault_point
from rf_core.progress import progress

__all__ = ["Callback", "Checkpointer", "FitResult", "HistoryLog", "ProgressBar", "StepHook",
           "StopAfter", "fit", "last_history_row", "skipped_steps_warning", "trim_history"]

SKIPPED_WARN_FRACTION = 0.05
"""A finished run that skipped more than this fraction of its steps says so."""

_log = logging.getLogger(__name__)


class Callback:
    """Hooks around the fitting loop; every method is optional (the defaults do nothing)."""

    def on_start(self, recon) -> bool | None:
        """Before the first step of this call (``recon.step_count`` may be > 0 on resume).
        Return True to stop before any step."""

    def on_step(self, recon, metrics: dict) -> bool | None:
        """After each step; ``metrics`` is ``recon.step()``'s dict. Return True to stop."""

    def on_end(self, recon, metrics: dict, finished: bool) -> None:
        """After the loop: ``finished`` when all steps ran, False when a callback stopped it.
        Not called when the loop raises (a crash resumes from the last saved checkpoint)."""


@dataclass
class FitResult:
    """What one call of :func:`fit` did."""

    metrics: dict
    """The last step's metrics ({} when no step ran)."""
    finished: bool
    """Whether the reconstruction reached its last step."""
    start_step: int
    """``recon.step_count`` when the call began (> 0: resumed)."""


def fit(recon, steps: int, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Step ``recon`` until ``recon.step_count == steps`` or a callback asks to stop."""
    start = recon.step_count
    stop = any([bool(cb.on_start(recon)) for cb in callbacks])
    metrics: dict = {}
    while recon.step_count < steps and not stop:
        metrics = recon.step()
        fault_point("fit.step")
        # every callback sees every step, even after one of them asked to stop
        stop = any([bool(cb.on_step(recon, metrics)) for cb in callbacks])
    finished = recon.step_count >= steps
    for cb in callbacks:
        cb.on_end(recon, metrics, finished)
    warning = skipped_steps_warning(recon) if finished else None
    if warning:
        _log.warning(warning)
    return FitResult(metrics, finished, start)


def skipped_steps_warning(recon) -> str | None:
    """One line when more than 5% of ``recon``'s steps made no update (a non-finite loss, or
    an fp16 gradient overflow that the GradScaler skipped), else None."""
    steps = recon.step_count
    skipped = getattr(recon, "skipped_steps", 0)
    if not steps or skipped <= SKIPPED_WARN_FRACTION * steps:
        return None
    nonfinite = getattr(recon, "nonfinite_steps", 0)
    return (f"rf: warning: {skipped} of {steps} steps ({100 * skipped / steps:.0f}%) made no "
            f"update ({nonfinite} with a non-finite loss, {skipped - nonfinite} skipped by the "
            "fp16 loss scaler); the result may be undertrained: see sds/nonfinite and "
            "amp/scale in history.jsonl, lower lr or weights.sds, or use "
            "recon.mixed_precision=bf16")


# ---------------------------------------------------------------------------- callbacks


@dataclass
class HistoryLog(Callback):
    """Append the step's metrics to a JSON-lines file every ``every`` steps and at the last."""

    path: Path
    every: int
    total: int
    _file: object = field(default=None, init=False, repr=False)

    def on_start(self, recon) -> None:
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in on_end / __del__

    def on_step(self, recon, metrics: dict) -> None:
        done = recon.step_count
        if done % self.every == 0 or done == self.total:
            self._file.write(json.dumps(metrics) + "\n")
            self._file.flush()

    def on_end(self, recon, metrics: dict, finished: bool) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()


@dataclass
class Checkpointer(Callback):
    """Save a resumable checkpoint every ``every`` steps, at the last step, and when the loop
    is stopped early by a callback."""

    folder: Path
    every: int
    total: int
    config_text: str

    def on_step(self, recon, metrics: dict) -> None:
        done = recon.step_count
        if done % self.every == 0 or done == self.total:
            save_checkpoint(self.folder, recon.state_dict(), self.config_text)

    def on_end(self, recon, metrics: dict, finished: bool) -> None:
        if not finished:
            save_checkpoint(self.folder, recon.state_dict(), self.config_text)


class ProgressBar(Callback):
    """A tqdm bar over the steps, with the sampled input-view PSNR (silent when ``fit`` runs
    inside ``rf_core.progress.quiet()``)."""

    def __init__(self, total: int, label: str = "reconstructing"):
        self.total, self.label = total, label
        self.bar = None

    def on_start(self, recon) -> None:
        self.bar = progress(self.total, self.label, initial=recon.step_count)

    def on_step(self, recon, metrics: dict) -> None:
        self.bar.update(1)
        if "input_psnr_sampled" in metrics:
            self.bar.set_postfix(psnr=f"{metrics['input_psnr_sampled']:.1f}")

    def on_end(self, recon, metrics: dict, finished: bool) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class StepHook(Callback):
    """Call ``fn(step, total, metrics)`` after every step (live progress reporting)."""

    fn: Callable[[int, int, dict], None]
    total: int

    def on_step(self, recon, metrics: dict) -> None:
        self.fn(recon.step_count, self.total, metrics)


@dataclass
class StopAfter(Callback):
    """Stop the loop once ``recon.step_count`` reaches ``step`` (a deliberate interruption:
    the run stays resumable)."""

    step: int

    def on_start(self, recon) -> bool:
        return recon.step_count >= self.step

    def on_step(self, recon, metrics: dict) -> bool:
        return recon.step_count >= self.step


# ---------------------------------------------------------------------------- history files


def last_history_row(path: Path) -> dict:
    """The last complete row of a ``history.jsonl`` ({} when there is none)."""
    rows = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(rows):
        try:
            return json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
    return {}


def trim_history(path: Path, steps_done: int) -> None:
    """Keep the rows of ``history.jsonl`` of the first ``steps_done`` steps (0-based "step"),
    those the checkpoint holds: a resumed run then logs each step once."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if isinstance(row, dict) and row.get("step", 0) < steps_done:
            rows.append(line + "\n")
    atomic_write_text(path, "".join(rows))
