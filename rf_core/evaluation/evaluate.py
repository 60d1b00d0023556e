"""Evaluate a reconstruction against a ground-truth folder written by ``rf render-gt``.

Our reconstruction lives in its own world; the GT views live in the GT world. The input photo
is GT view ``k``, so our input camera and GT camera ``k`` are the same physical camera (same
intrinsics), which fixes the rigid transform between the two worlds (``align_from_input_view``).
Every GT view is then rendered from the matching camera in our world and compared
(``evaluate_views``), and the extracted mesh is compared with the GT mesh (``mesh_metrics``).

Backgrounds: ``render_gt`` fills every pixel outside the object mask with pure white (255), so
GT rgb is already "object over white". Both sides are compared over the same white
background: the GT is composited with its mask (a no-op for render-gt folders), the prediction
is rendered over white, or rendered without a background and composited with its opacity.

Units: distances (depth error, Chamfer, F-score threshold) are in GT world units; the GT mesh
is normalised so that its farthest vertex is at ``scene_radius`` (0.8 by default) from the
origin, i.e. the object is at most 1.6 across.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rf_core.evaluation.metric_registry import (
    CHAMFER_L1,
    CLIP_SIMILARITY,
    FSCORE,
    LPIPS,
    VIEW_METRICS,
    RenderedView,
    view_metric_keys,
    view_metrics,
)
from rf_core.ground_truth.gt_render import GTViews, load_textured_mesh
from rf_core.scene.cameras import Cameras

IMAGE_METRICS = view_metric_keys()
"""The numbers of every view (``rf_core.evaluation.metric_registry.VIEW_METRICS``)."""
_LPIPS_PACKAGE = "lpips"
"""The lpips package's import name (the metric is ``metric_registry.LPIPS``)."""
CLIP_MODEL = "openai/clip-vit-base-patch32"
# CLIP's image normalisation (Radford et al. 2021), as in its preprocessor_config.json.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_matrix(x, name: str) -> np.ndarray:
    m = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
    m = m.astype(np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"{name} must be a [4, 4] matrix, got shape {tuple(m.shape)}")
    return m


def _check_rigid(m: np.ndarray, name: str, tol: float = 1e-4) -> None:
    """Raise unless ``m`` is [[R, t], [0, 0, 0, 1]] with R a proper rotation."""
    R = m[:3, :3]
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=tol):
        raise ValueError(f"{name} has bottom row {m[3].tolist()}, expected [0, 0, 0, 1]")
    if not np.allclose(R.T @ R, np.eye(3), atol=tol) or np.linalg.det(R) < 0:
        raise ValueError(f"{name} is not rigid: its 3x3 block is not a rotation (orthonormal, "
                         "det +1); pass camera-to-world poses without scale or shear")


# ------------------------------------------------------------------------------ alignment


def align_from_input_view(ours_c2w, gt_c2w) -> torch.Tensor:
    """Rigid transform from OUR world to the GT world: ``T = gt_c2w @ inv(ours_c2w)``.

    ours_c2w: [4, 4] our input camera; gt_c2w: [4, 4] the GT camera of the same photo (OpenCV
    camera-to-world; both must be rigid, with the same intrinsics). Then
    ``T @ ours_c2w == gt_c2w``, and a point x in our world is ``T @ x`` in the GT world.
    Returns [4, 4] float64. Raises ValueError for non-rigid poses.
    """
    ours, gt = _as_matrix(ours_c2w, "ours_c2w"), _as_matrix(gt_c2w, "gt_c2w")
    _check_rigid(ours, "ours_c2w")
    _check_rigid(gt, "gt_c2w")
    T = gt @ np.linalg.inv(ours)
    _check_rigid(T, "T")
    return torch.from_numpy(T)


