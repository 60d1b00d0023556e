import pytest
import torch

from rf_core.config import ConfigError, build
from rf_core.scene.encoding import HashGridConfig
from rf_core.scene.field import Background, BackgroundConfig, FieldConfig, RadianceField, trunc_exp

SMALL = {"grid": {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 4,
                  "per_level_scale": 2.0}}


def blob_only_field(**kw) -> RadianceField:
    """A field whose MLP outputs zero, so density = exp(blob(x))."""
    fld = RadianceField(build(FieldConfig, {**SMALL, **kw}))
    last = fld.density_net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return fld


def test_blob_initialisation_is_gaussian():
    fld = blob_only_field(blob_density=10.0, blob_radius=0.5)
    x = torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [0, 0, 1.0]])
    expect = torch.exp(10 * torch.exp(-(x * x).sum(-1) / (2 * 0.25)))
    assert torch.allclose(fld.density(x), expect, rtol=1e-5)
    sigma, albedo = fld(x)
    assert torch.allclose(sigma, expect, rtol=1e-5)
    assert albedo.shape == (3, 3) and ((albedo >= 0) & (albedo <= 1)).all()


def test_finite_difference_normals_of_the_blob_point_outwards():
    fld = blob_only_field(blob_density=10.0, blob_radius=0.5, normal_eps=1e-3)
    radius = 0.2 + 0.6 * torch.rand(256, 1)
    x = torch.nn.functional.normalize(torch.randn(256, 3), dim=-1) * radius
    n = fld.normals(x)
    assert torch.allclose(n.norm(dim=-1), torch.ones(256), atol=1e-4)
    cos = (n * torch.nn.functional.normalize(x, dim=-1)).sum(-1)
    assert cos.min() > 0.999


def test_field_gradients_reach_grid_and_mlps():
    fld = RadianceField(build(FieldConfig, SMALL))
    x = torch.rand(512, 3) * 2 - 1
    sigma, albedo = fld(x)
    (sigma.mean() + albedo.mean()).backward()
    for name, p in fld.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_level_masking_passes_through():
    fld = RadianceField(build(FieldConfig, SMALL))
    fld.set_active_levels(2)
    assert fld.encoding.active_levels == 2
    feats = fld.encoding(torch.rand(64, 3))
    assert torch.equal(feats[:, 2 * 2:], torch.zeros(64, 2 * 2))


def test_trunc_exp_clamps_its_gradient():
    x = torch.tensor([0.0, 20.0], requires_grad=True)
    trunc_exp(x).sum().backward()
    assert torch.allclose(x.grad, torch.exp(torch.tensor([0.0, 15.0])))


def test_backgrounds():
    d = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    assert torch.equal(Background(BackgroundConfig(kind="color", color=[0, 0.5, 1]))(d)[3],
                       torch.tensor([0, 0.5, 1.0]))
    mlp_bg = Background(BackgroundConfig(kind="mlp"))(d)
    assert mlp_bg.shape == (10, 3) and ((mlp_bg > 0) & (mlp_bg < 1)).all()
    g = torch.Generator().manual_seed(3)
    rnd = Background(BackgroundConfig(kind="random"))(d, generator=g)
    assert torch.equal(rnd[0], rnd[9])
    with pytest.raises(ConfigError, match="background kind"):
        build(BackgroundConfig, {"kind": "sky"})
    with pytest.raises(ConfigError, match="three numbers"):
        build(BackgroundConfig, {"color": [2, 0, 0]})


def test_field_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="bound must be positive"):
        build(FieldConfig, {"bound": 0})
    assert isinstance(FieldConfig().grid, HashGridConfig)
