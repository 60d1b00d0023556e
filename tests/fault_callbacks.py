"""Fault-injection callbacks for the fitting loop (``rf_core.fitting.engine``), installed by tests.

They travel to Ray workers by value (``ray.cloudpickle.register_pickle_by_value``), so the
workers need not import the ``tests`` package.
"""

from __future__ import annotations

import os
from pathlib import Path

from rf_core.fitting.engine import Callback


class FailFreshRunAt(Callback):
    """Raise at ``step`` in a run that started from scratch, like a crashed trial; a run
    resumed from a checkpoint goes on. A sweep trial calls ``fit`` once per report interval:
    whether the run is fresh is decided by the first call."""

    def __init__(self, step: int):
        self.step, self.fresh = step, None

    def on_start(self, recon) -> None:
        if self.fresh is None:
            self.fresh = recon.step_count == 0

    def on_step(self, recon, metrics: dict) -> None:
        if self.fresh and recon.step_count == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


class KillWorkerOnceAt(Callback):
    """Stop at ``step`` on the first attempt (the run saves its checkpoint), then end the
    process with ``os._exit(1)``, like a lost worker; ``marker`` (created on the first attempt,
    relative to the working directory of the run unless absolute) makes later attempts go on."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker, self.first = step, marker, False

    def on_start(self, recon) -> bool:
        self.first = not Path(self.marker).exists()
        return False

    def on_step(self, recon, metrics: dict) -> bool:
        return self.first and recon.step_count >= self.step

    def on_end(self, recon, metrics: dict, finished: bool) -> None:
        if self.first and not finished:  # the checkpointer ran before us: exit like a crash
            Path(self.marker).touch()
            os._exit(1)


def ship_by_value() -> None:
    """Pickle this module's classes by value for Ray workers."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
