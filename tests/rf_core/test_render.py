import math

import pytest
import torch

from rf_core.scene.cameras import orbit_cameras
from rf_core.scene.render import (
    OccupancyConfig,
    RendererConfig,
    VolumeRenderer,
    ray_aabb,
    render_image,
    render_weights,
    shade,
    stratified_samples,
)

R_SPHERE = 0.5


def sphere_field(x):
    """A solid red sphere of radius 0.5: density 200 inside, 0 outside."""
    inside = (x.norm(dim=-1) < R_SPHERE).float()
    albedo = torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)
    return 200.0 * inside, albedo


def sphere_density(x):
    return sphere_field(x)[0]


def sphere_normals(x, density=None):
    return torch.nn.functional.normalize(x, dim=-1)


def white(d):
    return torch.ones_like(d)


def test_render_weights_match_cumprod_reference():
    sigma = torch.rand(7, 33, dtype=torch.float64) * 5
    deltas = torch.rand(7, 33, dtype=torch.float64) * 0.1
    w, t_last = render_weights(sigma, deltas)
    alpha = 1 - torch.exp(-sigma * deltas)
    trans = torch.cumprod(torch.cat([torch.ones(7, 1, dtype=torch.float64), 1 - alpha], -1), -1)
    assert torch.allclose(w, trans[:, :-1] * alpha, atol=1e-12)
    assert torch.allclose(t_last, trans[:, -1], atol=1e-12)
    assert torch.allclose(w.sum(-1) + t_last, torch.ones(7, dtype=torch.float64))
    sigma.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: render_weights(s, deltas)[0], (sigma,))


def test_ray_aabb_known_rays():
    o = torch.tensor([[-3.0, 0, 0], [-3.0, 5.0, 0], [0.0, 0, 0]])
    d = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.0, 0, 1.0]])
    t0, t1, hit = ray_aabb(o, d, 1.0)
    assert hit.tolist() == [True, False, True]
    assert torch.allclose(t0[[0, 2]], torch.tensor([2.0, 0.0]))
    assert torch.allclose(t1[[0, 2]], torch.tensor([4.0, 1.0]))


def test_stratified_samples_stay_in_their_strata():
    t0, t1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.5])
    t, dt = stratified_samples(t0, t1, 8, perturb=True, generator=torch.Generator().manual_seed(0))
    edges = t0[:, None] + (t1 - t0)[:, None] * torch.arange(9) / 8
    assert ((t >= edges[:, :-1]) & (t <= edges[:, 1:])).all()
    assert torch.allclose(dt.sum(-1), t1 - t0)


def test_min_step_takes_fewer_samples_on_short_chords():
    t0, t1 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 2.5, 10.0])
    t, dt = stratified_samples(t0, t1, 8, perturb=True, min_step=0.3,
                               generator=torch.Generator().manual_seed(0))
    # 2.0 / 0.3 -> 6 full strata + one cut at t1; 0.5 / 0.3 -> 1 + a cut one; 10 / 8 > 0.3.
    assert (dt > 0).sum(-1).tolist() == [7, 2, 8]
    assert torch.allclose(dt.sum(-1), t1 - t0)
    assert torch.allclose(dt[0, :6], torch.tensor(0.3))
    assert torch.allclose(dt[2], torch.tensor(1.25))
    starts = t0[:, None] + torch.cumsum(dt, -1) - dt
    assert ((t >= starts) & (t <= starts + dt)).all() and (t <= t1[:, None]).all()


def render_sphere(renderer, cams, **kw):
    return render_image(renderer, sphere_field, cams, 0, background_fn=white,
                        normal_fn=sphere_normals, **kw)


