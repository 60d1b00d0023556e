"""Cameras: one convention everywhere.

Convention (OpenCV): camera x right, y down, z forward; poses are camera-to-world
4x4 matrices ``c2w`` whose columns are [right, down, forward, eye]. The world is
z-up. Pixel (row i, column j) has its centre at image coordinates
``(u, v) = (j + 0.5, i + 0.5)``. Depth maps hold z-depth (distance along the
camera's forward axis), not ray length.

Orbit angles: ``elevation`` is degrees above the xy-plane, ``azimuth`` is
degrees counter-clockwise around +z starting at +x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rf_core.config import bounded

WORLD_UP = (0.0, 0.0, 1.0)


@dataclass
class OrbitConfig:
    """Ranges random views are drawn from (each a ``[low, high]`` pair)."""

    radius_range: list[float] = bounded([2.6, 3.0], lo=0, lo_open=True)
    """Camera distance from the origin."""
    elevation_range: list[float] = bounded([-10.0, 60.0], lo=-90, hi=90)
    """Degrees above the horizontal plane."""
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    """Degrees around the up axis; 0 looks from +x."""
    fov_range: list[float] = bounded([40.0, 40.0], lo=0, hi=180, lo_open=True, hi_open=True)
    """Vertical field of view in degrees."""
    uniform_sphere_rate: float = bounded(0.0, lo=0, hi=1)
    """Probability that a view is instead drawn uniformly by area over the upper hemisphere
    (elevation 0..90°, azimuth in range; stable-dreamfusion's ``uniform_sphere_rate``), which
    sees the top as often as its area says."""

    def __post_init__(self) -> None:
        for name in ("radius_range", "elevation_range", "azimuth_range", "fov_range"):
            low, high = _pair(getattr(self, name), name)
            if low > high:
                raise ValueError(f"{name}: low {low} > high {high}; write it as [low, high]")
        if self.radius_range[0] <= 0:
            raise ValueError(f"radius_range must be positive, got {self.radius_range}")
        if not (0 < self.fov_range[0] and self.fov_range[1] < 180):
            raise ValueError(f"fov_range must lie in (0, 180) degrees, got {self.fov_range}")
        if not (-90 <= self.elevation_range[0] and self.elevation_range[1] <= 90):
            raise ValueError(f"elevation_range must lie in [-90, 90] degrees, "
                             f"got {self.elevation_range}")
        if not 0 <= self.uniform_sphere_rate <= 1:
            raise ValueError(f"uniform_sphere_rate must be in [0, 1], "
                             f"got {self.uniform_sphere_rate}")


@dataclass
class CameraSetup:
    """The input view's camera and the range of random views."""

    input_radius: float = bounded(3.0, lo=0, lo_open=True)
    """Distance of the input camera from the origin."""
    input_elevation: float = bounded(0.0, lo=-90, hi=90)
    """Input camera elevation (degrees); RealFusion assumes a roughly level photo."""
    input_azimuth: float = 0.0
    """Input camera azimuth (degrees); the front of the object faces this direction."""
    input_fov: float = bounded(40.0, lo=0, hi=180, lo_open=True, hi_open=True)
    """Input camera vertical field of view (degrees)."""
    random: OrbitConfig = field(default_factory=lambda: OrbitConfig(
        radius_range=[1.17, 1.75], elevation_range=[-30.0, 90.0],
        azimuth_range=[-180.0, 180.0], fov_range=[40.0, 70.0], uniform_sphere_rate=0.5))
    """Random views for SDS. The authors' ranges (radius 1.0-1.5 around an input camera at 1.8
    with fov 55°, elevation -30..90°, fov 40-70°, half the views uniform on the upper
    hemisphere), with radii scaled by 1.165 so that the object appears at the same size
    relative to our input camera (radius 3, fov 40: 3 tan 20° / (1.8 tan 27.5°) = 1.165)."""


def _pair(value, name: str) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be [low, high], got {value}")
    return float(value[0]), float(value[1])


@dataclass
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    c2w: [B, 4, 4] camera-to-world (OpenCV axes). K: [B, 3, 3] intrinsics.
    """

    c2w: torch.Tensor
    K: torch.Tensor
    width: int
    height: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> Cameras:
        c2w, K = self.c2w[index], self.K[index]
        if c2w.dim() == 2:
            c2w, K = c2w[None], K[None]
        return Cameras(c2w, K, self.width, self.height)

    def to(self, device) -> Cameras:
        return Cameras(self.c2w.to(device), self.K.to(device), self.width, self.height)

    def to_json(self) -> dict:
        return {
            "convention": "opencv_c2w_z_up",
            "width": self.width,
            "height": self.height,
            "frames": [
                {"c2w": c.tolist(), "K": k.tolist()} for c, k in zip(self.c2w, self.K)
            ],
        }

    @staticmethod
    def from_json(data: dict) -> Cameras:
        frames = data["frames"]
        c2w = torch.tensor([f["c2w"] for f in frames], dtype=torch.float32)
        K = torch.tensor([f["K"] for f in frames], dtype=torch.float32)
        return Cameras(c2w, K, int(data["width"]), int(data["height"]))


def intrinsics_from_fov(fov_y_deg: torch.Tensor | float, width: int, height: int) -> torch.Tensor:
    """Pinhole intrinsics with square pixels and the principal point at the centre.

    fov_y_deg: [B] or scalar vertical field of view. Returns [B, 3, 3] (or [3, 3]).
    """
    fov = torch.as_tensor(fov_y_deg, dtype=torch.float32)
    focal = 0.5 * height / torch.tan(torch.deg2rad(fov) / 2)
    K = torch.zeros(*fov.shape, 3, 3)
    K[..., 0, 0] = focal
    K[..., 1, 1] = focal
    K[..., 0, 2] = width / 2
    K[..., 1, 2] = height / 2
    K[..., 2, 2] = 1.0
    return K


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up=WORLD_UP) -> torch.Tensor:
    """Camera-to-world poses looking from ``eye`` [B, 3] at ``target`` [B, 3] (default origin).

    Returns [B, 4, 4] with columns [right, down, forward, eye].
    """
    eye = torch.as_tensor(eye, dtype=torch.float32)
    if target is None:
        target = torch.zeros_like(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up_t = torch.as_tensor(up, dtype=eye.dtype).expand_as(forward)
    right = torch.linalg.cross(forward, up_t, dim=-1)
    # Looking straight up or down: the up vector is parallel to forward, pick +y instead.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0]).expand_as(forward), dim=-1)
    right = torch.nn.functional.normalize(torch.where(degenerate, alt, right), dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.eye(4).repeat(*eye.shape[:-1], 1, 1)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = down
    c2w[..., :3, 2] = forward
    c2w[..., :3, 3] = eye
    return c2w


def orbit_position(radius, elevation_deg, azimuth_deg) -> torch.Tensor:
    """Points on a sphere around the origin: [B] each -> [B, 3]."""
    r = torch.as_tensor(radius, dtype=torch.float32)
    el = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float32))
    az = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float32))
    r, el, az = torch.broadcast_tensors(r, el, az)
    return torch.stack(
        [r * torch.cos(el) * torch.cos(az), r * torch.cos(el) * torch.sin(az), r * torch.sin(el)],
        dim=-1,
    )


def orbit_cameras(radius, elevation_deg, azimuth_deg, fov_deg, width: int, height: int) -> Cameras:
    """Cameras on an orbit looking at the origin; angle arguments are [B] or scalars."""
    eye = orbit_position(radius, elevation_deg, azimuth_deg)
    if eye.dim() == 1:
        eye = eye[None]
    fov = torch.as_tensor(fov_deg, dtype=torch.float32).expand(eye.shape[0])
    return Cameras(look_at(eye), intrinsics_from_fov(fov, width, height), width, height)


def sample_orbit(
    cfg: OrbitConfig, n: int, width: int, height: int, generator: torch.Generator | None = None
) -> tuple[Cameras, dict[str, torch.Tensor]]:
    """Draw ``n`` random orbit cameras uniformly in each range.

    Returns the cameras and their angles {"radius", "elevation", "azimuth", "fov"}: [n] each.
    """

    def uniform(lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angles = {
        "radius": uniform(cfg.radius_range),
        "elevation": uniform(cfg.elevation_range),
        "azimuth": uniform(cfg.azimuth_range),
        "fov": uniform(cfg.fov_range),
    }
    if cfg.uniform_sphere_rate > 0:
        on_sphere = torch.rand(n, generator=generator) < cfg.uniform_sphere_rate
        hemisphere = torch.rad2deg(torch.asin(torch.rand(n, generator=generator)))
        angles["elevation"] = torch.where(on_sphere, hemisphere, angles["elevation"])
    cams = orbit_cameras(
        angles["radius"], angles["elevation"], angles["azimuth"], angles["fov"], width, height
    )
    return cams, angles


def sphere_views(n: int, radius: float, fov_deg: float, width: int, height: int,
                 offset: float = 0.0, min_elevation: float = -60.0,
                 max_elevation: float = 75.0) -> Cameras:
    """``n`` views spread evenly over a band of the viewing sphere (a Fibonacci spiral).

    ``offset`` in [0, 1) shifts the spiral so that a second set interleaves the first
    (held-out views that are not copies of training views).
    """
    if n <= 0:
        raise ValueError(f"the number of views must be positive, got {n}")
    i = torch.arange(n, dtype=torch.float32) + 0.5 + offset
    lo, hi = math.sin(math.radians(min_elevation)), math.sin(math.radians(max_elevation))
    z = lo + (hi - lo) * (i / n)
    elevation = torch.rad2deg(torch.asin(z.clamp(-1, 1)))
    golden = math.pi * (3.0 - math.sqrt(5.0))
    azimuth = torch.rad2deg(torch.remainder(i * golden, 2 * math.pi))
    return orbit_cameras(radius, elevation, azimuth, fov_deg, width, height)


def generate_rays(cams: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through every pixel centre.

    Returns rays_o, rays_d: [B, H, W, 3] each; rays_d has unit length.
    """
    device = cams.c2w.device
    j, i = torch.meshgrid(
        torch.arange(cams.width, device=device, dtype=torch.float32) + 0.5,
        torch.arange(cams.height, device=device, dtype=torch.float32) + 0.5,
        indexing="xy",
    )  # [H, W]
    K = cams.K[:, None, None]  # [B, 1, 1, 3, 3]
    x = (j - K[..., 0, 2]) / K[..., 0, 0]
    y = (i - K[..., 1, 2]) / K[..., 1, 1]
    dirs_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
    R = cams.c2w[:, None, None, :3, :3]
    rays_d = torch.nn.functional.normalize((R @ dirs_cam[..., None])[..., 0], dim=-1)
    rays_o = cams.c2w[:, None, None, :3, 3].expand_as(rays_d)
    return rays_o, rays_d


def project(points: torch.Tensor, cams: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into every camera.

    points: [N, 3]. Returns uv: [B, N, 2] image coordinates (pixel centres at +0.5) and
    z: [B, N] z-depth (negative behind the camera).
    """
    w2c = torch.linalg.inv(cams.c2w)  # [B, 4, 4]
    p_cam = points[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    z = p_cam[..., 2]
    uvw = p_cam @ cams.K.transpose(1, 2)
    uv = uvw[..., :2] / uvw[..., 2:3]
    return uv, z
