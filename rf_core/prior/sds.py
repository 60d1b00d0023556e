"""Score distillation sampling (DreamFusion, Poole et al. 2022), as pure functions.

For a rendered image x with latent z = E(x), a timestep t and noise eps:
    z_t = sqrt(a_t) z + sqrt(1 - a_t) eps                  (a_t = alpha-bar, the DDPM schedule)
    eps_hat = eps_u + s (eps_c - eps_u)                     (classifier-free guidance, scale s)
    dL/dz = w(t) (eps_hat - eps)                            (the UNet Jacobian is dropped)
and dL/dx is that pushed back through the encoder. The caller applies it with
:func:`sds_loss`, whose gradient is exactly ``grad``: a real loss, so AMP loss scaling and
gradient accumulation treat it like any other term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rf_core.config import Schedule, ScheduleSpec, bounded, schedule_field
from rf_core.host_sync import to_device

WEIGHTINGS = ("sds", "uniform", "sqrt_alpha")
PREDICTION_TYPES = ("epsilon", "v_prediction")


_SCHEDULED = ("guidance_scale", "t_min", "t_max")


@dataclass
class SDSConfig:
    """Score distillation settings. Scheduled values are ``Schedule`` specs over training steps."""

    guidance_scale: ScheduleSpec = schedule_field(100.0, "classifier-free guidance scale "
                                                  "(DreamFusion and RealFusion use 100)", lo=0)
    t_min: ScheduleSpec = schedule_field(0.02, "lowest timestep, as a fraction of T", lo=0, hi=1)
    t_max: ScheduleSpec = schedule_field(0.98, "highest timestep, as a fraction of T", lo=0, hi=1)
    weighting: str = "sds"
    """w(t): ``sds`` = 1 - a_t (DreamFusion), ``uniform`` = 1,
    ``sqrt_alpha`` = sqrt(a_t)(1 - a_t)."""
    grad_clip: float | None = bounded(None, lo=0, lo_open=True)
    """Clip each image's latent gradient to this L2 norm (None: no clipping)."""

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "t_min", "t_max"):
            Schedule.parse(getattr(self, name), name)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; "
                             f"got {self.weighting!r}")
        lo, hi = Schedule.parse(self.t_min, "t_min"), Schedule.parse(self.t_max, "t_max")
        if lo.start_value == lo.end_value and hi.start_value == hi.end_value \
                and lo.start_value > hi.start_value:  # scheduled ones are checked by at()
            raise ValueError(f"t_min {lo.start_value} is above t_max {hi.start_value}; lower "
                             "t_min or raise t_max")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")

    def schedules(self) -> tuple[Schedule, Schedule, Schedule]:
        """(guidance_scale, t_min, t_max) as ``Schedule`` objects, parsed once per value."""
        specs = tuple(getattr(self, n) for n in _SCHEDULED)
        key = repr(specs)
        if self.__dict__.get("_schedules_key") != key:  # parsed again only if a field changed
            self.__dict__["_schedules"] = tuple(Schedule.parse(v, n)
                                                for v, n in zip(specs, _SCHEDULED))
            self.__dict__["_schedules_key"] = key
        return self.__dict__["_schedules"]

    def at(self, step: int) -> tuple[float, float, float]:
        """(guidance_scale, t_min, t_max) at ``step``; checks 0 <= t_min <= t_max <= 1."""
        s, lo, hi = (schedule(step) for schedule in self.schedules())
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1 at step {step}, got {lo}, {hi}")
        return s, lo, hi


def timestep_bounds(t_min: float, t_max: float, num_train_timesteps: int) -> tuple[int, int]:
    """Integer timestep range [lo, hi] (inclusive) for fractions of T, as stable-dreamfusion."""
    lo = int(num_train_timesteps * t_min)
    hi = min(int(num_train_timesteps * t_max), num_train_timesteps - 1)
    return lo, max(lo, hi)