def transform_cameras(cams: Cameras, M) -> Cameras:
    """Cameras with poses ``M @ c2w`` (same intrinsics, size, dtype and device)."""
    M = torch.as_tensor(_as_matrix(M, "M"), dtype=torch.float64, device=cams.c2w.device)
    c2w = (M @ cams.c2w.double()).to(cams.c2w.dtype)
    return Cameras(c2w, cams.K.clone(), cams.width, cams.height)


# ------------------------------------------------------------------------- image metrics


def composite_white(rgb: torch.Tensor, alpha: torch.Tensor,
                    premultiplied: bool = False) -> torch.Tensor:
    """``rgb`` [H, W, 3] over a white background with coverage ``alpha`` [H, W], in [0, 1].

    ``premultiplied``: rgb is ``sum_i w_i c_i`` (rendered without a background), so white is
    added as ``(1 - alpha)``; otherwise rgb is straight colour, mixed as ``a rgb + (1 - a)``.
    """
    a = alpha[..., None].to(rgb.dtype)
    out = rgb + (1 - a) if premultiplied else a * rgb + (1 - a)
    return out.clamp(0.0, 1.0)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_views(render_fn: Callable[[Cameras, int], dict], gt: GTViews, T,
                   view_indices: Sequence[int] | None = None, *, rgb_premultiplied: bool = False,
                   return_images: bool = False, device=None) -> dict:
    """Render GT views from our reconstruction and compare them with the GT images.

    For GT view i our camera is ``inv(T) @ gt.cams.c2w[i]`` with the GT intrinsics and size.
    ``render_fn(cams, j)`` renders camera ``j`` of ``cams`` (the selected views, in the order of
    ``view_indices``) and returns {"rgb": [H, W, 3], "opacity": [H, W], "depth": [H, W]
    z-depth}, as ``render_image``. Its rgb is expected over WHITE
    (``background_fn=lambda d: torch.ones_like(d)``) and is used as it is; with
    ``rgb_premultiplied=True`` it is rendered without a background (``background_fn=None``)
    and composited here as ``rgb + (1 - opacity)``. The GT is composited over white with its
    mask, so both sides are compared over the same white background.

    Masks: IoU of ``opacity > 0.5`` with the GT mask. Depth: mean |z_ours - z_gt| where both
    masks cover the pixel. ``view_indices`` default to all GT views; ``device`` is where the
    cameras go (default: the GT cameras' device).

    Returns {"views": [{"index", <each of ``IMAGE_METRICS``>}, ...],
    "mean": {metric: mean over views, NaN views skipped}} plus, with ``return_images``,
    "images": {"pred_rgb", "gt_rgb": [V, H, W, 3], "pred_opacity", "gt_mask", "pred_depth",
    "gt_depth": [V, H, W]} as float32 numpy arrays (rgb composited over white).
    """
    n = len(gt.cams)
    indices = list(range(n)) if view_indices is None else [int(i) for i in view_indices]
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise IndexError(f"view indices {bad} out of range: the GT folder has {n} views")
    if not indices:
        raise ValueError("no views to evaluate; pass at least one GT view index")
    T = _as_matrix(T, "T")
    _check_rigid(T, "T")
    cams = transform_cameras(gt.cams[indices], np.linalg.inv(T))
    if device is not None:
        cams = cams.to(device)

    views, images = [], {k: [] for k in ("pred_rgb", "gt_rgb", "pred_opacity", "gt_mask",
                                         "pred_depth", "gt_depth")}
    H, W = gt.cams.height, gt.cams.width
    for j, i in enumerate(indices):
        with torch.no_grad():
            out = render_fn(cams, j)
        rgb, opacity, depth = (out[k].detach().float().cpu() for k in ("rgb", "opacity", "depth"))
        if rgb.shape != (H, W, 3) or opacity.shape != (H, W) or depth.shape != (H, W):
            raise ValueError(f"render_fn returned rgb {tuple(rgb.shape)}, opacity "
                             f"{tuple(opacity.shape)}, depth {tuple(depth.shape)} for GT view "
                             f"{i}; expected [{H}, {W}, 3] and [{H}, {W}]")
        gt_mask = gt.mask[i].float().cpu()
        # Rendered over white already: re-mixing with a fractional opacity would count the
        # background twice, so only a premultiplied (background-free) render is composited.
        pred_rgb = (composite_white(rgb, opacity, premultiplied=True) if rgb_premultiplied
                    else rgb.clamp(0.0, 1.0))
        # GT colour is straight with a binary mask (a no-op for render-gt folders, which are
        # white outside the mask already; it makes any other GT background white too).
        gt_rgb = composite_white(gt.rgb[i].float().cpu(), gt_mask)
        # T is rigid, so our camera sees our scene exactly as the GT camera sees the GT world:
        # z-depth in our camera equals z-depth in the GT camera, in the same units. No scale
        # is fitted, so a reconstruction at the wrong depth shows up here, as it should.
        views.append({"index": i, **view_metrics(RenderedView(
            pred_rgb, gt_rgb, opacity, gt_mask, depth, gt.depth[i].float().cpu()))})
        if return_images:
            for key, value in (("pred_rgb", pred_rgb), ("gt_rgb", gt_rgb),
                               ("pred_opacity", opacity), ("gt_mask", gt_mask),
                               ("pred_depth", depth), ("gt_depth", gt.depth[i])):
                images[key].append(value.float().cpu().numpy())

    result = {"views": views, "mean": {m: _mean([v[m] for v in views]) for m in IMAGE_METRICS}}
    if return_images:
        result["images"] = {k: np.stack(v) for k, v in images.items()}
    return result


