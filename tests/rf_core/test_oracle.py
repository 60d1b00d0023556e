"""The ground-truth oracle prior: its gradient is exactly the residual to the GT render."""

import json

import numpy as np
import pytest
import torch

from rf_core.errors import UserError
from rf_core.ground_truth.gt_render import MeshError, render_views
from rf_core.prior.conditioning import Conditioning, PromptConfig, make_conditioning
from rf_core.prior.oracle import OraclePrior
from rf_core.prior.sds import SDSConfig, sds_loss
from rf_core.scene.cameras import orbit_cameras, sphere_views

DUCK = "pybullet_data:duck.obj"


@pytest.fixture(scope="module")
def oracle():
    prior = OraclePrior(DUCK)
    yield prior
    prior.close()


def _cond(cams, background=None):
    n = len(cams)
    return make_conditioning(PromptConfig(), batch=n, cameras=cams,
                             background=background if background is not None else torch.ones(n, 3))


def _gt(cams, background):
    """GT of ``cams`` from gt_render itself, composited over ``background`` [B,3]."""
    r = render_views(DUCK, cams)
    rgb = torch.from_numpy(r["rgb"]).permute(0, 3, 1, 2).float() / 255
    m = torch.from_numpy(r["mask"])[:, None].float()
    return m * rgb + (1 - m) * background[:, :, None, None], m


def test_gt_image_gives_zero_gradient_and_delta_gives_delta(oracle):
    cams = sphere_views(3, 3.0, 40.0, 32, 32)
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.5, 0.9], [0.0, 0.0, 0.0]])
    gt, mask = _gt(cams, bg)
    assert 0.05 < mask.mean() < 0.9  # the duck is in view
    cond = _cond(cams, bg)
    grad = oracle.sds_grad(gt, cond, SDSConfig(), step=0, generator=torch.Generator())
    assert grad.shape == gt.shape and grad.dtype == torch.float32
    assert grad.abs().max() < 1e-6
    delta = 0.1 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))
    grad = oracle.sds_grad(gt + delta, cond)
    torch.testing.assert_close(grad, delta, atol=1e-6, rtol=0)
    # sds_loss turns it into a loss whose gradient is the residual
    x = (gt + delta).requires_grad_(True)
    sds_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, delta, atol=1e-6, rtol=0)


def test_scale_multiplies_the_residual():
    cams = sphere_views(1, 3.0, 40.0, 24, 24)
    prior = OraclePrior(DUCK, scale=2.5)
    gt, _ = _gt(cams, torch.ones(1, 3))
    torch.testing.assert_close(prior.sds_grad(gt + 0.1, _cond(cams)),
                               torch.full_like(gt, 0.25), atol=1e-6, rtol=0)
    prior.close()


def test_background_only_changes_pixels_outside_the_mask(oracle):
    cams = sphere_views(1, 3.0, 40.0, 32, 32)
    white, red = torch.ones(1, 3), torch.tensor([[1.0, 0.0, 0.0]])
    gt_white, mask = _gt(cams, white)
    grad = oracle.sds_grad(gt_white, _cond(cams, red))  # a white-background view, GT over red
    inside = mask.expand_as(grad).bool()
    assert grad[inside].abs().max() < 1e-6
    outside = grad.permute(0, 2, 3, 1)[~mask[:, 0].bool()]  # [N, 3]
    torch.testing.assert_close(outside, torch.tensor([0.0, 1.0, 1.0]).expand_as(outside))


def test_matches_gt_render_exactly_and_loads_the_mesh_once():
    prior = OraclePrior(DUCK)
    cams = sphere_views(4, 3.0, 40.0, 40, 40)
    rgb, mask = prior.render_views(_cond(cams))
    r = render_views(DUCK, cams)
    assert np.array_equal((rgb * 255).round().byte().permute(0, 2, 3, 1).numpy(), r["rgb"])
    assert np.array_equal(mask.numpy(), r["mask"])
    for _ in range(3):
        prior.sds_grad(torch.rand(4, 3, 40, 40), _cond(cams))
    assert prior.loads == 1 and prior.calls == 3
    prior.close()


def test_image_size_other_than_the_cameras_rescales_intrinsics(oracle):
    small = sphere_views(1, 3.0, 40.0, 24, 24)
    big = sphere_views(1, 3.0, 40.0, 48, 48)
    a = oracle.render(_cond(small), size=(48, 48))
    b = oracle.render(_cond(big))
    torch.testing.assert_close(a, b)


