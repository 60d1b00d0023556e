"""The recipe's open choices as switches (issue 24): the prompt regime, the background
(random solid colours vs the authors' learned MLP with a masked image loss) and the SDS
multiplier. Each default is today's behaviour; each alternative does what it says."""

from __future__ import annotations

import pytest
import torch

from rf_core.fitting.losses import loss_terms
from rf_core.prior.conditioning import PromptConfig, make_conditioning, view_directions
from tests.rf_core.test_reconstruct import RecordingPrior, _recon


def _names(regime: str, azimuth: list[float], step: int | None = None) -> list[str]:
    az = torch.tensor(azimuth)
    cond = make_conditioning(PromptConfig(regime=regime), azimuth=az,
                             elevation=torch.zeros_like(az), step=step)
    return [p.rsplit(", ", 1)[1].removesuffix(" view") for p in cond.prompts]


def test_one_sided_is_the_default_and_turns_its_front_band_to_the_photos_left():
    assert PromptConfig().regime == "one-sided"
    assert _names("one-sided", [-50, -10, 20, 50, 150, -170]) == \
        ["front", "front", "side", "side", "back", "side"]


def test_symmetric_centres_a_band_of_the_same_width_on_the_input_view():
    assert _names("symmetric", [-50, -25, 0, 25, 50, 180, 155, -140]) == \
        ["side", "front", "front", "front", "side", "back", "back", "side"]


def test_authors_regime_says_front_on_nine_steps_in_ten():
    views = [-50, 20, 150]
    for step in range(1, 10):
        assert _names("authors", views, step) == ["front"] * 3
    assert _names("authors", views, 10) == _names("one-sided", views) == \
        ["front", "side", "back"]
    # The overhead view too: their replaced embedding is text_z[0] whatever the camera.
    cond = make_conditioning(PromptConfig(regime="authors"), azimuth=torch.tensor([0.0]),
                             elevation=torch.tensor([80.0]), step=3)
    assert cond.prompts[0].endswith("front view")


def test_an_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="prompt regime must be one of one-sided"):
        PromptConfig(regime="mirrored")
    assert view_directions(torch.tensor([10.0]), torch.tensor([0.0]))  # default still works


def test_the_masked_image_loss_ignores_the_render_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    rgb, target = torch.rand(50, 3, generator=g), torch.rand(50, 3, generator=g)
    mask = (torch.rand(50, generator=g) > 0.5).float()
    views = {"rgb": torch.rand(1, 3, 4, 4), "opacity": torch.rand(1, 1, 4, 4),
             "normal": torch.rand(1, 3, 4, 4), "samples": []}
    views["samples"] = []
    opacity = torch.rand(50)

    def rgb_term(pred, masked):
        from unittest import mock
        flat = lambda s, n: torch.zeros(1, n)  # noqa: E731
        with mock.patch("rf_core.fitting.losses._views_orientation", flat):
            return loss_terms(pred, opacity, target, mask, views, masked_rgb=masked)["rgb"]

    outside = rgb + (1 - mask)[:, None] * 0.7
    assert rgb_term(rgb, True) == pytest.approx(float(rgb_term(outside, True)))
    assert rgb_term(rgb, False) != pytest.approx(float(rgb_term(outside, False)))
    expected = ((rgb - target) * mask[:, None]).square().mean()
    assert rgb_term(rgb, True) == pytest.approx(float(expected))


def test_a_learned_background_trains_behind_every_render_and_resumes():
    recon = _recon(RecordingPrior(0.01), ["background=learned", "weights.sds=1"])
    assert recon.background is not None
    before = [p.detach().clone() for p in recon.background.parameters()]
    assert {id(p) for p in recon.background.parameters()} <= {
        id(p) for g in recon.optimizer.param_groups if g["name"] == "mlp" for p in g["params"]}
    metrics = recon.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    moved = [not torch.equal(a, b) for a, b in zip(before, recon.background.parameters())]
    assert all(moved)
    state = recon.state_dict()
    again = _recon(RecordingPrior(0.01), ["background=learned", "weights.sds=1"])
    again.load_state_dict(state)
    for a, b in zip(again.background.parameters(), recon.background.parameters()):
        assert torch.equal(a, b)
    assert _recon(RecordingPrior()).background is None  # random-solid: the default


def test_the_sds_multiplier_scales_the_schedule():
    base = _recon(RecordingPrior(), ["weights.sds=[0, 1.0, 0.25, 10]"])
    double = _recon(RecordingPrior(), ["weights.sds=[0, 1.0, 0.25, 10]", "sds_multiplier=2"])
    for step in (0, 5, 10, 20):
        assert double._weights(step)["sds"] == pytest.approx(2 * base._weights(step)["sds"])
        assert double._weights(step)["rgb"] == base._weights(step)["rgb"]
