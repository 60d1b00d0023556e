"""The novel-view prior's training set: rendered views of training objects, and pairs of them.

Every object is seen from ``input_views_per_object`` input-like cameras (the reconstruction's
input camera: its radius and field of view, elevation in ``cond_elevation_range``, any azimuth)
and ``target_views_per_object`` cameras drawn from the reconstruction's random-view
``OrbitConfig`` (the zooms, fields of view and elevations SDS renders). A pair is any input-like
view (the condition) with any view of the same object as target: the other input-like views
(input-like targets), the random views, and the condition itself (the identical camera, which
teaches the copy).

Scale: the reconstruction sees a photo recentred so that the object's bounding box's longer side
is ``InputConfig.fill_ratio`` (0.7) of the image, from its input camera (radius 3, fov 40), so
each object is scaled until its input-like views have that framing on average (``frame_scale``).
For a sphere that is a radius of 3 sin(atan(0.7 tan 20°)) = 0.74; other shapes come out at
farthest-point radii of about 0.75 to 1.0 (capped at ``max_radius``). A fixed farthest-vertex
radius would frame long thin objects smaller than round ones. (The evaluation meshes are
rendered at radius 0.8, but their photos are recentred to the same 0.7 framing.)

On disk (``build_dataset``)::

    config.json                   the NovelViewDataConfig (a resumed build must match it)
    shards/shard_NNNNN.npz        rgba [n, V, S, S, 4] uint8 (RGB over white, alpha coverage;
                                  the first input_views_per_object views are the input-like
                                  ones), angles [n, V, 4] float32 (elevation, azimuth, radius,
                                  fov; degrees), object_index [n] int64, name [n] str,
                                  object_radius [n] float32 (farthest point after scaling)
    manifest.json                 written last: config, counts, shards, render speed, and the
                                  evaluation meshes that were excluded
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rf_core.config import bounded
from rf_core.errors import UserError
from rf_core.files.atomic import atomic_write, atomic_write_json
from rf_core.input.image_input import InputConfig
from rf_core.prior.novel_view.geometry import ANGLE_KEYS, camera_features
from rf_core.prior.novel_view.objects import ObjectConfig
from rf_core.prior.novel_view.splits import EVALUATION_MESHES
from rf_core.scene.cameras import Cameras, CameraSetup, OrbitConfig, project, sample_orbit


class DatasetMismatchError(UserError, ValueError):
    """The output folder holds a dataset built with another config."""

__all__ = ["NovelViewDataConfig", "NovelViewPairs", "area_downsample", "build_dataset",
           "frame_scale", "render_object"]

FORMAT = "rf-novel-view-data/1"


@dataclass
class NovelViewDataConfig:
    """What ``build_dataset`` renders.

    The defaults (5000 objects x 16 views, 80,000 renders at 96 px) take 3 to 7 minutes on one
    CPU core (measured 200-450 views/s, depending on what else runs), need ~450 MB while
    building, ~65 MB on disk and ~330 MB in memory for the training split.
    """

    size: int = bounded(32, lo=4)
    """Side of the stored views, in pixels."""
    supersample: int = bounded(3, lo=1)
    """Views are rendered at ``size * supersample`` and area-averaged down (anti-aliasing)."""
    objects: int = bounded(5000, lo=2)
    """Training objects, validation ones included."""
    val_objects: int = bounded(64, lo=1)
    """The last this many objects form the ``val`` split (held-out training objects for
    monitoring; the evaluation meshes are never rendered at all)."""
    input_views_per_object: int = bounded(4, lo=1)
    """Input-like views per object; each is a condition of pairs."""
    target_views_per_object: int = bounded(12, lo=0)
    """Views from ``target_orbit`` per object (targets only)."""
    cond_elevation_range: list[float] = bounded([-60.0, 75.0], lo=-90, hi=90)
    """Elevation (degrees) of the input-like views. Photos come from any height: the
    reconstruction's input camera sits at 0 (15 in the realfusion preset), and ``rf
    render-gt``'s views, any of which can be the photo, span -60..75."""
    input_radius: float = bounded(CameraSetup.input_radius, lo=0, lo_open=True)
    """Distance of the input-like cameras (the reconstruction's input camera)."""
    input_fov: float = bounded(CameraSetup.input_fov, lo=0, hi=180, lo_open=True, hi_open=True)
    """Vertical field of view (degrees) of the input-like cameras."""
    target_orbit: OrbitConfig = field(default_factory=lambda: CameraSetup().random)
    """Where target views are drawn from: the reconstruction's random SDS views."""
    fill_ratio: float = bounded(InputConfig.fill_ratio, lo=0, hi=1, lo_open=True)
    """Mean bounding-box longer side of an object in its input-like views, as a fraction of the
    image (``InputConfig.fill_ratio``: how a photo is framed)."""
    max_radius: float = bounded(1.0, lo=0, lo_open=True)
    """Cap on an object's farthest point from the origin after framing (the scene bound)."""
    shard_objects: int = bounded(200, lo=1)
    """Objects per shard file; a finished shard survives an interrupted build."""
    seed: int = 0
    """Every object and camera is a function of (seed, object index)."""
    object: ObjectConfig = field(default_factory=ObjectConfig)
    """How objects are drawn."""

    def __post_init__(self) -> None:
        if isinstance(self.target_orbit, dict):
            self.target_orbit = OrbitConfig(**self.target_orbit)
        if isinstance(self.object, dict):
            self.object = ObjectConfig(**self.object)
        if not 1 <= self.val_objects < self.objects:
            raise ValueError(f"val_objects must be in [1, objects), got {self.val_objects} "
                             f"of {self.objects}")
        lo, hi = self.cond_elevation_range
        if not -90 <= lo <= hi <= 90:
            raise ValueError(f"cond_elevation_range must be [low, high] within [-90, 90], "
                             f"got {self.cond_elevation_range}")
        for name in ("size", "supersample", "input_views_per_object", "shard_objects"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.target_views_per_object < 0:
            raise ValueError(f"target_views_per_object must be >= 0, "
                             f"got {self.target_views_per_object}")

    @property
    def views_per_object(self) -> int:
        return self.input_views_per_object + self.target_views_per_object


# ----------------------------------------------------------------------------- building


def _object_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, index])


