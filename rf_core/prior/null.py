"""``NullPrior``: no score distillation at all (``type: none``).

Its gradient is zero, so a reconstruction under it fits the input view and the regularisers
only: the baseline that shows what the prior adds. It reads no text, so it accepts learned
tokens and ignores them, and textual inversion under it is a one-line ``UserError``.
"""

from __future__ import annotations

import torch

from rf_core.prior.base import TextFreePrior, check_sds_inputs
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.sds import SDSConfig


class NullPrior(TextFreePrior):
    """The prior of ``type: none``: zero SDS gradient, no text model."""

    no_inversion = ("textual inversion needs a text-to-image prior; the prior type 'none' has "
                    "no text model: pass an embedding file, or run without --invert")

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning,
                 cfg: SDSConfig | None = None, *, step: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Zeros [B,3,H,W] float32 on the images' device; draws nothing from ``generator``."""
        check_sds_inputs(images)
        return torch.zeros(images.shape, dtype=torch.float32, device=images.device)


__all__ = ["NullPrior"]
