"""Small pictures of a reconstruction in progress, cheap enough for every report of a sweep.

:func:`preview_object` renders one object: a short low-resolution orbit, a shaded picture of a
coarse mesh and, with ground truth, the held-out strip (GT above ours). :func:`write_preview`
lays several objects out together (one row or column per object) and writes the files a sweep
logs to MLflow: ``orbit.gif``, ``views.png``, ``mesh_preview.png`` and ``heldout.png``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from rf_core.evaluation.heldout import InterimPlan, heldout_strip
from rf_core.files.atomic import atomic_write_bytes
from rf_core.output.export import ExportConfig, extract_mesh, orbit_frames, write_video
from rf_core.output.mesh_io import render_mesh_preview
from rf_core.progress import quiet

__all__ = ["PREVIEW_FILES", "preview_object", "write_preview"]

PREVIEW_FILES = ("orbit.gif", "views.png", "mesh_preview.png", "heldout.png")


def preview_object(recon, export: ExportConfig, gt=None, input_view: int = 0,
                   interim: InterimPlan | None = None, frames: int = 6, size: int = 64,
                   mesh_resolution: int = 64) -> dict[str, np.ndarray]:
    """One object's preview images (uint8 RGB):

    - ``orbit`` [F, size, size, 3]: ``frames`` albedo views around the object from the input
      camera's distance and field of view, starting at the input view's azimuth;
    - ``mesh`` [h, w, 3]: the mesh at ``min(export.mesh_resolution, mesh_resolution)``,
      shaded (white with "no surface" when the field is still empty);
    - ``heldout`` [2 s, V s, 3] (with ``gt``): GT views above ours, ``interim``'s views/size.
    """
    cam = recon.cfg.camera
    video = dataclasses.replace(export.video, frames=frames, size=size, panels=["rgb"],
                                radius=cam.input_radius, fov=cam.input_fov,
                                start_azimuth=cam.input_azimuth)
    with quiet():  # a few small frames: no bar
        orbit = orbit_frames(lambda cams, i: recon.render(cams, i, normals=False), video)
    field = recon.field
    try:
        with torch.no_grad():
            mesh = extract_mesh(field.density, lambda x: field(x)[1],
                                bound=recon.cfg.field.bound,
                                resolution=min(export.mesh_resolution, mesh_resolution),
                                threshold=export.threshold, device=recon.device)
        mesh_image = render_mesh_preview(mesh, size=2 * size, azimuth=cam.input_azimuth)
    except ValueError:  # no surface yet (early steps, or a diverged field)
        mesh_image = _label(np.full((2 * size, 6 * size, 3), 255, np.uint8), "no surface")
    out = {"orbit": orbit, "mesh": mesh_image}
    if gt is not None:
        plan = interim or InterimPlan()
        out["heldout"] = heldout_strip(recon, gt, input_view, plan.views, plan.size)
    return out


def write_preview(per_object: dict[str, dict[str, np.ndarray]], folder: Path | str,
                  fps: int = 8) -> list[Path]:
    """Write the previews of one or more objects into ``folder``: ``orbit.gif`` (objects side
    by side in every frame, enlarged to at least 128 px per object), ``views.png`` (4 orbit
    frames per object, one row each), ``mesh_preview.png`` and ``heldout.png`` (one labelled
    row per object; heldout only when some object has ground truth). Returns the written
    paths."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(per_object)
    orbits = [per_object[n]["orbit"] for n in names]
    frames = min(len(o) for o in orbits)
    tiled = np.stack([np.concatenate([o[i] for o in orbits], axis=1) for i in range(frames)])
    tiled = np.stack([_enlarge(f, orbits[0].shape[1]) for f in tiled])
    written = write_video(tiled, folder / "orbit", fps=fps, formats=["gif"])
    pick = np.linspace(0, frames - 1, min(4, frames)).round().astype(int)
    rows = {"views.png": [_label(_enlarge(np.concatenate(list(per_object[n]["orbit"][pick]),
                                                         axis=1), orbits[0].shape[1]), n)
                          for n in names],
            "mesh_preview.png": [_label(per_object[n]["mesh"], n) for n in names],
            "heldout.png": [_label(_enlarge(per_object[n]["heldout"],
                                            per_object[n]["heldout"].shape[0] // 2), n)
                            for n in names if "heldout" in per_object[n]]}
    for file, images in rows.items():
        if images:
            path = folder / file
            atomic_write_bytes(path, iio.imwrite("<bytes>", _stack_rows(images),
                                                 extension=".png"))
            written.append(path)
    return written


def _enlarge(image: np.ndarray, tile: int, least: int = 128) -> np.ndarray:
    """``image`` (made of ``tile``-pixel views) repeated by the integer factor that makes a
    view at least ``least`` pixels, so small interim renders are visible in MLflow."""
    k = max(1, -(-least // max(tile, 1)))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def _stack_rows(images: list[np.ndarray]) -> np.ndarray:
    """Images one above the other, padded with white to the widest."""
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255)
              for im in images]
    return np.concatenate(padded, axis=0)


def _label(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` in its top-left corner (PIL's default font)."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    draw = ImageDraw.Draw(pil)
    box = draw.textbbox((3, 2), text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(255, 255, 255))
    draw.text((3, 2), text, fill=(0, 0, 0))
    return np.asarray(pil)