def test_sphere_silhouette_depth_and_normals():
    size, dist, fov = 64, 3.0, 40.0
    cams = orbit_cameras(dist, 20.0, 30.0, fov, size, size)
    renderer = VolumeRenderer(RendererConfig(num_samples=512,
                                             occupancy=OccupancyConfig(enabled=False)), 1.0)
    out = render_sphere(renderer, cams, want_normals=True)
    # silhouette: a disc whose angular radius is asin(r / d)
    focal = cams.K[0, 1, 1].item()
    r_px = focal * math.tan(math.asin(R_SPHERE / dist))
    mask = out["opacity"] > 0.5
    assert abs(mask.sum().item() - math.pi * r_px ** 2) < 0.04 * math.pi * r_px ** 2
    # colour: red inside, white background outside
    c = size // 2
    assert torch.allclose(out["rgb"][c, c], torch.tensor([1.0, 0.0, 0.0]), atol=1e-2)
    assert torch.allclose(out["rgb"][0, 0], torch.ones(3))
    # z-depth at the centre is the distance to the front of the sphere
    assert abs(out["depth"][c, c].item() - (dist - R_SPHERE)) < 0.01
    # normals at the centre face the camera
    toward_cam = -cams.c2w[0, :3, 2]
    assert torch.dot(out["normal"][c, c], toward_cam) > 0.99


def test_occupancy_grid_skips_empty_space_without_changing_the_image():
    cams = orbit_cameras(3.0, 10.0, 45.0, 40.0, 48, 48)
    cfg = RendererConfig(num_samples=256, occupancy=OccupancyConfig(resolution=32))
    renderer = VolumeRenderer(cfg, 1.0)
    full = render_sphere(renderer, cams)
    renderer.update_occupancy(sphere_density, generator=torch.Generator().manual_seed(0))
    occ = renderer.occupancy
    assert 0.0 < occ.occupancy_ratio < 0.2  # the sphere fills ~6.5% of the cube
    assert occ.query(torch.zeros(1, 3)).item() and not occ.query(torch.full((1, 3), 0.9)).item()
    skipped = render_sphere(renderer, cams)
    assert torch.allclose(full["rgb"], skipped["rgb"], atol=2e-2)
    assert torch.allclose(full["opacity"], skipped["opacity"], atol=2e-2)
    # decay: once the density is gone, cells empty out
    for _ in range(200):
        renderer.update_occupancy(lambda x: torch.zeros(x.shape[0]))
    assert occ.occupancy_ratio == 0.0


def test_renderer_gradients_reach_the_field():
    cams = orbit_cameras(3.0, 0.0, 0.0, 40.0, 8, 8)
    from rf_core.scene.cameras import generate_rays

    o, d = generate_rays(cams)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    log_sigma = torch.zeros((), requires_grad=True)
    color = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)

    def fld(x):
        inside = (x.norm(dim=-1) < 0.8).float()
        return inside * log_sigma.exp(), color.expand(x.shape[0], 3)

    renderer = VolumeRenderer(RendererConfig(num_samples=64), 1.0)
    out = renderer(o, d, fld, white)
    out.rgb.sum().backward()
    assert log_sigma.grad is not None and log_sigma.grad.abs() > 0
    assert color.grad is not None and (color.grad > 0).all()


@pytest.mark.parametrize("mode", ["albedo", "lambertian", "textureless"])
def test_shading_modes(mode):
    albedo = torch.tensor([[0.2, 0.4, 0.6], [0.2, 0.4, 0.6]])
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    light = torch.tensor([0.0, 0.0, 1.0])
    out = shade(albedo, normals, mode, light, ambient=0.25)
    if mode == "albedo":
        assert torch.equal(out, albedo)
    else:
        base = albedo if mode == "lambertian" else torch.ones_like(albedo)
        assert torch.allclose(out[0], base[0])  # lit face: full
        assert torch.allclose(out[1], 0.25 * base[1])  # back face: ambient only
    with pytest.raises(ValueError, match="shading"):
        shade(albedo, normals, "phong", light, 0.1)


