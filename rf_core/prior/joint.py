"""The joint prior: the weighted sum of two priors' score distillation (Magic123).

Magic123 (Qian et al., ICLR 2024) adds an image-conditioned 3D prior (Zero-1-to-3) to the
text-conditioned 2D prior (Stable Diffusion with a learned token): the 2D prior brings
detail and imagination, the 3D prior consistent geometry (less of the Janus problem that
RealFusion names as its main failure). The gradient is

    g = w_main(step) * g_main + w(step) * g_extra

where each prior computes its SDS gradient on the same rendered views, under its own
:class:`~rf_core.prior.sds.SDSConfig` (Stable Diffusion wants guidance 100, Zero-1-to-3 about 5).

The main prior stays *the* prior of the run: textual inversion, the learned token and every
other attribute are the main prior's (``JointPrior`` forwards them). On a Ray cluster each
member is its own prior server (one model per server; both may share a GPU): see
``rf_distributed.prior_client``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rf_core.config import Schedule, ScheduleSpec, schedule_field
from rf_core.prior.loading import ModelConfig
from rf_core.prior.sds import SDSConfig


def _no_model() -> ModelConfig:
    return ModelConfig(type="none")


@dataclass
class JointConfig:
    """A second prior whose SDS adds to the main one's (``model``): off while ``model.type``
    is ``none``."""

    model: ModelConfig = dataclasses.field(default_factory=_no_model)
    """The second prior: e.g. ``type: zero123`` with a Zero-1-to-3 folder, or ``type: learned``
    (the project's novel-view model)."""
    main_weight: ScheduleSpec = schedule_field(1.0, "weight of the main prior's SDS gradient "
                                               "in the sum", lo=0)
    weight: ScheduleSpec = schedule_field(1.0, "weight of the second prior's SDS gradient in "
                                          "the sum (Magic123: 40 against 1)", lo=0)
    sds: SDSConfig = dataclasses.field(default_factory=lambda: SDSConfig(
        guidance_scale=5.0, t_min=0.2, t_max=0.6))
    """The second prior's SDS (Magic123's Zero-1-to-3 guidance: scale 5, t in [0.2, 0.6])."""

    @property
    def enabled(self) -> bool:
        return self.model.type != "none"

    def __post_init__(self) -> None:
        """Refuse an unknown prior, and a sum that is zero at every step (both weights 0)."""
        from rf_core.prior.registry import prior_types  # registering imports this module

        if self.model.type not in prior_types():
            raise ValueError(f"joint.model.type: unknown prior {self.model.type!r}; choose one "
                             f"of {', '.join(prior_types())}")
        if self.enabled and all(_always_zero(w) for w in (self.main_weight, self.weight)):
            raise ValueError("main_weight and weight are both 0: the joint prior would add "
                             "nothing; give one a positive weight, or set joint.model.type=none")


def _always_zero(spec: ScheduleSpec) -> bool:
    s = Schedule.parse(spec)
    return s.start_value == 0 and s.end_value == 0


class JointPrior:
    """``main`` and ``extra`` (any priors) as one: ``sds_grad`` is their weighted sum.

    ``cfg``: the :class:`JointConfig` (weights as schedules of the step, the extra prior's
    SDS settings). A member whose weight is 0 at a step is not called.
    """

    def __init__(self, main, extra, cfg: JointConfig):
        self.main, self.extra, self.cfg = main, extra, cfg
        self.main_weight = Schedule.parse(cfg.main_weight, "joint.main_weight")
        self.weight = Schedule.parse(cfg.weight, "joint.weight")

    @property
    def needs_reference(self) -> bool:
        return any(getattr(p, "needs_reference", False) for p in (self.main, self.extra))

    def sds_grad(self, images: torch.Tensor, conditioning, cfg: SDSConfig | None = None, *,
                 step: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """images: [B,3,H,W] in [0,1] -> the weighted sum of both priors' gradients."""
        total = None
        for prior, weight, sds in ((self.main, self.main_weight(step), cfg),
                                   (self.extra, self.weight(step), self.cfg.sds)):
            if weight == 0:
                continue
            grad = prior.sds_grad(images, conditioning, sds, step=step, generator=generator)
            total = weight * grad.float() if total is None else total + weight * grad.float()
        return torch.zeros_like(images, dtype=torch.float32) if total is None else total

    def __getattr__(self, name: str):
        # Only reached for names JointPrior lacks: the token, inversion, model info, ...
        if name in ("main", "extra", "cfg"):
            raise AttributeError(name)
        return getattr(self.main, name)