# -------------------------------------------------------------------------- mesh metrics


def chamfer_fscore(pred_points: np.ndarray, gt_points: np.ndarray, threshold: float) -> dict:
    """Chamfer distances and F-score between point sets pred [N, 3] and gt [M, 3].

    With d(p, G) the distance from p to its nearest neighbour in G:
      - chamfer_l1 = (mean_p d(p, G) + mean_g d(g, P)) / 2  (mean of the two directed means);
      - chamfer_l2 = the same with squared distances;
      - precision = fraction of pred points with d(p, G) < threshold, recall = fraction of GT
        points with d(g, P) < threshold, fscore = 2 P R / (P + R) (0 when both are 0)
        (Tatarchenko et al. 2019, "What Do Single-view 3D Reconstruction Networks Learn?").
    Returns floats {"chamfer_l1", "chamfer_l2", "precision", "recall", "fscore", "threshold"}.
    """
    from scipy.spatial import cKDTree

    pred = np.asarray(pred_points, dtype=np.float64)
    gtp = np.asarray(gt_points, dtype=np.float64)
    for name, pts in (("pred_points", pred), ("gt_points", gtp)):
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
            raise ValueError(f"{name} must be a non-empty [N, 3] array, got {pts.shape}")
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    d_pg, _ = cKDTree(gtp).query(pred)  # pred -> nearest GT point: accuracy
    d_gp, _ = cKDTree(pred).query(gtp)  # GT -> nearest pred point: completeness
    precision = float(np.mean(d_pg < threshold))
    recall = float(np.mean(d_gp < threshold))
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        CHAMFER_L1: float(0.5 * (d_pg.mean() + d_gp.mean())),
        "chamfer_l2": float(0.5 * ((d_pg ** 2).mean() + (d_gp ** 2).mean())),
        "precision": precision,
        "recall": recall,
        FSCORE: float(fscore),
        "threshold": float(threshold),
    }


def gt_world_mesh(gt: GTViews):
    """The GT folder's mesh in GT world coordinates (``world_transform`` applied): a Trimesh."""
    mesh = load_textured_mesh(gt.mesh).copy()
    mesh.apply_transform(_as_matrix(gt.world_transform, "world_transform"))
    return mesh


