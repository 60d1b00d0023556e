"""Load a Zero-1-to-3 checkpoint in the diffusers layout, offline, refusing pickled code.

``model.name`` (with ``model.type: zero123`` or ``stable-zero123``) may be:
  - a random-weight model (``zero123-random``, ``zero123-tiny``: ``zero123_random``), built
    offline on first use;
  - a local folder in the diffusers layout of kxic/zero123-xl (``scripts/
    convert_zero123_to_diffusers.py`` writes it; docs/zero123.md shows how, for Stable Zero123's
    single file too)::

        unet/            UNet2DConditionModel, 8 input channels (noisy latent ; photo latent)
        vae/             AutoencoderKL
        image_encoder/   CLIPVisionModelWithProjection (CLIP ViT-L/14)
        cc_projection/   Linear(768 + 4 -> 768): config.json + weights (``projection.*``);
                         ``clip_camera_projection/`` (``proj.*``, bennyguo/zero123-xl-diffusers)
                         is read too
        scheduler/       the noise schedule (its betas are what SDS uses)

  - a hub id (``kxic/zero123-xl``) already in the local Hugging Face cache.

Nothing is downloaded (``local_files_only``). Weights load from safetensors, or from ``.bin``
files with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling (a saved
module, not a dict of tensors) is refused, never executed. A missing model or component is one
line that says where it looked and what to do.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rf_core.errors import UserError
from rf_core.prior.components import LatentDiffusionParts
from rf_core.prior.loading import ModelConfig, ModelNotFoundError, place_models
from rf_core.prior.zero123_random import CAMERA_DIM, ZERO123_MODELS, is_zero123_random
from rf_core.progress import is_quiet

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_log = logging.getLogger(__name__)
_noted: set[str] = set()

DOC = "docs/zero123.md"
PROJECTIONS = {"cc_projection": "projection", "clip_camera_projection": "proj"}
"""Folder name of the camera projection -> the prefix of its weight names."""
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.bin.index.json")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                         "pytorch_model.bin.index.json")
COMPONENTS = {
    "unet": ("the 8-channel UNet", "config.json", _DIFFUSERS_WEIGHTS),
    "vae": ("the autoencoder", "config.json", _DIFFUSERS_WEIGHTS),
    "image_encoder": ("the CLIP vision encoder", "config.json", _TRANSFORMERS_WEIGHTS),
    "scheduler": ("the noise schedule", "scheduler_config.json", ()),
}
"""Component folder -> (what it is, its config file, weight files of which one must exist)."""
LAYOUT = ("unet/, vae/, image_encoder/, cc_projection/ and scheduler/ (the diffusers layout of "
          "kxic/zero123-xl)")


class UnsafeWeightsError(UserError, ValueError):
    """A weights file needs arbitrary unpickling (code, not tensors): refused."""


@dataclass
class Zero123Components(LatentDiffusionParts):
    """The frozen parts of a Zero-1-to-3 model that the prior needs."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    cc_projection: torch.nn.Linear
    scheduler: object
    name: str
    device: torch.device
    dtype: torch.dtype
    attention: str

    @property
    def clip_size(self) -> int:
        """The CLIP encoder's input side (224 for ViT-L/14)."""
        return int(self.image_encoder.config.image_size)


# ---------------------------------------------------------------------------- where
def _not_found(name: str, looked: str) -> ModelNotFoundError:
    fetch = (f"download it once with `hf download {name}` where there is internet (it then "
             "loads offline from the cache), or " if _HUB_ID.match(name) else "")
    return ModelNotFoundError(
        f"Zero-1-to-3 model {name!r} not found ({looked}); {fetch}pass a local folder in the "
        f"diffusers layout ({DOC} converts a single-file checkpoint), or use one of the "
        f"random-weight models {', '.join(ZERO123_MODELS)}")


