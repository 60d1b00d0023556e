"""A small learned novel-view model in Zero-1-to-3's form (Liu et al. 2023), in pixel space.

Given the conditioning view of an object (``cond``: rgba in [0, 1], rgb over white, alpha the
mask) and the relative camera of the wanted view (``camera``: ``camera_features`` numbers from
:mod:`rf_core.prior.novel_view.geometry`), it answers the object as seen from there. As in
Zero-1-to-3 the conditioning view is concatenated with the UNet's input and the camera is added
to the timestep embedding (through a small MLP, diffusers' ``class_embed_type="identity"``).

One class, two kinds (``NovelViewConfig.kind``):

- ``regressor``: one UNet pass at t = 0 with the target channels zeroed predicts the target's
  rgba logits. Deterministic, so it blurs what it cannot know, but on 2 CPU cores it is the kind
  that beats the copy-the-input baseline in minutes.
- ``diffusion``: a DDPM over the target rgba in [-1, 1] (epsilon or v prediction) with
  conditioning dropout for classifier-free guidance (Ho & Salimans 2022).

Both answer ``predict(cond, camera)`` (rgba in [0, 1]) and, for score distillation,
``eps(noisy, t, cond, camera)`` and ``predict_x0(...)`` with ``noisy`` in [-1, 1] under the
model's noise schedule. Weights travel as a diffusers-style folder: ``config.json`` +
``model.safetensors`` (:meth:`NovelViewModel.save_pretrained`, :meth:`~NovelViewModel.
from_pretrained`); nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rf_core.config import ConfigError, bounded, build, to_dict
from rf_core.errors import UserError
from rf_core.files.atomic import atomic_write, atomic_write_json

__all__ = ["CONFIG_NAME", "KINDS", "WEIGHTS_NAME", "NovelViewConfig", "NovelViewModel",
           "NovelViewModelError", "NovelViewModelNotFoundError"]

KINDS = ("regressor", "diffusion")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "NovelViewModel"
FORMAT_VERSION = 1
WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_TRAIN_HINT = "train one with `rf prior train --out DIR` and pass DIR/model"


class NovelViewModelError(UserError, ValueError):
    """A novel-view model folder cannot be used; ``str(err)`` says what is wrong and what to do."""


class NovelViewModelNotFoundError(NovelViewModelError, FileNotFoundError):
    """The novel-view model folder (or one of its two files) does not exist."""


@dataclasses.dataclass
class NovelViewConfig:
    """Architecture, losses and sampling of a :class:`NovelViewModel`. Defaults build the
    1.1M-parameter 32 px regressor sized for training on 2 CPU cores."""

    kind: str = "regressor"
    """``regressor`` (one deterministic pass predicts the target rgba) or ``diffusion`` (a
    DDPM over the target rgba, conditioned on the view and camera)."""
    size: int = bounded(32, lo=8)
    """Image side in pixels, of the conditioning view and the prediction (32; 64 works, ~4x the
    compute). A multiple of 2 ** (levels - 1)."""
    camera_features: int = bounded(6, lo=1)
    """Length of the relative-camera vector; equals ``geometry.CAMERA_FEATURES``."""
    block_out_channels: list[int] = bounded([32, 64, 64], lo=8)
    """UNet channels per resolution level (32, 16, 8 px at size 32)."""
    attention: list[bool] = dataclasses.field(default_factory=lambda: [False, False, True])
    """Self-attention in each level's blocks (one entry per level; the coarsest only by
    default: attention at 32 px costs more than it gives on 2 cores)."""
    layers_per_block: int = bounded(1, lo=1)
    """ResNet blocks per down level (the up path has one more, as in diffusers)."""
    norm_num_groups: int = bounded(8, lo=1)
    """GroupNorm groups; divides every entry of ``block_out_channels``."""
    attention_head_dim: int = bounded(32, lo=1)
    """Channels per attention head."""
    camera_hidden: int = bounded(128, lo=1)
    """Hidden width of the MLP that maps the camera to the timestep embedding."""
    rgb_loss: str = "l1"
    """Regressor loss on rgb (over white): ``l1`` (the median of what the target may be, less
    grey than the mean where the view is ambiguous) or ``l2``."""
    alpha_loss: str = "bce"
    """Regressor loss on alpha: ``bce`` on the logit (the mask is a per-pixel Bernoulli; BCE
    keeps a gradient where a sigmoid has saturated on the wrong side) or ``l2``."""
    alpha_weight: float = bounded(1.0, lo=0)
    """Weight of the regressor's alpha loss relative to its rgb loss."""
    prediction_type: str = "v_prediction"
    """Diffusion target: ``epsilon`` or ``v_prediction`` (Salimans & Ho 2022; better behaved
    at the high noise levels that dominate a few-step sampler and SDS)."""
    beta_schedule: str = "squaredcos_cap_v2"
    """Noise schedule (diffusers name). The cosine schedule (Nichol & Dhariwal 2021) suits
    small pixel-space images, where the linear one destroys the signal too early."""
    num_train_timesteps: int = bounded(1000, lo=2)
    """Timesteps T of the noise schedule."""
    cond_dropout: float = bounded(0.1, lo=0, hi=1, hi_open=True)
    """Diffusion training: the chance that a pair's conditioning view and camera are zeroed,
    teaching the unconditional model that classifier-free guidance needs."""
    sample_steps: int = bounded(20, lo=1)
    """DDIM steps of ``predict`` (diffusion)."""
    guidance_scale: float = bounded(3.0, lo=0)
    """Classifier-free guidance scale of ``predict``, ``eps`` and ``predict_x0`` when the call
    gives none (1: conditional only; 0: unconditional only)."""

    def __post_init__(self) -> None:
        for name, value, choices in (("kind", self.kind, KINDS),
                                     ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                     ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                     ("rgb_loss", self.rgb_loss, ("l1", "l2")),
                                     ("alpha_loss", self.alpha_loss, ("bce", "l2"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        levels = len(self.block_out_channels)
        if len(self.attention) != levels:
            raise ValueError(f"attention has {len(self.attention)} entries but "
                             f"block_out_channels has {levels} levels; give one per level")
        if self.size % 2 ** (levels - 1):
            raise ValueError(f"size {self.size} is not a multiple of {2 ** (levels - 1)} (the "
                             f"{levels} levels halve it {levels - 1} times)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide the "
                             f"channels {bad}")


def _unet(cfg: NovelViewConfig):
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(
        sample_size=cfg.size, in_channels=8, out_channels=4,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim, class_embed_type="identity")


def _schedule_kwargs(cfg: NovelViewConfig) -> dict:
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
            "prediction_type": cfg.prediction_type, "clip_sample": True, "clip_sample_range": 1.0}


def _timesteps(t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` (an int, a 0-d or a [B] tensor) as a long tensor [B]."""
    t = torch.as_tensor(t, device=device).long()
    return t.expand(batch) if t.dim() == 0 else t


class NovelViewModel(nn.Module):
    """The novel-view UNet. Images are [B, 4, S, S] rgba; ``camera`` is [B, F] with
    F = ``cfg.camera_features``.

    Spaces: ``cond``, ``target`` and ``predict``'s answer are rgba in [0, 1]; ``noisy`` and
    ``predict_x0``'s answer are the same images mapped to [-1, 1] (x0 = 2 rgba - 1) under the
    noise schedule ``alphas_cumprod`` [T].
    """

    def __init__(self, cfg: NovelViewConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or NovelViewConfig()
        self.unet = _unet(cfg)
        temb = self.unet.time_embedding.linear_2.out_features
        self.camera_mlp = nn.Sequential(nn.Linear(cfg.camera_features, cfg.camera_hidden),
                                        nn.SiLU(), nn.Linear(cfg.camera_hidden, temb))
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(**_schedule_kwargs(cfg))
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.float().clone(),
                             persistent=False)
        self.metadata: dict[str, Any] = {}
        """What ``from_pretrained`` read beside the config (data, training summary)."""

    # ------------------------------------------------------------------ the network

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, sample: torch.Tensor, timesteps: int | torch.Tensor, cond: torch.Tensor,
                camera: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The raw UNet output [B, 4, S, S]: eps or v (diffusion), rgba logits (regressor).

        sample: [B, 4, S, S] the noisy target in [-1, 1] (zeros for the regressor);
        timesteps: int or [B]; cond: [B, 4, S, S] rgba in [0, 1]; camera: [B, F];
        drop: [B] bool, pairs whose view and camera are zeroed (the unconditional model).
        """
        view = cond * 2 - 1
        if drop is not None:
            keep = (~drop).to(view.dtype)
            view, camera = view * keep[:, None, None, None], camera * keep[:, None]
        emb = self.camera_mlp(camera)
        t = _timesteps(timesteps, sample.shape[0], sample.device)
        return self.unet(torch.cat([sample, view], dim=1), t, class_labels=emb).sample

    def _logits(self, cond: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """Regressor: rgba logits [B, 4, S, S] from one pass at t = 0, target input zeroed."""
        return self(torch.zeros_like(cond), 0, cond, camera)

    def _guided(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                camera: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Diffusion: the classifier-free-guided output u + s (c - u), in one batched pass."""
        if guidance_scale == 1.0:
            return self(noisy, t, cond, camera)
        batch = noisy.shape[0]
        drop = torch.arange(2 * batch, device=noisy.device) < batch
        out = self(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([cond, cond]),
                   torch.cat([camera, camera]), drop)
        uncond, conditional = out.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    def _alphas(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) as [B, 1, 1, 1]."""
        a = self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    # ------------------------------------------------------------------ noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor,
                  t: int | torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise: [B, 4, S, S] in [-1, 1]."""
        sa, sb = self._alphas(_timesteps(t, x0.shape[0], x0.device))
        return sa * x0 + sb * noise

    def eps(self, noisy: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor,
            camera: torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """The guided noise estimate [B, 4, S, S] of ``noisy`` at timestep ``t``.

        noisy: [B, 4, S, S] in model space; t: int or [B] in [0, T). The regressor answers the
        noise its x0 implies, (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), so SDS runs on either kind.
        """
        t = _timesteps(t, noisy.shape[0], noisy.device)
        sa, sb = self._alphas(t)
        if self.cfg.kind == "regressor":
            x0 = torch.sigmoid(self._logits(cond, camera)) * 2 - 1
            return (noisy - sa * x0) / sb.clamp_min(1e-4)
        out = self._guided(noisy, t, cond, camera, self._scale(guidance_scale))
        return out if self.cfg.prediction_type == "epsilon" else sa * out + sb * noisy

    def predict_x0(self, noisy: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor,
                   camera: torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """The guided estimate [B, 4, S, S] of the clean target in [-1, 1] (not clamped).

        The regressor ignores ``noisy`` and ``t``: its x0 is its prediction.
        """
        t = _timesteps(t, noisy.shape[0], noisy.device)
        if self.cfg.kind == "regressor":
            return torch.sigmoid(self._logits(cond, camera)) * 2 - 1
        sa, sb = self._alphas(t)
        out = self._guided(noisy, t, cond, camera, self._scale(guidance_scale))
        if self.cfg.prediction_type == "epsilon":
            return (noisy - sb * out) / sa
        return sa * noisy - sb * out

    def _scale(self, guidance_scale: float | None) -> float:
        return self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)

    # ------------------------------------------------------------------ training and inference

    def loss(self, cond: torch.Tensor, target: torch.Tensor, camera: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss (a scalar) of one batch: cond, target [B, 4, S, S] in [0, 1],
        camera [B, F]. ``generator`` draws the diffusion's timesteps, noise and dropout."""
        if self.cfg.kind == "regressor":
            logits = self._logits(cond, camera)
            rgb = torch.sigmoid(logits[:, :3])
            rgb_loss = (F.l1_loss if self.cfg.rgb_loss == "l1" else F.mse_loss)(rgb, target[:, :3])
            if self.cfg.alpha_loss == "bce":
                alpha_loss = F.binary_cross_entropy_with_logits(logits[:, 3], target[:, 3])
            else:
                alpha_loss = F.mse_loss(torch.sigmoid(logits[:, 3]), target[:, 3])
            return rgb_loss + self.cfg.alpha_weight * alpha_loss
        batch, device = target.shape[0], target.device
        x0 = target * 2 - 1
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, self.cfg.num_train_timesteps, (batch,), generator=generator,
                          device=device)
        drop = torch.rand(batch, generator=generator, device=device) < self.cfg.cond_dropout
        out = self(self.add_noise(x0, noise, t), t, cond, camera, drop)
        if self.cfg.prediction_type == "epsilon":
            return F.mse_loss(out, noise)
        sa, sb = self._alphas(t)
        return F.mse_loss(out, sa * noise - sb * x0)  # v = sqrt(a) eps - sqrt(1 - a) x0

    @torch.no_grad()
    def predict(self, cond: torch.Tensor, camera: torch.Tensor, *, steps: int | None = None,
                guidance_scale: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The target view [B, 4, S, S] rgba in [0, 1] from cond [B, 4, S, S] and camera [B, F].

        Regressor: one pass. Diffusion: a DDIM sampler (eta 0, ``steps`` or ``cfg.sample_steps``
        trailing timesteps, so the first is T - 1) with classifier-free guidance; the answer is
        the last step's x0 estimate. ``generator`` draws the starting noise.
        """
        if self.cfg.kind == "regressor":
            return torch.sigmoid(self._logits(cond, camera))
        from diffusers import DDIMScheduler

        sampler = DDIMScheduler(**_schedule_kwargs(self.cfg), timestep_spacing="trailing",
                                set_alpha_to_one=False)
        sampler.set_timesteps(steps or self.cfg.sample_steps, device=cond.device)
        x = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
        scale, x0 = self._scale(guidance_scale), x
        for t in sampler.timesteps:
            out = self._guided(x, _timesteps(t, x.shape[0], x.device), cond, camera, scale)
            stepped = sampler.step(out, t, x, eta=0.0)
            x, x0 = stepped.prev_sample, stepped.pred_original_sample
        return ((x0 + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ the folder

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None,
                        weights_dtype: str = "float32") -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``folder`` (made if missing).

        ``metadata`` (JSON: the data config, a training summary) goes into config.json beside
        the model config. ``weights_dtype="float16"`` halves the file; loading casts back to
        float32, so outputs then differ from this model's by fp16 rounding.
        """
        from safetensors.torch import save_file

        if weights_dtype not in WEIGHTS_DTYPES:
            raise ConfigError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}; got "
                              f"{weights_dtype!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = WEIGHTS_DTYPES[weights_dtype]
        tensors = {k: v.detach().to("cpu", dtype).contiguous()
                   for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME,
                     lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        atomic_write_json(folder / CONFIG_NAME, {
            "_class_name": CLASS_NAME, "format_version": FORMAT_VERSION,
            "weights_dtype": weights_dtype, "parameters": self.num_parameters(),
            "model": to_dict(self.cfg), **(metadata or {})})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, size: int | None = None,
                        kind: str | None = None,
                        device: str | torch.device = "cpu") -> NovelViewModel:
        """Rebuild the model a :meth:`save_pretrained` folder holds, in float32, in eval mode.

        ``size``/``kind``: what the caller needs; a model of another size or kind is refused.
        Raises :class:`NovelViewModelError` (one line) for a missing, corrupt or mismatched
        folder.
        """
        folder = Path(folder)
        cfg, meta = _read_config(folder)
        if size is not None and cfg.size != size:
            raise NovelViewModelError(
                f"{folder} holds a {cfg.size} px novel-view model but {size} px was asked for; "
                f"use a model trained at {size} px (`rf prior train --size {size}`) or ask for "
                f"{cfg.size} px")
        if kind is not None and cfg.kind != kind:
            raise NovelViewModelError(f"{folder} holds a {cfg.kind} novel-view model but a "
                                      f"{kind} was asked for; pass a {kind} model folder")
        model = cls(cfg)
        model.load_state_dict(_read_weights(folder, model.state_dict()))
        model.metadata = meta
        return model.to(device).eval()


def _read_config(folder: Path) -> tuple[NovelViewConfig, dict]:
    """(model config, the rest of config.json) of a model folder, or a one-line error."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise NovelViewModelNotFoundError(f"novel-view model folder {folder} {what}; "
                                          f"{_TRAIN_HINT}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise NovelViewModelNotFoundError(f"{folder} has no {CONFIG_NAME}, so it is not a "
                                          f"novel-view model folder; {_TRAIN_HINT}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NovelViewModelError(f"{path} is not valid JSON (corrupt); copy the model folder "
                                  f"again or {_TRAIN_HINT}") from None
    if not isinstance(data, dict) or data.get("_class_name") != CLASS_NAME:
        raise NovelViewModelError(f"{path} is not a {CLASS_NAME} config (no _class_name "
                                  f"{CLASS_NAME!r}); pass a folder written by `rf prior train`")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NovelViewModelError(f"{path} has format version {version!r}, newer than this rf "
                                  f"reads ({FORMAT_VERSION}); upgrade rf to load it")
    try:
        cfg = build(NovelViewConfig, data.get("model"), prefix="model")
    except ConfigError as e:
        raise NovelViewModelError(f"{path}: {e}; the folder was written by another version of "
                                  f"rf, or {_TRAIN_HINT}") from None
    meta = {k: v for k, v in data.items() if k != "model"}
    return cfg, meta


def _read_weights(folder: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights of ``folder``, checked against the state the config builds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise NovelViewModelNotFoundError(f"{folder} has no {WEIGHTS_NAME} (a .bin or .pt is "
                                          f"never read: only safetensors); {_TRAIN_HINT}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise NovelViewModelError(f"{path} is truncated or corrupt ({reason}); copy the model "
                                  f"folder again or {_TRAIN_HINT}") from None
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shaped = sorted(k for k in set(expected) & set(tensors)
                    if tensors[k].shape != expected[k].shape)
    for problem, keys in (("lacks", missing), ("has unexpected", extra),
                          ("has wrongly shaped", shaped)):
        if keys:
            raise NovelViewModelError(
                f"{path} {problem} tensors ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})"
                f" for the architecture in its {CONFIG_NAME}; the two files do not belong "
                f"together: copy the model folder again or {_TRAIN_HINT}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not math.isfinite(
        float(v.float().abs().sum()))]
    if bad:
        raise NovelViewModelError(f"{path} holds non-finite weights ({bad[0]}); the training "
                                  "diverged: retrain with a lower lr")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
