"""RealFusion's loss terms as pure functions, and their weights.

``loss_terms`` returns one scalar per term, named as the fields of ``LossWeights``; the
``Reconstructor`` sums ``weight(step) * term`` over that dict. Adding a term means a function
here, an entry in ``loss_terms`` and a field in ``LossWeights``; ``check_terms`` refuses a term
without a weight and a (non-zero) weight without a term.

Terms (R input-view pixels; B random views of H x W pixels; M evaluated samples):
  rgb, mask      MSE of the input view's colour and opacity to the photo and its mask
  sds            score distillation (DreamFusion) through the detached-target loss
  entropy        binary entropy (bits) of the random views' opacity (RealFusion)
  orientation    Ref-NeRF's penalty on visible normals facing away from the camera
  normal_smooth  MSE of the rendered normal maps to their detached blur (RealFusion)
  opacity        mean opacity of the random views (sparsity)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rf_core.config import Schedule, ScheduleSpec, schedule_field
from rf_core.prior.sds import sds_loss
from rf_core.scene.render import PackedSamples

__all__ = [
    "LossWeights", "binary_entropy", "check_terms", "gaussian_blur", "loss_terms",
    "normal_smoothness", "orientation", "sds_term",
]


@dataclass
class LossWeights:
    """Weight of each loss term (a number or a schedule over steps)."""

    rgb: ScheduleSpec = schedule_field(1000.0, "input-view image MSE", lo=0)
    mask: ScheduleSpec = schedule_field(500.0, "input-view mask MSE (opacity vs mask)", lo=0)
    sds: ScheduleSpec = schedule_field(1.0, "score distillation on random views", lo=0)
    entropy: ScheduleSpec = schedule_field(1.0, "opacity entropy (bits) of random views: pushes "
                                           "each pixel to fully empty or fully solid", lo=0)
    orientation: ScheduleSpec = schedule_field(1e-2, "Ref-NeRF orientation: no visible normals "
                                               "facing away from the camera", lo=0)
    normal_smooth: ScheduleSpec = schedule_field(0.5, "2D smoothness of rendered normal maps "
                                                 "(RealFusion)", lo=0)
    opacity: ScheduleSpec = schedule_field(0.0, "mean opacity of random views (sparsity)",
                                           lo=0)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            Schedule.parse(getattr(self, name), f"weights.{name}")


# ---------------------------------------------------------------------------- terms


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean of -(p log2 p + (1-p) log2(1-p)) over all entries (bits, as the authors),
    p clamped away from 0 and 1."""
    p = p.clamp(1e-5, 1 - 1e-5)
    return -(p * p.log2() + (1 - p) * (1 - p).log2()).mean()


