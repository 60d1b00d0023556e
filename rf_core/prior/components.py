"""``SDComponents``: the frozen parts of a loaded Stable Diffusion model, and what every latent
diffusion model's parts answer (``LatentDiffusionParts``, shared with Zero-1-to-3).

Its own module so that the loader (``loading``) and the in-memory random-weight builders
(``random_models``) can both make one without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LatentDiffusionParts:
    """What the parts of any latent diffusion model answer (for a class with ``unet``,
    ``vae`` and ``scheduler``): Stable Diffusion's and Zero-1-to-3's."""

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def resolution(self) -> int:
        """Native image side in pixels (512 for SD 1.x, 768 for SD 2.x-v, 256 for
        Zero-1-to-3, 64 for tiny)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass
class SDComponents(LatentDiffusionParts):
    """The frozen parts of a Stable Diffusion model that the prior needs."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    name: str
    device: torch.device
    dtype: torch.dtype
    attention: str
    """The attention backend in use: ``sdpa`` or ``xformers``."""



__all__ = ["LatentDiffusionParts", "SDComponents"]
