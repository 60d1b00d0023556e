"""Random-weight Zero-1-to-3 models, built from configs in code and saved in the diffusers layout.

    zero123-random   Zero-1-to-3's architecture (kxic/zero123-xl): the SD 1.x UNet with 8 input
                     channels at 256 px (32x32 latents), the SD VAE, the CLIP ViT-L/14 vision
                     encoder with its 768-d projection, and cc_projection (Linear 772 -> 768);
                     ~1.25B parameters (5.0 GB in fp32)
    zero123-tiny     the same layout at ~1M parameters and 64 px, for tests

Like ``sd15-random`` (``rf_core.prior.random_models``): built with a fixed seed (every parameter
from its own seeded stream, :func:`~rf_core.prior.random_models.fill_random_`), saved once to
``cache_root()/models/NAME-vN`` (atomically, safetensors, with the random-weights marker) in the
folder layout of a converted checkpoint, and read back by the same loader as a real one
(``rf_core.prior.zero123_loading``). Their weights are RANDOM: they run the real code path at
the real sizes, but as priors they know nothing.

CLIP's ``class_embedding`` is the one parameter outside ``fill_random_``'s layer rules; it is
drawn like a token embedding, U(-a, a) with a = sqrt(3) / sqrt(width) (std width^-0.5, as CLIP's
own init). Every block normalises its input, so activations stay O(1) (as for sd15-random).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from rf_core.prior.random_models import (
    SD15_UNET,
    SD15_VAE,
    fill_random_,
    random_scheduler,
    seeded_uniform,
)
from rf_core.prior.tiny import RANDOM_MARKER, saved_pipeline_path

ZERO123_RANDOM = "zero123-random"
ZERO123_TINY = "zero123-tiny"
ZERO123_VERSION = 1
"""Bump when an architecture or the init changes (stale caches are rebuilt in a new folder)."""
ZERO123_SEED = 0
CAMERA_DIM = 4
"""Width of Zero-1-to-3's camera vector (Δpolar, sin Δazimuth, cos Δazimuth, Δradius)."""

# kxic/zero123-xl (diffusers' scripts/convert_zero123_to_diffusers.py on the authors'
# sd-objaverse-finetune-c_concat-256.yaml): SD 1.x's UNet with the conditioning latent
# concatenated to the noisy one (8 input channels) at 256 px; the SD VAE; CLIP ViT-L/14's vision
# tower from lambdalabs/sd-image-variations-diffusers.
ZERO123_UNET = {**SD15_UNET, "in_channels": 8, "sample_size": 32}
ZERO123_VAE = {**SD15_VAE, "sample_size": 256}
ZERO123_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_channels": 3, "image_size": 224,
                  "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}
"""openai/clip-vit-large-patch14's vision tower and projection."""

TINY_UNET = {"sample_size": 16, "in_channels": 8, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (32, 64), "norm_num_groups": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 8}
TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": (16, 32, 32), "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3, "layers_per_block": 1,
            "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.18215}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_channels": 3, "image_size": 32, "patch_size": 8,
               "projection_dim": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}

MODEL_INDEX = {
    "_class_name": "Zero1to3StableDiffusionPipeline",
    "cc_projection": ["pipeline_zero1to3", "CCProjection"],
    "feature_extractor": [None, None],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
"""``model_index.json`` of the saved folders: kxic/zero123-xl's components (the scheduler as
the DDPM training schedule SDS uses; feature extractor and safety checker not needed)."""


@dataclass
class Zero123Parts:
    """The modules of a Zero-1-to-3 checkpoint, before freezing and placing."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    cc_projection: torch.nn.Linear
    """[image embedding ; camera] -> the UNet's cross-attention context."""
    scheduler: object

    def save_pretrained(self, path: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write the diffusers layout (every weight as safetensors) into the folder ``path``."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("Zero-1-to-3 folders are written as safetensors only")
        path = Path(path)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.vae.save_pretrained(path / "vae", safe_serialization=True)
        self.image_encoder.save_pretrained(path / "image_encoder")
        self.scheduler.save_pretrained(path / "scheduler")
        cc = path / "cc_projection"
        cc.mkdir(parents=True, exist_ok=True)
        lin = self.cc_projection
        (cc / "config.json").write_text(json.dumps(
            {"_class_name": "CCProjection", "in_channel": lin.in_features,
             "out_channel": lin.out_features}, indent=2) + "\n")
        save_file({"projection.weight": lin.weight.detach().contiguous(),
                   "projection.bias": lin.bias.detach().contiguous()},
                  str(cc / "diffusion_pytorch_model.safetensors"))
        (path / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")


def _empty_parts(unet_cfg: dict, vae_cfg: dict, vision_cfg: dict, *, meta_buffers: bool):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=meta_buffers):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg))
        cc = torch.nn.Linear(vision_cfg["projection_dim"] + CAMERA_DIM,
                             unet_cfg["cross_attention_dim"])
    return unet, vae, encoder, cc


