"""Single-view benchmark: reconstruct one ``rf render-gt`` view, evaluate on the others.

The photo is GT view 0, not recentred, and the reconstruction's input camera is set to that
view's radius, elevation, azimuth and fov, so the two worlds align rigidly and held-out views,
depth and the mesh can be compared with ground truth.
"""

from __future__ import annotations

import os
from pathlib import Path

from rf_core.bench.common import cpu_name, write_json
from rf_core.evaluate_run import evaluate_run, input_view_overrides
from rf_core.gt_render import render_gt
from rf_core.reconstruct_job import load_job_config, reconstruct


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