def mesh_metrics(pred_mesh, gt: GTViews, T, n_points: int = 20000, threshold: float = 0.05,
                 seed: int = 0) -> dict:
    """Chamfer and F-score between our mesh (in our world) and the GT mesh (GT world).

    pred_mesh: ``trimesh.Trimesh`` in our world, mapped into the GT world by T [4, 4].
    ``n_points`` are sampled uniformly by area on each surface (seeds ``seed`` and ``seed + 1``,
    so the result is reproducible). ``threshold`` is in GT world units: the scene is
    normalised to radius ``gt.scene_radius`` (0.8), so 0.05 is about 3% of the object's size.
    Returns ``chamfer_fscore``'s dict plus "n_points". Raises ValueError for an empty mesh.
    """
    import trimesh

    if len(getattr(pred_mesh, "faces", [])) == 0:
        raise ValueError("the predicted mesh has no faces; nothing to compare (was the density "
                         "threshold for mesh extraction too high?)")
    if n_points <= 0:
        raise ValueError(f"n_points must be positive, got {n_points}")
    T = _as_matrix(T, "T")
    _check_rigid(T, "T")
    pred = pred_mesh.copy()
    pred.apply_transform(T)
    gt_mesh = gt_world_mesh(gt)
    gt_pts, _ = trimesh.sample.sample_surface(gt_mesh, n_points, seed=seed)
    pred_pts, _ = trimesh.sample.sample_surface(pred, n_points, seed=seed + 1)
    return {**chamfer_fscore(pred_pts, gt_pts, threshold), "n_points": int(n_points)}


# ----------------------------------------------------------------------- optional metrics


def _unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason}


def _images_tensor(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [V, H, W, 3] in [0, 1], got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).clamp(0, 1)  # [V, 3, H, W]


def clip_similarity(pred_images, gt_images, model: str = CLIP_MODEL) -> float | dict:
    """Mean cosine similarity of CLIP image embeddings of pred and GT views (pairwise).

    ``model`` is a local folder or a hub id already in the local Hugging Face cache; nothing is
    downloaded. Returns a float, or {"available": False, "reason"} when the weights are absent.
    """
    try:
        folder = find_clip(model)
    except ImportError:
        return _unavailable("huggingface_hub is not installed")
    except (OSError, ValueError) as err:  # not cached (LocalEntryNotFoundError), or not an id
        return _unavailable(f"CLIP weights {model!r} are not in the local Hugging Face "
                            f"cache ({type(err).__name__}); run `hf download {model}` where "
                            "there is internet")
    try:
        clip = load_clip(folder)
    except Exception as err:  # optional metric: any loading failure means "not available"
        return _unavailable(f"cannot load CLIP from {folder} ({type(err).__name__}: {err})")
    return float((clip_embed(clip, pred_images) * clip_embed(clip, gt_images)).sum(-1).mean())


def find_clip(model: str):
    """The folder of CLIP weights ``model`` (a ``pathlib.Path``): a local folder, or a hub id's
    snapshot in the local Hugging Face cache; nothing is downloaded. Raises ImportError
    without huggingface_hub, and the hub's OSError or ValueError when the id is not cached."""
    from pathlib import Path

    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


def load_clip(folder):
    """A ``transformers.CLIPModel`` from a local folder (``save_pretrained`` layout), in eval
    mode; nothing is downloaded. Raises whatever ``from_pretrained`` raises."""
    import transformers.utils.logging as hf_logging
    from transformers import CLIPModel

    hf_logging.disable_progress_bar()  # a per-shard bar for a sub-second load is noise
    return CLIPModel.from_pretrained(folder, local_files_only=True).eval()


def clip_embed(clip, images) -> torch.Tensor:
    """Unit CLIP image embeddings [V, D] of ``images`` [V, H, W, 3] (or [H, W, 3]) in [0, 1].

    CLIP's preprocessing: shortest side to the model's size (bicubic), centre crop, normalise.
    """
    size = int(clip.config.vision_config.image_size)
    mean = torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
    x = _images_tensor(images)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True,
                                        align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = (x[..., top:top + size, left:left + size] - mean) / std
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=x).pooler_output
        return torch.nn.functional.normalize(clip.visual_projection(pooled), dim=-1)