def locate_zero123(name: str | os.PathLike) -> Path:
    """The folder of Zero-1-to-3 ``name`` (built first for a random-weight name), its
    components checked (``check_zero123_folder``). Raises ``ModelNotFoundError`` in one line."""
    name = str(name)
    if name in ZERO123_MODELS:
        _quiet_hf()
        return ZERO123_MODELS[name].path()
    path = Path(name).expanduser()
    if path.is_file():
        raise _not_found(name, f"{path} is a file, not a folder: convert it to the diffusers "
                         "layout first")
    if not path.is_dir():
        if not _HUB_ID.match(name):
            raise _not_found(name, f"no folder {path.resolve()}")
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(name, local_files_only=True))
        except LocalEntryNotFoundError as err:
            raise _not_found(name, f"no folder {path.resolve()}, and not in the Hugging Face "
                             f"cache {constants.HF_HUB_CACHE}") from err
    check_zero123_folder(path)
    return path


def projection_folder(path: Path) -> Path | None:
    """``cc_projection/`` or ``clip_camera_projection/`` under ``path``, if either exists."""
    return next((path / n for n in PROJECTIONS if (path / n).is_dir()), None)


def _missing(path: Path, component: str, what: str, detail: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Zero-1-to-3 folder {path} {detail} {component}/ ({what}); a Zero-1-to-3 model holds "
        f"{LAYOUT}: pass a complete folder, or convert a single-file checkpoint as {DOC} shows")


def check_zero123_folder(path: str | os.PathLike) -> None:
    """A one-line ``ModelNotFoundError`` unless every component folder is there with its config
    and weights (nothing is read beyond file names)."""
    path = Path(path)
    for component, (what, config, weights) in COMPONENTS.items():
        folder = path / component
        if not folder.is_dir():
            raise _missing(path, component, what, "has no")
        if not (folder / config).is_file():
            raise _missing(path, component, what, f"has no {config} in")
        if weights and not any((folder / w).is_file() for w in weights):
            raise _missing(path, component, what, f"has no weights ({weights[0]} or "
                           f"{weights[1]}) in")
    proj = projection_folder(path)
    if proj is None:
        raise _missing(path, "cc_projection", "the camera projection", "has no")
    if not _projection_files(proj):
        raise _missing(path, proj.name, "the camera projection", "has no weights (.safetensors "
                       "or .bin) in")