def gaussian_blur(images: torch.Tensor, sigma: float, radius: int | None = None
                  ) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's ``gaussian_blur``).
    images: [B,C,H,W]; ``radius`` taps each side (default ceil(3 sigma), at most H-1, W-1)."""
    radius = radius if radius is not None else max(1, math.ceil(3 * sigma))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def normal_smoothness(normals: torch.Tensor, sigma: float = 1.7) -> torch.Tensor:
    """RealFusion's 2D normal smoothness: the MSE (mean over pixels and channels) between the
    rendered normal map [B,3,H,W] and its detached blur (a 9-tap kernel at sigma 1.7, as the
    authors' ``gaussian_blur(normals, kernel_size=9)``)."""
    target = gaussian_blur(normals, sigma, radius=4).detach()
    return F.mse_loss(normals, target)


def orientation(weights: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor,
                ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Ref-NeRF's orientation penalty per ray: sum_i sg(w_i) max(0, n_i . d)^2.

    weights: [M] compositing weights; normals, dirs: [M, 3] (dirs point away from the camera);
    ray_indices: [M] ray of each sample -> [n_rays]. The weights are detached, as DreamFusion's:
    only the normals move, so thinning density cannot lower the penalty (holes).
    """
    facing_away = (normals * dirs).sum(-1, keepdim=True).clamp(min=0)
    out = torch.zeros(n_rays, 1, device=normals.device, dtype=facing_away.dtype)
    return out.index_add(0, ray_indices, weights.detach()[:, None] * facing_away.pow(2))[:, 0]


def sds_term(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Score distillation as a loss whose gradient w.r.t. ``images`` is ``grad / B``.

    images: [B,3,H,W] in the autograd graph; grad: [B,3,H,W] from the prior's ``sds_grad``.
    """
    return sds_loss(images, grad.to(images.device)) / images.shape[0]


def loss_terms(input_rgb: torch.Tensor, input_opacity: torch.Tensor, target_rgb: torch.Tensor,
               target_mask: torch.Tensor, views: Mapping, sds_grad: torch.Tensor | None = None,
               normal_blur_sigma: float = 1.7, masked_rgb: bool = False
               ) -> dict[str, torch.Tensor]:
    """Every loss term of one step, unweighted, in ``LossWeights``' order.

    input_rgb: [R, 3] and input_opacity: [R] rendered at R input-view pixels whose photo
    colours are target_rgb: [R, 3] and mask values target_mask: [R]. ``views``: the random
    views, ``rgb`` [B,3,H,W] (over their backgrounds), ``opacity`` [B,1,H,W], ``normal``
    [B,3,H,W] and ``samples``: one :class:`~rf_core.scene.render.PackedSamples` per view, with
    normals. ``sds_grad``: [B,3,H,W] from the prior; None leaves the ``sds`` term out (the
    caller skips the prior while its weight is zero). ``masked_rgb``: the image term compares
    only the object, MSE(rgb · mask, target · mask) (the authors', for renders over a learned
    background); else the whole render over white.
    """
    rgb = input_rgb.float()
    if masked_rgb:
        rgb, target_rgb = rgb * target_mask[:, None], target_rgb * target_mask[:, None]
    terms = {"rgb": F.mse_loss(rgb, target_rgb),
             "mask": F.mse_loss(input_opacity.float(), target_mask)}
    if sds_grad is not None:
        terms["sds"] = sds_term(views["rgb"].float(), sds_grad)
    opacity = views["opacity"].float()
    terms["entropy"] = binary_entropy(opacity)
    terms["orientation"] = _views_orientation(views["samples"], opacity[0].numel()).mean()
    terms["normal_smooth"] = normal_smoothness(views["normal"].float(), normal_blur_sigma)
    terms["opacity"] = opacity.mean()
    return terms


def _views_orientation(samples: Sequence[PackedSamples], n_rays: int) -> torch.Tensor:
    """[B, n_rays] orientation penalty of each view's rays."""
    return torch.stack([orientation(s.weights, s.normals, s.dirs, s.ray_indices, n_rays)
                        for s in samples]).float()


def check_terms(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> None:
    """Raise ``ValueError`` for a term without a weight, or a non-zero weight without a term.

    ``weights``: the value of each ``LossWeights`` field at this step. A term may be left out
    while its weight is zero (SDS then skips the prior's forward pass).
    """
    unweighted = [name for name in terms if name not in weights]
    if unweighted:
        raise ValueError(f"loss term {unweighted[0]!r} has no weight; add a field "
                         f"{unweighted[0]!r} to LossWeights (rf_core/fitting/losses.py)")
    missing = [name for name, w in weights.items() if w != 0 and name not in terms]
    if missing:
        raise ValueError(f"weights.{missing[0]} is {weights[missing[0]]} but no loss term "
                         f"{missing[0]!r} was computed; add it to loss_terms "
                         "(rf_core/fitting/losses.py) or remove the weight")


def weight_names() -> tuple[str, ...]:
    """Names of the weighted terms, in order (the fields of ``LossWeights``)."""
    return tuple(f.name for f in dataclasses.fields(LossWeights))
