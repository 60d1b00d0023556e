"""Mesh files and mesh previews.

Frame: our world is z-up (``rf_core.scene.cameras``); glTF is +y up, right-handed. Every mesh file
rf writes, GLB and OBJ alike, is in the glTF frame: world (x, y, z) is written as
(x, z, -y), i.e. ``file = GLTF_FROM_WORLD @ world``, a rotation by -90 degrees about +x, so
winding and handedness are kept and the object stands upright in Blender, three.js and
model-viewer. ``read_mesh`` is the one way back: it returns the mesh in the world frame, so
metrics computed on a read-back mesh are those of the mesh that was written. Files carry a
tag saying so (glTF ``asset.extras.rf_frame``, a first OBJ comment line); a file without it
(written by rf before the change) is read as already in the world frame.

Written: ``write_mesh`` (GLB with NORMAL and COLOR_0, OBJ with ``vn`` and ``v x y z r g b``,
optionally a GLB textured by baking the vertex colours into a UV atlas from ``xatlas``) and
``write_mesh_preview`` (a PNG of ``render_mesh_preview``: the vertex-coloured mesh seen from
a few directions around the up axis, Lambert-shaded, by a numpy z-buffer rasteriser). Every
file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rf_core.errors import UserError
from rf_core.files.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import trimesh

__all__ = ["FRAME_TAG", "GLTF_FROM_WORLD", "bake_texture", "read_mesh", "render_mesh_preview",
           "write_mesh", "write_mesh_preview"]

GLTF_FROM_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""[3, 3] rotation taking world points (z-up) to file points (glTF, y-up): (x, y, z) ->
(x, z, -y). Its transpose takes them back."""

FRAME_TAG = "gltf_y_up"
"""Value of ``asset.extras.rf_frame`` in rf's GLB files and of the OBJ's first comment."""

_OBJ_HEADER = f"rf_frame: {FRAME_TAG} (file = (x, z, -y) of rf's z-up world)"
_FRAGMENT_BUDGET = 1 << 22  # candidate pixels rasterised at once: ~200 MB of temporaries


# ---------------------------------------------------------------------------- files


