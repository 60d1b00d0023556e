"""Random-weight Stable Diffusion models, built from configs in code: the registry of names.

Every name in :data:`RANDOM_MODELS` works the same way wherever ``--model`` /
``ModelConfig.name`` is accepted: the pipeline is built with a fixed seed, saved once with
``save_pretrained`` (fp32 safetensors) to ``cache_root()/models/NAME-vN`` (atomically), and read
back by the normal loader (``StableDiffusionPipeline.from_pretrained(local_files_only=True)``).
Their weights are RANDOM: they exercise the real code paths at the real sizes (memory, speed,
token ids, embedding tables), but as priors they know nothing about objects.

    tiny          ~1M parameters, 64 px, epsilon        (rf_core.prior.tiny)
    tiny-v        the same, v prediction                (rf_core.prior.tiny)
    sd15-random   Stable Diffusion 1.5's architecture: 512 px, epsilon, CLIP ViT-L/14 text
                  encoder, ~1.07B parameters (4.3 GB in fp32)
    sd21v-random  Stable Diffusion 2.1 (768-v)'s architecture: 768 px, v prediction,
                  OpenCLIP ViT-H text encoder as diffusers loads it, ~1.29B parameters

The full-size models are built with their parameters on the ``meta`` device (accelerate's
``init_empty_weights``; buffers stay real), then every parameter is filled from its own
seeded numpy PCG64 stream (seed and parameter name), on a few threads: deterministic for the
seed, independent of thread count and build order, and about 2-3x faster than PyTorch's default
initialisation on 2 CPU cores (where writing 4.3 GB of fresh memory is the rest of the time).
Distributions follow each layer's default init: Linear/Conv weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's ``kaiming_uniform_(a=sqrt(5))`` and bias rule),
norms weight 1 / bias 0, embeddings std 0.02 (CLIP's ``_init_weights``; drawn uniform, not
normal, for speed). Every block normalises its input (GroupNorm/LayerNorm), so activations stay
O(1): over a full-size sd15-random UNet call (64x64 latents), VAE encode (512 px) and text
encoder call in fp32, the largest |activation| of any module was ~6 (fp16 overflows at 65504),
and the UNet output, VAE latents and text states are finite with fp16 and bf16 weights and
under bf16 autocast. No extra scaling of the init is needed.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rf_core.prior.components import SDComponents
from rf_core.prior.tiny import (
    RANDOM_MARKER,
    TINY_MODELS,
    TINY_RESOLUTION,
    TINY_SEED,
    TINY_VERSION,
    build_tiny_pipeline,
    saved_pipeline_path,
    tiny_vocab,
)

RANDOM_VERSION = 1
"""Bump when a full-size random model's architecture, tokenizer or init changes (stale caches
are then rebuilt under a new folder)."""
RANDOM_SEED = 0
SD15_RANDOM = "sd15-random"
SD21V_RANDOM = "sd21v-random"
MARKER_FILE = RANDOM_MARKER

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
"""``<|startoftext|>``, as in CLIP's real vocabulary."""
CLIP_EOS_ID = 49407
"""``<|endoftext|>``, as in CLIP's real vocabulary."""
CLIP_MAX_LENGTH = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------------------- tokenizer
# Whole words added to the tiny vocabulary's (rf_core.prior.tiny._WORDS): the other view words,
# words of common negative prompts, and common object names to start textual inversion from.
_EXTRA_WORDS = (
    "bottom top left right up down close in on with and or at from low blurry quality render "
    "model background white black red green blue yellow brown grey gray pink purple small large "
    "big wooden metal plastic ceramic glass paper cute old new person man woman child face head "
    "hand robot doll monkey elephant giraffe turtle frog owl penguin lion tiger sheep cow pig "
    "chicken dragon dinosaur mouse fox deer wolf panda unicorn lamp apple banana orange lemon "
    "pear strawberry pumpkin mushroom flower tree rock shell bottle bowl jar pot kettle candle "
    "basket box bag backpack hat helmet boot sneaker book clock camera phone keyboard guitar "
    "robot sculpture bust skull house castle tower bridge truck bus train plane boat bike "
    "motorcycle rocket bench table sofa bed pillow umbrella donut burger pizza sandwich bread "
    "cake cookie"
).split()


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lowercase word: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        first = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == first:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clip_sized_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny model's byte-level BPE vocabulary and merges (same ids), plus whole-word merges
    for ``_EXTRA_WORDS``, padded with unreachable filler entries (``<|unusedN|>``) to CLIP's
    49408 tokens, with ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407 as in CLIP.
    Prompt, view and initializer words are single tokens."""
    vocab, merges = tiny_vocab()
    tokens = [t for t in vocab if t not in (_BOS, _EOS)]  # dicts keep id order
    known = set(tokens)
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in dict.fromkeys(_EXTRA_WORDS):
        # Join whatever the merges so far leave of the word, left to right: new merges rank
        # after all existing ones, so the tiny vocabulary's words tokenize as before.
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                tokens.append(pair[0] + pair[1])
    fillers = [f"<|unused{i}|>" for i in range(CLIP_VOCAB_SIZE - 2 - len(tokens))]
    tokens = [*tokens, *fillers, _BOS, _EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_sized_tokenizer(pad_token: str = _EOS):
    """A ``CLIPTokenizer`` over :func:`clip_sized_vocab` (77 tokens per prompt). ``pad_token``:
    ``<|endoftext|>`` as SD 1.x's tokenizer, ``!`` as SD 2.x's."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_sized_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token,
                         model_max_length=CLIP_MAX_LENGTH)


