"""Example objects with ground truth: pybullet's textured meshes rendered by ``rf render-gt``.

``make_objects(folder, count, size, views)`` renders each mesh's views (once; a folder already
rendered is kept) and writes a ``manifest.jsonl`` that ``rf dataset`` reads: one row per object
with its photo (one GT view), mask, GT folder and input view, so held-out views and the mesh
can be evaluated. ``make dataset`` and ``rf bench dataset`` build their inputs with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rf_core.files.atomic import atomic_write_text
from rf_core.ground_truth.gt_render import render_gt
from rf_core.progress import quiet

__all__ = ["MESHES", "make_objects"]

MESHES = [("duck", "pybullet_data:duck.obj", "y", 0),
          ("soccerball", "pybullet_data:soccerball.obj", "y", 0),
          ("torus", "pybullet_data:torus/torus_textured.obj", "y", 0),
          ("jenga", "pybullet_data:jenga/jenga.obj", "z", 0),
          ("sphere", "pybullet_data:textured_sphere_smooth.obj", "y", 0),
          ("duck_side", "pybullet_data:duck.obj", "y", 2)]
"""(object name, mesh, up axis, input view), in the order ``make_objects`` takes them."""


def make_objects(folder: Path, count: int, size: int, views: int) -> Path:
    """Render GT views for the first ``count`` of ``MESHES`` into ``folder`` and write
    ``folder/manifest.jsonl``; returns its path.

    Args:
        folder: created if missing; each mesh's views go to ``gt_<mesh name>/``.
        count: how many objects, at most ``len(MESHES)``.
        size: image width and height of the GT views.
        views: GT views per object (the input view is one of them).
    """
    if count > len(MESHES):
        raise ValueError(f"at most {len(MESHES)} objects (meshes: "
                         f"{', '.join(m[0] for m in MESHES)}), got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, mesh, up, view in MESHES[:count]:
        gt = folder / f"gt_{mesh.split(':')[1].replace('/', '_')[:-4]}"
        if not (gt / "cameras.json").is_file():
            with quiet():
                render_gt(mesh, gt, views=views, size=size, up_axis=up, overwrite=True)
        rows.append({"name": name, "image": f"{gt.name}/rgb/{view:03d}.png",
                     "mask": f"{gt.name}/mask/{view:03d}.png", "gt": gt.name,
                     "input_view": view})
    manifest = folder / "manifest.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest
