"""Exports of a trained field: a turntable video and a coloured triangle mesh.

Video: ``orbit_frames`` renders an orbit at a fixed elevation through a caller's
``render_fn`` and lays the panels (rgb | normal | depth) side by side; ``write_video``
writes them as GIF and MP4 (H.264, yuv420p). Mesh: ``extract_mesh`` runs marching
cubes on the density sampled over the scene cube and colours the vertices from the
albedo; ``write_mesh`` (from ``rf_core.output.mesh_io``, re-exported here) writes GLB and OBJ in
glTF's y-up frame. Every file is written to a temporary sibling and renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rf_core.config import bounded
from rf_core.files.atomic import atomic_write
from rf_core.output.mesh_io import write_mesh as write_mesh  # the mesh files' home; kept importable
from rf_core.progress import progress
from rf_core.scene.cameras import Cameras, orbit_cameras

if TYPE_CHECKING:
    import trimesh

VIDEO_FORMATS = ("gif", "mp4")  # the order they are written in: GIF needs no ffmpeg
PANELS = ("rgb", "normal", "depth")

DEFAULT_DENSITY_THRESHOLD = 10.0
"""Marching-cubes level when none is given: stable-dreamfusion's ``density_thresh``. A slab
of density 10 and thickness 0.1 scene units is 1 - e^-1 = 63% opaque, so the surface sits
where the field turns opaque on the scale of a tenth of the unit-sized object."""

# viridis (matplotlib's perceptual map) sampled at 11 evenly spaced stops; interpolated
# linearly between them, which is visually indistinguishable at video resolution.
_VIRIDIS = np.array([
    [0.267004, 0.004874, 0.329415], [0.282623, 0.140926, 0.457517],
    [0.253935, 0.265254, 0.529983], [0.206756, 0.371758, 0.553117],
    [0.163625, 0.471133, 0.558148], [0.127568, 0.566949, 0.550556],
    [0.134692, 0.658636, 0.517649], [0.266941, 0.748751, 0.440573],
    [0.477504, 0.821444, 0.318195], [0.741388, 0.873449, 0.149561],
    [0.993248, 0.906157, 0.143936],
])


# ---------------------------------------------------------------------------- video


@dataclass
class OrbitVideoConfig:
    """A turntable video: ``frames`` views on a circle at a fixed elevation."""

    frames: int = bounded(60, lo=1)
    """Views in one full turn (evenly spaced in azimuth; the last is not a copy of the first)."""
    size: int = bounded(128, lo=2)
    """Width and height of each panel in pixels."""
    radius: float = bounded(3.0, lo=0, lo_open=True)
    """Camera distance from the origin, in scene units."""
    elevation: float = bounded(15.0, lo=-90, hi=90)
    """Degrees above the xy-plane (the world is z-up)."""
    fov: float = bounded(40.0, lo=0, hi=180, lo_open=True, hi_open=True)
    """Vertical field of view in degrees."""
    fps: int = bounded(24, lo=1)
    """Frames per second of the written video."""
    start_azimuth: float = 0.0
    """Azimuth of the first frame in degrees, counter-clockwise around +z from +x."""
    formats: list[str] = field(default_factory=lambda: ["mp4", "gif"])
    """Files to write, any of 'mp4' and 'gif' (GIF is always written first)."""
    panels: list[str] = field(default_factory=lambda: ["rgb", "normal", "depth"])
    """Panels laid side by side, left to right, any of 'rgb', 'normal' and 'depth'."""

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.size < 2:
            raise ValueError(f"size must be >= 2 pixels, got {self.size}")
        if self.radius <= 0:
            raise ValueError(f"radius must be positive, got {self.radius}")
        if not 0 < self.fov < 180:
            raise ValueError(f"fov must lie in (0, 180) degrees, got {self.fov}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        _check_names(self.formats, VIDEO_FORMATS, "formats")
        _check_names(self.panels, PANELS, "panels")
        if not self.panels:
            raise ValueError(f"panels must name at least one of {list(PANELS)}")


@dataclass
class ExportConfig:
    """What a finished run exports."""

    video: OrbitVideoConfig = field(default_factory=OrbitVideoConfig)
    """The 360° orbit video."""
    mesh: bool = True
    """Extract a mesh by marching cubes."""
    mesh_resolution: int = bounded(128, lo=8)
    """Grid points per side for marching cubes."""
    threshold: float | None = bounded(None, lo=0, lo_open=True)
    """Density level of the surface (None: rf_core.output.export's default, 10)."""


def _check_names(names: Sequence[str], allowed: Sequence[str], what: str) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {bad[0]!r}; choose from {list(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} lists a name twice: {list(names)}")


def orbit_cameras_for(cfg: OrbitVideoConfig) -> Cameras:
    """The video's ``cfg.frames`` cameras, [F] in a batch, looking at the origin."""
    azimuth = cfg.start_azimuth + 360.0 * torch.arange(cfg.frames, dtype=torch.float32) / cfg.frames
    return orbit_cameras(cfg.radius, cfg.elevation, azimuth, cfg.fov, cfg.size, cfg.size)


def orbit_frames(render_fn: Callable[[Cameras, int], dict], cfg: OrbitVideoConfig
                 ) -> np.ndarray:
    """Render the orbit of ``cfg`` and lay the panels side by side.

    ``render_fn(cams, index)`` returns ``render_image``'s dict for camera ``index`` of
    ``cams`` (the caller closes over its renderer and field; pass ``want_normals=True``
    when 'normal' is a panel). Panels: 'rgb' is the dict's rgb as it is, so the caller's
    background_fn decides what is behind the object; 'normal' maps world normals from
    [-1, 1] to [0, 1], over white by opacity; 'depth' is z-depth normalised over the whole
    video (near is bright, viridis), over white by opacity.

    Returns uint8 frames [F, H, W * len(cfg.panels), 3].
    """
    cams = orbit_cameras_for(cfg)
    views = []
    with progress(total=cfg.frames, desc="orbit video") as bar:
        for i in range(cfg.frames):
            out = render_fn(cams, i)
            views.append({k: _numpy(out[k]) for k in ("rgb", "opacity", "depth", "normal")
                          if k in out})
            bar.update(1)

    opaque = [v["depth"][v["opacity"] > 0.5] for v in views if "depth" in v]
    opaque = np.concatenate(opaque) if opaque else np.zeros(0)
    lo, hi = (float(opaque.min()), float(opaque.max())) if opaque.size else (0.0, 1.0)

    frames = []
    for v in views:
        panels = []
        for name in cfg.panels:
            if name not in v:
                raise KeyError(f"render_fn returned no {name!r}; it must return "
                               "render_image's dict")
            if name == "rgb":
                panels.append(v["rgb"])
            elif name == "normal":
                panels.append(_normal_panel(v["normal"], v["opacity"]))
            else:
                panels.append(_depth_panel(v["depth"], v["opacity"], lo, hi))
        frames.append(_to_u8(np.concatenate(panels, axis=1)))
    return np.stack(frames)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _over_white(color: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    a = np.clip(opacity, 0.0, 1.0)[..., None]
    return a * color + (1.0 - a)


def _normal_panel(normal: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    # The renderer composites normals with the weights, so they are scaled by opacity;
    # dividing it out and renormalising gives unit normals at the object's edge too.
    n = normal / np.maximum(opacity, 1e-6)[..., None]
    n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
    return _over_white(0.5 * (n + 1.0), opacity)


def _depth_panel(depth: np.ndarray, opacity: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((depth - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return _over_white(_viridis(1.0 - t), opacity)


def _viridis(t: np.ndarray) -> np.ndarray:
    """viridis at t: [...] in [0, 1] -> RGB [..., 3] in [0, 1] (dark purple to yellow)."""
    x = np.clip(t, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(x.astype(np.int64), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return (1 - f) * _VIRIDIS[i] + f * _VIRIDIS[i + 1]


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def write_video(frames: np.ndarray, out_stem: Path | str, fps: float = 24,
                formats: Sequence[str] = ("mp4", "gif")) -> list[Path]:
    """Write uint8 frames [F, H, W, 3] as ``out_stem.gif`` and/or ``out_stem.mp4``.

    GIF: loops forever, frame delays rounded to 10 ms (the format's unit); Pillow merges
    identical consecutive frames (adding their durations), so playback is unchanged.
    MP4: H.264, yuv420p, padded by repeating the edge pixels to even height and width;
    needs the ffmpeg of ``imageio-ffmpeg``. The GIF is written first, so it exists even
    when MP4 fails for want of ffmpeg.
    Returns the written paths in the order written.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got "
                         f"{frames.dtype} {list(frames.shape)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _check_names(list(formats), VIDEO_FORMATS, "formats")
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in VIDEO_FORMATS:
        if fmt in formats:
            path = out_stem.with_name(f"{out_stem.name}.{fmt}")
            (_write_gif if fmt == "gif" else _write_mp4)(frames, path, fps)
            written.append(path)
    return written


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration = max(20, round(1000 / fps))  # ms; browsers slow down anything under 20 ms

    def write(tmp: Path) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=duration, loop=0, disposal=1)

    atomic_write(path, write)


def _ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise RuntimeError("cannot write MP4: no ffmpeg found; pip install imageio-ffmpeg "
                           "(or drop 'mp4' from the video formats)") from None


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    _ffmpeg_exe()
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    frames = np.ascontiguousarray(np.pad(frames, pad, mode="edge"))

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
            pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
            ffmpeg_log_level="error", output_params=["-crf", "18", "-movflags", "+faststart"])
        writer.send(None)  # start ffmpeg
        try:
            for f in frames:
                writer.send(f)
        finally:
            writer.close()

    atomic_write(path, write)


# ---------------------------------------------------------------------------- mesh


def _grid_points(start: int, stop: int, resolution: int, bound: float, device) -> torch.Tensor:
    """World positions of flat grid indices [start, stop): grid point (i, j, k) sits at
    -bound + 2 bound (i, j, k) / (resolution - 1), so the corners are the cube's corners."""
    idx = torch.arange(start, stop, device=device)
    r = resolution
    ijk = torch.stack([idx // (r * r), (idx // r) % r, idx % r], dim=-1).float()
    return -bound + ijk * (2 * bound / (r - 1))


@torch.no_grad()
def _density_grid(density_fn: Callable[[torch.Tensor], torch.Tensor], bound: float,
                 resolution: int, chunk: int = 65536, device: torch.device | str = "cpu"
                 ) -> np.ndarray:
    """density_fn sampled at resolution^3 grid points over [-bound, bound]^3 -> float32
    [R, R, R] indexed [x, y, z] (see ``_grid_points`` for where each point lies)."""
    n = resolution ** 3
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        out[s:e] = density_fn(_grid_points(s, e, resolution, bound, device)).float().cpu().numpy()
    return out.reshape(resolution, resolution, resolution)


@torch.no_grad()
def extract_mesh(density_fn: Callable[[torch.Tensor], torch.Tensor],
                 color_fn: Callable[[torch.Tensor], torch.Tensor], bound: float,
                 resolution: int = 128, threshold: float | None = None, chunk: int = 65536,
                 device: torch.device | str = "cpu", keep_largest: bool = True,
                 min_component_fraction: float = 0.05) -> trimesh.Trimesh:
    """The surface density = ``threshold`` of a field as a vertex-coloured trimesh.Trimesh.

    density_fn(x [N, 3]) -> [N] and color_fn(x [N, 3]) -> [N, 3] in [0, 1] take world points
    on ``device`` (e.g. ``field.density`` and ``lambda x: field(x)[1]``); both run without
    gradients, ``chunk`` points at a time. The density is sampled on a resolution^3 grid
    whose corners are the corners of [-bound, bound]^3; ``threshold`` defaults to
    ``DEFAULT_DENSITY_THRESHOLD``. The grid is padded with empty space, so a surface cut by
    the cube is closed by a cap on the cube's face and the mesh stays watertight. Faces wind
    counter-clockwise seen from outside, so normals point from dense to empty.

    ``keep_largest`` drops floaters: connected components with fewer than
    ``min_component_fraction`` times the faces of the largest component.
    Vertex colours are RGBA uint8. Raises ValueError when nothing reaches the threshold.
    """
    import trimesh
    from skimage.measure import marching_cubes

    if resolution < 2:
        raise ValueError(f"mesh resolution must be >= 2, got {resolution}")
    level = DEFAULT_DENSITY_THRESHOLD if threshold is None else float(threshold)
    if level <= 0:
        raise ValueError(f"the density threshold must be positive, got {level:g}")
    volume = _density_grid(density_fn, bound, resolution, chunk, device)
    if not np.isfinite(volume).all():
        raise ValueError("the field's density has NaN or inf values; the model has diverged")
    peak = float(volume.max())
    if peak <= level:
        raise ValueError(f"no surface at threshold {level:g}: the field is empty (densest "
                         f"point {peak:.3g}); train longer or lower export.threshold")

    step = 2 * bound / (resolution - 1)
    padded = np.pad(volume, 1, mode="constant", constant_values=0.0)
    verts, faces, _, _ = marching_cubes(padded, level, spacing=(step, step, step),
                                        allow_degenerate=False)
    verts = np.clip(verts - bound - step, -bound, bound)  # undo the padding; caps on the cube
    # skimage winds faces clockwise seen from the low side for a field that is high inside;
    # reversing them makes the right-hand normals point outward.
    mesh = trimesh.Trimesh(verts, faces[:, ::-1], process=True)

    if keep_largest and len(mesh.faces):
        labels = trimesh.graph.connected_component_labels(mesh.face_adjacency,
                                                          node_count=len(mesh.faces))
        sizes = np.bincount(labels)
        keep = sizes >= min_component_fraction * sizes.max()
        if not keep.all():
            mesh.update_faces(keep[labels])
            mesh.remove_unreferenced_vertices()

    x = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
    rgb = torch.cat([color_fn(c).float().cpu() for c in x.split(chunk)]).numpy()
    rgba = np.concatenate([_to_u8(rgb), np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    mesh.visual.vertex_colors = rgba
    return mesh
