"""The sync-free march (rf_core.scene.ray_march) against the exact one: ``compact`` against
``nonzero``, shares that cover the alive samples against the exact march (values and
gradients), shares that fall short (the dropped samples are counted and belong to the most
opaque rays), and a training render that waits for the device only to read its counts."""

from __future__ import annotations

import pytest
import torch

from rf_bench.syncs import SyncCounter
from rf_core.scene.ray_march import compact, march, plan_rays, read_counts
from rf_core.scene.render import OccupancyConfig, RendererConfig, VolumeRenderer
from tests.rf_core.test_render_fast_paths import _field, _rays


@pytest.mark.parametrize("p", [0.0, 0.03, 0.5, 1.0])
def test_compact_equals_nonzero(p):
    g = torch.Generator().manual_seed(int(p * 100))
    mask = torch.rand(1000, generator=g) < p
    expected = mask.nonzero().squeeze(-1)
    torch.testing.assert_close(compact(mask, expected.numel()), expected)
    assert torch.equal(compact(mask, 5), expected[:5]) or expected.numel() < 5


def _plan(rays, segments=4, blob=8.0):
    renderer = VolumeRenderer(RendererConfig(num_samples=48, perturb=False,
                                             occupancy=OccupancyConfig(enabled=False),
                                             march_segments=segments), 1.0)
    field = _field(blob=blob)
    return renderer.plan(*rays), field


def _march(plan, field, shares):
    field.zero_grad()
    field.reset_counters()
    out = march(plan, field, 1e-4, shares)
    (out.weights.square().sum() + (out.weights.sum(-1) * 0.5).sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in field.parameters() if p.grad is not None])
    return out, grads, field.points_forward


def test_shares_that_cover_the_alive_samples_equal_the_exact_march():
    plan, field = _plan(_rays())
    exact, g_exact, n_exact = _march(plan, field, None)
    assert exact.wanted[1:].sum() < plan.device_counts[1:].sum()  # early stop skips work
    tight = [float(w) / c for w, c in zip(exact.wanted[1:], plan.counts[1:])]
    assert min(tight) < 1
    for shares in ([1.0] * 3, [(1 + s) / 2 for s in tight]):
        out, g, n = _march(plan, field, shares)
        torch.testing.assert_close(out.weights, exact.weights, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g, g_exact, rtol=1e-4, atol=1e-7)
        assert n > n_exact and float(out.dropped) == 0
    # The tightest share that still covers them: what the reconstructor carries over.
    out, g, n = _march(plan, field, tight)
    torch.testing.assert_close(out.weights, exact.weights, rtol=1e-5, atol=1e-7)
    assert n == n_exact and float(out.dropped) == 0


def test_a_short_share_drops_the_most_opaque_rays_samples_and_counts_them():
    plan, field = _plan(_rays(n=160))
    exact, _, _ = _march(plan, field, None)
    tight = [float(w) / c for w, c in zip(exact.wanted[1:], plan.counts[1:])]
    out, _, n = _march(plan, field, [0.5 * s for s in tight])
    assert float(out.dropped) > 0
    diff = (out.weights - exact.weights).abs().sum(-1)
    changed = diff > 1e-6
    assert changed.any()
    # Only rays still alive after the first segment can lose samples, and a ray's weights
    # behind that point sum to its transmittance there: dropping moves them by at most twice
    # that (what is lost, and what later samples gain).
    trans = 1 - exact.weights[:, :plan.edges[1]].sum(-1)
    assert bool((diff[changed] <= 2 * trans[changed] + 1e-6).all())
    untouched = ~changed
    torch.testing.assert_close(out.weights[untouched], exact.weights[untouched])


def test_a_training_render_with_shares_waits_only_to_read_its_counts():
    rays = _rays()
    renderer = VolumeRenderer(RendererConfig(num_samples=48, march_segments=3,
                                             occupancy=OccupancyConfig(enabled=False)), 1.0)
    field = _field(blob=8.0, normals="forward")
    gen = torch.Generator().manual_seed(0)
    plans = [renderer.plan(*rays, generator=gen), renderer.plan(*rays, generator=gen)]
    with SyncCounter("cpu") as syncs:
        read_counts(plans)
    assert syncs.total == 1
    with SyncCounter("cpu") as syncs:
        for plan in plans:
            out = renderer(*rays, field, normal_fn=field.normals, shading="lambertian",
                           light_dir=torch.tensor([0.0, 0.6, -0.8]), want_normals=True,
                           plan=plan, segment_shares=[0.8, 0.8], normals_share=0.5)
            (out.rgb.sum() + out.normal.sum()).backward()
    assert syncs.total == 0, syncs.by_kind
    assert out.segments_wanted.shape == (3,) and len(out.segment_counts) == 3


def test_plan_counts_split_the_active_samples():
    plan, _ = _plan(_rays(), segments=3)
    read_counts([plan])
    assert sum(plan.counts) == int(plan.active.sum())
    direct = plan_rays(plan.t, plan.deltas, plan.x, plan.active, 3)
    assert direct.edges == plan.edges == [0, 16, 32, 48]


def test_the_march_share_follows_a_rise_at_once_and_falls_slowly():
    from types import SimpleNamespace

    from rf_core.scene.sample_shares import MARCH_SHARE_DECAY, MARCH_SHARE_MARGIN, SampleShares

    shares = SampleShares()

    def step(alive: int, count: int = 1000) -> list[float]:
        out = SimpleNamespace(normals_wanted=None, segments_wanted=torch.tensor([count, alive]),
                              segment_counts=[count, count], dropped=torch.tensor(0.0),
                              samples=count)
        shares.watch("views", out)
        metrics = shares.update([float(v) for v in shares.device_values()])
        assert metrics["march/share"] == pytest.approx(alive / count)
        return shares.march["views"]

    assert step(500) == pytest.approx([MARCH_SHARE_MARGIN * 0.5 + 1e-3])
    high = step(900)[0]
    assert high == pytest.approx(MARCH_SHARE_MARGIN * 0.9 + 1e-3)  # a rise: at once
    assert step(400)[0] == pytest.approx(MARCH_SHARE_DECAY * high)  # a fall: slowly
    assert step(1000)[0] == 1.0
