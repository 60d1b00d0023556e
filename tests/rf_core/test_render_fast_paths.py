"""The renderer's work-saving paths against the simple ones: early ray termination, normals
only where weights matter, the sync-free occupancy box, and the occupancy grid seeded from
the initial field. Each compares values and gradients on random inputs."""

from __future__ import annotations

import pytest
import torch

from rf_core.scene.cameras import generate_rays, orbit_cameras
from rf_core.scene.field import FieldConfig, RadianceField
from rf_core.scene.render import OccupancyConfig, OccupancyGrid, RendererConfig, VolumeRenderer


def _rays(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cams = orbit_cameras(3.0, 15.0, 30.0, 12.0, 16, 16)  # rays through the blob
    rays_o, rays_d = (t.reshape(-1, 3) for t in generate_rays(cams))
    pick = torch.randperm(rays_o.shape[0], generator=g)[:n]
    return rays_o[pick], rays_d[pick]


def _field(seed: int = 0, blob: float = 4.85, normals: str = "central") -> RadianceField:
    """Central differences by default: forward ones divide float rounding of the (batch-size
    dependent) sample densities by eps, which the exactness tests would see."""
    torch.manual_seed(seed)
    cfg = FieldConfig(blob_density=blob, normal_difference=normals)
    cfg.grid.n_levels, cfg.grid.log2_hashmap_size = 6, 14
    cfg.grid.init_scale = 0.5  # a rough field: densities vary along rays
    return RadianceField(cfg)


def _render(field, renderer_kw, rays, shading="lambertian"):
    kw = {"num_samples": 48, "perturb": False, **renderer_kw}
    renderer = VolumeRenderer(RendererConfig(occupancy=OccupancyConfig(enabled=False), **kw),
                              1.0)
    field.zero_grad()
    field.reset_counters()
    out = renderer(*rays, field, normal_fn=field.normals, shading=shading,
                   light_dir=torch.tensor([0.0, 0.6, -0.8]), want_normals=True,
                   background_fn=lambda d: torch.full_like(d, 0.5))
    loss = out.rgb.square().sum() + out.normal.sum() + out.depth.sum()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in field.parameters() if p.grad is not None])
    counts = (field.points_forward, field.points_normal_probes)
    return out, grads, counts


SIMPLE = {"early_stop_eps": 0.0, "normals_min_weight": 0.0}


@pytest.mark.parametrize("segments", [1, 3, 4])
def test_marching_without_stopping_equals_one_pass(segments):
    """Marched in segments with a vanishing threshold, the render is the one-pass render:
    values and field gradients to float rounding."""
    rays, field = _rays(), _field()
    ref, g_ref, n_ref = _render(field, SIMPLE, rays)
    out, g, n = _render(field, {"early_stop_eps": 1e-30, "march_segments": segments,
                                "normals_min_weight": 0.0}, rays)
    assert n == n_ref
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_early_stop_and_normal_threshold_skip_work_within_their_bounds():
    """An opaque blob: early termination skips samples behind the surface and normals skip
    faint samples; colour and opacity move by at most the skipped weight."""
    rays, field = _rays(), _field(blob=8.0)
    ref, g_ref, (fwd_ref, probes_ref) = _render(field, SIMPLE, rays)
    out, g, (fwd, probes) = _render(field, {"early_stop_eps": 1e-4, "march_segments": 4,
                                            "normals_min_weight": 1e-3}, rays)
    assert fwd < 0.8 * fwd_ref and probes < 0.5 * probes_ref
    assert (out.opacity - ref.opacity).abs().max() <= 1e-4 + 1e-6
    # Skipped normals shade their samples at the ambient level: bounded by their weight sum.
    assert (out.rgb - ref.rgb).abs().max() < 0.05
    cos = torch.nn.functional.cosine_similarity(g, g_ref, dim=0)
    assert cos > 0.99


def test_occupancy_box_matches_nonzero_reference():
    """The sync-free bounding box equals the one from the occupied cells' indices."""
    g = torch.Generator().manual_seed(1)
    grid = OccupancyGrid(OccupancyConfig(resolution=12), bound=1.5)
    for trial in range(6):
        occupied = torch.rand(12, 12, 12, generator=g) < (0.002 if trial < 3 else 0.3)
        if trial == 0:
            occupied[:] = False
        grid.occupied.copy_(occupied)
        grid._update_box()
        cells = occupied.nonzero()
        if cells.numel() == 0:
            expected = torch.zeros(2, 3)
        else:
            cell = 3.0 / 12
            expected = torch.stack([cells.amin(0).float() * cell - 1.5,
                                    (cells.amax(0).float() + 1) * cell - 1.5])
        torch.testing.assert_close(grid.box, expected)


def test_occupancy_threshold_is_computed_on_the_device():
    """The refresh makes no host read (no .item()): its threshold stays a tensor."""
    from rf_bench.syncs import SyncCounter

    grid = OccupancyGrid(OccupancyConfig(resolution=8), bound=1.0)
    with SyncCounter("cpu") as syncs:
        grid.update(lambda x: torch.exp(-(x * x).sum(-1) * 4) * 50, step_size=0.02)
    assert syncs.total == 0, syncs.by_kind
    assert 0 < grid.occupied.float().mean() < 1


