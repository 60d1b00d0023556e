"""``NullPrior``: no score distillation at all (``type: none``).

Its gradient is zero, so a reconstruction under it fits the input view and the regularisers
only: the baseline that shows what the prior adds. It reads no text, so it accepts learned
tokens and ignores them, and textual inversion under it is a one-line ``UserError``.
"""

from __future__ import annotations

import os

import torch

from rf_core.errors import UserError
from rf_core.prior.base import SDSRequest, check_sds_inputs, sds_grad_each
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.inversion import InversionConfig, InversionResult
from rf_core.prior.sds import SDSConfig


class NullPrior:
    """The prior of ``type: none``: zero SDS gradient, no text model."""

    def __init__(self) -> None:
        self.embeddings: dict[str, torch.Tensor] = {}
        """Tokens registered by the reconstruction job (recorded, never used)."""

    def register_embedding(self, token: str, vector: torch.Tensor) -> None:
        """Record a learned token; this prior reads no text, so it changes nothing."""
        self.embeddings[token] = vector.detach().float().cpu().clone()

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning,
                 cfg: SDSConfig | None = None, *, step: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Zeros [B,3,H,W] float32 on the images' device; draws nothing from ``generator``."""
        check_sds_inputs(images)
        return torch.zeros(images.shape, dtype=torch.float32, device=images.device)

    def sds_grad_batch(self, requests: list[SDSRequest]) -> list[torch.Tensor]:
        return sds_grad_each(self, requests)

    def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig | None = None,
               checkpoint: str | os.PathLike | None = None) -> InversionResult:
        raise UserError("textual inversion needs a text-to-image prior; the prior type 'none' "
                        "has no text model: pass an embedding file, or run without --invert")


__all__ = ["NullPrior"]
