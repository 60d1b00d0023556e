"""Ground-truth views of a textured OBJ, rendered by pybullet's TinyRenderer in our convention.

The mesh is placed in our world (z-up, scene bound [-1, 1]^3) by one similarity transform::

    world = R_up @ (scale * v) + offset          # v: a vertex as written in the OBJ file

``R_up`` is the identity for ``up_axis="z"`` and the +90 degree rotation about +x for
``up_axis="y"`` (Blender's y-up import: (x, y, z) -> (x, -z, y), det +1), ``scale`` puts the
farthest vertex at ``radius`` from the bounding-box centre and ``offset`` moves that centre to
the origin. The 4x4 ``world_transform = [[scale * R_up, offset], [0, 0, 0, 1]]`` is saved in
``cameras.json``. pybullet applies exactly this: ``meshScale=[scale]*3`` then the body pose
``(offset, R_up)``.

Most OBJ files (pybullet's duck.obj, soccerball.obj, torus_textured.obj) are y-up; those
made for pybullet's z-up URDFs (jenga, tray, table_square, domino) are z-up. The duck faces
world -x.

Lighting is fixed in the world (ambient + Lambert, no specular, no shadows), so a radiance
field with view-independent colour can fit the images exactly.

Output folder (``write_gt``)::

    rgb/NNN.png  mask/NNN.png (0/255)  depth/NNN.npy (float32 z-depth, 0 on background)
    cameras.json (Cameras.to_json() + per-frame files + mesh, world_transform, scene_radius)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rf_core.errors import OutputExistsError, UserError
from rf_core.files.run_folder import (
    FolderLock,
    check_output_path,
    check_removable,
    replace_folder,
    write_marker,
)
from rf_core.scene.cameras import Cameras, sphere_views

PYBULLET_PREFIX = "pybullet_data:"

# Rotations taking the mesh file's up axis to our world +z (proper rotations, det = +1).
_UP_ROTATIONS = {
    "z": np.eye(3),
    "y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
}
# The same rotations as pybullet quaternions [x, y, z, w] (public: the oracle prior places the
# mesh with them).
UP_QUATERNIONS = {
    "z": (0.0, 0.0, 0.0, 1.0),
    "y": (float(np.sqrt(0.5)), 0.0, 0.0, float(np.sqrt(0.5))),
}

# OpenCV camera axes (x right, y down, z forward) -> OpenGL (x right, y up, z backward).
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])

# TinyRenderer samples pixel (row i, column j) at image point (u, v) = (j, i + 1), not at the
# centre (j + 0.5, i + 0.5). Shifting the principal point by this much makes every pixel sample
# its centre (pinned by test_quad_matches_generate_rays_exactly: masks match ray casting exactly).
TINY_PRINCIPAL_SHIFT = (-0.5, 0.5)


class MeshError(UserError, ValueError):
    """A mesh that cannot be rendered as ground truth (missing, unreadable or untextured)."""


@dataclass
class LightConfig:
    """A light fixed in the world; no specular and no shadows, so shading is view-independent."""

    direction: list[float] = field(default_factory=lambda: [0.4, -0.5, 1.0])
    """Direction towards the light, in world coordinates (z-up)."""
    ambient: float = 0.6
    """Ambient coefficient: the share of the texture colour every surface gets."""
    diffuse: float = 0.4
    """Lambertian coefficient (times max(0, n . light))."""


# ----------------------------------------------------------------------------- mesh loading


def resolve_mesh_path(path: str | os.PathLike) -> Path:
    """A real path, or ``pybullet_data:duck.obj`` resolved inside ``pybullet_data``."""
    text = str(path)
    if text.startswith(PYBULLET_PREFIX):
        import pybullet_data

        return Path(pybullet_data.getDataPath()) / text[len(PYBULLET_PREFIX):]
    return Path(text).expanduser()


def _texture_files(obj_path: Path) -> list[Path]:
    """Diffuse texture files an OBJ names through its ``mtllib`` (checked to exist)."""
    text = obj_path.read_text(errors="replace")
    mtl_names = [ln.split(None, 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("mtllib") and len(ln.split(None, 1)) == 2]
    if not mtl_names:
        raise MeshError(f"{obj_path} is untextured: it names no material library (mtllib); "
                        "use an OBJ with a .mtl whose material has a map_Kd texture")
    textures = []
    for name in mtl_names:
        mtl = obj_path.parent / name
        if not mtl.is_file():
            raise MeshError(f"material file {mtl} (named by {obj_path.name}) is missing; "
                            "put it next to the OBJ")
        for line in mtl.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "map_Kd":
                tex = mtl.parent / parts[-1]  # options such as "-s 1 1 1" come before the name
                if not tex.is_file():
                    raise MeshError(f"texture {tex} (map_Kd in {mtl.name}) is missing; "
                                    "put it next to the .mtl")
                textures.append(tex)
    if not textures:
        raise MeshError(f"{obj_path} is untextured: no material in {', '.join(mtl_names)} has "
                        "a diffuse texture (map_Kd)")
    if len(set(textures)) > 1:
        # TinyRenderer binds one texture per visual shape; the others would render wrongly.
        raise MeshError(f"{obj_path} uses {len(set(textures))} texture images; pybullet renders "
                        "only one per mesh: bake them into a single atlas")
    return textures


def load_textured_mesh(path: str | os.PathLike):
    """Load and validate a textured OBJ; returns a ``trimesh.Trimesh`` in file coordinates.

    Raises MeshError (one line) for a missing file, a non-OBJ or unreadable file, a mesh
    without faces, or a mesh without a diffuse texture that exists on disk.
    """
    import trimesh

    obj = resolve_mesh_path(path)
    if not obj.is_file():
        raise MeshError(f"mesh file {obj} not found; pass an .obj path or "
                        f"'{PYBULLET_PREFIX}duck.obj'")
    if obj.suffix.lower() != ".obj":
        raise MeshError(f"{obj} is not a Wavefront OBJ; only textured .obj files are supported")
    _texture_files(obj)
    try:
        mesh = trimesh.load(obj, file_type="obj", process=False, force="mesh")
    except Exception as exc:  # trimesh raises many types for malformed files
        raise MeshError(f"cannot read {obj} as OBJ ({type(exc).__name__}: {exc})") from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise MeshError(f"{obj} has no faces; ground truth needs a surface mesh")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if not np.isfinite(vertices).all():
        raise MeshError(f"{obj} has vertices with NaN or infinite coordinates; fix or re-export it")
    if not np.ptp(vertices, axis=0).max() > 0:
        raise MeshError(f"{obj} has zero extent (all vertices coincide); it is not a surface")
    return mesh


# ------------------------------------------------------------------------ world transform


def up_rotation(up_axis: str) -> np.ndarray:
    """The rotation [3,3] taking a mesh file's ``up_axis`` (``y`` or ``z``) to world +z; a bad
    axis is a ValueError."""
    if up_axis not in _UP_ROTATIONS:
        raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
    return _UP_ROTATIONS[up_axis]


def normalize_transform(mesh, radius: float = 0.8, up_axis: str = "y") -> tuple[float, np.ndarray]:
    """Scale and offset with ``world = R_up @ (scale * v) + offset``.

    The bounding-box centre of the mesh goes to the origin and its farthest vertex from
    that centre to distance ``radius``. Returns (scale, offset [3]).
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    R = up_rotation(up_axis)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    centre = 0.5 * (v.min(0) + v.max(0))
    extent = np.linalg.norm(v - centre, axis=1).max()
    if not extent > 0:
        raise MeshError("mesh has zero extent (all vertices coincide)")
    scale = float(radius / extent)
    offset = -scale * (R @ centre)
    return scale, offset