def test_world_transform_moves_the_cameras():
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)  # 90° z
    moved = OraclePrior(DUCK, world_transform=T)
    turned = orbit_cameras(3.0, 0.0, 90.0, 40.0, 32, 32)
    plain = orbit_cameras(3.0, 0.0, 0.0, 40.0, 32, 32)
    torch.testing.assert_close(moved.render(_cond(plain)), OraclePrior(DUCK).render(_cond(turned)))
    moved.close()


def test_conditioning_without_cameras_is_a_value_error(oracle):
    cond = Conditioning(["a"], [""])
    with pytest.raises(ValueError, match="needs each view's camera"):
        oracle.sds_grad(torch.rand(1, 3, 16, 16), cond)


def test_untextured_mesh_is_one_clear_error(tmp_path):
    obj = tmp_path / "plain.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match="untextured") as err:
        OraclePrior(obj)
    assert "\n" not in str(err.value)
    with pytest.raises(MeshError, match="not found"):
        OraclePrior(tmp_path / "missing.obj")


def test_textual_inversion_is_refused_and_embeddings_recorded(oracle):
    from rf_core.prior.inversion import invert

    with pytest.raises(ValueError, match="does not apply to the oracle.*without --invert"):
        oracle.invert(torch.rand(3, 16, 16), torch.ones(1, 16, 16))
    with pytest.raises(ValueError, match="does not apply to the oracle"):
        invert(oracle, torch.rand(3, 16, 16), torch.ones(1, 16, 16))
    oracle.register_embedding("<e>", torch.zeros(4))
    assert "<e>" in oracle.embeddings


def _tiny_recon(prior, sds_weight, heldout):
    from rf_core.config import build, deep_merge, parse_override
    from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig

    elevation, azimuth = heldout
    overrides = [
        "steps=30", "input_size=16", "input_rays=256", "sds_size=16", "albedo_steps=100",
        "levels=4", "lr=0.1", f"weights.sds={sds_weight}",
        "camera.input_elevation=0.0", "camera.input_azimuth=0.0", "camera.input_fov=40.0",
        f"camera.random.elevation_range=[{elevation},{elevation}]",
        f"camera.random.azimuth_range=[{azimuth},{azimuth}]",
        "camera.random.radius_range=[3.0,3.0]", "camera.random.fov_range=[40.0,40.0]",
        "camera.random.uniform_sphere_rate=0.0",
        "field.grid.n_levels=4", "field.grid.log2_hashmap_size=12", "field.density_hidden=16",
        "field.albedo_hidden=16", "renderer.num_samples=24",
        "renderer.occupancy.warmup_steps=1000",
    ]
    data: dict = {}
    for o in overrides:
        data = deep_merge(data, parse_override(o))
    cfg = build(ReconstructorConfig, data)
    photo_cond = _cond(orbit_cameras(3.0, 0.0, 0.0, 40.0, 16, 16))
    photo = prior.render(photo_cond)[0]  # the input view, over white
    _, mask = prior.render_views(photo_cond)
    recon = Reconstructor(cfg, photo, mask[:1].float(), prior, device="cpu")
    for _ in range(cfg.steps):
        recon.step()
    cam = orbit_cameras(3.0, elevation, azimuth, 40.0, 16, 16)
    out = recon.render(cam)
    gt = prior.render(_cond(cam))[0].permute(1, 2, 0)
    return float((out["rgb"] - gt).pow(2).mean())


def test_oracle_steps_lower_the_heldout_error_versus_no_sds():
    prior = OraclePrior(DUCK)
    heldout = (30.0, 150.0)  # a side the photo (azimuth 0, level) does not see
    err_oracle = _tiny_recon(prior, 3.0, heldout)
    err_none = _tiny_recon(prior, 0.0, heldout)
    prior.close()
    assert err_oracle < 0.5 * err_none, (err_oracle, err_none)


def test_bench_json_shape_is_documented():
    from rf_bench.singleview import ORACLE_OVERRIDES, PRIORS, prior_overrides

    assert set(PRIORS) == {"tiny", "oracle", "none", "learned", "joint"}
    assert prior_overrides("none") == ["recon.weights.sds=0"]
    # the learned prior runs under the oracle's settings: they differ only in the target view
    assert prior_overrides("learned")[2:] == ORACLE_OVERRIDES
    # joint: the same settings, tiny SD as the main prior and the learned model added
    joint = prior_overrides("joint")
    assert joint[:len(ORACLE_OVERRIDES)] == ORACLE_OVERRIDES
    assert {"model.name=tiny", "joint.model.type=learned"} <= set(joint)
    assert any(o.startswith("recon.weights.sds=") for o in ORACLE_OVERRIDES)
    with pytest.raises(UserError, match="unknown prior 'bogus'"):
        prior_overrides("bogus")
    json.dumps(ORACLE_OVERRIDES)
