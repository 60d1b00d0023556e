"""``rf invert``: one photo in, one textual-inversion embedding file out.

Loads and recentres the photo, builds the prior (``make_prior``), learns the token with its
``invert`` (resumable from a checkpoint beside the output) and writes ``EMB.safetensors``
atomically, with the resolved config in its safetensors metadata. The processed input is saved
beside it as ``EMB.input/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from rf_core.config import dump_yaml
from rf_core.errors import OutputError
from rf_core.files.checkpoint import remove_checkpoint
from rf_core.files.run_folder import FolderLock, check_output_path, check_removable, staged_folder
from rf_core.input.image_input import InputConfig, load_input
from rf_core.prior.base import Prior
from rf_core.prior.embeddings import save_embedding
from rf_core.prior.inversion import InversionConfig, InversionResult
from rf_core.prior.loading import ModelConfig
from rf_core.prior.random_models import is_random_model
from rf_core.prior.registry import make_prior

EMBEDDING_FORMAT = "realfusion-ray textual inversion"


@dataclass
class InvertJobConfig:
    """Everything ``rf invert`` needs; override as ``model.dtype=fp16``, ``inversion.steps=500``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    input: InputConfig = field(default_factory=InputConfig)


def checkpoint_path(out: Path) -> Path:
    """Where an interrupted ``rf invert`` keeps its state: a hidden checkpoint folder beside
    the output."""
    return out.with_name(f".{out.name}.ckpt")


def invert_image(image: str | os.PathLike, mask: str | os.PathLike | None,
                 out: str | os.PathLike, cfg: InvertJobConfig,
                 prior: Prior | None = None) -> InversionResult:
    """Run single-image textual inversion and write ``out`` (.safetensors). Resumes an
    interrupted run with the same settings; the checkpoint is removed once ``out`` exists.
    ``prior``: any ``Prior`` (a local one, a Ray client); None builds ``cfg.model``'s."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise OutputError(f"--out {str(out)!r} must end in .safetensors (diffusers' embedding "
                          "format)")
    check_output_path(out, [image, mask], folder=False)
    processed = load_input(image, mask, cfg.input)  # before the lock creates any folder
    with FolderLock(out, "rf invert"):
        _check_replaceable(out)
        prior = prior or make_prior(cfg.model)
        ckpt = checkpoint_path(out)
        result = prior.invert(processed.rgb, processed.mask, cfg.inversion, checkpoint=ckpt)
        with staged_folder(out.with_name(out.stem + ".input"), "input",
                           kinds=("input",)) as stage:
            processed.save(stage)
        meta = {"format": EMBEDDING_FORMAT, "model": cfg.model.name,
                "random_weights": str(is_random_model(cfg.model.name)).lower(),
                "config": dump_yaml(cfg),
                "final_loss": f"{sum(result.losses[-50:]) / max(1, len(result.losses[-50:])):.6f}"}
        save_embedding(out, result.token, result.vector, metadata=meta)
        remove_checkpoint(ckpt)
        return result


def _check_replaceable(out: Path) -> None:
    """An existing ``out`` is replaced only if it is an embedding rf wrote."""
    if not out.exists():
        return
    try:
        with safe_open(str(out), "pt") as f:
            ours = (f.metadata() or {}).get("format") == EMBEDDING_FORMAT
    except Exception:  # noqa: BLE001 - unreadable means: not a file rf wrote
        ours = False
    if not ours:
        raise OutputError(f"--out {out} exists and is not an embedding rf wrote; choose another "
                          "file name or remove it yourself")
    check_removable(out.with_name(out.stem + ".input"), kinds=("input",))
