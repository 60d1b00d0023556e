"""``LearnedViewPrior``: the project's own novel-view model as a prior (``type: learned``).

The model (``rf_core.prior.novel_view``) was trained here on rendered objects that no benchmark
evaluates on. Given the input photo (its RGBA at the model's size) and a relative camera it
predicts the object's view from that camera. Zero-1-to-3 uses such a model for SDS; ours is a
deterministic regressor, so, as the oracle does with the ground truth, the prior answers with
the image-space residual to its prediction::

    pred = model.predict(reference_rgba, camera_features(reference camera, view camera))
    gt   = pred.rgb * pred.alpha + background * (1 - pred.alpha)      # at the model's size
    grad = scale * (images - upsample(gt))                              # [B,3,H,W]

Applied with ``sds_loss`` (gradient exactly ``grad``) it is an L2 photometric loss of each
random view against the model's guess of that view. Its weight is set at parity with the input
view's loss, as for the oracle (``rf_bench.singleview.ORACLE_OVERRIDES``).

Needs from the conditioning: each view's camera (``c2w``, ``K``, ``image_size``), its
background, and the reference (``reference`` RGBA, ``reference_c2w``/``reference_K``), which
the reconstructor fills for priors whose ``needs_reference`` is true. It reads no text: it
needs no textual inversion, and learned tokens are recorded and ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from rf_core.errors import UserError
from rf_core.prior.base import TextFreePrior, check_sds_inputs
from rf_core.prior.conditioning import Conditioning

BUILTIN = "builtin"
"""``model.name`` of the weights shipped with the package (``rf_core/prior/novel_view/weights``)."""

_NO_INVERSION = ("textual inversion does not apply to the learned novel-view prior (it reads "
                 "the photo, not text); run without --invert")


class MissingReferenceError(UserError, ValueError):
    """The conditioning lacks the input photo or a camera the prior needs."""


def builtin_weights() -> Path:
    """The folder of the shipped model."""
    return Path(__file__).resolve().parent / "novel_view" / "weights"


def resolve_weights(name: str | os.PathLike) -> Path:
    """``builtin`` or a folder written by ``rf prior train`` (its ``model/`` subfolder is
    accepted too)."""
    path = builtin_weights() if str(name) == BUILTIN else Path(name).expanduser()
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        path = path / "model"
    return path


class LearnedViewPrior(TextFreePrior):
    """The shipped (or a given) novel-view model as a residual prior.

    weights: ``builtin`` or a model folder. scale: multiplies the residual.
    device: where the model runs (it is small: the CPU is fine).
    """

    no_inversion = _NO_INVERSION
    needs_inversion = False
    needs_reference = True

    def __init__(self, weights: str | os.PathLike = BUILTIN, scale: float = 1.0,
                 device: str | torch.device = "cpu"):
        super().__init__()
        from rf_core.prior.novel_view.model import NovelViewModel

        if not scale > 0:
            raise ValueError(f"learned prior scale must be positive, got {scale}")
        self.weights = resolve_weights(weights)
        self.model = NovelViewModel.from_pretrained(self.weights).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.size = int(self.model.cfg.size)
        self.scale = float(scale)
        self.device = torch.device(device)
        self.calls = 0

    # ------------------------------------------------------------------ interface
    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning, cfg=None, *,
                 step: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``scale * (images - predicted view)``: [B,3,H,W] float32 on the images' device.

        images: [B,3,H,W] in [0,1]. ``cfg``, ``step`` and ``generator`` are accepted for the
        interface and unused: the regressor is deterministic.
        """
        check_sds_inputs(images, conditioning)
        target = self.predict_views(conditioning, tuple(images.shape[-2:]))
        self.calls += 1
        return (self.scale * (images.detach().float() - target.to(images.device))).float()

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_rgba(self, conditioning: Conditioning) -> torch.Tensor:
        """The model's RGBA of each view at its own size: [B,4,S,S] in [0,1]."""
        from rf_core.prior.novel_view.geometry import angles_from_cameras, camera_features

        c = conditioning
        if not c.has_cameras or c.reference is None:
            raise MissingReferenceError(
                "the learned prior needs each view's camera and the input photo with its "
                "camera in the conditioning (make_conditioning(..., cameras=, reference=))")
        # sizes travel as (height, width); the geometry takes (width, height) as Cameras do
        views = angles_from_cameras(c.c2w, c.K, c.image_size[::-1])
        ref = angles_from_cameras(c.reference_c2w, c.reference_K, c.reference_size[::-1])
        camera = camera_features(ref, views).to(self.device)
        cond = F.interpolate(c.reference.to(self.device).float(), size=(self.size, self.size),
                             mode="area")
        return self.model.predict(cond, camera).clamp(0, 1)

    @torch.no_grad()
    def predict_views(self, conditioning: Conditioning, size: tuple[int, int]) -> torch.Tensor:
        """The predicted views over their backgrounds (white when absent), resized to
        ``size``: [B,3,H,W] in [0,1]."""
        rgba = self.predict_rgba(conditioning)
        rgb, alpha = rgba[:, :3], rgba[:, 3:]
        # The model predicts colour over white (its training composite) and the alpha.
        # Un-composite to the object's own colour, then over the view's background.
        obj = ((rgb - (1 - alpha)) / alpha.clamp(min=1e-3)).clamp(0, 1)
        bg = (torch.ones(len(conditioning), 3) if conditioning.background is None
              else conditioning.background.float()).to(rgba.device)[:, :, None, None]
        view = obj * alpha + bg * (1 - alpha)
        return F.interpolate(view, size=size, mode="bilinear", align_corners=False,
                             antialias=True)


__all__ = ["BUILTIN", "LearnedViewPrior", "MissingReferenceError", "builtin_weights",
           "resolve_weights"]
