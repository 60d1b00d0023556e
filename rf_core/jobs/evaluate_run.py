"""``rf evaluate RUN --gt GT``: a finished reconstruction against ground truth.

The photo a run reconstructed must be view ``input_view`` of a ``rf render-gt`` folder, taken
with the run's input camera settings (radius, fov) and not recentred (``input.recenter=false``),
so that our world maps rigidly onto the GT world (see ``align_from_input_view``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from rf_core.evaluation.evaluate import (
    align_from_input_view,
    evaluate_views,
    format_report,
    mesh_metrics,
    optional_metrics,
)
from rf_core.evaluation.metric_registry import GT_INPUT_MASK_IOU, GT_INPUT_PSNR, flat_metrics
from rf_core.files.atomic import atomic_write_text
from rf_core.files.run_folder import claim_files
from rf_core.ground_truth.gt_render import load_gt
from rf_core.jobs.run_loading import load_run
from rf_core.output.mesh_io import read_mesh
from rf_core.scene.cameras import Cameras


def input_view_overrides(gt_dir: Path, index: int = 0) -> list[str]:
    """Config overrides that put the reconstruction's input camera on GT view ``index``.

    Reads only ``gt_dir/cameras.json`` (a sweep computes these for every object at start)."""
    meta = Path(gt_dir) / "cameras.json"
    try:
        cams = Cameras.from_json(json.loads(meta.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{meta} holds no readable cameras ({type(err).__name__}: {err}); "
                         "render the folder again with `rf render-gt`") from None
    if not 0 <= index < len(cams):
        raise ValueError(f"input view {index} is out of range: {meta} has {len(cams)} views")
    eye = cams.c2w[index, :3, 3].double()
    radius = float(eye.norm())
    fov = math.degrees(2 * math.atan(cams.height / (2 * float(cams.K[index, 1, 1]))))
    return [f"recon.camera.input_radius={radius}",
            f"recon.camera.input_elevation={math.degrees(math.asin(float(eye[2]) / radius))}",
            f"recon.camera.input_azimuth={math.degrees(math.atan2(float(eye[1]), float(eye[0])))}",
            f"recon.camera.input_fov={fov}", "input.recenter=false"]


def object_overrides(gt_dir: Path | None, input_view: int = 0,
                     initializer: str | None = None) -> list[str]:
    """What one object of a sweep or a dataset adds to the shared config: the input camera
    on its GT view (when it has ground truth), and its textual-inversion initializer word."""
    extra = input_view_overrides(Path(gt_dir), input_view) if gt_dir else []
    if initializer:
        extra.append(f"inversion.initializer={initializer}")
    return extra


def evaluate_run(run_dir: str | os.PathLike, gt_dir: str | os.PathLike, input_view: int = 0
                 ) -> tuple[dict, str]:
    """Held-out and input-view image metrics, mesh metrics and (when their weights exist
    locally) CLIP/LPIPS. Writes ``RUN/evaluation.json``; returns (report, table text)."""
    run = Path(run_dir)
    recon, cfg = load_run(run)
    gt = load_gt(gt_dir)
    if not 0 <= input_view < len(gt.cams):
        raise ValueError(f"--input-view {input_view} out of range: {gt_dir} has "
                         f"{len(gt.cams)} views")
    gt_fov = math.degrees(2 * math.atan(gt.cams.height / (2 * float(gt.cams.K[input_view, 1, 1]))))
    if abs(gt_fov - cfg.recon.camera.input_fov) > 0.5:
        raise ValueError(f"the GT camera's fov is {gt_fov:.1f}° but the run assumed "
                         f"{cfg.recon.camera.input_fov:.1f}°; reconstruct with "
                         f"recon.camera.input_fov={gt_fov:.1f}")
    report = evaluate_reconstruction(recon, gt, input_view, run / "mesh.glb")
    text = format_report(report)
    flat = flat_metrics(report)
    text = (f"input view {input_view}: PSNR {flat[GT_INPUT_PSNR]:.2f} dB, mask IoU "
            f"{flat[GT_INPUT_MASK_IOU]:.3f}\n" + text)
    atomic_write_text(run / "evaluation.json", json.dumps(report, indent=2, default=_json) + "\n")
    claim_files(run, ["evaluation.json"])
    return report, text


def evaluate_reconstruction(recon, gt, input_view: int = 0, mesh_file: Path | None = None,
                            optional: bool = True, mesh_errors: str = "raise") -> dict:
    """The nested report of :func:`evaluate_run` for a ``Reconstructor`` in memory.

    gt: ``GTViews`` whose view ``input_view`` is the photo; mesh_file: the run's mesh (mesh
    metrics when it exists; ``read_mesh`` brings it back into our z-up world); optional:
    CLIP/LPIPS (each reported unavailable without local weights); mesh_errors: "raise", or
    "report" to put a mesh that cannot be compared (an empty mesh, a GT mesh file missing on
    this node) under ``mesh_error`` instead.
    """
    T = align_from_input_view(recon.input_camera().c2w[0], gt.cams.c2w[input_view])
    held_out = [i for i in range(len(gt.cams)) if i != input_view]

    def render(cams, j):
        return recon.render(cams, j, normals=False)

    report: dict = {"input_view": input_view}
    report["input"] = evaluate_views(render, gt, T, [input_view])["mean"]
    if held_out:
        views = evaluate_views(render, gt, T, held_out, return_images=optional)
        images = views.pop("images", None)
        report["views"] = views
        if optional:
            report["optional"] = optional_metrics(images["pred_rgb"], images["gt_rgb"])
    if mesh_file is not None and Path(mesh_file).exists():
        try:
            report["mesh"] = mesh_metrics(read_mesh(mesh_file), gt, T)
        except (OSError, ValueError) as err:  # GT mesh file not on this node, an empty mesh
            if mesh_errors == "raise":
                raise
            report["mesh_error"] = str(err)
    return report


def evaluate(recon, gt, input_view: int = 0, mesh_file: Path | None = None,
             optional: bool = False) -> dict[str, float]:
    """One flat dict of every metric of ``recon`` (names as in
    ``rf_core.evaluation.metric_registry``): the input-view metrics, and with ``gt`` the held-out,
    GT-input and mesh metrics."""
    report = {"input_view_metrics": recon.input_view_metrics()}
    if gt is not None:
        report.update(evaluate_reconstruction(recon, gt, input_view, mesh_file, optional,
                                              mesh_errors="report"))
    metrics = flat_metrics(report)
    if "mesh_error" in report:
        metrics["mesh_metrics_error"] = report["mesh_error"]
    return metrics


def _json(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot serialise {type(x).__name__}")


def evaluation_metrics(report: dict) -> dict[str, float]:
    """The flat numbers of an ``evaluate_run`` report, named as sweeps name them:
    ``heldout_{psnr,ssim,mask_iou,depth_error}``, ``gt_input_{psnr,mask_iou}``, ``chamfer_l1``,
    ``fscore`` and, where their weights were local, ``clip_similarity`` / ``lpips``
    (:func:`rf_core.evaluation.metric_registry.flat_metrics`)."""
    return flat_metrics(report)
