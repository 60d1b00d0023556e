"""The models of ``rf bench prior-sharing``, saved to disk once like real checkpoints: "medium"
(Stable Diffusion's architecture at ~220M random parameters, for the CPU) and SD 1.5's size
(random weights, fp16, for a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rf_core.files.atomic import atomic_dir
from rf_core.prior.random_models import sd15_sized_components
from rf_core.prior.tiny import cache_root, tiny_vocab

__all__ = ["MEDIUM_SEED", "MEDIUM_VERSION", "build_medium_pipeline", "medium_model_path",
           "sd15_model_path"]

MEDIUM_VERSION = 1
"""Bump when the medium model's architecture changes so stale caches are rebuilt."""
MEDIUM_SEED = 0


def _saved(folder: str, make_pipeline: Callable[[], object]) -> Path:
    """``cache_root()/models/<folder>``, saved with ``save_pretrained`` on first use; written to
    a temporary folder and renamed, so concurrent builders and crashes leave no half model."""
    path = cache_root() / "models" / folder
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(path) as tmp:
            make_pipeline().save_pretrained(tmp)
    except OSError:
        if not (path / "model_index.json").exists():
            raise  # a real failure, not another process finishing the same build first
    return path


def _pipeline(unet, vae, text_encoder):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()  # the tiny model's tokenizer: vocabulary size costs no compute
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
        prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_medium_pipeline(seed: int = MEDIUM_SEED):
    """Stable Diffusion's architecture scaled to ~220M RANDOM parameters (0.9 GB fp32): UNet
    (192, 384, 768) at 32x32 latents, a 3-level VAE (128 px images), a 6-layer 768-wide CLIP
    text encoder. Big enough that weights dominate a process's memory, small enough that one
    SDS call takes about a second on a CPU core."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = tiny_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(192, 384, 768), cross_attention_dim=768, attention_head_dim=8,
            norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(64, 128, 256), norm_num_groups=32, sample_size=128,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=6,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    return _pipeline(unet, vae, text_encoder)


def medium_model_path() -> Path:
    """Folder of the saved medium model; built (deterministically, seconds) on first use."""
    return _saved(f"medium-v{MEDIUM_VERSION}", build_medium_pipeline)


def sd15_model_path() -> Path:
    """Folder of SD 1.5's architecture with random weights, saved in fp16 (~2 GB). UNTESTED."""
    def make():
        sd = sd15_sized_components("cpu", torch.float16)
        return _pipeline(sd.unet, sd.vae, sd.text_encoder)

    return _saved("sd15-size-v1", make)
