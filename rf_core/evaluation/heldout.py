"""Held-out metrics cheap enough for every intermediate report of a sweep.

A sweep ranks trials on their reports, so each report must measure the same thing as the
final evaluation (``rf_core.jobs.evaluate_run``), only cheaper: ``evaluate_interim``
evaluates a fixed, evenly spread subset of the held-out GT views at a small size (``InterimPlan``),
and optionally a coarse mesh, under the metric names of ``evaluation_metrics``. The subset depends
only on the GT folder, so every trial and every report sees the same views.

Objects without ground truth are judged as in the RealFusion paper: by the CLIP similarity of
novel views to the input photo (``clip_input_similarity``). CLIP weights are never downloaded;
``locate_clip`` finds them on this machine or says how to provide them.

``heldout_strip`` lays GT views over our renders of them, for artifacts ("GT | ours").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rf_core.config import ConfigError, bounded, field_range
from rf_core.errors import UserError
from rf_core.evaluation.evaluate import (
    CLIP_MODEL,
    align_from_input_view,
    clip_embed,
    composite_white,
    evaluate_views,
    find_clip,
    load_clip,
    mesh_metrics,
    transform_cameras,
)
from rf_core.evaluation.metric_registry import CHAMFER_L1, FSCORE, flat_metrics
from rf_core.ground_truth.gt_render import GTViews
from rf_core.output.export import extract_mesh
from rf_core.scene.cameras import Cameras, orbit_cameras

__all__ = ["ClipWeightsError", "InterimPlan", "clip_input_similarity", "downsample_gt",
           "evaluate_interim", "heldout_indices", "heldout_strip", "locate_clip",
           "no_surface_metrics"]


class ClipWeightsError(UserError, FileNotFoundError):
    """CLIP weights are neither a local folder nor in the local Hugging Face cache."""


@dataclasses.dataclass(frozen=True)
class InterimPlan:
    """How intermediate reports evaluate held-out views (the last report evaluates all)."""

    views: int = bounded(4, lo=1)
    """Held-out views per report: a fixed subset, evenly spread over the GT folder's views."""
    size: int = bounded(64, lo=11)
    """Side in pixels the views are rendered at (the GT is area-downsampled to it); at least
    SSIM's 11-pixel Gaussian window."""
    mesh_resolution: int = bounded(32, lo=8)
    """Marching-cubes grid points per side of the coarse mesh for chamfer_l1 and fscore."""

    def __post_init__(self) -> None:
        # Every field is a whole number within its declared (``bounded``) range.
        for f in dataclasses.fields(self):
            value, bounds = getattr(self, f.name), field_range(f)
            if isinstance(value, bool) or not isinstance(value, int) or not bounds.contains(value):
                raise ConfigError(f"{f.name} must be an integer {bounds.describe()} "
                                  f"({_PLAN_UNITS[f.name]}), got {value!r}")


_PLAN_UNITS = {"views": "held-out views per report", "size": "pixels per side, SSIM's window",
               "mesh_resolution": "marching-cubes grid points per side"}
"""What each ``InterimPlan`` field counts, for its error message."""


# ---------------------------------------------------------------------------- views