def _as4x4(rotation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation
    return m


def _to_file_frame(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of ``mesh`` rotated into the file frame, its vertex normals computed in the
    world frame first and rotated with it (exact: the rotation only permutes and negates)."""
    normals = np.asarray(mesh.vertex_normals)
    out = mesh.copy()
    out.apply_transform(_as4x4(GLTF_FROM_WORLD))
    out.vertex_normals = normals @ GLTF_FROM_WORLD.T
    return out


def _glb_postprocess(tree: dict) -> None:
    """Tag the frame and give every bufferView of vertex or index data its target (the
    validator hints about a missing target; some loaders need it to upload buffers)."""
    tree["asset"].setdefault("extras", {})["rf_frame"] = FRAME_TAG
    views, accessors = tree.get("bufferViews", []), tree.get("accessors", [])
    array_buffer, element_array_buffer = 34962, 34963
    for mesh in tree.get("meshes", []):
        for prim in mesh["primitives"]:
            for acc in prim["attributes"].values():
                views[accessors[acc]["bufferView"]]["target"] = array_buffer
            if "indices" in prim:
                views[accessors[prim["indices"]]["bufferView"]]["target"] = element_array_buffer


def _glb_bytes(mesh: trimesh.Trimesh) -> bytes:
    return mesh.export(file_type="glb", include_normals=True,
                       tree_postprocessor=_glb_postprocess)


def write_mesh(mesh: trimesh.Trimesh, out_stem: Path | str, texture: bool = False,
               texture_size: int = 1024) -> list[Path]:
    """Write ``mesh`` (world frame, z-up) as ``out_stem.glb`` and ``out_stem.obj``.

    Both files are in glTF's frame, +y up: world (x, y, z) is written as (x, z, -y) (see the
    module docstring). The GLB carries per-vertex NORMAL and COLOR_0; the OBJ ``vn`` normals
    and vertex colours as ``v x y z r g b``. With ``texture``, also ``out_stem_textured.glb``:
    the vertex colours baked into a ``texture_size`` x ``texture_size`` texture over an
    ``xatlas`` UV atlas (see ``bake_texture``; needs ``pip install xatlas``; xatlas takes
    ~20 s for a 40k-face marching-cubes mesh). Returns the written paths, in that order.
    """
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    textured = bake_texture(mesh, texture_size) if texture else None  # fail before writing
    file_mesh = _to_file_frame(mesh)
    obj = file_mesh.export(file_type="obj", include_color=True, include_normals=True,
                           include_texture=False, header=_OBJ_HEADER)
    files = [(out_stem.with_name(f"{out_stem.name}.glb"), _glb_bytes(file_mesh)),
             (out_stem.with_name(f"{out_stem.name}.obj"), obj.encode())]
    if textured is not None:
        files.append((out_stem.with_name(f"{out_stem.name}_textured.glb"),
                      _glb_bytes(_to_file_frame(textured))))
    for path, data in files:
        atomic_write_bytes(path, data)
    return [path for path, _ in files]


def _tagged(path: Path) -> bool:
    """Whether the GLB or OBJ at ``path`` says it is in the glTF frame."""
    with open(path, "rb") as f:
        if path.suffix.lower() != ".glb":
            return f.readline(4096).decode(errors="replace").strip() == f"# {_OBJ_HEADER}"
        head = f.read(20)
        if len(head) < 20 or head[:4] != b"glTF":
            return False
        length, kind = struct.unpack_from("<II", head, 12)
        if kind != 0x4E4F534A:  # "JSON"
            return False
        extras = json.loads(f.read(length)).get("asset", {}).get("extras", {})
    return isinstance(extras, dict) and extras.get("rf_frame") == FRAME_TAG


def read_mesh(path: Path | str) -> trimesh.Trimesh:
    """A GLB or OBJ written by ``write_mesh`` as a ``trimesh.Trimesh`` in the world frame
    (z-up): vertices [V, 3] = GLTF_FROM_WORLD.T @ file vertices, in the file's order (no
    merging), normals rotated alike, colours or texture kept. A file without rf's frame tag
    is returned as it is. Raises ValueError when the file holds no triangle mesh."""
    import trimesh

    path = Path(path)
    mesh = trimesh.load(path, force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh):
        raise ValueError(f"{path} holds no triangle mesh")
    if _tagged(path):
        mesh.apply_transform(_as4x4(GLTF_FROM_WORLD.T))  # rotates the file's normals too
    return mesh


# ---------------------------------------------------------------------------- rasteriser


def _rasterize(xy: np.ndarray, width: int, height: int):
    """Pixels whose centres lie in each triangle.

    xy: [F, 3, 2] triangle corners in pixel units (x = column, y = row; pixel (r, c) has its
    centre at (c + 0.5, r + 0.5)). Returns (face [K], pixel [K] = r * width + c, bary [K, 3])
    for every covered (triangle, pixel) pair; pixels on a shared edge may come twice.
    Degenerate triangles cover nothing. Candidates are each triangle's bounding box,
    enumerated in chunks of about ``_FRAGMENT_BUDGET``.
    """
    lo = np.clip(np.ceil(xy.min(1) - 0.5).astype(np.int64), 0, [width, height])
    hi = np.clip(np.floor(xy.max(1) - 0.5).astype(np.int64), -1, [width - 1, height - 1])
    size = np.maximum(hi - lo + 1, 0)  # [F, 2]: columns, rows
    count = size[:, 0] * size[:, 1]
    a, b, c = xy[:, 0], xy[:, 1], xy[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    count[np.abs(area) < 1e-12] = 0
    ends = np.cumsum(count)
    faces, pixels, barys = [], [], []
    start = 0
    while start < len(xy):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + _FRAGMENT_BUDGET, side="right")), start + 1)
        f = np.repeat(np.arange(start, stop), count[start:stop])
        local = np.arange(len(f)) - np.repeat(ends[start:stop] - count[start:stop] - base,
                                              count[start:stop])
        col = lo[f, 0] + local % size[f, 0]
        row = lo[f, 1] + local // size[f, 0]
        px, py = col + 0.5, row + 0.5
        # Barycentric coordinates from the signed areas of the sub-triangles at the pixel.
        w0 = ((b[f, 0] - px) * (c[f, 1] - py) - (b[f, 1] - py) * (c[f, 0] - px)) / area[f]
        w1 = ((c[f, 0] - px) * (a[f, 1] - py) - (c[f, 1] - py) * (a[f, 0] - px)) / area[f]
        w = np.stack([w0, w1, 1.0 - w0 - w1], axis=-1)
        inside = (w >= -1e-7).all(-1)
        faces.append(f[inside])
        pixels.append(row[inside] * width + col[inside])
        barys.append(w[inside])
        start = stop
    if not faces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    return np.concatenate(faces), np.concatenate(pixels), np.concatenate(barys)


def _vertex_rgb(mesh: trimesh.Trimesh) -> np.ndarray:
    """Vertex colours [V, 3] in [0, 1] (a textured mesh's texture sampled at its UVs)."""
    visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
    return np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0


# ---------------------------------------------------------------------------- texture


def bake_texture(mesh: trimesh.Trimesh, size: int = 1024, padding: int = 4
                 ) -> trimesh.Trimesh:
    """A copy of ``mesh`` textured with its own vertex colours.

    UVs come from ``xatlas`` (vertices are split along chart seams, so the copy has
    V' >= V vertices; uv [V', 2], trimesh's convention, v up). The texture is ``size`` x
    ``size`` RGB (a PIL image in the PBR material's baseColorTexture): every texel whose centre
    lies in a UV triangle gets the barycentric blend of that triangle's vertex colours, and
    ``padding`` rings of texels around the charts get their neighbours' mean, so bilinear
    filtering and mipmaps do not pull in the background at seams.
    Raises UserError when xatlas is not installed.
    """
    if size < 8:
        raise ValueError(f"texture size must be >= 8 pixels, got {size}")
    try:
        import xatlas
    except ImportError:
        raise UserError("a textured mesh needs xatlas: pip install xatlas (or "
                        "pip install -e .[texture])") from None
    import trimesh
    from PIL import Image

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(size)
    pack.padding = 2
    atlas.generate(xatlas.ChartOptions(), pack)
    vmap, faces, uv = atlas[0]

    rgb = _vertex_rgb(mesh)[vmap]
    # The atlas's uvs are normalised, so it is baked at exactly size x size (xatlas's own
    # atlas is only near that, and viewers prefer power-of-two textures). glTF's v grows
    # downwards, with the image row; the file gets xatlas's v as it is.
    face, pixel, bary = _rasterize((uv * size)[faces], size, size)
    image = np.zeros((size * size, 3))
    filled = np.zeros(size * size, bool)
    image[pixel] = np.einsum("kc,kcd->kd", bary, rgb[faces[face]])
    filled[pixel] = True
    image, filled = image.reshape(size, size, 3), filled.reshape(size, size)
    for _ in range(padding):
        image, filled = _grow(image, filled)

    texture = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture,
                                                   metallicFactor=0.0, roughnessFactor=1.0)
    # trimesh keeps uvs with v up and flips them when it writes glTF.
    visual = trimesh.visual.TextureVisuals(uv=np.stack([uv[:, 0], 1.0 - uv[:, 1]], -1),
                                           material=material)
    return trimesh.Trimesh(np.asarray(mesh.vertices)[vmap], faces.astype(np.int64),
                           vertex_normals=np.asarray(mesh.vertex_normals)[vmap],
                           visual=visual, process=False)