def _fill_vision_(encoder: torch.nn.Module, seed: int, device, dtype) -> None:
    """``fill_random_`` plus CLIP's class embedding (a bare parameter: no layer rule)."""
    emb = encoder.vision_model.embeddings
    shape = emb._parameters.pop("class_embedding").shape
    fill_random_(encoder, seed, device=device, dtype=dtype)
    bound = math.sqrt(3.0 / shape[0])
    value = seeded_uniform(seed, "vision_model.embeddings.class_embedding", shape, bound)
    emb.class_embedding = torch.nn.Parameter(value.to(device=device, dtype=dtype))


def random_zero123_parts(unet_cfg: dict = ZERO123_UNET, vae_cfg: dict = ZERO123_VAE,
                         vision_cfg: dict = ZERO123_VISION, seed: int = ZERO123_SEED, *,
                         device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> Zero123Parts:
    """A Zero-1-to-3 of these configs with seeded random weights on ``device`` in ``dtype``
    (default: the full-size ``zero123-random``); ``device="meta"`` gives shapes only."""
    meta = torch.device(device).type == "meta"
    unet, vae, encoder, cc = _empty_parts(unet_cfg, vae_cfg, vision_cfg, meta_buffers=meta)
    if not meta:
        for model in (unet, vae, cc):
            fill_random_(model, seed, device=device, dtype=dtype)
        _fill_vision_(encoder, seed, device, dtype)
        for model in (unet, vae, encoder, cc):
            torch.nn.Module.to(model, device)  # the (real) buffers follow
            model.eval()
    return Zero123Parts(unet, vae, encoder, cc, random_scheduler("epsilon"))


@dataclass(frozen=True)
class Zero123Random:
    """One random-weight Zero-1-to-3 name: its configs and where it is saved."""

    name: str
    unet: dict
    vae: dict
    vision: dict
    summary: str
    version: int = ZERO123_VERSION
    seed: int = ZERO123_SEED

    @property
    def folder(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def resolution(self) -> int:
        """Native image side in pixels."""
        return int(self.vae["sample_size"])

    def build(self) -> Zero123Parts:
        return random_zero123_parts(self.unet, self.vae, self.vision, self.seed)

    def path(self) -> Path:
        """The saved model's folder; built and saved on first use."""
        return saved_pipeline_path(self.folder, self.build,
                                   {"name": self.name, "version": self.version, "seed": self.seed})


ZERO123_MODELS: dict[str, Zero123Random] = {
    ZERO123_RANDOM: Zero123Random(ZERO123_RANDOM, ZERO123_UNET, ZERO123_VAE, ZERO123_VISION,
                                  "Zero-1-to-3's architecture (zero123-xl)"),
    ZERO123_TINY: Zero123Random(ZERO123_TINY, TINY_UNET, TINY_VAE, TINY_VISION,
                                "a ~1M-parameter Zero-1-to-3 for tests"),
}
"""Every random-weight Zero-1-to-3 name accepted as ``model.name`` with ``model.type: zero123``."""


def zero123_random_path(name: str = ZERO123_RANDOM) -> Path:
    """Folder of the saved random-weight Zero-1-to-3 ``name``; built on first use."""
    if name not in ZERO123_MODELS:
        raise ValueError(f"unknown random-weight Zero-1-to-3 {name!r}; choose one of "
                         f"{', '.join(ZERO123_MODELS)}")
    return ZERO123_MODELS[name].path()


def is_zero123_random(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a random-weight Zero-1-to-3 name or a folder one was saved to."""
    if str(name) in ZERO123_MODELS:
        return True
    try:
        path = Path(name).expanduser()
        return (path / RANDOM_MARKER).is_file() and (path / "cc_projection").is_dir()
    except (OSError, ValueError):
        return False


build_zero123_random = partial(random_zero123_parts, ZERO123_UNET, ZERO123_VAE, ZERO123_VISION)
"""``build_zero123_random(seed=0)``: the full-size parts in memory (fp32, CPU)."""

__all__ = ["CAMERA_DIM", "MODEL_INDEX", "ZERO123_MODELS", "ZERO123_RANDOM", "ZERO123_TINY",
           "ZERO123_UNET", "ZERO123_VAE", "ZERO123_VISION", "Zero123Parts", "Zero123Random",
           "build_zero123_random", "is_zero123_random", "random_zero123_parts",
           "zero123_random_path"]