def lpips_distance(pred_images, gt_images, net: str = "alex") -> float | dict:
    """Mean LPIPS (Zhang et al. 2018) between pred and GT views, if it can run offline.

    Needs the ``lpips`` package (its linear-layer weights ship inside it) and the torchvision
    backbone weights already in the torch hub cache; nothing is downloaded. Returns a float,
    or {"available": False, "reason"}.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec(_LPIPS_PACKAGE) is None:
        return _unavailable("the lpips package is not installed (pip install lpips; it also "
                            "needs torchvision and its backbone weights)")
    if importlib.util.find_spec("torchvision") is None:
        return _unavailable("lpips needs torchvision for its backbone, which is not installed")
    from pathlib import Path

    backbone = {"alex": "alexnet-owt-", "vgg": "vgg16-", "squeeze": "squeezenet1_1-"}.get(net)
    if backbone is None:
        return _unavailable(f"unknown LPIPS network {net!r}; use 'alex', 'vgg' or 'squeeze'")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob(f"{backbone}*.pth")):
        return _unavailable(f"the {net} backbone weights are not in {hub} (torchvision would "
                            "download them); fetch them once where there is internet")
    try:
        lpips = importlib.import_module(_LPIPS_PACKAGE)
        model = lpips.LPIPS(net=net, verbose=False).eval()
        with torch.no_grad():
            # LPIPS takes images in [-1, 1].
            d = model(_images_tensor(pred_images) * 2 - 1, _images_tensor(gt_images) * 2 - 1)
    except Exception as err:  # optional metric: any failure means "not available"
        return _unavailable(f"LPIPS failed ({type(err).__name__}: {err})")
    return float(d.mean())


def optional_metrics(pred_images, gt_images, clip_model: str = CLIP_MODEL) -> dict:
    """CLIP similarity and LPIPS between pred and GT views [V, H, W, 3] in [0, 1], each only
    when its weights are on this machine: {"clip_similarity": float or {"available": False,
    "reason"}, "lpips": likewise}. Never downloads, never invents a number."""
    return {CLIP_SIMILARITY: clip_similarity(pred_images, gt_images, clip_model),
            LPIPS: lpips_distance(pred_images, gt_images)}


# ------------------------------------------------------------------------------- report


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, dict):
        return f"unavailable: {value.get('reason', '?')}"
    if value is None:
        return "-"
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def format_report(report: dict) -> str:
    """A plain-text table of a report {"views": evaluate_views(...), "mesh": mesh_metrics(...),
    "optional": optional_metrics(...)}; each part may be missing."""
    lines = []
    views = report.get("views")
    if views:
        header = " ".join([f"{'view':>6}", *(f"{c.label:>{c.width}}" for c in VIEW_METRICS)])
        lines += ["Novel views (GT world, over white)", header, "-" * len(header)]

        def row(name, m):
            return " ".join([f"{name:>6}", *(f"{_fmt(m[c.key], c.digits):>{c.width}}"
                                             for c in VIEW_METRICS)])

        lines += [row(str(v["index"]), v) for v in views["views"]]
        lines += ["-" * len(header), row("mean", views["mean"])]
    mesh = report.get("mesh")
    if mesh:
        lines += ["", f"Mesh ({mesh.get('n_points', '?')} points per surface, "
                      f"threshold {_fmt(mesh['threshold'], 3)} GT units)"]
        for key, label in ((CHAMFER_L1, "Chamfer-L1"), ("chamfer_l2", "Chamfer-L2"),
                           ("precision", "precision"), ("recall", "recall"),
                           (FSCORE, "F-score")):
            lines.append(f"  {label:<12} {_fmt(mesh[key])}")
    optional = report.get("optional")
    if optional:
        lines += ["", "Optional"]
        for key, value in optional.items():
            lines.append(f"  {key:<16} {_fmt(value)}")
    return "\n".join(lines).strip("\n")
