import math

import pytest
import torch

from rf_core.config import ConfigError, build
from rf_core.scene.cameras import (
    Cameras,
    OrbitConfig,
    generate_rays,
    intrinsics_from_fov,
    look_at,
    orbit_cameras,
    project,
    sample_orbit,
    sphere_views,
)


def test_look_at_is_a_right_handed_opencv_frame():
    eye = torch.randn(64, 3) * 3
    c2w = look_at(eye)
    R = c2w[:, :3, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(64), atol=1e-5)
    # forward (z) points from the eye to the origin, down (y) has no upward component
    assert torch.allclose(R[:, :, 2], torch.nn.functional.normalize(-eye, dim=-1), atol=1e-5)
    assert (R[:, 2, 1] <= 1e-6).all()
    # degenerate: looking straight down still gives a valid frame
    top = look_at(torch.tensor([[0.0, 0.0, 3.0]]))
    assert torch.allclose(torch.linalg.det(top[:, :3, :3]), torch.ones(1), atol=1e-5)


def test_known_view_from_plus_x():
    cam = orbit_cameras(3.0, 0.0, 0.0, 40.0, 64, 64)
    uv, z = project(torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 1, 0]]), cam)
    assert torch.allclose(uv[0, 0], torch.tensor([32.0, 32.0]), atol=1e-4)  # centre
    assert uv[0, 1, 1] < 32 and abs(uv[0, 1, 0] - 32) < 1e-4  # world up is image up
    assert uv[0, 2, 0] > 32  # from +x, world +y is to the right
    assert torch.allclose(z, torch.full((1, 3), 3.0))


def test_fov_edge_ray_angle():
    fov = 50.0
    cam = Cameras(look_at(torch.tensor([[0.0, -2.0, 0.0]])), intrinsics_from_fov(fov, 32, 32)[None],
                  32, 32)
    K = cam.K[0]
    # the top edge of the image (v = 0) is fov/2 above the optical axis
    assert math.isclose(math.degrees(math.atan(K[1, 2] / K[1, 1])), fov / 2, rel_tol=1e-5)


def test_rays_round_trip_through_projection():
    cams = sphere_views(5, 2.5, 45.0, 24, 16)
    rays_o, rays_d = generate_rays(cams)
    assert rays_o.shape == (5, 16, 24, 3)
    assert torch.allclose(rays_d.norm(dim=-1), torch.ones(5, 16, 24), atol=1e-5)
    t = torch.rand(5, 16, 24, 1) * 3 + 0.5
    pts = rays_o + rays_d * t
    for b in range(5):
        uv, z = project(pts[b].reshape(-1, 3), cams[b])
        j, i = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(16) + 0.5, indexing="xy")
        assert torch.allclose(uv[0], torch.stack([j, i], -1).reshape(-1, 2), atol=1e-3)
        assert (z > 0).all()


def test_sphere_views_cover_band_and_interleave():
    a = sphere_views(32, 3.0, 40.0, 8, 8)
    b = sphere_views(8, 3.0, 40.0, 8, 8, offset=0.5)
    eyes_a, eyes_b = a.c2w[:, :3, 3], b.c2w[:, :3, 3]
    assert torch.allclose(eyes_a.norm(dim=-1), torch.full((32,), 3.0), atol=1e-5)
    el = torch.rad2deg(torch.asin(eyes_a[:, 2] / 3.0))
    assert el.min() >= -60 and el.max() <= 75
    assert torch.cdist(eyes_b, eyes_a).min() > 1e-2  # held-out views are new views
    with pytest.raises(ValueError, match="positive"):
        sphere_views(0, 3.0, 40.0, 8, 8)


def test_sample_orbit_ranges_and_determinism():
    cfg = OrbitConfig(radius_range=[2.0, 2.5], elevation_range=[0, 30], azimuth_range=[-90, 90],
                      fov_range=[30, 50])
    cams, ang = sample_orbit(cfg, 200, 16, 16, torch.Generator().manual_seed(1))
    for k, (lo, hi) in [("radius", cfg.radius_range), ("elevation", cfg.elevation_range),
                        ("azimuth", cfg.azimuth_range), ("fov", cfg.fov_range)]:
        assert ang[k].min() >= lo and ang[k].max() <= hi
    assert torch.allclose(cams.c2w[:, :3, 3].norm(dim=-1), ang["radius"], atol=1e-5)
    again, _ = sample_orbit(cfg, 200, 16, 16, torch.Generator().manual_seed(1))
    assert torch.equal(cams.c2w, again.c2w)


def test_orbit_config_validation():
    with pytest.raises(ConfigError, match="low 3.0 > high 2.0"):
        build(OrbitConfig, {"radius_range": [3.0, 2.0]})
    with pytest.raises(ConfigError, match=r"\[low, high\]"):
        build(OrbitConfig, {"fov_range": [40.0]})


def test_cameras_json_round_trip():
    cams = sphere_views(3, 3.0, 40.0, 10, 12)
    back = Cameras.from_json(cams.to_json())
    assert torch.allclose(back.c2w, cams.c2w) and torch.allclose(back.K, cams.K)
    assert (back.width, back.height) == (10, 12)
