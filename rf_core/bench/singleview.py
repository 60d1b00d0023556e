"""Single-view benchmark: reconstruct one ``rf render-gt`` view, evaluate on the others.

The photo is GT view 0, not recentred, and the reconstruction's input camera is set to that
view's radius, elevation, azimuth and fov, so the two worlds align rigidly and held-out views,
depth and the mesh can be compared with ground truth.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from rf_core.bench.common import cpu_name, write_json
from rf_core.evaluate_run import evaluate_run
from rf_core.gt_render import load_gt, render_gt
from rf_core.reconstruct_job import load_job_config, reconstruct


def input_view_overrides(gt_dir: Path, index: int = 0) -> list[str]:
    """Config overrides that put the reconstruction's input camera on GT view ``index``."""
    cams = load_gt(gt_dir).cams
    eye = cams.c2w[index, :3, 3].double()
    radius = float(eye.norm())
    fov = math.degrees(2 * math.atan(cams.height / (2 * float(cams.K[index, 1, 1]))))
    return [f"recon.camera.input_radius={radius}",
            f"recon.camera.input_elevation={math.degrees(math.asin(float(eye[2]) / radius))}",
            f"recon.camera.input_azimuth={math.degrees(math.atan2(float(eye[1]), float(eye[0])))}",
            f"recon.camera.input_fov={fov}", "input.recenter=false"]


def run_singleview(mesh: str, out_dir: str | os.PathLike, *, preset: str = "tiny",
                   views: int = 9, size: int = 128, overrides: list[str] = (),
                   json_path: str | None = None) -> dict:
    out = Path(out_dir)
    gt = render_gt(mesh, out / "gt", views=views, size=size, overwrite=True)
    cfg = load_job_config(preset, overrides=[*input_view_overrides(gt), f"input.size={size}",
                                             *overrides])
    result = reconstruct(gt / "rgb" / "000.png", gt / "mask" / "000.png", out / "run", cfg,
                         learn_embedding=True, overwrite=True)
    report, text = evaluate_run(out / "run", gt, input_view=0)
    summary = {"benchmark": "singleview", "mesh": mesh, "preset": preset, "model": cfg.model.name,
               "machine": cpu_name(), "reconstruction": result, "evaluation": report,
               "table": text}
    if json_path:
        write_json(json_path, summary)
    return summary
