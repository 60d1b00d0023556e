"""The novel-view model: config checks, the noise algebra against diffusers' schedulers,
guidance, the sampler against predict_x0, overfitting, and its folder (round trip, refusals)."""

from __future__ import annotations

import json

import pytest
import torch

from rf_core.config import ConfigError, build
from rf_core.errors import UserError
from rf_core.prior.novel_view.model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    NovelViewConfig,
    NovelViewModel,
    NovelViewModelError,
    NovelViewModelNotFoundError,
)

S = 16
TINY = dict(size=S, block_out_channels=[8, 16], attention=[False, True], norm_num_groups=4,
            attention_head_dim=8, camera_hidden=16, sample_steps=3)


def tiny(kind="regressor", **kw) -> NovelViewModel:
    torch.manual_seed(0)
    return NovelViewModel(NovelViewConfig(kind=kind, **{**TINY, **kw})).eval()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 4, S, S, generator=g), torch.randn(batch, 6, generator=g),
            torch.randn(batch, 4, S, S, generator=g))


def randomize_(model: NovelViewModel) -> NovelViewModel:
    """diffusers zero-initialises some output convs; give every weight a value."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------------------- config


def test_defaults_build_the_sized_model():
    model = NovelViewModel()
    assert model.cfg.kind == "regressor" and model.cfg.size == 32
    assert 1.0e6 < model.num_parameters() < 1.3e6  # ~4.5 MB of float32, far under 20 MB
    cond, camera = torch.rand(1, 4, 32, 32), torch.randn(1, 6)
    assert model.predict(cond, camera).shape == (1, 4, 32, 32)


def test_camera_features_match_the_data_package():
    geometry = pytest.importorskip("rf_core.prior.novel_view.geometry")
    assert NovelViewConfig().camera_features == geometry.CAMERA_FEATURES


@pytest.mark.parametrize("data, message", [
    ({"kind": "gan"}, "kind must be one of regressor, diffusion"),
    ({"attention": [True]}, "one per level"),
    ({"size": 30}, "not a multiple of 4"),
    ({"norm_num_groups": 5}, "does not divide"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"cond_dropout": 1.0}, "cond_dropout"),
    ({"colour": 1}, "unknown config key"),
])
def test_bad_configs_are_one_line_config_errors(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(NovelViewConfig, data)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- noise algebra


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_and_targets_match_diffusers(prediction_type):
    model = tiny("diffusion", prediction_type=prediction_type)
    x0, noise = torch.rand(3, 4, S, S) * 2 - 1, torch.randn(3, 4, S, S)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(model.add_noise(x0, noise, t), model.scheduler.add_noise(x0, noise, t),
                          atol=1e-6)
    # the loss's v target, recomputed from the model's own schedule, is diffusers' velocity
    sa, sb = model._alphas(t)
    assert torch.allclose(sa * noise - sb * x0, model.scheduler.get_velocity(x0, noise, t),
                          atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_eps_and_x0_recompose_the_noisy_input(prediction_type, scale):
    """x_t = sqrt(a) x0_hat + sqrt(1 - a) eps_hat, whatever the prediction type and guidance."""
    model = randomize_(tiny("diffusion", prediction_type=prediction_type))
    cond, camera, noisy = inputs()
    t = torch.tensor([10, 700])
    with torch.no_grad():
        eps = model.eps(noisy, t, cond, camera, scale)
        x0 = model.predict_x0(noisy, t, cond, camera, scale)
    sa, sb = model._alphas(t)
    assert torch.allclose(sa * x0 + sb * eps, noisy, atol=1e-4)


def test_guidance_mixes_the_conditional_and_unconditional_passes():
    model = randomize_(tiny("diffusion", prediction_type="epsilon"))
    cond, camera, noisy = inputs()
    t = torch.tensor([300, 300])
    with torch.no_grad():
        c = model(noisy, t, cond, camera)
        u = model(noisy, t, torch.full_like(cond, 0.5), torch.zeros_like(camera))  # zeroed
        assert torch.allclose(model.eps(noisy, t, cond, camera, 1.0), c, atol=1e-5)
        assert torch.allclose(model.eps(noisy, t, cond, camera, 0.0), u, atol=1e-5)
        assert torch.allclose(model.eps(noisy, t, cond, camera, 4.0), u + 4 * (c - u),
                              atol=1e-4)
        assert not torch.allclose(c, u, atol=1e-3)


def test_regressor_answers_the_sds_interface_from_its_prediction():
    model = randomize_(tiny("regressor"))
    cond, camera, noisy = inputs()
    with torch.no_grad():
        rgba = model.predict(cond, camera)
        x0 = model.predict_x0(noisy, 400, cond, camera)
        eps = model.eps(noisy, 400, cond, camera)
    assert rgba.min() >= 0 and rgba.max() <= 1
    assert torch.allclose(x0, rgba * 2 - 1, atol=1e-6)
    sa, sb = model._alphas(torch.tensor([400]))
    assert torch.allclose(sa * x0 + sb * eps, noisy, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_sampler_is_the_clamped_x0_of_pure_noise(prediction_type):
    """DDIM with one trailing step starts at t = T - 1 and answers its x0 estimate."""
    model = randomize_(tiny("diffusion", prediction_type=prediction_type))
    cond, camera, _ = inputs()
    rgba = model.predict(cond, camera, steps=1, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x0 = model.predict_x0(noise, 999, cond, camera)
    assert torch.allclose(rgba, ((x0.clamp(-1, 1) + 1) / 2), atol=1e-5)


def test_diffusion_predict_is_seeded_and_in_range():
    model = randomize_(tiny("diffusion"))
    cond, camera, _ = inputs()
    a = model.predict(cond, camera, generator=torch.Generator().manual_seed(0))
    b = model.predict(cond, camera, generator=torch.Generator().manual_seed(0))
    c = model.predict(cond, camera, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == cond.shape and a.min() >= 0 and a.max() <= 1


# ---------------------------------------------------------------------------- learning


def fixed_pairs(n=8, seed=0):
    """Smooth views whose target is the view mirrored, masks as discs."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=S,
                                          mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r = torch.rand(n, generator=g) * 3 + 3
    alpha = (((yy - S / 2) ** 2 + (xx - 5) ** 2)[None] < r[:, None, None] ** 2).float()
    cond = torch.cat([rgb * alpha[:, None] + (1 - alpha[:, None]), alpha[:, None]], 1)
    return cond, cond.flip(-1), torch.randn(n, 6, generator=g)


