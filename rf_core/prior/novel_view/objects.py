"""Training objects for the novel-view prior, and their rendering with the GT renderer.

An object is a few coloured or textured triangle meshes (``Part``), either

- procedural: 1 to ``max_parts`` primitives (box, ellipsoid, cylinder, capsule, cone), each
  attached to the ones before it, some mirrored for the symmetry of man-made things; or
- a pybullet_data mesh (``training_meshes()``: the 1000 ``random_urdfs`` blobs and a few named
  objects such as the bunny, teddy, mug and lego brick), never an evaluation mesh
  (``rf_core.prior.novel_view.splits``), with a random colour or generated texture.

Textures are generated (stripes, checks, smooth noise, dots, two-tone splits, gradients) and
mapped by per-face planar projection along the face's dominant axis, so untextured meshes get
them too. No other 3D asset collection is used.

``ObjectRenderer`` draws objects with pybullet's TinyRenderer exactly as
``rf_core.ground_truth.gt_render`` draws the evaluation meshes (same camera conversion, pixel-centre
shift and fixed world light), so training views look like the ground-truth renders.
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rf_core.config import bounded
from rf_core.ground_truth.gt_render import (
    PYBULLET_PREFIX,
    TINY_PRINCIPAL_SHIFT,
    LightConfig,
    opengl_projection_matrix,
    opengl_view_matrix,
    resolve_mesh_path,
    up_rotation,
)
from rf_core.prior.novel_view.splits import is_evaluation_mesh
from rf_core.scene.cameras import Cameras

__all__ = ["ObjectConfig", "ObjectRenderer", "Part", "TrainingObject", "make_texture",
           "sample_object", "training_meshes"]

NAMED_MESHES: dict[str, str] = {
    "bunny.obj": "y", "teddy2_VHACD_CHs.obj": "y", "lego/lego.obj": "y", "objects/mug.obj": "z",
    "toys/shape_sorter.obj": "z", "racecar/meshes/cone.obj": "z",
}
"""Recognisable pybullet_data objects drawn besides the blobs: relative path -> the file's up
axis (checked by rendering: the bunny, teddy and brick stand upright). Not the domino: a plain
block like the evaluated jenga block, which procedural boxes cover anyway."""

PRIMITIVES = ("box", "ellipsoid", "cylinder", "capsule", "cone")
"""Procedural part kinds. No torus: the textured torus is an evaluation object."""

TEXTURES = ("stripes", "checks", "noise", "dots", "two_tone", "gradient")
"""Generated texture kinds."""


@dataclass
class ObjectConfig:
    """How training objects are drawn."""

    mesh_fraction: float = bounded(0.4, lo=0, hi=1)
    """Share of objects that are pybullet_data meshes; the rest are procedural."""
    named_mesh_p: float = bounded(0.15, lo=0, hi=1)
    """Of the mesh objects, the share drawn from ``NAMED_MESHES`` (else a random_urdfs blob)."""
    max_parts: int = bounded(4, lo=1)
    """Procedural objects have 1 to this many primitives."""
    mirror_p: float = bounded(0.35, lo=0, hi=1)
    """Probability that a procedural part after the first gets a mirror twin across x = 0."""
    textured_p: float = bounded(0.6, lo=0, hi=1)
    """Probability that a part gets a generated texture (else one plain colour)."""
    texture_size: int = bounded(64, lo=4)
    """Side of the generated texture images, in pixels."""

    def __post_init__(self) -> None:
        for name in ("mesh_fraction", "named_mesh_p", "mirror_p", "textured_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_parts < 1 or self.texture_size < 4:
            raise ValueError(f"max_parts must be >= 1 and texture_size >= 4, got "
                             f"{self.max_parts} and {self.texture_size}")


@dataclass
class Part:
    """One triangle mesh, unrolled so that every face has its own three corners.

    vertices, normals: [3F, 3]; uvs: [3F, 2] (they wrap); rgba: [4] in [0, 1] (multiplies the
    texture); texture: [T, T, 3] uint8 or None.
    """

    vertices: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray
    rgba: np.ndarray
    texture: np.ndarray | None = None


@dataclass
class TrainingObject:
    """A training object: its parts and where it came from (``procedural:box+cone``,
    ``pybullet_data:bunny.obj``)."""

    name: str
    parts: list[Part] = field(default_factory=list)

    def points(self) -> np.ndarray:
        """All corners: [N, 3]."""
        return np.concatenate([p.vertices for p in self.parts])

    def transformed(self, scale: float, offset: np.ndarray) -> TrainingObject:
        """The object with every point mapped to ``scale * x + offset`` (offset: [3])."""
        parts = [Part(scale * p.vertices + offset, p.normals, p.uvs, p.rgba, p.texture)
                 for p in self.parts]
        return TrainingObject(self.name, parts)


# ------------------------------------------------------------------------------- meshes


@functools.cache
def training_meshes() -> tuple[str, ...]:
    """The pybullet_data meshes objects may be drawn from (``pybullet_data:...``), sorted;
    none is an evaluation mesh or of its family."""
    root = resolve_mesh_path(PYBULLET_PREFIX)
    blobs = sorted(p.relative_to(root).as_posix() for p in root.glob("random_urdfs/*/*.obj"))
    names = [f"{PYBULLET_PREFIX}{n}" for n in blobs + sorted(NAMED_MESHES)
             if (root / n).is_file() and _usable(root / n)]
    bad = [n for n in names if is_evaluation_mesh(n)]
    if bad:
        raise RuntimeError(f"training meshes include evaluation meshes {bad}; fix NAMED_MESHES")
    return tuple(names)


def _usable(path: Path) -> bool:
    """An OBJ with faces and finite vertices (random_urdfs/168 is all NaN)."""
    lines = path.read_text(errors="replace").splitlines()
    vertices = [ln for ln in lines if ln.startswith("v ")]
    return (any(ln.startswith("f ") for ln in lines) and bool(vertices)
            and not any("nan" in ln.lower() or "inf" in ln.lower() for ln in vertices))


@functools.lru_cache(maxsize=64)
def _load_mesh(name: str):
    import trimesh

    mesh = trimesh.load(resolve_mesh_path(name), file_type="obj", force="mesh", process=True)
    if len(mesh.faces) == 0:
        raise ValueError(f"{name} has no faces")
    return mesh


def _unroll(mesh, rng: np.random.Generator, uv_scale: float) -> tuple[np.ndarray, ...]:
    """Per-corner vertices, normals and planar-projection uvs of a trimesh: [3F, 3/3/2].

    Normals are smooth where the surface is (vertex normal within 30 degrees of the face
    normal) and flat at creases, so boxes stay crisp and blobs stay round.
    """
    faces = np.asarray(mesh.faces)
    v = np.asarray(mesh.vertices, dtype=np.float64)[faces]  # [F, 3, 3]
    fn = np.asarray(mesh.face_normals, dtype=np.float64)  # [F, 3]
    vn = np.asarray(mesh.vertex_normals, dtype=np.float64)[faces]  # [F, 3, 3]
    smooth = (vn * fn[:, None]).sum(-1, keepdims=True) > math.cos(math.radians(30))
    normals = np.where(smooth, vn, fn[:, None].repeat(3, 1))
    # Degenerate faces have no normal; any unit vector will do for a zero-area triangle.
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    normals = np.where(length > 0.5, normals / np.maximum(length, 1e-12), [0.0, 0.0, 1.0])
    axis = np.abs(fn).argmax(-1)  # project each face along its dominant axis
    keep = np.array([[1, 2], [0, 2], [0, 1]])[axis]  # [F, 2]
    uv = np.take_along_axis(v, keep[:, None, :].repeat(3, 1), axis=2)
    uv = uv * uv_scale + rng.uniform(0, 1, 2)
    return v.reshape(-1, 3), normals.reshape(-1, 3), uv.reshape(-1, 2)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation [3, 3]."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# --------------------------------------------------------------------------- appearance


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour [3] in [0, 1], from HSV so that greys and saturated hues both occur."""
    h, s, v = rng.uniform(), rng.uniform(0.0, 1.0) ** 0.7, rng.uniform(0.25, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def make_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A generated texture of ``kind`` (one of ``TEXTURES``): [size, size, 3] uint8, tileable
    where the pattern allows (stripes, checks, dots, noise)."""
    a, b = _colour(rng), _colour(rng)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size  # [size, size] in (0, 1)
    if kind == "stripes":
        fx, fy = rng.integers(-4, 5, 2)
        fx = fx if fx or fy else 1
        t = (np.sin(2 * np.pi * (fx * x + fy * y)) > rng.uniform(-0.5, 0.5)).astype(float)
    elif kind == "checks":
        n = int(rng.integers(1, 5))
        t = ((np.floor(2 * n * x) + np.floor(2 * n * y)) % 2).astype(float)
    elif kind == "noise":
        n = int(rng.integers(2, 9))
        grid = rng.uniform(size=(n, n))
        gx, gy = x * n, y * n
        i0, j0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
        fx, fy = gx - i0, gy - j0
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep
        g = lambda i, j: grid[j % n, i % n]  # noqa: E731 (wraps: tileable)
        t = ((1 - fy) * ((1 - fx) * g(i0, j0) + fx * g(i0 + 1, j0))
             + fy * ((1 - fx) * g(i0, j0 + 1) + fx * g(i0 + 1, j0 + 1)))
    elif kind == "dots":
        n = int(rng.integers(2, 6))
        d = np.hypot((x * n) % 1 - 0.5, (y * n) % 1 - 0.5)
        t = (d < rng.uniform(0.15, 0.4)).astype(float)
    elif kind == "two_tone":
        angle = rng.uniform(0, 2 * np.pi)
        t = ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) > 0).astype(float)
    elif kind == "gradient":
        t = x if rng.uniform() < 0.5 else y
    else:
        raise ValueError(f"unknown texture kind {kind!r}; choose from {TEXTURES}")
    rgb = (1 - t)[..., None] * a + t[..., None] * b
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def _appearance(rng: np.random.Generator, cfg: ObjectConfig) -> tuple[np.ndarray, ...]:
    """(rgba [4], texture [T, T, 3] or None) for one part."""
    if rng.uniform() < cfg.textured_p:
        kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        return np.ones(4), make_texture(kind, cfg.texture_size, rng)
    return np.append(_colour(rng), 1.0), None


# ----------------------------------------------------------------------------- sampling


def _primitive(kind: str, rng: np.random.Generator):
    """A primitive about the origin with sizes drawn in [0.15, 1]."""
    import trimesh

    size = rng.uniform(0.15, 1.0, 3)
    if kind == "box":
        return trimesh.creation.box(extents=size)
    if kind == "ellipsoid":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
        mesh.apply_scale(size)
        return mesh
    if kind == "cylinder":
        return trimesh.creation.cylinder(radius=size[0] / 2, height=size[2], sections=24)
    if kind == "capsule":
        return trimesh.creation.capsule(height=size[2], radius=size[0] / 3, count=[12, 12])
    if kind == "cone":
        return trimesh.creation.cone(radius=size[0] / 2, height=size[2], sections=24)
    raise ValueError(f"unknown primitive {kind!r}; choose from {PRIMITIVES}")


def _procedural(rng: np.random.Generator, cfg: ObjectConfig) -> TrainingObject:
    parts, kinds = [], []
    for i in range(int(rng.integers(1, cfg.max_parts + 1))):
        kind = PRIMITIVES[int(rng.integers(len(PRIMITIVES)))]
        mesh = _primitive(kind, rng)
        mesh.apply_transform(_homogeneous(_rotation(rng)))
        if parts:  # attach: the new part's centre sits on a corner of what is already there
            anchor = parts[int(rng.integers(len(parts)))].vertices
            mesh.apply_translation(anchor[int(rng.integers(len(anchor)))])
        rgba, texture = _appearance(rng, cfg)
        v, n, uv = _unroll(mesh, rng, rng.uniform(1.0, 4.0))
        parts.append(Part(v, n, uv, rgba, texture))
        kinds.append(kind)
        if i and rng.uniform() < cfg.mirror_p:
            flip = np.array([-1.0, 1.0, 1.0])
            # Mirroring reverses the winding: swap two corners of every face.
            order = np.arange(len(v)).reshape(-1, 3)[:, [0, 2, 1]].reshape(-1)
            parts.append(Part((v * flip)[order], (n * flip)[order], uv[order], rgba, texture))
    return TrainingObject("procedural:" + "+".join(kinds), parts)


def _homogeneous(R: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    return T


def _from_mesh(name: str, rng: np.random.Generator, cfg: ObjectConfig) -> TrainingObject:
    mesh = _load_mesh(name).copy()
    rel = name[len(PYBULLET_PREFIX):]
    # Blobs have no up; named objects stand upright (the cameras' azimuth turns them).
    R = _rotation(rng) if rel not in NAMED_MESHES else up_rotation(NAMED_MESHES[rel])
    mesh.apply_transform(_homogeneous(R))
    v = np.asarray(mesh.vertices)
    extent = np.ptp(v, axis=0).max()
    rgba, texture = _appearance(rng, cfg)
    v, n, uv = _unroll(mesh, rng, rng.uniform(1.0, 4.0) / extent)
    return TrainingObject(name, [Part(v, n, uv, rgba, texture)])


def sample_object(rng: np.random.Generator, cfg: ObjectConfig | None = None) -> TrainingObject:
    """One random training object, its bounding-box centre at the origin (size arbitrary:
    the dataset scales it to the input view's framing)."""
    cfg = cfg or ObjectConfig()
    if rng.uniform() < cfg.mesh_fraction:
        meshes = training_meshes()
        named = [m for m in meshes if m[len(PYBULLET_PREFIX):] in NAMED_MESHES]
        blobs = [m for m in meshes if m not in named]
        pool = named if named and (not blobs or rng.uniform() < cfg.named_mesh_p) else blobs
        obj = _from_mesh(pool[int(rng.integers(len(pool)))], rng, cfg)
    else:
        obj = _procedural(rng, cfg)
    pts = obj.points()
    return obj.transformed(1.0, -0.5 * (pts.min(0) + pts.max(0)))


# ---------------------------------------------------------------------------- rendering


class ObjectRenderer:
    """A pybullet DIRECT client that renders ``TrainingObject`` s as ``gt_render`` renders
    meshes. Use as a context manager (or call ``close``)."""

    def __init__(self, light: LightConfig | None = None, near: float = 0.05,
                 far: float = 10.0) -> None:
        import pybullet as p

        self._p = p
        self.light = light or LightConfig()
        self.near, self.far = near, far
        self._client = p.connect(p.DIRECT)
        p.setPhysicsEngineParameter(enableFileCaching=0, physicsClientId=self._client)
        self._tmp = tempfile.TemporaryDirectory(prefix="rf-novel-view-")
        self._files = 0

    def render(self, obj: TrainingObject, cams: Cameras) -> np.ndarray:
        """Render ``obj`` from every camera: [B, H, W, 4] uint8 RGBA, RGB over white and alpha
        255 on the object, 0 elsewhere."""
        p, cid = self._p, self._client
        p.resetSimulation(physicsClientId=cid)
        for part in obj.parts:
            mesh_file = self._mesh_file(part)
            shape = p.createVisualShape(p.GEOM_MESH, fileName=str(mesh_file),
                                        rgbaColor=[float(c) for c in part.rgba],
                                        physicsClientId=cid)
            body = p.createMultiBody(baseVisualShapeIndex=shape, physicsClientId=cid)
            mesh_file.unlink()  # read by now
            if part.texture is not None:
                p.changeVisualShape(body, -1, textureUniqueId=self._texture(part.texture),
                                    physicsClientId=cid)
        c2w = cams.c2w.detach().cpu().double().numpy()
        K = cams.K.detach().cpu().double().numpy().copy()
        K[:, 0, 2] += TINY_PRINCIPAL_SHIFT[0]
        K[:, 1, 2] += TINY_PRINCIPAL_SHIFT[1]
        W, H = cams.width, cams.height
        out = np.full((len(cams), H, W, 4), 255, np.uint8)
        for b in range(len(cams)):
            _, _, img, _, seg = p.getCameraImage(
                W, H, opengl_view_matrix(c2w[b]),
                opengl_projection_matrix(K[b], W, H, self.near, self.far),
                renderer=p.ER_TINY_RENDERER, shadow=0,
                lightDirection=list(self.light.direction),
                lightAmbientCoeff=self.light.ambient, lightDiffuseCoeff=self.light.diffuse,
                lightSpecularCoeff=0.0, physicsClientId=cid)
            mask = np.reshape(seg, (H, W)) >= 0
            out[b, mask, :3] = np.reshape(img, (H, W, 4))[mask, :3]
            out[b, ..., 3] = mask * 255
        return out

    def _mesh_file(self, part: Part) -> Path:
        # Through an OBJ file: pybullet never frees meshes passed as vertex lists (~0.5 MB
        # each, even after resetSimulation or disconnect), but frees file meshes.
        path = self._fresh_path(".obj")
        n = len(part.vertices)
        corners = np.arange(1, n + 1).reshape(-1, 3).repeat(3, axis=1)
        # One %-format over flat lists: 4x faster than np.savetxt for these sizes.
        text = (("v %.6f %.6f %.6f\n" * n) % tuple(part.vertices.ravel().tolist())
                + ("vt %.5f %.5f\n" * n) % tuple(part.uvs.ravel().tolist())
                + ("vn %.5f %.5f %.5f\n" * n) % tuple(part.normals.ravel().tolist())
                + ("f %d/%d/%d %d/%d/%d %d/%d/%d\n" * (n // 3)) % tuple(corners.ravel().tolist()))
        path.write_text(text)
        return path

    def _fresh_path(self, suffix: str) -> Path:
        # A fresh name each time: pybullet would otherwise hand back a cached file.
        self._files += 1
        return Path(self._tmp.name) / f"f{self._files}{suffix}"

    def _texture(self, texture: np.ndarray) -> int:
        from PIL import Image

        path = self._fresh_path(".png")
        Image.fromarray(texture).save(path)
        tex = self._p.loadTexture(str(path), physicsClientId=self._client)
        path.unlink()
        return tex

    def close(self) -> None:
        if self._client is not None:
            self._p.disconnect(self._client)
            self._client = None
            self._tmp.cleanup()

    def __enter__(self) -> ObjectRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
