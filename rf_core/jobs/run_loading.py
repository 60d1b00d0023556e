"""A finished (or checkpointed) run folder read back: its configuration and its reconstruction."""

from __future__ import annotations

import os
from pathlib import Path

from rf_core.config import build, parse_yaml
from rf_core.files.checkpoint import load_checkpoint
from rf_core.fitting.reconstruct import Reconstructor
from rf_core.input.image_input import ProcessedInput
from rf_core.jobs.job_config import ReconstructJobConfig
from rf_core.precision import resolve_device


def require_run(run: Path) -> None:
    if not (run / "checkpoint").is_dir():
        raise FileNotFoundError(f"{run} is not a run folder (no checkpoint/); make one with "
                                "`rf reconstruct`")


def run_config(run_dir: str | os.PathLike) -> ReconstructJobConfig:
    """The resolved configuration a run folder was made with (from its checkpoint)."""
    run = Path(run_dir)
    require_run(run)
    return build(ReconstructJobConfig, parse_yaml((run / "checkpoint" / "config.yaml")
                                                 .read_text()))


def load_run(run_dir: str | os.PathLike, device: str = "auto"
             ) -> tuple[Reconstructor, ReconstructJobConfig]:
    """Rebuild a run's reconstruction (no prior attached) from its checkpoint."""
    run = Path(run_dir)
    require_run(run)
    state, text = load_checkpoint(run / "checkpoint")
    cfg = build(ReconstructJobConfig, parse_yaml(text))
    processed = ProcessedInput.load(run / "input")
    recon = Reconstructor(cfg.recon, processed.rgb, processed.mask, prior=None,
                          device=resolve_device(device, "device"))
    recon.load_state_dict(state)
    return recon, cfg
