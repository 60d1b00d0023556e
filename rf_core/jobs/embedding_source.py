"""Where a reconstruction's learned token comes from, written once for every caller.

``rf reconstruct``, the sweep driver and the dataset task all call :func:`acquire_embedding`:
a textual-inversion file the user gave, else one an earlier (interrupted) run saved, else
single-image textual inversion now, through the prior's own ``invert`` (a local model or the
Ray prior server: the same call), resumable from a checkpoint beside the saved file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from rf_core.files.checkpoint import remove_checkpoint
from rf_core.prior.embeddings import EmbeddingError, load_embedding, save_embedding

__all__ = ["acquire_embedding", "inversion_checkpoint", "with_token"]


def inversion_checkpoint(path: Path) -> Path:
    """The resumable inversion state (a checkpoint folder) kept beside ``path`` while it is
    being learned."""
    return path.with_name(".inversion.ckpt")


def acquire_embedding(prior, *, rgb: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, inversion=None,
                      given: str | os.PathLike | None = None, path: Path | None = None,
                      model_name: str = "") -> tuple[str, torch.Tensor]:
    """The token and its vector, registered with ``prior``.

    given: a textual-inversion file (``--embedding``); used as it is.
    path: where a learned embedding is kept: reused when it exists, else learned from
        ``rgb`` [3,H,W] and ``mask`` [1,H,W] with ``inversion`` (an ``InversionConfig``) by
        ``prior.invert`` and saved there (``model_name`` goes in its metadata); its progress
        bar shows unless the call runs inside ``rf_core.progress.quiet()``.
    """
    if given is not None:
        token, vector = load_embedding(given)  # missing, malformed or non-finite: one line
        try:  # a vector of the wrong size for this model
            prior.register_embedding(token, vector)
        except EmbeddingError as err:
            raise EmbeddingError(f"{given}: {err}") from None
        return token, vector
    if path is None:
        raise ValueError("acquire_embedding needs a given file or a path to keep one")
    ckpt = inversion_checkpoint(path)
    if path.exists():
        remove_checkpoint(ckpt)  # a crash may follow the save
        token, vector = load_embedding(path)
    else:
        result = prior.invert(rgb, mask, inversion, checkpoint=ckpt)
        token, vector = result.token, result.vector
        save_embedding(path, token, vector, metadata={"model": model_name})
        remove_checkpoint(ckpt)
    prior.register_embedding(token, vector)
    return token, vector


def with_token(recon_cfg, token: str):
    """``recon_cfg`` (a ``ReconstructorConfig``) prompting with the learned ``token``."""
    return dataclasses.replace(recon_cfg, prompt=dataclasses.replace(recon_cfg.prompt,
                                                                     token=token))