# ---------------------------------------------------------------------------- the projection
def _projection_files(folder: Path) -> list[Path]:
    """Candidate weight files, safetensors first."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return files + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors: safetensors, or ``torch.load(weights_only=True)``. A pickle
    that holds more than tensors is an ``UnsafeWeightsError`` (never unpickled)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeWeightsError(
            f"{file} is a pickle that holds code, not only tensors; refusing to load it (it "
            "could run anything): save its state_dict as safetensors (safetensors.torch."
            "save_file) where you trust it, or reconvert the checkpoint") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelNotFoundError(f"{file} is not a readable weights file ({err}); reconvert "
                                 f"the checkpoint ({DOC})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeWeightsError(f"{file} holds {type(state).__name__}, not a dict of tensors; "
                                 "save the projection's state_dict as safetensors")
    return state


def load_cc_projection(folder: Path) -> torch.nn.Linear:
    """The camera projection of ``folder`` (``cc_projection/`` or ``clip_camera_projection/``) as
    a float32 ``nn.Linear(D + 4, D')``."""
    prefix = PROJECTIONS.get(folder.name, "projection")
    files = _projection_files(folder)
    if not files:
        raise ModelNotFoundError(f"{folder} has no weights (.safetensors or .bin); reconvert "
                                 f"the checkpoint ({DOC})")
    state = read_tensors(files[0])
    state = {k.removeprefix(f"{prefix}.").removeprefix("cc_projection."): v
             for k, v in state.items()}
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or weight.dim() != 2 or weight.shape[1] <= CAMERA_DIM \
            or (bias is not None and bias.shape != weight.shape[:1]):
        raise ModelNotFoundError(
            f"{files[0]} is not a camera projection (want {prefix}.weight [D', D + 4] and "
            f"{prefix}.bias [D'], got {sorted(state)}); reconvert the checkpoint ({DOC})")
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


# ---------------------------------------------------------------------------- loading
def _quiet_hf() -> None:
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()  # the DDIM config read as DDPM lists keys DDPM does not use


def _note_random(name: str) -> None:
    if (name in _noted or is_quiet()
            or os.environ.get("RF_RANDOM_NOTED") == "1"):
        return
    _noted.add(name)
    _log.warning("rf: note: model %r has RANDOM weights (built from configs in code): it runs "
                 "the real code path but as a prior knows nothing about objects", name)


def _load(component: str, path: Path, load):
    """``load()``, with a pickle refused and other failures said in one line."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        cause, chain = err, []
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(c, pickle.UnpicklingError) for c in chain):
            raise UnsafeWeightsError(
                f"{path / component} holds a pickle with code, not only tensors; refusing to "
                "load it: reconvert the checkpoint with safetensors") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"could not load {component}/ of Zero-1-to-3 folder {path} "
                                 f"({first}); reconvert the checkpoint ({DOC})") from err


def load_zero123(cfg: ModelConfig | None = None) -> Zero123Components:
    """Load, freeze and place the Zero-1-to-3 model ``cfg.name``; configure attention.
    Raises ``ModelNotFoundError`` / ``UnsafeWeightsError`` (one line) when it cannot."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    cfg = cfg or ModelConfig(type="zero123", name="zero123-tiny")
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    path = locate_zero123(cfg.name)
    _quiet_hf()
    common = {"local_files_only": True, "dtype": dtype}
    unet = _load("unet", path, lambda: UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", **common))
    if unet.config.in_channels != 8:
        raise ModelNotFoundError(
            f"{path / 'unet'} has {unet.config.in_channels} input channels, not Zero-1-to-3's 8 "
            "(noisy latent ; photo latent): is this a Stable Diffusion folder? Use "
            "model.type=stable-diffusion for it")
    vae = _load("vae", path, lambda: AutoencoderKL.from_pretrained(path, subfolder="vae",
                                                                   **common))
    encoder = _load("image_encoder", path, lambda: CLIPVisionModelWithProjection.from_pretrained(
        path, subfolder="image_encoder", **common))
    scheduler = _load("scheduler", path, lambda: DDPMScheduler.from_config(
        DDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)))
    proj = load_cc_projection(projection_folder(path))
    want = (unet.config.cross_attention_dim, encoder.config.projection_dim + CAMERA_DIM)
    if tuple(proj.weight.shape) != want:
        raise ModelNotFoundError(
            f"{projection_folder(path)} maps {proj.in_features} -> {proj.out_features}, but this "
            f"UNet and CLIP encoder need {want[1]} -> {want[0]}; reconvert the checkpoint")
    proj = proj.to(dtype)
    if is_zero123_random(cfg.name):
        _note_random(cfg.name)
    attention = place_models(cfg, device, unet, vae, encoder, proj)
    return Zero123Components(unet=unet, vae=vae, image_encoder=encoder, cc_projection=proj,
                             scheduler=scheduler, name=cfg.name, device=device, dtype=dtype,
                             attention=attention)


def describe_zero123(components: Zero123Components) -> dict:
    """A JSON-able summary of what was loaded (for logs and benchmark tables)."""
    params = {k: sum(p.numel() for p in getattr(components, k).parameters())
              for k in ("unet", "vae", "image_encoder", "cc_projection")}
    return {"model": components.name, "device": str(components.device),
            "dtype": str(components.dtype).removeprefix("torch."),
            "attention": components.attention, "prediction_type": components.prediction_type,
            "resolution": components.resolution, "parameters": params}


__all__ = ["COMPONENTS", "PROJECTIONS", "UnsafeWeightsError", "Zero123Components",
           "check_zero123_folder", "describe_zero123", "load_cc_projection", "load_zero123",
           "locate_zero123", "projection_folder", "read_tensors"]