@pytest.mark.parametrize("kind, steps, factor", [("regressor", 120, 10), ("diffusion", 60, 2)])
def test_overfits_eight_fixed_pairs(kind, steps, factor):
    model = tiny(kind).train()
    cond, target, camera = fixed_pairs()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss(step):
        return model.loss(cond, target, camera, torch.Generator().manual_seed(step))

    with torch.no_grad():
        first = sum(loss(s).item() for s in range(4)) / 4
    for step in range(steps):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        last = sum(loss(s).item() for s in range(4)) / 4
    assert last < first / factor, (first, last)


# ---------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("kind", ["regressor", "diffusion"])
def test_save_and_load_round_trip_outputs_exactly(tmp_path, kind):
    model = randomize_(tiny(kind))
    model.save_pretrained(tmp_path / "m", metadata={"data": {"size": S}})
    loaded = NovelViewModel.from_pretrained(tmp_path / "m", size=S, kind=kind)
    assert loaded.cfg == model.cfg and loaded.metadata["data"] == {"size": S}
    assert not loaded.training
    cond, camera, _ = inputs()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(model.predict(cond, camera, generator=gen()),
                       loaded.predict(cond, camera, generator=gen()))
    written = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert written["model"]["kind"] == kind and written["model"]["size"] == S
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_float16_weights_halve_the_file_and_load_as_float32(tmp_path):
    model = randomize_(tiny())
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", weights_dtype="float16")
    size = lambda f: (tmp_path / f / WEIGHTS_NAME).stat().st_size  # noqa: E731
    assert size("b") < 0.6 * size("a")
    loaded = NovelViewModel.from_pretrained(tmp_path / "b")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    cond, camera, _ = inputs()
    assert torch.allclose(loaded.predict(cond, camera), model.predict(cond, camera), atol=5e-3)


def _break(folder, how):
    if how == "missing folder":
        return folder / "nope"
    if how == "no config":
        (folder / CONFIG_NAME).unlink()
    elif how == "corrupt config":
        (folder / CONFIG_NAME).write_text("{not json")
    elif how == "foreign config":
        (folder / CONFIG_NAME).write_text(json.dumps({"_class_name": "UNet2DModel"}))
    elif how == "no weights":
        (folder / WEIGHTS_NAME).unlink()
    elif how == "truncated weights":
        data = (folder / WEIGHTS_NAME).read_bytes()
        (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    elif how == "other architecture":
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        cfg["model"]["block_out_channels"] = [16, 16]
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("how, error, message", [
    ("missing folder", NovelViewModelNotFoundError, "does not exist; train one"),
    ("no config", NovelViewModelNotFoundError, "has no config.json"),
    ("corrupt config", NovelViewModelError, "not valid JSON"),
    ("foreign config", NovelViewModelError, "not a NovelViewModel config"),
    ("no weights", NovelViewModelNotFoundError, "has no model.safetensors"),
    ("truncated weights", NovelViewModelError, "truncated or corrupt"),
    ("other architecture", NovelViewModelError, "do not belong together"),
])
def test_unusable_folders_are_refused_in_one_line(tmp_path, how, error, message):
    tiny().save_pretrained(tmp_path / "m")
    with pytest.raises(error, match=message) as err:
        NovelViewModel.from_pretrained(_break(tmp_path / "m", how))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_a_model_of_another_size_or_kind_is_refused(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    with pytest.raises(NovelViewModelError, match="16 px novel-view model but 32 px"):
        NovelViewModel.from_pretrained(tmp_path / "m", size=32)
    with pytest.raises(NovelViewModelError, match="regressor novel-view model but a diffusion"):
        NovelViewModel.from_pretrained(tmp_path / "m", kind="diffusion")
