"""Single-image textual inversion (Gal et al. 2022), as RealFusion uses it.

One new token ``<e>`` is learned so that "a photo of a <e>" makes Stable Diffusion denoise heavy
augmentations of the single input photo. Only that token's vector trains: the text encoder's
embedding table stays frozen, and a forward hook substitutes the trainable vector wherever the
token's id appears, so every other row is untouched by construction (and a test checks it).

RealFusion's recipe (their README's textual-inversion command): 3000 steps, batch 1 with 4
accumulation steps, learning rate 5e-4 scaled by 4 = 2e-3, constant schedule, augmentations on.

Speed: every random draw (views, timesteps, prompts, noise) is made per accumulation
micro-batch in the authors' order, then the micro-batches run as one UNet call of
``batch_size x grad_accum`` views (``fuse_accumulation``, the default): the same gradient as
accumulating them one by one (a test compares the two), a quarter of the calls. Augmentations,
draws and the loss stay on the model's device; the losses are read back every
``LOSS_READ_EVERY`` steps and at checkpoints, so a fp32 step waits for the device not once
(fp16's gradient scaler reads one flag per step).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rf_core.config import bounded, dump_yaml, to_dict
from rf_core.files.checkpoint import (
    CheckpointError,
    check_training_state,
    load_checkpoint,
    packed_step,
    previous_path,
    restore_previous,
    save_checkpoint,
)
from rf_core.files.fault_points import fault_point
from rf_core.precision import DTYPES, parse_precision, precision_field
from rf_core.prior.augment import AugmentConfig, augment_views
from rf_core.prior.embeddings import add_token
from rf_core.prior.sds import randn_from
from rf_core.progress import progress

# The textual-inversion paper's object templates (``imagenet_templates_small``), which the
# authors' textual_inversion.py uses unchanged.
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)


@dataclass
class InversionConfig:
    """Single-image textual inversion settings (defaults: RealFusion's recipe)."""

    token: str = "<e>"
    """The new placeholder token."""
    initializer: str = "object"
    """A single-token word whose embedding starts the new token (e.g. cat, teddy, duck)."""
    steps: int = bounded(3000, lo=1)
    """Optimizer steps."""
    lr: float = bounded(2e-3, lo=0, lo_open=True)
    """AdamW learning rate (RealFusion: 5e-4 scaled by batch x accumulation = 4)."""
    weight_decay: float = bounded(1e-2, lo=0)
    """AdamW weight decay (diffusers' textual-inversion default)."""
    batch_size: int = bounded(1, lo=1)
    """Augmented views per forward pass."""
    grad_accum: int = bounded(4, lo=1)
    """Micro-batches of ``batch_size`` views per optimizer step (gradient accumulation)."""
    fuse_accumulation: bool = True
    """Run the ``grad_accum`` micro-batches as one UNet call of ``batch_size x grad_accum``
    views: the same views, timesteps, noise and gradient (up to float rounding), fewer and
    fuller calls, ``grad_accum`` times the activation memory. False: one call per micro-batch,
    as the authors' script (less memory)."""
    mixed_precision: str = precision_field("auto")
    """``fp32`` (or ``no``), ``fp16``, ``bf16`` autocast; ``auto`` runs in the model's own
    dtype. fp16 gets a gradient scaler."""
    checkpoint_every: int = bounded(250, lo=0)
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    seed: int = 0
    """Seeds augmentations, timesteps and noise: same seed, same embedding."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentations; ``augment.resolution`` is replaced by the model's resolution."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        self.mixed_precision = parse_precision(self.mixed_precision, "mixed_precision")
        if not self.token or any(c.isspace() for c in self.token):
            raise ValueError(f"token must be a non-empty word without spaces, got {self.token!r}")


@dataclass
class InversionResult:
    token: str
    vector: torch.Tensor
    """[D] float32 learned embedding."""
    losses: list[float]
    """Mean denoising loss per optimizer step."""
    resumed_from: int = 0
    """Step the run resumed from (0: a fresh start)."""


LOSS_READ_EVERY = 25
"""Steps between reads of the step losses from the device (each read is one host sync)."""


class _TokenSubstitution:
    """Forward hook on the token-embedding layer: rows of ``token_id`` become ``vector``."""

    def __init__(self, embedding: torch.nn.Embedding, token_id: int, vector: torch.nn.Parameter):
        self.token_id, self.vector = token_id, vector
        self.embedding = embedding
        self.handle = embedding.register_forward_hook(self)

    def follow(self, text_encoder) -> None:
        """Move to the text encoder's current embedding layer. Adding a token elsewhere (a
        prior server registering a trial's token between two inversion steps) may resize the
        table, which replaces the layer."""
        current = text_encoder.get_input_embeddings()
        if current is not self.embedding:
            self.handle.remove()
            self.embedding, self.handle = current, current.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        hit = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(hit, self.vector.to(output.dtype), output)

    def remove(self) -> None:
        self.handle.remove()


def denoising_loss(prior, latents: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The diffusion training loss for latents [B,C,h,w] with prompts input_ids [B,77]: MSE
    between ``prior``'s (a ``StableDiffusionPrior``) UNet output and its target (the noise, or
    the velocity for v-prediction)."""
    sd = prior.sd
    text = sd.text_encoder(input_ids.to(prior.device))[0]
    noisy = sd.scheduler.add_noise(latents, noise, t)
    pred = sd.unet(noisy.to(prior.dtype), t, encoder_hidden_states=text.to(prior.dtype)).sample
    if sd.prediction_type == "v_prediction":
        target = sd.scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


_FREE = ("steps", "checkpoint_every", "fuse_accumulation")
"""Settings a checkpoint may differ in: length, saving cadence, and how the same micro-batches
are grouped into UNet calls (the same draws either way; only rounding differs)."""


def _compatible(saved: dict, cfg: InversionConfig) -> bool:
    """A checkpoint resumes a run whose settings differ at most in ``_FREE``."""
    mine = {k: v for k, v in to_dict(cfg).items() if k not in _FREE}
    theirs = {k: v for k, v in saved.items() if k not in _FREE}
    return mine == theirs


@dataclass
class _MicroBatch:
    """One accumulation micro-batch's draws, all on the model's device."""

    views: torch.Tensor
    """[B,3,R,R] in [-1, 1], the model's dtype."""
    t: torch.Tensor
    """[B] timesteps."""
    input_ids: torch.Tensor
    """[B,77] prompt tokens."""
    posterior_eps: torch.Tensor
    """[B,C,h,w] the VAE posterior sample's noise."""
    noise: torch.Tensor
    """[B,C,h,w] the diffusion noise."""

    @staticmethod
    def cat(parts: list[_MicroBatch]) -> _MicroBatch:
        if len(parts) == 1:
            return parts[0]
        return _MicroBatch(*(torch.cat(group) for group in zip(*(
            (p.views, p.t, p.input_ids, p.posterior_eps, p.noise) for p in parts))))


def _draw(prior, rgb: torch.Tensor, mask: torch.Tensor, n: int, aug_cfg: AugmentConfig,
          gen: torch.Generator, templates: torch.Tensor) -> _MicroBatch:
    """One micro-batch's random choices, in the order the unfused loop has always drawn them
    (views, timesteps, prompts, posterior noise, diffusion noise). templates: [T,77] ids."""
    device = prior.device
    views = augment_views(rgb, mask, n, aug_cfg, gen).to(device, prior.dtype)
    t = torch.randint(0, prior.num_train_timesteps, (n,), generator=gen,
                      device=gen.device).to(device)
    pick = torch.randint(len(templates), (n,), generator=gen, device=gen.device)
    input_ids = templates[pick.to(templates.device)]
    shape = (n, *prior.latent_shape(views)[1:])
    posterior_eps = randn_from(shape, gen, device)
    noise = randn_from(shape, gen, device)
    return _MicroBatch(views, t, input_ids, posterior_eps, noise)


def backward_step(prior, draws: list[_MicroBatch], fuse: bool, amp: torch.dtype | None,
                  scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Backpropagate one optimizer step's loss, the mean denoising loss over every view of
    ``draws``, into the learned vector; returns that loss, detached, on the device.

    fuse: one UNet call for all micro-batches; else one call each, weighed by its share of the
    views (gradient accumulation). Both give the same gradient up to float rounding.
    """
    device_type = prior.device.type
    total = sum(len(mb.views) for mb in draws)
    step_loss = None
    for mb in [_MicroBatch.cat(draws)] if fuse else draws:
        with torch.no_grad():
            latents = prior.encode_latents(mb.views, mb.posterior_eps).float()
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = denoising_loss(prior, latents, mb.noise, mb.t, mb.input_ids) / (
                total / len(mb.views))
        scaler.scale(loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss


def invert(prior, rgb: torch.Tensor, mask: torch.Tensor,
           cfg: InversionConfig | None = None, *, checkpoint: str | os.PathLike | None = None,
           between_steps: Callable[[int], None] | None = None) -> InversionResult:
    """Learn ``cfg.token`` on ``prior`` (a ``StableDiffusionPrior``; its ``invert`` method is the
    public entry) from one photo. rgb: [3,H,W] in [0,1]; mask: [1,H,W] in [0,1].

    With ``checkpoint`` set, a checkpoint folder (``rf_core.files.checkpoint``) is saved there
    every ``cfg.checkpoint_every`` steps and at the end, and a compatible checkpoint found there
    is resumed (bit-identical to an uninterrupted run). The token stays registered on
    ``prior`` with the learned vector.

    ``between_steps(done)``: called on this thread after each optimizer step (and its
    checkpoint), with no autocast or autograd state open; a prior server lends the model to
    other callers there. It may use the prior, and may add tokens to it.
    """
    cfg = cfg or InversionConfig()
    sd, device = prior.sd, prior.device
    aug_cfg = dataclasses.replace(cfg.augment, resolution=prior.resolution)
    token_id = add_token(sd.tokenizer, sd.text_encoder, cfg.token, initializer=cfg.initializer)
    table = sd.text_encoder.get_input_embeddings()
    vector = torch.nn.Parameter(table.weight[token_id].detach().float().clone())
    optimizer = torch.optim.AdamW([vector], lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = prior.dtype if cfg.mixed_precision == "auto" else DTYPES[cfg.mixed_precision]
    amp = None if amp == torch.float32 else amp
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # On the model's device: views, timesteps and noise are made where they are used.
    gen = torch.Generator(device).manual_seed(cfg.seed)
    start, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None:
        prepare_checkpoint(ckpt)
        if ckpt.exists():
            start, losses = _load_checkpoint(ckpt, cfg, vector, optimizer, scaler, gen)
    ids = {tpl: sd.tokenizer(tpl.format(cfg.token), padding="max_length", truncation=True,
                             max_length=sd.tokenizer.model_max_length,
                             return_tensors="pt").input_ids[0] for tpl in TEMPLATES}
    templates = torch.stack(list(ids.values())).to(device)  # [T,77], copied once
    rgb = rgb.detach().to(device, torch.float32)
    mask = mask.detach().to(device, torch.float32)
    pending: list[torch.Tensor] = []  # step losses not yet read from the device

    def read_losses() -> None:
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")

    hook = _TokenSubstitution(table, token_id, vector)
    bar = progress(cfg.steps, f"inverting {cfg.token}", initial=start)
    try:
        for step in range(start, cfg.steps):
            hook.follow(sd.text_encoder)
            draws = [_draw(prior, rgb, mask, cfg.batch_size, aug_cfg, gen, templates)
                     for _ in range(cfg.grad_accum)]
            fault_point("inversion.step")
            step_loss = backward_step(prior, draws, cfg.fuse_accumulation, amp, scaler)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            pending.append(step_loss)
            bar.update(1)
            done = step + 1
            save = ckpt is not None and (done == cfg.steps or (
                cfg.checkpoint_every and done % cfg.checkpoint_every == 0))
            if save or done == cfg.steps or done % LOSS_READ_EVERY == 0:
                read_losses()
            if save:
                _save_checkpoint(ckpt, cfg, done, vector, optimizer, scaler, gen, losses)
            if between_steps is not None:
                between_steps(done)
    finally:
        hook.remove()
        bar.close()
    table = sd.text_encoder.get_input_embeddings()  # between_steps may have replaced it
    with torch.no_grad():
        table.weight[token_id] = vector.detach().to(table.weight.dtype)
    prior.register_embedding(cfg.token, vector.detach())
    return InversionResult(cfg.token, vector.detach().float().cpu(), losses, resumed_from=start)


def checkpoint_step(data: bytes | None) -> int:
    """The step an inversion checkpoint was saved at, from its bytes
    (``rf_core.files.checkpoint.pack_checkpoint``); 0 for none or unreadable ones (``invert``
    itself then starts over, or says what is wrong with them)."""
    return max(0, packed_step(data) or 0)


def prepare_checkpoint(path: str | os.PathLike) -> None:
    """Before an inversion resumes from ``path`` (here or on a prior server): a checkpoint of
    an older rf (one ``torch.save`` file where the folder goes) is removed with a one-line
    note, and the inversion starts over; a save killed between its two renames is undone."""
    path = Path(path)
    if path.is_file():
        _log.warning("rf: note: %s is an inversion checkpoint of an older rf; the inversion "
                     "starts over", path)
        path.unlink()
    restore_previous(path)


def start_over_advice(path: str | os.PathLike) -> str:
    """What a message about an unusable inversion checkpoint at ``path`` ends with."""
    prev = previous_path(path)
    return f"delete it{f' and {prev}' if prev.exists() else ''} to start the inversion over"


_log = logging.getLogger(__name__)
_STATE_KEYS = ("config", "step", "vector", "optimizer", "scaler", "generator", "losses")
_POINTS = "inversion.checkpoint"
"""The prefix of the inversion checkpoint's fault points (``rf_core.files.fault_points``)."""


def _save_checkpoint(path: Path, cfg, step, vector, optimizer, scaler, gen, losses) -> None:
    state = {"config": to_dict(cfg), "step": step, "vector": vector.detach().cpu(),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "generator": gen.get_state(), "losses": losses}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state, dump_yaml(cfg), name=_POINTS)


def _load_checkpoint(path: Path, cfg, vector, optimizer, scaler, gen) -> tuple[int, list]:
    """Resume from ``path`` into the given objects; returns (step, losses), or (0, []) when the
    checkpoint belongs to other settings. A corrupt one raises a one-line CheckpointError."""
    start_over = start_over_advice(path)

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"inversion checkpoint {path} is unusable: {problem}; "
                               f"{start_over}")

    state, _ = load_checkpoint(path, start_over=start_over)
    if not isinstance(state, dict):
        raise bad(f"it holds a {type(state).__name__}, not a checkpoint")
    for key in _STATE_KEYS:
        if key not in state:
            raise bad(f"it has no {key!r}")
    if not isinstance(state["config"], dict) or not _compatible(state["config"], cfg):
        return 0, []
    saved_vector = state["vector"]
    if not isinstance(saved_vector, torch.Tensor) or saved_vector.shape != vector.shape:
        got = list(saved_vector.shape) if isinstance(saved_vector, torch.Tensor) else "none"
        raise bad(f"tensor 'vector' has shape {got}, this model expects {list(vector.shape)}")
    saved_gen, want = state["generator"], gen.get_state()
    if isinstance(saved_gen, torch.Tensor) and saved_gen.dtype == want.dtype and \
            saved_gen.shape != want.shape:  # a CPU run's state on a CUDA run, or the reverse
        return 0, []
    check_training_state(state, optimizer, [("generator", gen)], bad)
    with torch.no_grad():
        vector.copy_(saved_vector)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    gen.set_state(saved_gen)
    return int(state["step"]), list(state["losses"])
