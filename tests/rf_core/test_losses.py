"""Loss terms (rf_core.fitting.losses): values, gradients, and the term/weight bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rf_core.fitting.losses import (
    LossWeights,
    binary_entropy,
    check_terms,
    gaussian_blur,
    loss_terms,
    normal_smoothness,
    orientation,
    sds_term,
    weight_names,
)
from rf_core.prior.sds import sds_loss
from rf_core.scene.render import PackedSamples


def _former_renderer_orientation(weights, normals, dirs_of_rays, ray_of, n):
    """The penalty as rf_core.scene.render computed it inside the renderer before it moved here:
    w_a [M, 1] detached, rays_d indexed by ray, accumulated with the renderer's gather."""
    w_a = weights[:, None]
    facing_away = (normals * dirs_of_rays[ray_of]).sum(-1, keepdim=True).clamp(min=0)
    values_a, weights_a = facing_away.pow(2), w_a.detach()
    out = torch.zeros(n, values_a.shape[-1], dtype=values_a.dtype)
    return out.index_add(0, ray_of, weights_a * values_a)[:, 0]


@pytest.mark.parametrize("seed", range(4))
def test_orientation_equals_the_former_renderer_computation(seed):
    """Same values and gradients, to the bit, on random packed samples."""
    g = torch.Generator().manual_seed(seed)
    n, m = 50, 700
    ray_of = torch.randint(0, n, (m,), generator=g).sort().values
    rays_d = F.normalize(torch.randn(n, 3, generator=g), dim=-1)
    weights = torch.rand(m, generator=g).requires_grad_(True)
    normals = F.normalize(torch.randn(m, 3, generator=g), dim=-1).requires_grad_(True)
    old = _former_renderer_orientation(weights, normals, rays_d, ray_of, n)
    new = orientation(weights, normals, rays_d[ray_of], ray_of, n)
    assert new.shape == (n,) and torch.equal(old, new)
    up = torch.rand(n, generator=g)
    g_old = torch.autograd.grad((old * up).sum(), normals)[0]
    g_new, g_w = torch.autograd.grad((new * up).sum(), [normals, weights], allow_unused=True)
    assert torch.equal(g_old, g_new) and g_new.abs().sum() > 0
    assert g_w is None  # the weights are detached: only the normals move


def test_orientation_by_hand():
    """One ray, two samples: sum_i w_i max(0, n_i . d)^2; normals facing the camera cost 0."""
    d = torch.tensor([[0.0, 0.0, -1.0]] * 2)
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.6, -0.8]])  # towards, away from camera
    out = orientation(torch.tensor([0.5, 0.25]), normals, d, torch.tensor([1, 1]), 3)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.25 * 0.64, 0.0]))


def test_regulariser_values():
    assert binary_entropy(torch.tensor([0.5])).item() == pytest.approx(1.0, abs=1e-6)  # bits
    assert binary_entropy(torch.tensor([0.0, 1.0])).item() < 1e-3
    img = torch.rand(2, 3, 12, 12)
    sigma = 1.3
    radius = 4
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k2 = torch.outer(k, k) / k.sum() ** 2
    ref = F.conv2d(F.pad(img, (radius,) * 4, mode="reflect"),
                   k2.expand(3, 1, -1, -1), groups=3)
    torch.testing.assert_close(gaussian_blur(img, sigma, radius), ref, rtol=1e-5, atol=1e-6)
    flat = torch.zeros(1, 3, 8, 8)
    flat[:, 2] = 1
    assert normal_smoothness(flat).item() == pytest.approx(0, abs=1e-9)
    noisy = F.normalize(torch.randn(1, 3, 8, 8), dim=1)
    # The authors' form: plain MSE to the detached 9-tap blur (sigma 1.7), mean over channels.
    blur = F.conv2d(F.pad(noisy, (4,) * 4, mode="reflect"),
                    _kernel2d(1.7, 4).expand(3, 1, -1, -1), groups=3)
    assert normal_smoothness(noisy).item() == pytest.approx(F.mse_loss(noisy, blur).item(),
                                                            rel=1e-5)
    leaf = noisy.clone().requires_grad_(True)
    normal_smoothness(leaf).backward()
    torch.testing.assert_close(leaf.grad, 2 * (noisy - blur) / noisy.numel(), rtol=1e-4,
                               atol=1e-7)  # no gradient through the blurred target
    assert normal_smoothness(noisy).item() > 0.1