def _cameras(cfg: NovelViewDataConfig, res: int,
             generator: torch.Generator) -> tuple[Cameras, Cameras, torch.Tensor]:
    """Input-like and target cameras at ``res`` pixels and their angles [V, 4] (ANGLE_KEYS)."""
    cond_orbit = OrbitConfig(radius_range=[cfg.input_radius] * 2,
                             elevation_range=list(cfg.cond_elevation_range),
                             azimuth_range=[-180.0, 180.0], fov_range=[cfg.input_fov] * 2)
    cond, cond_angles = sample_orbit(cond_orbit, cfg.input_views_per_object, res, res, generator)
    target, target_angles = sample_orbit(cfg.target_orbit, cfg.target_views_per_object, res, res,
                                         generator)
    angles = torch.stack([torch.cat([cond_angles[k], target_angles[k]]) for k in ANGLE_KEYS], -1)
    return cond, target, angles


def frame_scale(points: np.ndarray, cams: Cameras, fill_ratio: float,
                max_radius: float) -> float:
    """The scale that makes ``points`` [N, 3] (centred at the origin) fill ``fill_ratio`` of
    ``cams``' images on average (bounding-box longer side), capped at ``max_radius``.

    Perspective makes the fill slightly nonlinear in the scale: three fixed-point steps bring
    it within 0.1% for objects of this size.
    """
    pts = torch.as_tensor(points, dtype=torch.float32)
    radius = float(pts.norm(dim=-1).max())
    scale = 0.75 / radius  # a start safely in front of every camera
    for _ in range(3):
        uv, _z = project(pts * scale, cams)  # [B, N, 2]
        side = torch.maximum((uv[..., 0].amax(1) - uv[..., 0].amin(1)) / cams.width,
                             (uv[..., 1].amax(1) - uv[..., 1].amin(1)) / cams.height)
        scale *= fill_ratio / float(side.mean())
    return min(scale, max_radius / radius)


