"""Novel-view benchmark: the learned model alone, on objects it was never trained on.

For each evaluation mesh (``rf_core.prior.novel_view.splits``) it renders ``rf render-gt``'s views
(radius 3, fov 40, a Fibonacci spiral of elevations), takes each of ``inputs`` views in turn as
the photo, and asks the model for every other view from the relative camera. Each prediction
is compared with the ground truth at the model's size: PSNR (RGB over white), SSIM and mask
IoU (alpha > 0.5), next to the baseline that answers with the photo itself ("copy": what a
prior that knows nothing about 3D would say).

    rf bench novel-view --json outputs/bench_novel_view.json
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rf_bench.common import cpu_name, write_json

__all__ = ["EVALUATION_OBJECTS", "run_novel_view_bench", "format_novel_view_table"]

EVALUATION_OBJECTS = ("pybullet_data:duck.obj", "pybullet_data:soccerball.obj",
                      "pybullet_data:torus/torus_textured.obj")
"""The objects the targets of the learned prior are set on (none of them trained on)."""


def _views(mesh: str, folder: Path, views: int, size: int):
    """GT views of ``mesh`` as rgba [V, 4, size, size] (RGB over white) and their cameras."""
    from rf_core.ground_truth.gt_render import load_gt, render_gt
    from rf_core.progress import quiet

    gt_dir = folder / mesh.split(":")[-1].replace("/", "_").removesuffix(".obj")
    if not (gt_dir / "cameras.json").is_file():
        with quiet():
            render_gt(mesh, gt_dir, views=views, size=size * 3, overwrite=True)
    gt = load_gt(gt_dir)
    rgba = torch.cat([gt.rgb, gt.mask[..., None]], -1).permute(0, 3, 1, 2).float()
    return F.interpolate(rgba, size=(size, size), mode="area"), gt.cams


def _scores(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """pred, gt: [4, S, S] rgba in [0, 1] -> psnr, ssim, mask_iou."""
    from rf_core.ground_truth.metrics import mask_iou, psnr, ssim

    return {"psnr": psnr(pred[:3].permute(1, 2, 0), gt[:3].permute(1, 2, 0)),
            "ssim": ssim(pred[:3].permute(1, 2, 0), gt[:3].permute(1, 2, 0)),
            "mask_iou": mask_iou(pred[3], gt[3])}


def run_novel_view_bench(weights: str = "builtin", objects=EVALUATION_OBJECTS, views: int = 9,
                         inputs: int = 3, out_dir: str = "outputs/bench_novel_view",
                         json_path: str | None = None, progress=print) -> dict:
    """Model vs copy on every (photo, other view) pair of each object; returns the summary
    ``{"objects": {name: {"model": {...}, "copy": {...}, "pairs": n}}, "mean": {...}}``."""
    from rf_core.prior.learned import resolve_weights
    from rf_core.prior.novel_view.geometry import angles_from_cameras, camera_features
    from rf_core.prior.novel_view.model import NovelViewModel
    from rf_core.prior.novel_view.splits import is_evaluation_mesh

    t0 = time.perf_counter()
    model = NovelViewModel.from_pretrained(resolve_weights(weights))
    size = model.cfg.size
    summary: dict = {"benchmark": "novel-view", "weights": str(resolve_weights(weights)),
                     "size": size, "views": views, "inputs": inputs, "objects": {},
                     "machine": cpu_name()}
    for mesh in objects:
        if not is_evaluation_mesh(mesh.split(":")[-1]):
            raise ValueError(f"{mesh} is not an evaluation mesh of rf_core.prior.novel_view.splits")
        rgba, cams = _views(mesh, Path(out_dir), views, size)
        angles = angles_from_cameras(cams.c2w, cams.K, (cams.width, cams.height))
        rows = {"model": [], "copy": []}
        for i in range(min(inputs, views)):
            others = [j for j in range(views) if j != i]
            one = {k: v[[i] * len(others)] for k, v in angles.items()}
            rest = {k: v[others] for k, v in angles.items()}
            with torch.no_grad():
                pred = model.predict(rgba[[i] * len(others)], camera_features(one, rest))
            for p, j in zip(pred, others):
                rows["model"].append(_scores(p.clamp(0, 1), rgba[j]))
                rows["copy"].append(_scores(rgba[i], rgba[j]))
        name = mesh.split(":")[-1].split("/")[-1].removesuffix(".obj")
        summary["objects"][name] = {
            kind: {m: sum(r[m] for r in rs) / len(rs) for m in ("psnr", "ssim", "mask_iou")}
            for kind, rs in rows.items()} | {"pairs": len(rows["model"])}
        o = summary["objects"][name]
        progress(f"  {name}: model PSNR {o['model']['psnr']:.2f} / IoU "
                 f"{o['model']['mask_iou']:.3f}; copy {o['copy']['psnr']:.2f} / "
                 f"{o['copy']['mask_iou']:.3f}")
    objs = list(summary["objects"].values())
    summary["mean"] = {kind: {m: sum(o[kind][m] for o in objs) / len(objs)
                              for m in ("psnr", "ssim", "mask_iou")} for kind in ("model", "copy")}
    summary["wall_seconds"] = time.perf_counter() - t0
    if json_path:
        write_json(json_path, summary)
    return summary


def format_novel_view_table(summary: dict) -> str:
    """A Markdown table of the summary: one row per object, model and copy side by side."""
    lines = ["| object | model PSNR | copy PSNR | model SSIM | copy SSIM | model IoU | copy IoU |",
             "|---|---|---|---|---|---|---|"]
    for name, o in [*summary["objects"].items(), ("mean", summary["mean"])]:
        m, c = o["model"], o["copy"]
        lines.append(f"| {name} | {m['psnr']:.2f} | {c['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{c['ssim']:.3f} | {m['mask_iou']:.3f} | {c['mask_iou']:.3f} |")
    return "\n".join(lines)