def _kernel2d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return torch.outer(k, k) / k.sum() ** 2


def test_sds_term_gradient_is_the_prior_gradient_over_the_batch():
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4)
    sds_term(images, grad).backward()
    assert torch.equal(images.grad, grad / 2)
    assert sds_term(images, grad).item() == pytest.approx(sds_loss(images, grad).item() / 2)


def _inputs(b: int = 2, side: int = 6, r: int = 10, samples_per_ray: int = 3):
    g = torch.Generator().manual_seed(0)
    n = side * side
    ray_of = torch.arange(n).repeat_interleave(samples_per_ray)
    views = {
        "rgb": torch.rand(b, 3, side, side, generator=g).requires_grad_(True),
        "opacity": torch.rand(b, 1, side, side, generator=g),
        "normal": F.normalize(torch.randn(b, 3, side, side, generator=g), dim=1),
        "samples": [PackedSamples(ray_of, torch.rand(len(ray_of), generator=g),
                                  F.normalize(torch.randn(len(ray_of), 3, generator=g), dim=-1),
                                  F.normalize(torch.randn(len(ray_of), 3, generator=g), dim=-1))
                    for _ in range(b)],
    }
    rendered = torch.rand(r, 3, generator=g), torch.rand(r, generator=g)
    targets = torch.rand(r, 3, generator=g), torch.rand(r, generator=g)
    return rendered, targets, views, torch.randn(b, 3, side, side, generator=g)


def test_loss_terms_are_the_weighted_terms_with_their_values():
    (rgb, opac), (t_rgb, t_mask), views, grad = _inputs()
    terms = loss_terms(rgb, opac, t_rgb, t_mask, views, grad, normal_blur_sigma=1.3)
    assert tuple(terms) == weight_names() == tuple(f.name for f in
                                                   dataclasses.fields(LossWeights))
    assert all(t.dim() == 0 for t in terms.values())
    assert terms["rgb"] == F.mse_loss(rgb, t_rgb) and terms["mask"] == F.mse_loss(opac, t_mask)
    assert terms["sds"] == sds_term(views["rgb"], grad)
    assert terms["entropy"] == binary_entropy(views["opacity"])
    assert terms["opacity"] == views["opacity"].mean()
    assert terms["normal_smooth"] == normal_smoothness(views["normal"], 1.3)
    per_view = [orientation(s.weights, s.normals, s.dirs, s.ray_indices, 36)
                for s in views["samples"]]
    assert terms["orientation"] == torch.stack(per_view).mean()
    no_sds = loss_terms(rgb, opac, t_rgb, t_mask, views)  # the prior was skipped
    assert "sds" not in no_sds and set(no_sds) == set(terms) - {"sds"}


def test_every_term_needs_a_weight_and_every_weight_a_term():
    (rgb, opac), (t_rgb, t_mask), views, grad = _inputs()
    terms = loss_terms(rgb, opac, t_rgb, t_mask, views, grad)
    weights = dict.fromkeys(weight_names(), 1.0)
    check_terms(terms, weights)
    with pytest.raises(ValueError, match="loss term 'extra' has no weight.*LossWeights"):
        check_terms({**terms, "extra": torch.tensor(1.0)}, weights)
    with pytest.raises(ValueError, match="weights.curvature is 1.0 but no loss term"):
        check_terms(terms, {**weights, "curvature": 1.0})
    # a term may be left out while its weight is zero (SDS skips the prior then) ...
    check_terms({k: v for k, v in terms.items() if k != "sds"}, {**weights, "sds": 0.0})
    # ... but not while it counts
    with pytest.raises(ValueError, match="weights.sds is 1.0 but no loss term 'sds'"):
        check_terms({k: v for k, v in terms.items() if k != "sds"}, weights)