def area_downsample(rgba: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks: [B, H, W, 4] uint8 -> [B, H/f, W/f, 4] uint8."""
    if factor == 1:
        return rgba
    B, H, W, C = rgba.shape
    blocks = rgba.reshape(B, H // factor, factor, W // factor, factor, C).astype(np.float32)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def render_object(index: int, cfg: NovelViewDataConfig, renderer) -> dict:
    """Draw object ``index`` and its cameras from (seed, index) and render every view.

    Returns {"rgba": [V, S, S, 4] uint8, "angles": [V, 4] float32, "name": str,
    "object_radius": float}.
    """
    from rf_core.prior.novel_view.objects import sample_object

    seq = _object_seed(cfg.seed, index)
    rng = np.random.default_rng(seq)
    generator = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
    obj = sample_object(rng, cfg.object)
    res = cfg.size * cfg.supersample
    cond, target, angles = _cameras(cfg, res, generator)
    scale = frame_scale(obj.points(), cond, cfg.fill_ratio, cfg.max_radius)
    obj = obj.transformed(scale, np.zeros(3))
    cams = Cameras(torch.cat([cond.c2w, target.c2w]), torch.cat([cond.K, target.K]), res, res)
    rgba = area_downsample(renderer.render(obj, cams), cfg.supersample)
    return {"rgba": rgba, "angles": angles.numpy().astype(np.float32), "name": obj.name,
            "object_radius": float(np.linalg.norm(obj.points(), axis=-1).max())}


def _config_json(cfg: NovelViewDataConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _write_shard(path: Path, first: int, rows: list[dict]) -> None:
    arrays = {
        "rgba": np.stack([r["rgba"] for r in rows]),
        "angles": np.stack([r["angles"] for r in rows]),
        "object_index": np.arange(first, first + len(rows), dtype=np.int64),
        "name": np.array([r["name"] for r in rows]),
        "object_radius": np.array([r["object_radius"] for r in rows], np.float32),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def build_dataset(out_dir, cfg: NovelViewDataConfig | None = None,
                  progress: Callable[[str], object] = print) -> Path:
    """Render the training set into ``out_dir``; returns the path of its ``manifest.json``.

    Resumable: shards already on disk are kept, so an interrupted build continues where it
    stopped (and a finished one returns at once). Each object depends only on (seed, index),
    so a resumed build writes the same data as an uninterrupted one. A folder built with
    another config is refused. ``progress`` gets one line per shard.
    """
    from rf_core.prior.novel_view.objects import ObjectRenderer

    cfg = cfg or NovelViewDataConfig()
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest_path, config_path = out / "manifest.json", out / "config.json"
    wanted = _config_json(cfg)
    if config_path.is_file():
        have = json.loads(config_path.read_text())
        if have != wanted:
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            raise DatasetMismatchError(
                f"{out} holds a novel-view dataset built with another config (differs in "
                f"{', '.join(diff)}); use another folder or delete it")
    else:
        atomic_write_json(config_path, wanted)
    if manifest_path.is_file():
        progress(f"novel-view data: {out} is complete")
        return manifest_path

    n_shards = -(-cfg.objects // cfg.shard_objects)
    shards = []
    for k in range(n_shards):
        first = k * cfg.shard_objects
        count = min(cfg.shard_objects, cfg.objects - first)
        shards.append({"file": f"shards/shard_{k:05d}.npz", "first": first, "count": count})
    todo = [s for s in shards if not (out / s["file"]).is_file()]
    res = cfg.size * cfg.supersample
    progress(f"novel-view data: {cfg.objects} objects x {cfg.views_per_object} views at {res} px "
             f"-> {cfg.size} px into {out} ({len(shards) - len(todo)} of {len(shards)} shards "
             "already done)")
    renders, seconds = 0, 0.0
    with ObjectRenderer() as renderer:
        for i, shard in enumerate(todo):
            start = time.perf_counter()
            rows = [render_object(j, cfg, renderer)
                    for j in range(shard["first"], shard["first"] + shard["count"])]
            _write_shard(out / shard["file"], shard["first"], rows)
            seconds += time.perf_counter() - start
            renders += shard["count"] * cfg.views_per_object
            left = sum(s["count"] for s in todo[i + 1:]) * cfg.views_per_object
            progress(f"novel-view data: {shard['file']} ({i + 1}/{len(todo)} to do), "
                     f"{renders / seconds:.0f} views/s, ~{left / (renders / seconds):.0f} s left")
    counts = {"objects": cfg.objects, "train_objects": cfg.objects - cfg.val_objects,
              "val_objects": cfg.val_objects, "views_per_object": cfg.views_per_object,
              "pairs_per_object": cfg.input_views_per_object * cfg.views_per_object}
    counts["train_pairs"] = counts["train_objects"] * counts["pairs_per_object"]
    counts["val_pairs"] = counts["val_objects"] * counts["pairs_per_object"]
    manifest = {"format": FORMAT, "config": wanted, "counts": counts, "shards": shards,
                "angle_keys": list(ANGLE_KEYS),
                "excluded_evaluation_meshes": list(EVALUATION_MESHES),
                "last_run": {"views": renders, "seconds": round(seconds, 2),
                             "views_per_second": round(renders / seconds, 1) if seconds else None}}
    atomic_write_json(manifest_path, manifest)
    progress(f"novel-view data: done, {counts['train_pairs']} train and {counts['val_pairs']} "
             f"val pairs in {out}")
    return manifest_path


# ------------------------------------------------------------------------------ reading


class NovelViewPairs(torch.utils.data.Dataset):
    """Pairs (condition view, target view, relative camera) of one split of a built dataset.

    split: ``"train"`` or ``"val"`` (the last ``val_objects`` objects). Item i is object
    i // P (P = input views x views per object), condition view (i % P) // V, target view
    i % V (V views per object, the condition's own index included). Items are
    {"cond": [4, S, S] float32, "target": [4, S, S] float32 (RGB over white, alpha = mask, in
    [0, 1]), "camera": [6] float32 (``camera_features``)}. The split is held in memory as uint8
    (``objects x V x S x S x 4`` bytes).
    """

    def __init__(self, folder, split: str = "train") -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(folder)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: {root} is not a finished "
                                    "novel-view dataset; run build_dataset on it (it resumes)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, this code "
                             f"reads {FORMAT!r}; rebuild the dataset")
        self.config = NovelViewDataConfig(**manifest["config"])
        cfg = self.config
        first = 0 if split == "train" else cfg.objects - cfg.val_objects
        stop = cfg.objects - cfg.val_objects if split == "train" else cfg.objects
        rgba, angles = [], []
        for shard in manifest["shards"]:
            lo, hi = max(first, shard["first"]), min(stop, shard["first"] + shard["count"])
            if lo >= hi:
                continue
            with np.load(root / shard["file"]) as data:
                take = slice(lo - shard["first"], hi - shard["first"])
                rgba.append(data["rgba"][take])
                angles.append(data["angles"][take])
        self.rgba = torch.from_numpy(np.concatenate(rgba))  # [N, V, S, S, 4] uint8
        self.angles = torch.from_numpy(np.concatenate(angles))  # [N, V, 4]
        V, C = cfg.views_per_object, cfg.input_views_per_object
        expected = (stop - first, V, cfg.size, cfg.size, 4)
        if tuple(self.rgba.shape) != expected:
            raise ValueError(f"{root} holds views of shape {tuple(self.rgba.shape)}, its manifest "
                             f"says {expected}; rebuild the dataset")
        a = {k: self.angles[..., i] for i, k in enumerate(ANGLE_KEYS)}  # [N, V] each
        cond = {k: v[:, :C, None].expand(-1, C, V) for k, v in a.items()}
        target = {k: v[:, None, :].expand(-1, C, V) for k, v in a.items()}
        self.camera = camera_features({k: v.reshape(-1) for k, v in cond.items()},
                                      {k: v.reshape(-1) for k, v in target.items()},
                                      ).reshape(-1, C, V, 6)  # [N, C, V, 6]
        self.views, self.cond_views = V, C

    def __len__(self) -> int:
        return self.rgba.shape[0] * self.cond_views * self.views

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs")
        i %= len(self)
        obj, rest = divmod(i, self.cond_views * self.views)
        c, t = divmod(rest, self.views)
        return {"cond": self.rgba[obj, c].permute(2, 0, 1).float() / 255.0,
                "target": self.rgba[obj, t].permute(2, 0, 1).float() / 255.0,
                "camera": self.camera[obj, c, t]}