def world_transform_matrix(scale: float, offset: np.ndarray, up_axis: str = "y") -> np.ndarray:
    """[4, 4] mapping mesh-file coordinates to our world."""
    T = np.eye(4)
    T[:3, :3] = scale * up_rotation(up_axis)
    T[:3, 3] = offset
    return T


def world_vertices(mesh_path, up_axis: str = "y", radius: float = 0.8) -> np.ndarray:
    """Mesh vertices in our world frame, as rendered by ``render_views``: [V, 3] float64."""
    mesh = load_textured_mesh(mesh_path)
    scale, offset = normalize_transform(mesh, radius, up_axis)
    return np.asarray(mesh.vertices) @ (scale * up_rotation(up_axis)).T + offset


# ---------------------------------------------------------------------- camera conversion


def opengl_view_matrix(c2w: np.ndarray) -> list[float]:
    """Our OpenCV camera-to-world [4, 4] -> pybullet's column-major OpenGL view matrix."""
    view = _CV_TO_GL @ np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    return view.flatten(order="F").tolist()


def opengl_projection_matrix(K: np.ndarray, width: int, height: int,
                             near: float, far: float) -> list[float]:
    """Pinhole intrinsics [3, 3] -> column-major OpenGL projection (NDC y up = image row 0)."""
    K = np.asarray(K, dtype=np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    P = np.zeros((4, 4))
    P[0, 0] = 2 * fx / width
    P[0, 2] = 1 - 2 * cx / width
    P[1, 1] = 2 * fy / height
    P[1, 2] = 2 * cy / height - 1
    P[2, 2] = -(far + near) / (far - near)
    P[2, 3] = -2 * far * near / (far - near)
    P[3, 2] = -1.0
    return P.flatten(order="F").tolist()


def depth_from_buffer(buffer: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenGL depth buffer values in [0, 1] -> metric z-depth."""
    return far * near / (far - (far - near) * buffer)


# ------------------------------------------------------------------------------ rendering


def render_views(mesh_path, cams: Cameras, *, up_axis: str = "y", radius: float = 0.8,
                 light: LightConfig | None = None, near: float = 0.1, far: float = 10.0
                 ) -> dict[str, np.ndarray]:
    """Render the normalised mesh from every camera with TinyRenderer.

    A bar shows unless the caller is inside ``rf_core.progress.quiet()`` (or ``RF_QUIET=1``).

    Returns {"rgb": [B, H, W, 3] uint8 on white, "mask": [B, H, W] bool,
    "depth": [B, H, W] float32 z-depth (0 on background), "world_transform": [4, 4] float64
    (mesh-file coordinates -> world), "scene_radius": [] float64}.
    Every pixel samples its centre, exactly as ``generate_rays`` and ``project`` assume.
    """
    import pybullet as p

    from rf_core.progress import progress as progress_bar

    light = light or LightConfig()
    mesh = load_textured_mesh(mesh_path)
    scale, offset = normalize_transform(mesh, radius, up_axis)
    c2w, K = cams.c2w.detach().cpu().double().numpy(), cams.K.detach().cpu().double().numpy()
    W, H = cams.width, cams.height
    rgb = np.full((len(cams), H, W, 3), 255, np.uint8)
    mask = np.zeros((len(cams), H, W), bool)
    depth = np.zeros((len(cams), H, W), np.float32)

    client = p.connect(p.DIRECT)
    try:
        # pybullet caches meshes by file name across clients; a file edited on disk (or a
        # temporary file reusing a name) would otherwise render stale geometry.
        p.setPhysicsEngineParameter(enableFileCaching=0, physicsClientId=client)
        try:
            shape = p.createVisualShape(p.GEOM_MESH, fileName=str(resolve_mesh_path(mesh_path)),
                                        meshScale=[scale] * 3, physicsClientId=client)
        except p.error as exc:
            raise MeshError(f"pybullet could not load {mesh_path}: {exc}") from exc
        K_tiny = K.copy()
        K_tiny[:, 0, 2] += TINY_PRINCIPAL_SHIFT[0]
        K_tiny[:, 1, 2] += TINY_PRINCIPAL_SHIFT[1]
        body = p.createMultiBody(baseVisualShapeIndex=shape, basePosition=offset.tolist(),
                                 baseOrientation=UP_QUATERNIONS[up_axis],
                                 physicsClientId=client)
        bar = progress_bar(total=len(cams), desc="render-gt")
        for b in range(len(cams)):
            _, _, img, zbuf, seg = p.getCameraImage(
                W, H, opengl_view_matrix(c2w[b]),
                opengl_projection_matrix(K_tiny[b], W, H, near, far),
                renderer=p.ER_TINY_RENDERER, shadow=0,
                lightDirection=list(light.direction), lightAmbientCoeff=light.ambient,
                lightDiffuseCoeff=light.diffuse, lightSpecularCoeff=0.0,
                physicsClientId=client)
            # Row 0 of pybullet's buffers is the top image row, like ours.
            m = np.reshape(seg, (H, W)) == body
            mask[b] = m
            rgb[b][m] = np.reshape(img, (H, W, 4))[..., :3][m]
            depth[b][m] = depth_from_buffer(np.reshape(zbuf, (H, W)).astype(np.float64)[m],
                                            near, far)
            bar.update()
        bar.close()
    finally:
        p.disconnect(client)
    return {"rgb": rgb, "mask": mask, "depth": depth,
            "world_transform": world_transform_matrix(scale, offset, up_axis),
            "scene_radius": np.asarray(float(radius))}


# ---------------------------------------------------------------------------- folder I/O


def _check_out_dir(out: Path, overwrite: bool, inputs=()) -> None:
    check_output_path(out, inputs)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) "
                                    "to replace it")
        check_removable(out, kinds=("gt",))  # --overwrite replaces only GT views rf wrote


def write_gt(out_dir, mesh_path, cams: Cameras, rendered: dict, meta: dict | None = None,
             *, overwrite: bool = False) -> Path:
    """Write rendered views as a ground-truth folder, atomically.

    Files go to a temporary sibling folder that is renamed into place only when complete.
    ``meta`` adds keys to ``cameras.json``; ``world_transform`` and ``scene_radius`` default
    to the ones in ``rendered``. Refuses a non-empty ``out_dir`` unless ``overwrite``.
    """
    import imageio.v3 as iio

    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    n = len(cams)
    for key in ("rgb", "mask", "depth"):
        if len(rendered[key]) != n:
            raise ValueError(f"rendered[{key!r}] has {len(rendered[key])} views, cameras {n}")
    data = cams.to_json()
    data.update(meta or {})
    data["mesh"] = str(mesh_path)
    data["mesh_file"] = str(resolve_mesh_path(mesh_path).resolve())
    for key in ("world_transform", "scene_radius"):
        if key not in data and key not in rendered:
            raise ValueError(f"write_gt needs {key!r} in meta or rendered (render_views gives it)")
        data[key] = np.asarray(data.get(key, rendered.get(key)), dtype=float).tolist()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for sub in ("rgb", "mask", "depth"):
            (tmp / sub).mkdir()
        for i, frame in enumerate(data["frames"]):
            names = {"rgb": f"rgb/{i:03d}.png", "mask": f"mask/{i:03d}.png",
                     "depth": f"depth/{i:03d}.npy"}
            iio.imwrite(tmp / names["rgb"], np.asarray(rendered["rgb"][i], np.uint8))
            iio.imwrite(tmp / names["mask"], np.asarray(rendered["mask"][i], np.uint8) * 255)
            np.save(tmp / names["depth"], np.asarray(rendered["depth"][i], np.float32))
            frame.update(names)
        (tmp / "cameras.json").write_text(json.dumps(data, indent=1))
        write_marker(tmp, "gt")
        replace_folder(tmp, out, kinds=("gt",))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class GTViews:
    """A ground-truth folder in memory. rgb: [B, H, W, 3] in [0, 1]; mask, depth: [B, H, W]."""

    rgb: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    cams: Cameras
    world_transform: torch.Tensor
    """[4, 4] mesh-file coordinates -> world."""
    mesh: str
    """The mesh as given to ``render_gt`` (a path or ``pybullet_data:NAME.obj``)."""
    scene_radius: float = 0.8
    """Radius the mesh was normalised to (its farthest vertex from the origin)."""


def load_gt(gt_dir) -> GTViews:
    """Read a folder written by ``write_gt``; clear errors for missing or partial folders."""
    import imageio.v3 as iio

    root = Path(gt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"ground-truth folder {root} not found; create it with "
                                "`rf render-gt MESH.obj --out DIR`")
    meta_path = root / "cameras.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {root} is not a complete ground-truth "
                                "folder; render it again")
    data = json.loads(meta_path.read_text())
    for key in ("frames", "world_transform", "mesh"):
        if key not in data:
            raise ValueError(f"{meta_path} has no {key!r}; render the folder again")
    cams = Cameras.from_json(data)
    rgb, mask, depth = [], [], []
    for i, frame in enumerate(data["frames"]):
        files = {k: root / frame.get(k, f"{k}/{i:03d}.{'npy' if k == 'depth' else 'png'}")
                 for k in ("rgb", "mask", "depth")}
        for f in files.values():
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: {root} is a partial ground-truth "
                                        "folder; render it again")
        rgb.append(iio.imread(files["rgb"])[..., :3])
        mask.append(iio.imread(files["mask"]))
        depth.append(np.load(files["depth"]))
        shapes = {rgb[-1].shape[:2], mask[-1].shape[:2], depth[-1].shape}
        if shapes != {(cams.height, cams.width)}:
            raise ValueError(f"frame {i} of {root} has image sizes {sorted(shapes)}, cameras say "
                             f"{cams.height}x{cams.width}; render the folder again")
    return GTViews(
        rgb=torch.from_numpy(np.stack(rgb)).float() / 255.0,
        mask=torch.from_numpy(np.stack(mask) > 127).float(),
        depth=torch.from_numpy(np.stack(depth)).float(),
        cams=cams,
        world_transform=torch.tensor(data["world_transform"], dtype=torch.float64),
        mesh=str(data["mesh"]),
        scene_radius=float(data.get("scene_radius", 0.8)),
    )


# ---------------------------------------------------------------------------- one call


def render_gt(mesh, out_dir, views: int = 32, size: int = 256, radius: float = 3.0,
              fov: float = 40.0, offset: float = 0.0, overwrite: bool = False, *,
              up_axis: str = "y", scene_radius: float = 0.8,
              light: LightConfig | None = None) -> Path:
    """Render ``views`` sphere views (camera distance ``radius``) of ``mesh`` into ``out_dir``.

    The mesh is normalised to ``scene_radius``; nothing is written unless every view renders.
    """
    if views <= 0:
        raise UserError(f"--views must be a positive number of views, got {views}")
    if size <= 0:
        raise UserError(f"--size must be a positive image size in pixels, got {size}")
    if not (math.isfinite(radius) and radius > scene_radius):
        raise UserError(f"--radius must be a camera distance above the normalised mesh's radius "
                        f"{scene_radius:g}, got {radius}")
    if not (math.isfinite(fov) and 0 < fov < 180):
        raise UserError(f"--fov must be a vertical field of view in (0, 180) degrees, got {fov}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite, inputs=[mesh])
    with FolderLock(out, "rf render-gt"):
        load_textured_mesh(mesh)  # fail on a bad mesh before any camera work
        light = light or LightConfig()
        cams = sphere_views(views, radius, fov, size, size, offset=offset)
        rendered = render_views(mesh, cams, up_axis=up_axis, radius=scene_radius, light=light)
        meta = {"scene_radius": scene_radius, "up_axis": up_axis, "light": asdict(light),
                "world_transform_formula": "world = world_transform @ [v_file, 1]",
                "renderer": "pybullet TinyRenderer"}
        return write_gt(out, mesh, cams, rendered, meta, overwrite=overwrite)