def sds_weights(weighting: str, alpha_bar: torch.Tensor) -> torch.Tensor:
    """w(t) for each request. alpha_bar: [B] -> [B]."""
    if weighting == "sds":
        return 1.0 - alpha_bar
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    if weighting == "sqrt_alpha":
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a) z + sqrt(1 - a) eps. latents, noise: [B,C,h,w]; alpha_bar: [B]."""
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1.0 - a).sqrt() * noise


def epsilon_from_output(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    """The model's noise estimate: ``output`` itself, or eps = sqrt(a) v + sqrt(1 - a) z_t for
    v-prediction models (SD 2.x). All tensors [B,C,h,w] except alpha_bar [B]."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        a = alpha_bar.view(-1, 1, 1, 1)
        return a.sqrt() * output + (1.0 - a).sqrt() * noisy
    raise ValueError(f"unsupported prediction type {prediction_type!r}; "
                     f"supported: {', '.join(PREDICTION_TYPES)}")


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance. eps_*: [B,C,h,w]; scale: [B]."""
    return eps_uncond + scale.view(-1, 1, 1, 1) * (eps_cond - eps_uncond)


def latent_grad(eps_hat: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor,
                grad_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w(t)(eps_hat - eps), with non-finite entries zeroed and optional per-image norm clipping.

    Returns (grad [B,C,h,w] float32, number of non-finite entries per image [B]).
    """
    grad = weights.float().view(-1, 1, 1, 1) * (eps_hat.float() - noise.float())
    bad = (~torch.isfinite(grad)).flatten(1).sum(1)
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grad_clip is not None:
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        grad = grad * (grad_clip / norm).clamp(max=1.0).view(-1, 1, 1, 1)
    return grad, bad


def randn_from(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device
               ) -> torch.Tensor:
    """Standard normal drawn on the generator's own device, then moved (reproducible anywhere)."""
    where = gen.device if gen is not None else device
    return to_device(torch.randn(shape, generator=gen, device=where), device)


def per_image_generators(generator, batch: int) -> list[torch.Generator | None]:
    """One generator per image from ``generator``: one for all, one each, or None."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for {batch} images; pass one or one each")
    return gens


def draw_timesteps(cfg: SDSConfig, step: int, generators, num_train_timesteps: int
                   ) -> torch.Tensor:
    """One timestep per image from ``cfg``'s range at ``step``, the first draw of each image's
    generator. -> [B] int64 on the CPU."""
    lo, hi = timestep_bounds(*cfg.at(step)[1:], num_train_timesteps)
    return torch.cat([torch.randint(lo, hi + 1, (1,), generator=g,
                                    device=g.device if g is not None else "cpu").cpu()
                      for g in generators])


def step_timesteps(timesteps: torch.Tensor | None, cfg: SDSConfig, step: int, generators,
                   num_train_timesteps: int, device) -> torch.Tensor:
    """The [B] timesteps of an SDS call on ``device``: drawn (in range, so unchecked: a check
    would wait for the device), or the caller's override, checked."""
    batch = len(generators)
    if timesteps is None:
        timesteps = draw_timesteps(cfg, step, generators, num_train_timesteps)
    elif timesteps.numel() != batch or timesteps.min() < 0 \
            or timesteps.max() >= num_train_timesteps:
        raise ValueError(f"timesteps must be {batch} integers in "
                         f"[0, {num_train_timesteps - 1}]")
    return to_device(timesteps.to(torch.long).reshape(-1), device)


def guidance_scales(guidance_scale: float | torch.Tensor | None, cfg: SDSConfig, step: int,
                    batch: int, device) -> torch.Tensor:
    """[B] guidance scales: the caller's (a number, or one per image), else ``cfg``'s at
    ``step``."""
    if isinstance(guidance_scale, torch.Tensor):
        return to_device(guidance_scale.float(), device).expand(batch)
    value = cfg.at(step)[0] if guidance_scale is None else guidance_scale
    return torch.full((batch,), float(value), device=device)


def sds_loss(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The detached-target SDS loss: a scalar whose gradient w.r.t. ``images`` is ``grad``.

    images: [B,3,H,W] (in the autograd graph); grad: [B,3,H,W] from ``sds_grad``.
    """
    # 0.5 |x - sg(x - g)|^2, written so that x - sg(x) is exactly 0 in floating point: the
    # gradient is then g to the last bit, not x - (x - g) with rounding when |g| << |x|.
    residual = (images - images.detach()) + grad.to(images).detach()
    return 0.5 * residual.pow(2).sum()