def heldout_indices(n_views: int, input_view: int, count: int | None = None) -> list[int]:
    """Every view of an ``n_views`` GT folder except ``input_view``; with ``count``, that many
    of them spread evenly (the same for every trial), or all when ``count`` is None or at
    least the number held out."""
    if not 0 <= input_view < n_views:
        raise ConfigError(f"input_view {input_view} is out of range: the GT folder has "
                          f"{n_views} views; use 0..{n_views - 1}")
    if count is not None and count < 1:
        raise ConfigError(f"the number of held-out views must be >= 1, got {count}")
    held = [i for i in range(n_views) if i != input_view]
    if count is None or count >= len(held):
        return held
    return [held[k * len(held) // count] for k in range(count)]


def _subset(gt: GTViews, input_view: int, count: int | None) -> list[int]:
    indices = heldout_indices(len(gt.cams), input_view, count)
    if not indices:
        raise ConfigError(f"the GT folder has only view {input_view}, the input: nothing is "
                          "held out; render more views with `rf render-gt --views N`")
    return indices


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """x: [V, C, H, W] -> [V, C, size, size]."""
    return F.interpolate(x, size=(size, size), mode=mode)


def _downsample_depth(depth: torch.Tensor, valid: torch.Tensor, size: int,
                      small_mask: torch.Tensor) -> torch.Tensor:
    """depth, valid: [V, 1, H, W] (valid in {0, 1}); small_mask: [V, 1, S, S] -> [V, 1, S, S]:
    the mean depth of each cell's object pixels, 0 outside ``small_mask``."""
    # Only object pixels are averaged: averaging across the silhouette mixes the object's depth
    # with the background's 0 into a depth no surface has, and the depth error would punish a
    # correct reconstruction at every edge. (Nearest sampling avoids that too, but samples half
    # a source pixel off the cell's centre at even factors: on a 32 -> 16 pixel duck its mean
    # error against a 16-pixel render is 2-4x this one's.)
    covered = _resize(valid, size, "area").clamp_min(1e-8)
    return _resize(depth * valid, size, "area") / covered * small_mask


def downsample_gt(gt: GTViews, indices: list[int], size: int) -> GTViews:
    """GT views ``indices`` at ``size`` x ``size``: rgb [V, S, S, 3] (composited over white,
    then area-averaged), mask [V, S, S] (area-averaged, > 0.5), depth [V, S, S] (see
    ``_downsample_depth``), the same poses with K scaled to the new size."""
    if not indices:
        raise ValueError("no views to downsample; pass at least one GT view index")
    if size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    valid = (gt.mask[idx].float() > 0.5).float()[:, None]  # [V, 1, H, W]
    rgb = composite_white(gt.rgb[idx].float(), valid[:, 0]).permute(0, 3, 1, 2)
    mask = (_resize(valid, size, "area") > 0.5).float()
    depth = _downsample_depth(gt.depth[idx].float()[:, None], valid, size, mask)
    K = gt.cams.K[idx].clone()
    K[:, 0, :] *= size / gt.cams.width  # fx, cx (pixel edges map onto pixel edges)
    K[:, 1, :] *= size / gt.cams.height  # fy, cy
    cams = Cameras(gt.cams.c2w[idx].clone(), K, size, size)
    return GTViews(rgb=_resize(rgb, size, "area").permute(0, 2, 3, 1), mask=mask[:, 0],
                   depth=depth[:, 0], cams=cams, world_transform=gt.world_transform,
                   mesh=gt.mesh, scene_radius=gt.scene_radius)


# -------------------------------------------------------------------------- metrics


def _align(recon, gt: GTViews, input_view: int) -> torch.Tensor:
    """Our world -> GT world [4, 4], from the ORIGINAL GT camera of the photo."""
    return align_from_input_view(recon.input_camera().c2w[0], gt.cams.c2w[input_view])


def _no_surface_chamfer(gt: GTViews, T: torch.Tensor, bound: float) -> float:
    """A Chamfer-L1 no mesh inside our scene cube can exceed, for a field with no surface.

    Our cube lies within |T(0)| + sqrt(3) bound of the GT origin and the GT mesh within
    ``scene_radius`` of it, so no two points are farther apart: finite, so a sweep can rank
    the trial, and worse than any real surface, so it ranks last.
    """
    return float(torch.as_tensor(T)[:3, 3].norm()) + math.sqrt(3) * bound + gt.scene_radius


def no_surface_metrics(recon, gt: GTViews, input_view: int) -> dict[str, float]:
    """chamfer_l1 and fscore of a reconstruction with no surface (an empty mesh): fscore 0 and
    a finite Chamfer worse than any real mesh's, so a sweep ranks it last."""
    return _no_surface(recon, gt, _align(recon, gt, input_view))


def _no_surface(recon, gt: GTViews, T: torch.Tensor) -> dict[str, float]:
    return {CHAMFER_L1: _no_surface_chamfer(gt, T, recon.cfg.field.bound), FSCORE: 0.0}


def _coarse_mesh_metrics(recon, gt: GTViews, T: torch.Tensor, resolution: int,
                         threshold: float | None) -> dict[str, float]:
    """chamfer_l1 and fscore of a mesh extracted at ``resolution`` (as ``rf export``)."""
    if threshold is not None and not threshold > 0:
        raise ConfigError(f"the mesh density threshold must be positive, got {threshold}")
    field = recon.field
    try:
        mesh = extract_mesh(field.density, lambda x: field(x)[1], bound=recon.cfg.field.bound,
                            resolution=resolution, threshold=threshold, device=recon.device)
    except ValueError:  # no density above the threshold, or a diverged (NaN) field
        mesh = None
    if mesh is None or len(mesh.faces) == 0:
        return _no_surface(recon, gt, T)
    result = mesh_metrics(mesh, gt, T)
    return {CHAMFER_L1: result[CHAMFER_L1], FSCORE: result[FSCORE]}


def evaluate_interim(recon, gt: GTViews, input_view: int, plan: InterimPlan,
                     mesh: bool = False, *, threshold: float | None = None) -> dict[str, float]:
    """The flat metrics of an intermediate report, named as ``evaluation_metrics`` names them.

    recon: a ``Reconstructor`` whose photo is GT view ``input_view``. Returns input_psnr,
    input_mask_iou, and heldout_{psnr,ssim,mask_iou,depth_error} (means over ``plan.views``
    held-out views at ``plan.size``); with ``mesh``, chamfer_l1 and fscore of a mesh at
    ``plan.mesh_resolution`` (density level ``threshold``, default ``rf_core.output.export``'s). A
    field with no surface gets fscore 0 and a finite Chamfer worse than any real mesh's.
    """
    T = _align(recon, gt, input_view)
    small = downsample_gt(gt, _subset(gt, input_view, plan.views), plan.size)
    # evaluate_views indexes into the GT it is given: the subset's own 0..V-1.
    views = evaluate_views(lambda cams, j: recon.render(cams, j, normals=False), small, T,
                           list(range(len(small.cams))))
    report = {"input_view_metrics": recon.input_view_metrics(), "views": views}
    if mesh:
        report["mesh"] = _coarse_mesh_metrics(recon, gt, T, plan.mesh_resolution, threshold)
    return flat_metrics(report)


def heldout_strip(recon, gt: GTViews, input_view: int, views: int = 4, size: int = 128
                  ) -> np.ndarray:
    """GT views (top row) over our renders of them (bottom row), each over white.

    The views are ``heldout_indices(..., views)``, downsampled to ``size``. Returns uint8
    [2 size, V size, 3], V = min(views, held-out views).
    """
    small = downsample_gt(gt, _subset(gt, input_view, views), size)
    cams = transform_cameras(small.cams, torch.linalg.inv(_align(recon, gt, input_view)))
    ours = [recon.render(cams, j, normals=False)["rgb"].float().cpu()
            for j in range(len(cams))]
    gt_rgb = composite_white(small.rgb, small.mask)
    rows = [torch.cat(list(images), dim=1) for images in (gt_rgb, ours)]
    return (torch.cat(rows).clamp(0.0, 1.0).numpy() * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- CLIP


def _hub_hint(model: str) -> str:
    """The hub id to suggest downloading: ``model`` when it looks like one."""
    looks_like_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    return model if looks_like_id else CLIP_MODEL


def locate_clip(model: str) -> Path:
    """The folder of CLIP weights ``model``: a local folder, or a hub id already in the local
    Hugging Face cache (nothing is downloaded). Raises ClipWeightsError (one line) otherwise."""
    fix = (f"set the sweep file's `clip_model:` to a folder holding CLIP weights, or run "
           f"`hf download {_hub_hint(model)}` where there is internet")
    try:
        folder = find_clip(model)
    except (ImportError, OSError, ValueError) as err:  # not cached, or not a hub id
        raise ClipWeightsError(f"CLIP weights {model!r} are not on this machine (no such "
                               f"folder, and not in the local Hugging Face cache: "
                               f"{type(err).__name__}); {fix}") from None
    if not (folder / "config.json").is_file():
        raise ClipWeightsError(f"{folder} holds no CLIP weights (no config.json); {fix}")
    return folder


@functools.lru_cache(maxsize=4)
def _cached_clip(folder: str):
    """One loaded CLIP per folder: it is embedded with at every report."""
    try:
        return load_clip(folder)
    except Exception as err:  # transformers raises many types for a broken folder
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ClipWeightsError(f"cannot load CLIP from {folder} ({type(err).__name__}: "
                               f"{first_line}); point `clip_model:` at a folder written by "
                               "CLIPModel.save_pretrained") from None


def _novel_cameras(recon, views: int, size: int) -> Cameras:
    """``views`` cameras on the input camera's orbit, evenly spaced in azimuth and all away
    from the input view: input azimuth + k 360 / (views + 1), k = 1..views."""
    c = recon.cfg.camera
    step = 360.0 / (views + 1)
    azimuth = c.input_azimuth + step * torch.arange(1, views + 1, dtype=torch.float32)
    return orbit_cameras(c.input_radius, c.input_elevation, azimuth, c.input_fov, size, size)


def clip_input_similarity(recon, photo_rgb: torch.Tensor, model_dir: Path, views: int = 8,
                          size: int = 128) -> float:
    """Mean cosine similarity of CLIP image embeddings of ``views`` novel views (rendered at
    ``size`` over white, see ``_novel_cameras``) to the input photo: the RealFusion paper's
    metric for objects without ground truth (Melas-Kyriazi et al. 2023).

    photo_rgb: [3, H, W] in [0, 1], composited over white. model_dir: from ``locate_clip``.
    """
    if photo_rgb.dim() != 3 or photo_rgb.shape[0] != 3:
        raise ValueError(f"photo_rgb must be [3, H, W], got {tuple(photo_rgb.shape)}")
    if views < 1 or size < 8:
        raise ValueError(f"need views >= 1 and size >= 8, got views={views}, size={size}")
    clip = _cached_clip(str(Path(model_dir).expanduser().resolve()))
    cams = _novel_cameras(recon, views, size)
    renders = torch.stack([recon.render(cams, i, normals=False)["rgb"].float().cpu()
                           for i in range(views)])
    photo = clip_embed(clip, photo_rgb.detach().float().cpu().permute(1, 2, 0))  # [1, D]
    return float((clip_embed(clip, renders) * photo).sum(-1).mean())
