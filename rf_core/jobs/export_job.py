"""``rf export``: a run's orbit video and mesh, written at the end of ``rf reconstruct`` and again
on demand, replacing the run's files all at once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from rf_core.files.fault_points import fault_point
from rf_core.files.run_folder import FolderLock, check_removable, staged_folder
from rf_core.fitting.reconstruct import Reconstructor
from rf_core.jobs.run_loading import load_run, require_run
from rf_core.output.export import ExportConfig, extract_mesh, orbit_frames, write_video
from rf_core.output.mesh_io import write_mesh, write_mesh_preview


def export_run(recon: Reconstructor, cfg: ExportConfig, folder: Path) -> list[Path]:
    """Write the orbit video and the mesh of ``recon`` into ``folder`` (the video's progress
    bar is silent inside ``rf_core.progress.quiet()``)."""
    white = (1.0, 1.0, 1.0)
    video = dataclasses.replace(cfg.video, radius=recon.cfg.camera.input_radius,
                                fov=recon.cfg.camera.input_fov,
                                start_azimuth=recon.cfg.camera.input_azimuth)
    normals = "normal" in video.panels
    frames = orbit_frames(lambda cams, i: recon.render(cams, i, background=white,
                                                       normals=normals), video)
    fault_point("export.rendered")
    written = write_video(frames, folder / "orbit", fps=video.fps, formats=video.formats)
    fault_point("export.video_written")
    if cfg.mesh:
        field = recon.field
        with torch.no_grad():
            mesh = extract_mesh(field.density, lambda x: field(x)[1],
                                bound=recon.cfg.field.bound, resolution=cfg.mesh_resolution,
                                threshold=cfg.threshold, device=recon.device)
        fault_point("export.before_mesh")
        written += write_mesh(mesh, folder / "mesh")
        # three sides of the mesh, the input photo's first: a look without a 3D viewer
        written.append(write_mesh_preview(mesh, folder / "mesh_preview.png",
                                          azimuth=recon.cfg.camera.input_azimuth))
    return written


def export_folder(run_dir: str | os.PathLike, cfg: ExportConfig | None = None) -> list[Path]:
    """``rf export``: re-export a finished run's video and mesh, all files at once.

    The new files are written into a hard-linked copy of the run that replaces it in one
    rename, so a failure leaves the run exactly as it was.
    """
    run = Path(run_dir)
    with FolderLock(run, "rf export"):
        require_run(run)
        check_removable(run, kinds=("reconstruct",))
        recon, run_cfg = load_run(run)
        cfg = cfg or run_cfg.export
        with staged_folder(run, "reconstruct", copy_from=run, kinds=("reconstruct",)) as stage:
            written = export_run(recon, cfg, stage)
        return [run / p.relative_to(stage) for p in written]
