"""The configuration of a reconstruction job: everything ``rf reconstruct`` needs, as presets
(``rf_core/presets/*.yaml``), YAML files and dotted overrides build it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rf_core.config import bounded, dump_yaml, load_config
from rf_core.fitting.reconstruct import ReconstructorConfig
from rf_core.input.image_input import InputConfig
from rf_core.output.export import ExportConfig
from rf_core.precision import device_field
from rf_core.prior.inversion import InversionConfig
from rf_core.prior.joint import JointConfig
from rf_core.prior.loading import ModelConfig


@dataclass
class ReconstructJobConfig:
    """Everything ``rf reconstruct`` needs. Presets (``rf_core/presets/*.yaml``) set it."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding: str | None = None
    """Textual-inversion file (.safetensors or the authors' .bin); None with --invert."""
    inversion: InversionConfig = dataclasses.field(default_factory=InversionConfig)
    """Used when the embedding is learned first (--invert)."""
    recon: ReconstructorConfig = dataclasses.field(default_factory=ReconstructorConfig)
    joint: JointConfig = dataclasses.field(default_factory=JointConfig)
    """A second prior whose score distillation adds to ``model``'s (Magic123's joint prior)."""
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    checkpoint_every: int = bounded(500, lo=1)
    """Save a resumable checkpoint every this many steps."""
    log_every: int = bounded(10, lo=1)
    """Append losses to history.jsonl every this many steps."""
    device: str = device_field("auto")
    """Where the field trains: auto (CUDA when available), cpu, cuda, cuda:N."""


def load_job_config(preset: str | None, files: list[str] = (), overrides: list[str] = ()
                    ) -> ReconstructJobConfig:
    """Preset, then YAML files, then dotted overrides -> a validated config."""
    return load_config(ReconstructJobConfig, presets=[preset] if preset else [], files=files,
                       overrides=overrides)


def config_yaml(cfg: ReconstructJobConfig) -> str:
    """The resolved config as the YAML text saved beside (and inside the checkpoint of) a run."""
    return dump_yaml(cfg)