def test_forward_differences_reuse_the_sample_density():
    """Forward-difference normals from the render's own densities are the ones that probe x
    themselves (values and gradients), at 3 probes per normal instead of 6; and on a smooth
    field (the blob alone) they agree with central differences and the analytic normal."""
    field = _field()
    field.cfg.normal_difference = "forward"
    x = torch.randn(64, 3) * 0.3
    field.zero_grad()
    field.reset_counters()
    own = field.normals(x, field.density(x))
    own.square().sum().backward()
    g_own = [p.grad.clone() for p in field.parameters() if p.grad is not None]
    assert field.points_normal_probes == 3 * 64
    field.zero_grad()
    field.reset_counters()
    probed = field.normals(x)
    probed.square().sum().backward()
    assert field.points_normal_probes == 4 * 64
    torch.testing.assert_close(own, probed)
    for a, b in zip(g_own, (p.grad for p in field.parameters() if p.grad is not None)):
        torch.testing.assert_close(a, b)

    blob = _field(blob=4.85)
    for p in blob.density_net.parameters():
        torch.nn.init.zeros_(p)  # density = trunc_exp(blob(x)): a smooth, radial field
    x = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1) * 0.3
    analytic = torch.nn.functional.normalize(x, dim=-1)  # density falls outwards
    blob.cfg.normal_difference = "forward"
    forward = blob.normals(x, blob.density(x))
    blob.cfg.normal_difference = "central"
    central = blob.normals(x)
    assert torch.nn.functional.cosine_similarity(central, analytic).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(forward, analytic).min() > 0.99


def test_min_step_samples_short_chords_at_a_fixed_spacing():
    """With a minimum step, rays through a small box take fewer samples; the render moves
    by no more than a coarser stratification would (both sample the same blob)."""
    rays, field = _rays(), _field(blob=8.0)
    fine, _, (n_fine, _) = _render(field, {**SIMPLE, "num_samples": 256}, rays)
    coarse, _, (n_coarse, _) = _render(field, {**SIMPLE, "num_samples": 256,
                                               "min_step": 0.05}, rays)
    assert n_coarse < 0.5 * n_fine
    assert (coarse.opacity - fine.opacity).abs().max() < 0.05
    assert (coarse.rgb - fine.rgb).abs().max() < 0.05


def test_normals_by_share_match_the_threshold_without_a_sync():
    """A share of the heaviest samples (topk, no host sync) gives the thresholded render when
    it covers exactly the samples above the threshold, every sample's normal at share 1, and
    drops only the faintest normals when short."""
    rays, field = _rays(), _field(blob=8.0)

    def render(share, min_weight=1e-3):
        renderer = VolumeRenderer(RendererConfig(
            num_samples=48, perturb=False, occupancy=OccupancyConfig(enabled=False),
            normals_min_weight=min_weight), 1.0)
        field.reset_counters()
        return renderer(*rays, field, normal_fn=field.normals, shading="lambertian",
                        light_dir=torch.tensor([0.0, 0.6, -0.8]), want_normals=True,
                        normals_share=share), field.points_normal_probes

    exact, probes = render(None)
    m = exact.samples
    wanted = int(exact.normals_wanted)
    assert probes == 6 * wanted and 0 < wanted < m
    same, probes_same = render(wanted / m)
    assert probes_same == probes
    for key in ("rgb", "opacity", "normal"):
        torch.testing.assert_close(getattr(same, key), getattr(exact, key))
    every, _ = render(1.0)
    everywhere, _ = render(None, min_weight=0.0)
    torch.testing.assert_close(every.rgb, everywhere.rgb)
    short, probes_short = render(0.5 * wanted / m)
    assert probes_short < probes

    def normal_weight(out):  # [N] compositing weight of the samples that got normals
        n = out.rgb.shape[0]
        return torch.zeros(n).index_add(0, out.packed.ray_indices, out.packed.weights.detach())

    # a sample without its normal moves its pixel by at most its weight, the heaviest kept
    dropped = normal_weight(exact) - normal_weight(short)
    assert (dropped >= -1e-6).all() and dropped.max() > 0
    assert ((short.rgb - exact.rgb).abs().max(-1).values <= dropped + 1e-5).all()


def test_reconstructor_carries_the_shares_from_step_to_step():
    """The first step finds the normals' samples and the march's later segments with
    ``nonzero``; later ones use the shares the previous step measured, and wait for the
    device twice (the renders' counts, then the metrics). The shares resume with the state."""
    from rf_bench.syncs import SyncCounter
    from rf_core.config import load_config
    from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig
    from rf_core.prior import NullPrior

    cfg = load_config(ReconstructorConfig, overrides=[
        "steps=3", "input_size=16", "input_rays=64", "sds_size=16", "renderer.num_samples=16",
        "field.grid.n_levels=2", "field.grid.log2_hashmap_size=10", "levels=2",
        "albedo_steps=0", "weights.sds=0"])
    recon = Reconstructor(cfg, torch.rand(3, 16, 16), torch.ones(1, 16, 16), NullPrior())
    nonzero, total = [], []
    for _ in range(3):
        with SyncCounter(torch.device("cpu")) as syncs:
            metrics = recon.step()
        nonzero.append(syncs.by_kind.get("nonzero", 0))
        total.append(syncs.total)
        assert 0 < metrics["normals/share"] <= 1 and 0 <= metrics["march/share"] <= 1
        assert metrics["march/dropped"] >= 0
    assert nonzero == [3, 0, 0] and total[1:] == [2, 2], (nonzero, total)
    assert recon.shares.normals is not None and recon.shares.march["views"]
    again = Reconstructor(cfg, torch.rand(3, 16, 16), torch.ones(1, 16, 16), NullPrior())
    again.load_state_dict(recon.state_dict())
    assert again.shares.normals == pytest.approx(recon.shares.normals)
    for role, shares in recon.shares.march.items():
        assert again.shares.march[role] == pytest.approx(shares)
