"""Load a Stable Diffusion checkpoint's components, offline, with one clear error when missing.

``ModelConfig.name`` may be:
  - a random-weight model name (``tiny``, ``tiny-v``, ``sd15-random``, ``sd21v-random``: the
    registry :data:`rf_core.prior.random_models.RANDOM_MODELS`), built offline on first use;
  - a local diffusers folder (with ``model_index.json``);
  - a single ``.safetensors`` / ``.ckpt`` file (diffusers' ``from_single_file``);
  - a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) already in the local HF cache.
Nothing is ever downloaded here: hub look-ups run with ``local_files_only=True``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rf_core.errors import UserError
from rf_core.precision import (
    DTYPES,
    device_field,
    parse_device,
    parse_precision,
    precision_field,
    resolve_device,
    resolve_dtype,
)
from rf_core.prior.attention import ATTENTION_BACKENDS, configure_models, resolve_attention
from rf_core.prior.components import SDComponents
from rf_core.prior.random_models import RANDOM_MODELS, is_random_model, random_model_path
from rf_core.prior.zero123_random import ZERO123_MODELS
from rf_core.progress import is_quiet

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_log = logging.getLogger(__name__)
_noted_random: set[str] = set()


class ModelNotFoundError(UserError, FileNotFoundError):
    """The requested diffusion model is neither a local path nor in the local hub cache."""


@dataclass
class ModelConfig:
    """Which prior to build (``rf_core.prior.make_prior``) and, for Stable Diffusion, which
    model to load and how to run it."""

    type: str = "stable-diffusion"
    """The prior: ``stable-diffusion``, ``oracle`` (ground-truth renders of the mesh ``name``),
    ``learned``, ``zero123`` / ``stable-zero123`` (a Zero-1-to-3 folder, docs/zero123.md) or
    ``none`` (no score distillation); more with ``rf_core.prior.register_prior``."""
    name: str = "tiny"
    """A random-weight model (``tiny``, ``tiny-v``, ``sd15-random``, ``sd21v-random``), a local
    folder or ``.safetensors`` file, or a cached hub id. For ``type: oracle``: the textured mesh
    (an OBJ path or ``pybullet_data:NAME.obj``)."""
    dtype: str = precision_field("auto")
    """Weights dtype: ``fp32`` (or ``no``), ``fp16``, ``bf16``; ``auto`` = fp16 on CUDA, fp32
    on the CPU."""
    device: str = device_field("auto")
    """``cpu``, ``cuda``, ``cuda:N``; ``auto`` = CUDA when available."""
    attention: str = "auto"
    """``auto`` (xformers on CUDA when usable, else SDPA), ``sdpa`` or ``xformers``."""
    attention_slicing: bool = False
    """Compute attention in slices: less memory, slower. For small GPUs."""
    vae_slicing: bool = False
    """Encode a batch through the VAE one image at a time."""
    channels_last: bool = False
    """UNet in channels-last memory format (often faster with fp16 on tensor cores)."""
    cpu_offload: bool = False
    """Keep models on the CPU and move each to the GPU only while it runs (accelerate hooks)."""
    single_file_config: str | None = None
    """For a single-file checkpoint: a local diffusers folder with its configs, for offline use."""

    def __post_init__(self) -> None:
        self.dtype = parse_precision(self.dtype, "dtype")
        self.device = parse_device(self.device, "device")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}; "
                             f"got {self.attention!r}")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device, "model.device")

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)


def place_models(cfg: ModelConfig, device: torch.device, unet, vae, *others) -> str:
    """Freeze a diffusion model's parts, set up the UNet's attention backend and ``cfg``'s
    memory options, and put every part on ``device`` (or, with ``cpu_offload`` on CUDA,
    behind accelerate's offload hooks, in the order given). Returns the attention backend."""
    models = (*others, vae, unet)
    for model in models:
        model.requires_grad_(False).eval()
    attention = resolve_attention(cfg.attention, device)
    configure_models(unet, vae, backend=attention, attention_slicing=cfg.attention_slicing,
                     vae_slicing=cfg.vae_slicing, channels_last=cfg.channels_last)
    if cfg.cpu_offload and device.type == "cuda":
        from accelerate import cpu_offload_with_hook

        hook = None
        for model in models:
            _, hook = cpu_offload_with_hook(model, device, prev_module_hook=hook)
    else:
        for model in models:
            model.to(device)
    return attention


def _not_found(name: str, detail: str) -> ModelNotFoundError:
    fetch = (f", download it once with `hf download {name}` where there is internet (it then "
             "loads offline from the cache)" if _HUB_ID.match(name) else "")
    close = difflib.get_close_matches(name, RANDOM_MODELS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if name in ZERO123_MODELS:
        hint = f" ({name} is a Zero-1-to-3 model: add model.type=zero123)"
    return ModelNotFoundError(
        f"model {name!r} not found ({detail}); pass a local diffusers folder or .safetensors "
        f"file{fetch}, or use --model tiny for the offline random-weight test model{hint}; "
        f"random-weight models: {', '.join(RANDOM_MODELS)}")


def locate_model(name: str, single_file_config: str | None = None) -> tuple[str, str]:
    """Where model ``name`` is, without loading it: (kind, path) with kind ``folder`` or
    ``file``. Raises ModelNotFoundError (one line, with what to do) when it is nowhere."""
    if name in RANDOM_MODELS:
        _quiet_hf_loading()  # the first use builds and saves it: no per-shard progress bars
        return "folder", str(random_model_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise _not_found(name, "the folder has no model_index.json")
        return "folder", str(path)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"model file {name!r} must be .safetensors or .ckpt")
        return "file", str(path)
    if not _HUB_ID.match(name):
        raise _not_found(name, "no such file or folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return "folder", snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError as err:
        raise _not_found(name, "not in the local Hugging Face cache") from err


def _pipeline_from(name: str, dtype: torch.dtype, single_file_config: str | None):
    _quiet_hf_loading()
    from diffusers import StableDiffusionPipeline

    common = {"dtype": dtype, "safety_checker": None, "feature_extractor": None,
              "requires_safety_checker": False}
    kind, path = locate_model(name, single_file_config)
    if kind == "folder":
        return StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **common)
    try:
        return StableDiffusionPipeline.from_single_file(
            path, local_files_only=True, config=single_file_config, **common)
    except (OSError, ValueError) as err:
        raise _not_found(name, "its diffusers configs are not cached; pass "
                         "model.single_file_config=FOLDER with a diffusers SD folder") from err


def _quiet_hf_loading() -> None:
    """Sub-second loads need no per-shard progress bars, and the pipeline import should not warn
    about image processors (torchvision) that the prior never uses."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def _note_random_weights(name: str) -> None:
    """One log line, once per process and model, that a random-weight model was loaded
    (silent in a ``quiet()`` block, with ``RF_QUIET=1``, and with ``RF_RANDOM_NOTED=1``: `rf`
    said so already)."""
    if (name in _noted_random or is_quiet()
            or os.environ.get("RF_RANDOM_NOTED") == "1"):
        return
    _noted_random.add(name)
    _log.warning("rf: note: model %r has RANDOM weights (built from configs in code): it runs "
                 "the real code path but as a prior knows nothing about objects", name)


def load_components(cfg: ModelConfig | None = None) -> SDComponents:
    """Load, freeze and place a Stable Diffusion model's tokenizer, text encoder, VAE, UNet and
    noise schedule; configure attention. Raises :class:`ModelNotFoundError` when missing.
    Loading a random-weight model logs one warning saying so (once per process and model)."""
    cfg = cfg or ModelConfig()
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    pipe = _pipeline_from(cfg.name, dtype, cfg.single_file_config)
    if is_random_model(cfg.name):
        _note_random_weights(cfg.name)
    from diffusers import DDPMScheduler

    # The training noise schedule (betas, prediction type) is all SDS needs; samplers differ.
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    attention = place_models(cfg, device, pipe.unet, pipe.vae, pipe.text_encoder)
    return SDComponents(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                        unet=pipe.unet, scheduler=scheduler, name=cfg.name, device=device,
                        dtype=dtype, attention=attention)


def describe(components: SDComponents) -> dict:
    """A JSON-able summary of what was loaded (for logs and benchmark tables)."""
    params = {k: sum(p.numel() for p in getattr(components, k).parameters())
              for k in ("unet", "vae", "text_encoder")}
    return {"model": components.name, "device": str(components.device),
            "dtype": str(components.dtype).removeprefix("torch."),
            "attention": components.attention, "prediction_type": components.prediction_type,
            "resolution": components.resolution, "parameters": params}


__all__ = ["DTYPES", "ModelConfig", "ModelNotFoundError", "SDComponents", "describe",
           "load_components", "locate_model"]