def test_occupancy_threshold_adapts_to_a_faint_field():
    renderer = VolumeRenderer(RendererConfig(num_samples=128,
                                             occupancy=OccupancyConfig(resolution=16)), 1.0)
    # both densities are below the nominal threshold (~0.37 at this step size)
    faint = lambda x: torch.where(x.norm(dim=-1) < 0.5, 0.2, 0.05)  # noqa: E731
    renderer.update_occupancy(faint)
    occ = renderer.occupancy
    assert occ.query(torch.zeros(1, 3)).item()
    assert not occ.query(torch.full((1, 3), 0.9)).item()


def test_orientation_penalty_is_zero_for_outward_normals_and_positive_for_inward():
    """Ref-NeRF's orientation term: visible normals must face the camera."""
    from rf_core.fitting.losses import orientation
    from rf_core.scene.cameras import generate_rays

    cams = orbit_cameras(3.0, 10.0, 40.0, 40.0, 16, 16)
    rays_o, rays_d = (t.reshape(-1, 3) for t in generate_rays(cams))
    renderer = VolumeRenderer(RendererConfig(num_samples=256, perturb=False,
                                             occupancy=OccupancyConfig(enabled=False)), 1.0)

    def penalty(out):
        p = out.packed
        return orientation(p.weights, p.normals, p.dirs, p.ray_indices, rays_o.shape[0])

    out = renderer(rays_o, rays_d, sphere_field, normal_fn=sphere_normals, want_normals=True)
    inward = renderer(rays_o, rays_d, sphere_field, normal_fn=lambda x, d: -sphere_normals(x),
                      want_normals=True)
    hit = out.opacity > 0.99
    assert hit.sum() > 20
    assert penalty(out)[hit].max() < 0.05  # only the grazing sliver of the first sample
    # inward normals on the front surface: sum_i w_i (n.d)^2 = about (n.d)^2 > 0
    expected = (sphere_normals(rays_o[hit] + rays_d[hit] * out.depth[hit, None])
                * rays_d[hit]).sum(-1).pow(2)
    assert penalty(inward)[hit].mean() > 0.5 * expected.mean()
    plain = renderer(rays_o, rays_d, sphere_field)
    assert plain.packed.normals is None


@pytest.mark.parametrize("min_weight", [0.0, 1e-3])
def test_packed_samples_recompose_the_render(min_weight):
    """The packed samples are the render's own: their weights sum to the opacity per ray (all
    of it when every sample gets a normal; all but less than the threshold per skipped sample
    otherwise) and composite the normals into the normal map; dirs are the rays' directions."""
    from rf_core.scene.cameras import generate_rays

    cams = orbit_cameras(3.0, 10.0, 40.0, 40.0, 12, 12)
    rays_o, rays_d = (t.reshape(-1, 3) for t in generate_rays(cams))
    renderer = VolumeRenderer(RendererConfig(num_samples=64, perturb=False,
                                             normals_min_weight=min_weight,
                                             occupancy=OccupancyConfig(enabled=False)), 1.0)
    out = renderer(rays_o, rays_d, sphere_field, normal_fn=sphere_normals, want_normals=True)
    p, n = out.packed, rays_o.shape[0]
    opacity = torch.zeros(n).index_add(0, p.ray_indices, p.weights)
    if min_weight == 0:
        assert p.weights.shape == p.ray_indices.shape == (out.samples,)
        torch.testing.assert_close(opacity, out.opacity)
    else:
        assert 0 < p.weights.shape[0] < out.samples and (p.weights > min_weight).all()
        skipped = out.samples - p.weights.shape[0]
        assert (out.opacity - opacity).abs().sum() <= skipped * min_weight
    torch.testing.assert_close(torch.zeros(n, 3).index_add(0, p.ray_indices,
                                                           p.weights[:, None] * p.normals),
                               out.normal)
    torch.testing.assert_close(p.dirs, rays_d[p.ray_indices], rtol=0, atol=0)
