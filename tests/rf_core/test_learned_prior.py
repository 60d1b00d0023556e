"""The learned novel-view prior: its gradient is the residual to the model's own prediction of
each view (checked against the model called by hand), it finds the relative camera from the
conditioning, refuses a conditioning without the photo, needs no textual inversion anywhere,
and a Ray-served copy answers exactly as the local one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rf_core.errors import UserError
from rf_core.prior import ModelConfig, Prior, PromptConfig, make_conditioning, make_prior
from rf_core.prior.learned import LearnedViewPrior, MissingReferenceError
from rf_core.prior.novel_view.geometry import angles_from_cameras, camera_features
from rf_core.prior.novel_view.model import NovelViewConfig, NovelViewModel
from rf_core.prior.registry import needs_inversion
from rf_core.progress import quiet
from rf_core.scene.cameras import orbit_cameras

SIZE = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random-weight model folder (the shipped one is tested by its card's metrics)."""
    torch.manual_seed(0)
    model = NovelViewModel(NovelViewConfig(size=SIZE, block_out_channels=[8, 16],
                                           attention=[False, False], norm_num_groups=4,
                                           attention_head_dim=8, camera_hidden=16))
    # a non-trivial output: the regressor's last layer starts near zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("nv") / "model"
    model.save_pretrained(folder)
    return folder


def _photo():
    gen = torch.Generator().manual_seed(1)
    rgba = torch.rand(4, 32, 32, generator=gen)
    return rgba, orbit_cameras(3.0, 10.0, 0.0, 40.0, 32, 32)


def _cond(n: int = 2, reference: bool = True):
    cams = orbit_cameras(torch.tensor([1.5, 2.8][:n]), torch.tensor([30.0, -20.0][:n]),
                         torch.tensor([90.0, -150.0][:n]), torch.tensor([55.0, 40.0][:n]),
                         24, 24)
    bg = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.4, 0.6]][:n])
    return make_conditioning(PromptConfig(), batch=n, cameras=cams, background=bg,
                             reference=_photo() if reference else None), cams, bg


def test_grad_is_the_residual_to_the_models_view(weights):
    prior = LearnedViewPrior(weights, scale=2.0)
    assert isinstance(prior, Prior)
    cond, cams, bg = _cond()
    images = torch.rand(2, 3, 24, 24)
    grad = prior.sds_grad(images, cond)

    # by hand: the model at the relative camera, un-composited from white, over the background
    rgba, ref_cam = _photo()
    model = NovelViewModel.from_pretrained(weights)
    feats = camera_features(angles_from_cameras(ref_cam.c2w, ref_cam.K, (32, 32)),
                            angles_from_cameras(cams.c2w, cams.K, (24, 24)))
    pred = model.predict(F.interpolate(rgba[None].expand(2, -1, -1, -1), size=(SIZE, SIZE),
                                       mode="area"), feats)
    rgb, alpha = pred[:, :3], pred[:, 3:]
    obj = ((rgb - (1 - alpha)) / alpha.clamp(min=1e-3)).clamp(0, 1)
    view = obj * alpha + bg[:, :, None, None] * (1 - alpha)
    want = 2.0 * (images - F.interpolate(view, size=(24, 24), mode="bilinear",
                                         align_corners=False, antialias=True))
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    assert (grad[0] != grad[1]).any()  # two cameras, two answers


def test_the_input_camera_is_the_identity_camera():
    rgba, cam = _photo()
    a = angles_from_cameras(cam.c2w, cam.K, (32, 32))
    torch.testing.assert_close(camera_features(a, a)[0],
                               torch.tensor([10.0 * torch.pi / 180, 0, 0, 1, 0, 0]),
                               atol=1e-5, rtol=0)


def test_refuses_a_conditioning_without_the_photo(weights):
    prior = LearnedViewPrior(weights)
    cond, _, _ = _cond(reference=False)
    with pytest.raises(MissingReferenceError, match="input photo"):
        prior.sds_grad(torch.rand(2, 3, 24, 24), cond)
    with pytest.raises(UserError, match="does not apply"):
        prior.invert(torch.rand(3, 8, 8), torch.ones(1, 8, 8))


def test_registry_builds_it_and_it_needs_no_inversion(weights, tmp_path):
    cfg = ModelConfig(type="learned", name=str(weights), device="cpu")
    assert not needs_inversion(cfg)
    assert needs_inversion(ModelConfig(name="tiny"))
    prior = make_prior(cfg)
    assert isinstance(prior, LearnedViewPrior) and prior.size == SIZE
    with pytest.raises(UserError):
        make_prior(ModelConfig(type="learned", name=str(tmp_path / "missing")))


def test_reconstruct_runs_without_an_embedding(weights, tmp_path):
    """No --embedding, no inversion: the job runs, and the prior saw every view's camera."""
    from rf_core.jobs.job_config import load_job_config
    from rf_core.jobs.reconstruct_job import reconstruct

    cfg = load_job_config("tiny", overrides=[
        "model.type=learned", f"model.name={weights}", "model.device=cpu", "recon.steps=2",
        "recon.input_size=16", "recon.input_rays=64", "recon.sds_size=16",
        "recon.renderer.num_samples=16", "export.video.frames=2", "export.video.size=16",
        "export.mesh_resolution=16", "input.size=32"])
    prior = make_prior(cfg.model)
    with quiet():
        result = reconstruct("examples/duck.png", None, tmp_path / "run", cfg, prior=prior)
    assert result["finished"] and prior.calls == 2
    assert not (tmp_path / "run" / "embedding.safetensors").exists()


@pytest.mark.ray
def test_served_prior_answers_as_the_local_one(weights, ray_local):
    from rf_distributed.prior_server import PriorClient, start_prior_server

    server = start_prior_server(ModelConfig(type="learned", name=str(weights), device="cpu"),
                                name="rf-prior/learned-test")
    try:
        client = PriorClient(server)
        assert client.needs_reference
        cond, _, _ = _cond()
        images = torch.rand(2, 3, 24, 24)
        torch.testing.assert_close(client.sds_grad(images, cond),
                                   LearnedViewPrior(weights).sds_grad(images, cond))
    finally:
        ray_local.kill(server, no_restart=True)


def test_the_learned_preset_is_the_oracle_benchmark_settings():
    """One source: the shipped preset and `rf bench singleview --prior learned` agree."""
    from rf_bench.singleview import LEARNED_OVERRIDES
    from rf_core.jobs.job_config import config_yaml, load_job_config

    assert config_yaml(load_job_config("learned")) == config_yaml(
        load_job_config("tiny", overrides=LEARNED_OVERRIDES))


def test_each_prior_type_checks_its_own_files(weights, tmp_path):
    """Sweeps and dataset runs check the prior's files before Ray starts, by type: the
    learned prior's folder, not a Stable Diffusion model named like it."""
    from rf_core.prior.registry import check_available

    check_available(ModelConfig(type="learned", name=str(weights)))
    check_available(ModelConfig(type="learned", name="builtin"))  # the shipped weights
    check_available(ModelConfig(type="none"))
    with pytest.raises(UserError):
        check_available(ModelConfig(type="learned", name=str(tmp_path / "nothing")))
    with pytest.raises(UserError, match="not found"):
        check_available(ModelConfig(name=str(tmp_path / "no-sd")))
