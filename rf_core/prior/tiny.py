"""The offline tiny Stable Diffusion: every component built from configs in code.

Its weights are RANDOM (seeded). It exists so that inversion, SDS and whole reconstructions run
and are tested where no checkpoint can be downloaded; its "prior" carries no knowledge of objects.
It is written to disk with ``save_pretrained`` and read back by the same loader as a real
checkpoint, so the code path is the real one.

    tiny    epsilon prediction (like SD 1.x), 64 px images, 16x16x4 latents
    tiny-v  v prediction (like SD 2.x), otherwise the same

Full-size random-weight models (``sd15-random``, ``sd21v-random``) and the registry of every
random-weight model name are in :mod:`rf_core.prior.random_models`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

# Bump when the architecture or tokenizer changes so stale caches are rebuilt.
TINY_VERSION = 1
TINY_MODELS = {"tiny": "epsilon", "tiny-v": "v_prediction"}
TINY_RESOLUTION = 64
TINY_SEED = 0
RANDOM_MARKER = "rf_random_weights.json"
"""Written into the folder of every saved random-weight model, so that loading it by path can
still say that its weights are random."""

# Whole words in the tiny tokenizer's BPE merges, so that initializer words and prompt words are
# single tokens as they are in CLIP's real vocabulary; any other text falls back to characters.
_WORDS = (
    "a an the of image photo picture high resolution dslr view front side back overhead "
    "object thing toy duck cat statue bird dog teddy bear fish cactus teapot microphone cup mug "
    "chair car ball plant vase shoe stone rabbit horse figure colorful real"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: each byte maps to a printable unicode character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (bytes, bytes + ``</w>``, whole words) and its merges."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        current = word[0]
        for i, ch in enumerate(word[1:]):
            nxt = ch + ("</w>" if i == len(word) - 2 else "")
            merges.append((current, nxt))
            current += nxt
            tokens.append(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, list(dict.fromkeys(merges))


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = TINY_SEED):
    """A ``StableDiffusionPipeline`` with a few-hundred-thousand random parameters."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"]))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION)
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 4, in_channels=4, out_channels=4,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
        prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def cache_root() -> Path:
    """Where built random-weight models live: ``$RF_CACHE`` or ``~/.cache/realfusion-ray``."""
    return Path(os.environ.get("RF_CACHE", Path.home() / ".cache" / "realfusion-ray"))


def saved_pipeline_path(folder: str, make_pipeline: Callable[[], object],
                        info: dict | None = None) -> Path:
    """``cache_root()/models/<folder>``: built by ``make_pipeline()`` and written with
    ``save_pretrained`` (safetensors) on first use, into a temporary folder that is then renamed,
    so concurrent builders and crashes never leave a half model. The folder gets a
    ``RANDOM_MARKER`` file (``info`` as JSON) saying its weights are random. Shared by every
    random-weight model (:mod:`rf_core.prior.random_models`)."""
    path = cache_root() / "models" / folder
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=path.parent))
    try:
        make_pipeline().save_pretrained(tmp, safe_serialization=True)
        marker = {"folder": folder, **(info or {}), "random_weights": True}
        (tmp / RANDOM_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "model_index.json").exists():
                raise  # a real failure, not another process finishing the same build first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_path(name: str = "tiny") -> Path:
    """Folder of the saved tiny pipeline ``name``; built (deterministically) on first use."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    return saved_pipeline_path(f"{name}-v{TINY_VERSION}",
                               lambda: build_tiny_pipeline(TINY_MODELS[name]),
                               {"name": name, "version": TINY_VERSION, "seed": TINY_SEED})
