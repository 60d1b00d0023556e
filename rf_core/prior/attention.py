"""Attention backend and memory options for the diffusion models, chosen in this one place.

``auto`` takes xformers' memory-efficient attention on CUDA when it imports and runs a probe
call, and PyTorch's scaled-dot-product attention (SDPA, fused kernels on CUDA) otherwise.
"""

from __future__ import annotations

import functools
import logging

import torch

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
_log = logging.getLogger(__name__)


@functools.cache
def xformers_usable(device: str) -> bool:
    """Whether xformers imports and runs its attention kernel on ``device`` (cached)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        import xformers.ops

        q = torch.randn(1, 8, 1, 40, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception as err:  # any failure at all means "not usable"; reported once
        _log.warning("xformers is installed but unusable on %s (%s); using SDPA", device, err)
        return False


def resolve_attention(requested: str, device: torch.device) -> str:
    """The backend to use: ``sdpa`` or ``xformers``. Asking for a missing one is an error."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; "
                         f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    usable = xformers_usable(str(device))
    if requested == "xformers" and not usable:
        raise ValueError("attention=xformers needs a CUDA GPU with xformers installed "
                         "(pip install xformers matching your torch); or use attention=auto")
    if requested == "auto":
        return "xformers" if usable else "sdpa"
    return requested


def configure_models(unet, vae, *, backend: str, attention_slicing: bool = False,
                     vae_slicing: bool = False, channels_last: bool = False) -> None:
    """Apply the attention backend and the memory options to a UNet and a VAE, in place."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())
    if attention_slicing:
        unet.set_attention_slice("auto")
    if vae_slicing:
        vae.enable_slicing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