def _grow(image: np.ndarray, filled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One ring of empty texels next to filled ones set to their filled 4-neighbours' mean.
    image: [H, W, 3]; filled: [H, W] bool."""
    total = np.zeros_like(image)
    n = np.zeros(filled.shape)
    for axis in (0, 1):
        for shift in (1, -1):
            src = [slice(None), slice(None)]
            dst = [slice(None), slice(None)]
            src[axis] = slice(None, -1) if shift == 1 else slice(1, None)
            dst[axis] = slice(1, None) if shift == 1 else slice(None, -1)
            mask = filled[tuple(src)]
            total[tuple(dst)] += image[tuple(src)] * mask[..., None]
            n[tuple(dst)] += mask
    new = ~filled & (n > 0)
    image = image.copy()
    image[new] = total[new] / n[new][:, None]
    return image, filled | new


# ---------------------------------------------------------------------------- preview


def _view_axes(azimuth: float, elevation: float) -> np.ndarray:
    """[3, 3] rows right, down, forward (OpenCV) of a camera at ``azimuth`` degrees
    counter-clockwise around +z from +x and ``elevation`` degrees above the xy-plane,
    looking at the origin (the world is z-up)."""
    az, el = np.radians(azimuth), np.radians(elevation)
    forward = -np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    right = np.array([-np.sin(az), np.cos(az), 0.0])  # forward x up, normalised
    return np.stack([right, np.cross(forward, right), forward])


def render_mesh_preview(mesh: trimesh.Trimesh, size: int = 256, views: int = 3,
                        elevation: float = 20.0, azimuth: float = 0.0) -> np.ndarray:
    """The vertex-coloured ``mesh`` (world frame, z-up) seen from ``views`` directions.

    View k looks at the centre of the mesh's bounding box from azimuth ``azimuth + 360 k /
    views`` degrees (counter-clockwise around +z from +x, as ``rf_core.scene.cameras``; azimuth 0
    is the default input photo's side) and ``elevation`` degrees above the horizon, with +z
    up in the image. The projection is orthographic and the scale is the same in every view
    (the bounding sphere fills 90% of a panel), so proportions can be compared across views.
    Shading is Lambert (two-sided) under a light from the camera's upper left, plus ambient;
    colours are the vertex colours blended barycentrically; the background is white.

    Returns uint8 [size, size * views, 3], the views left to right.
    """
    if size < 2 or views < 1:
        raise ValueError(f"size must be >= 2 and views >= 1, got size={size}, views={views}")
    out = np.full((size, size * views, 3), 255, np.uint8)
    if len(mesh.faces) == 0:
        return out
    verts = np.asarray(mesh.vertices, np.float64)
    if not np.isfinite(verts).all():
        raise ValueError("the mesh has NaN or inf vertices; nothing to preview")
    faces = np.asarray(mesh.faces)
    normals = np.asarray(mesh.vertex_normals, np.float64)
    rgb = _vertex_rgb(mesh)
    centre = 0.5 * (verts.min(0) + verts.max(0))
    radius = max(float(np.linalg.norm(verts - centre, axis=1).max()), 1e-12)
    scale = 0.45 * size / radius
    for k in range(views):
        axes = _view_axes(azimuth + 360.0 * k / views, elevation)
        cam = (verts - centre) @ axes.T  # [V, 3]: right, down, forward
        xy = cam[:, :2] * scale + size / 2
        face, pixel, bary = _rasterize(xy[faces], size, size)
        depth = np.einsum("kc,kc->k", bary, cam[faces[face], 2])
        order = np.lexsort((depth, pixel))  # nearest fragment first within each pixel
        first = np.ones(len(order), bool)
        first[1:] = pixel[order[1:]] != pixel[order[:-1]]
        keep = order[first]
        f, w, px = faces[face[keep]], bary[keep], pixel[keep]
        n = np.einsum("kc,kcd->kd", w, normals[f])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        n *= -np.sign(n @ axes[2] + 1e-12)[:, None]  # two-sided: face the camera
        light = -axes[2] - 0.5 * axes[1] - 0.3 * axes[0]
        shade = 0.3 + 0.7 * np.clip(n @ (light / np.linalg.norm(light)), 0.0, 1.0)
        colour = np.einsum("kc,kcd->kd", w, rgb[f]) * shade[:, None]
        panel = np.full((size * size, 3), 255, np.uint8)
        panel[px] = (np.clip(colour, 0, 1) * 255 + 0.5).astype(np.uint8)
        out[:, k * size:(k + 1) * size] = panel.reshape(size, size, 3)
    return out


def write_mesh_preview(mesh: trimesh.Trimesh, path: Path | str, size: int = 256,
                       views: int = 3, azimuth: float = 0.0) -> Path:
    """Write ``render_mesh_preview(mesh, size, views, azimuth=azimuth)`` as a PNG at
    ``path``, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render_mesh_preview(mesh, size, views, azimuth=azimuth)).save(
        buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())