# ---------------------------------------------------------------------------- configs
# Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5's unet/vae/text_encoder
# configs; UNet2DConditionModel's defaults supply the rest: silu, 32 groups, eps 1e-5).
_SD_UNET = {
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_UNET = {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
# Stable Diffusion 2.1 (768-v). Checked against diffusers 0.42's own conversion code:
# loaders/single_file_utils.py and pipelines/stable_diffusion/convert_from_ckpt.py
# (create_unet_diffusers_config) map SD 2's LDM config (use_linear_in_transformer: True,
# num_head_channels 64, model_channels 320, channel_mult [1,2,4,4], context_dim 1024) to
# use_linear_projection=True and attention_head_dim = 320 // 64 * mult = [5, 10, 20, 20];
# the "v2" default image size there is 768 (sample_size 768 / 8 = 96); convert_from_ckpt sets
# upcast_attention=True for SD 2.1 ("v2.1 needs to upcast attention"); and
# convert_open_clip_checkpoint keeps num_hidden_layers == 23 of OpenCLIP ViT-H's 24 layers
# for "stabilityai/stable-diffusion-2" (SD 2 conditions on the penultimate layer).
SD21V_UNET = {**_SD_UNET, "sample_size": 96, "cross_attention_dim": 1024,
              "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
              "upcast_attention": True}
_SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.18215,
}
SD15_VAE = {**_SD_VAE, "sample_size": 512}
SD21V_VAE = {**_SD_VAE, "sample_size": 768}  # the same autoencoder; its config says 768
_CLIP_IDS = {"vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": CLIP_MAX_LENGTH,
             "layer_norm_eps": 1e-5, "bos_token_id": CLIP_BOS_ID, "eos_token_id": CLIP_EOS_ID,
             "pad_token_id": CLIP_EOS_ID}
SD15_TEXT = {**_CLIP_IDS, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
"""CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14)."""
SD21V_TEXT = {**_CLIP_IDS, "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 23, "num_attention_heads": 16, "hidden_act": "gelu",
              "projection_dim": 512}
"""OpenCLIP ViT-H/14's text tower as diffusers loads it for SD 2.x (23 of 24 layers)."""
_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1}
"""SD's training noise schedule. Saved as a DDPMScheduler (as tiny): load_components turns any
checkpoint's scheduler into one anyway; the betas are what SDS uses."""


# ---------------------------------------------------------------------------- fast seeded init
_EMBEDDING_STD = 0.02


def _init_rule(module: torch.nn.Module, pname: str, param: torch.Tensor) -> tuple[str, float]:
    """("ones" | "zeros" | "uniform", bound) for one parameter, as its layer's default init."""
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return ("ones", 0.0) if pname == "weight" else ("zeros", 0.0)
    if isinstance(module, torch.nn.Embedding):
        return "uniform", _EMBEDDING_STD * math.sqrt(3.0)
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and pname in ("weight", "bias"):
        fan_in = module.weight[0].numel()
        return "uniform", 1.0 / math.sqrt(fan_in)
    raise TypeError(f"no init rule for parameter {pname!r} of {type(module).__name__}")


def seeded_uniform(seed: int, name: str, shape: tuple[int, ...] | torch.Size,
                   bound: float) -> torch.Tensor:
    """U(-bound, bound) float32 values of parameter ``name``, from its own PCG64 stream."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    values = torch.empty(tuple(shape), dtype=torch.float32)
    # Drawn into torch's memory: numpy's own (huge-page advised) allocation faults in slower.
    rng.random(dtype=np.float32, out=values.numpy())  # U[0, 1)
    return values.mul_(2 * bound).sub_(bound)


def fill_random_(model: torch.nn.Module, seed: int = RANDOM_SEED, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 threads: int | None = None) -> torch.nn.Module:
    """Replace every parameter of ``model`` (typically on ``meta``) by a new one on ``device`` in
    ``dtype``, drawn from a numpy PCG64 stream seeded by ``(seed, crc32(name))``: deterministic
    for the seed whatever the thread count. Returns ``model``."""
    entries, seen = [], {}
    for mname, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is not None:
                entries.append((f"{mname}.{pname}" if mname else pname, module, pname, param))
    device = torch.device(device)

    def make(entry) -> torch.Tensor:
        qname, module, pname, param = entry
        kind, bound = _init_rule(module, pname, param)
        if kind == "ones":
            return torch.ones(param.shape, device=device, dtype=dtype)
        if kind == "zeros":
            return torch.zeros(param.shape, device=device, dtype=dtype)
        return seeded_uniform(seed, qname, param.shape, bound).to(device=device, dtype=dtype)

    workers = threads or max(1, min(8, torch.get_num_threads()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # numpy's generators and torch's kernels release the GIL: the threads run in parallel.
        for (_, module, pname, param), value in zip(entries, pool.map(make, entries)):
            if id(param) not in seen:  # tied parameters stay tied
                seen[id(param)] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[pname] = seen[id(param)]
    return model


def _empty_models(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, *, meta_buffers: bool):
    """UNet, VAE and text encoder with parameters on ``meta`` (buffers real unless
    ``meta_buffers``): shapes and configs, no memory, no init time."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=meta_buffers):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return unet, vae, text_encoder


@dataclass(frozen=True)
class _Arch:
    unet: dict
    vae: dict
    text: dict
    prediction_type: str
    pad_token: str


_ARCHS = {
    SD15_RANDOM: _Arch(SD15_UNET, SD15_VAE, SD15_TEXT, "epsilon", _EOS),
    SD21V_RANDOM: _Arch(SD21V_UNET, SD21V_VAE, SD21V_TEXT, "v_prediction", "!"),
}


def random_sd_models(name: str = SD15_RANDOM, seed: int = RANDOM_SEED, *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder) of ``sd15-random`` / ``sd21v-random`` with seeded random
    weights on ``device`` in ``dtype``; ``device="meta"`` gives shapes only (instant)."""
    arch = _arch(name)
    meta = torch.device(device).type == "meta"
    models = _empty_models(arch.unet, arch.vae, arch.text, meta_buffers=meta)
    if not meta:
        for model in models:
            fill_random_(model, seed, device=device, dtype=dtype)
            torch.nn.Module.to(model, device)  # the (real) buffers follow
    return models


def _arch(name: str) -> _Arch:
    if name not in _ARCHS:
        raise ValueError(f"unknown full-size random model {name!r}; choose one of "
                         f"{', '.join(sorted(_ARCHS))}")
    return _ARCHS[name]


def random_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_SCHEDULE, prediction_type=prediction_type)


def build_random_pipeline(name: str = SD15_RANDOM, seed: int = RANDOM_SEED):
    """A ``StableDiffusionPipeline`` of ``sd15-random`` or ``sd21v-random`` (fp32, CPU)."""
    from diffusers import StableDiffusionPipeline

    arch = _arch(name)
    unet, vae, text_encoder = random_sd_models(name, seed)
    for model in (unet, vae, text_encoder):
        model.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_sized_tokenizer(arch.pad_token),
        unet=unet, scheduler=random_scheduler(arch.prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class RandomModel:
    """One random-weight model name: what it is and how it is built."""

    name: str
    prediction_type: str
    resolution: int
    """Native image side in pixels."""
    version: int
    seed: int
    build: Callable[[], object]
    """Builds the ``StableDiffusionPipeline`` (deterministic)."""
    summary: str

    @property
    def folder(self) -> str:
        """Its folder under ``cache_root()/models``."""
        return f"{self.name}-v{self.version}"

    def path(self) -> Path:
        """The saved model's folder; built and saved on first use."""
        return saved_pipeline_path(self.folder, self.build,
                                   {"name": self.name, "version": self.version, "seed": self.seed})


def _tiny(name: str) -> RandomModel:
    return RandomModel(name, TINY_MODELS[name], TINY_RESOLUTION, TINY_VERSION, TINY_SEED,
                       partial(build_tiny_pipeline, TINY_MODELS[name]),
                       "~1M-parameter test model")


RANDOM_MODELS: dict[str, RandomModel] = {
    "tiny": _tiny("tiny"),
    "tiny-v": _tiny("tiny-v"),
    SD15_RANDOM: RandomModel(SD15_RANDOM, "epsilon", 512, RANDOM_VERSION, RANDOM_SEED,
                             partial(build_random_pipeline, SD15_RANDOM),
                             "Stable Diffusion 1.5's architecture"),
    SD21V_RANDOM: RandomModel(SD21V_RANDOM, "v_prediction", 768, RANDOM_VERSION, RANDOM_SEED,
                              partial(build_random_pipeline, SD21V_RANDOM),
                              "Stable Diffusion 2.1 (768-v)'s architecture"),
}
"""Every random-weight model name accepted as ``--model`` / ``ModelConfig.name``."""


def random_model_path(name: str) -> Path:
    """Folder of the saved random-weight model ``name``; built (deterministically) on first use.
    ``tiny`` / ``tiny-v`` land where :func:`rf_core.prior.tiny.tiny_model_path` puts them."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random-weight model {name!r}; choose one of "
                         f"{', '.join(RANDOM_MODELS)}")
    return RANDOM_MODELS[name].path()


def is_random_model(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a registered random-weight model name or a folder one was saved to."""
    if str(name) in RANDOM_MODELS:
        return True
    try:
        return (Path(name).expanduser() / MARKER_FILE).is_file()
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------- in memory
def sd15_sized_components(device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16,
                          attention: str = "sdpa", seed: int = RANDOM_SEED,
                          name: str = "sd15-size"):
    """``sd15-random``'s UNet, VAE, CLIP ViT-L/14 text encoder, 49408-token tokenizer and noise
    schedule, built in memory straight on ``device`` in ``dtype`` (nothing saved or loaded),
    frozen, with the attention backend applied as ``load_components`` does. For benchmarks:
    the weights are the same seeded random ones as the saved ``sd15-random``."""
    from rf_core.prior.attention import configure_models

    device = torch.device(device)
    unet, vae, text_encoder = random_sd_models(SD15_RANDOM, seed, device=device, dtype=dtype)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False).eval()
    configure_models(unet, vae, backend=attention)
    return SDComponents(tokenizer=clip_sized_tokenizer(), text_encoder=text_encoder, vae=vae,
                        unet=unet, scheduler=random_scheduler("epsilon"), name=name,
                        device=device, dtype=dtype, attention=attention)


__all__ = ["CLIP_BOS_ID", "CLIP_EOS_ID", "CLIP_VOCAB_SIZE", "RANDOM_MODELS", "SD15_RANDOM",
           "SD21V_RANDOM", "RandomModel", "build_random_pipeline", "clip_sized_tokenizer",
           "clip_sized_vocab", "fill_random_", "is_random_model", "random_model_path",
           "random_sd_models", "sd15_sized_components", "seeded_uniform"]
