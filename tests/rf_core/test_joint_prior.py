"""The joint prior (Magic123): the weighted sum of two priors' SDS, its config, the
``magic123`` preset, and a reconstruction that runs through it."""

from __future__ import annotations

import json

import pytest
import torch

from rf_core.config import ConfigError, read_preset
from rf_core.jobs.job_config import load_job_config
from rf_core.jobs.reconstruct_job import reconstruct
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.joint import JointConfig, JointPrior
from rf_core.prior.loading import ModelConfig
from rf_core.prior.sds import SDSConfig
from rf_core.progress import quiet
from tests.rf_core.test_reconstruct_job import EXAMPLE, SMALL


class FixedPrior:
    """Returns ``value`` everywhere and records each call's SDS config and step."""

    needs_reference = False

    def __init__(self, value: float, needs_reference: bool = False):
        self.value, self.calls, self.needs_reference = value, [], needs_reference
        self.token = None

    def register_embedding(self, token, vector):
        self.token = token

    def sds_grad(self, images, conditioning, cfg=None, *, step=0, generator=None):
        self.calls.append((cfg, step))
        return torch.full_like(images, self.value)


def _joint(main_weight, weight, **kw):
    cfg = JointConfig(model=ModelConfig(type="learned", name="builtin"), main_weight=main_weight,
                      weight=weight)
    main, extra = FixedPrior(1.0, **kw), FixedPrior(10.0)
    return JointPrior(main, extra, cfg), main, extra


def test_the_gradient_is_the_weighted_sum_under_each_priors_own_sds_settings():
    joint, main, extra = _joint(0.5, [0, 2.0, 4.0, 10])
    images, cond = torch.rand(2, 3, 8, 8), Conditioning(["a", "b"], ["", ""])
    main_sds = SDSConfig(guidance_scale=100.0)
    for step, w in ((0, 2.0), (5, 3.0), (10, 4.0)):
        grad = joint.sds_grad(images, cond, main_sds, step=step)
        torch.testing.assert_close(grad, torch.full_like(images, 0.5 * 1.0 + w * 10.0))
    assert [c for c, _ in main.calls] == [main_sds] * 3
    assert [c.guidance_scale for c, _ in extra.calls] == [5.0] * 3  # Magic123's 3D guidance
    assert [s for _, s in extra.calls] == [0, 5, 10]


def test_a_member_at_weight_zero_is_not_asked():
    joint, main, extra = _joint(0.0, 1.0)
    grad = joint.sds_grad(torch.rand(1, 3, 4, 4), Conditioning(["a"], [""]), step=3)
    assert main.calls == [] and len(extra.calls) == 1
    torch.testing.assert_close(grad, torch.full((1, 3, 4, 4), 10.0))


def test_the_main_prior_answers_everything_else():
    joint, main, _ = _joint(1.0, 1.0)
    joint.register_embedding("<e>", torch.zeros(4))
    assert main.token == "<e>" and joint.token == "<e>"
    assert not joint.needs_reference
    assert _joint(1.0, 1.0, needs_reference=True)[0].needs_reference


def test_weights_that_are_always_zero_are_one_line():
    with pytest.raises(ConfigError, match=r"^joint: main_weight and weight are both 0"):
        load_job_config("tiny", overrides=["joint.model.type=learned", "joint.weight=0",
                                           "joint.main_weight=0"])
    # Off (no second model): the weights are not read.
    assert not load_job_config("tiny", overrides=["joint.weight=0",
                                                  "joint.main_weight=0"]).joint.enabled


def test_the_magic123_preset_extends_realfusion_with_the_papers_values():
    cfg, base = load_job_config("magic123"), load_job_config("realfusion")
    assert cfg.joint.enabled and cfg.joint.model.type == "zero123"
    assert (cfg.joint.main_weight, cfg.joint.weight) == (1.0, 40.0)
    assert cfg.joint.sds.guidance_scale == 5.0 and cfg.recon.sds.guidance_scale == 100.0
    assert (cfg.recon.sds.t_min, cfg.recon.sds.t_max) == (0.2, 0.6)
    assert cfg.recon.steps == base.recon.steps and cfg.model == base.model
    assert "extends" not in read_preset("magic123")


def test_a_reconstruction_sums_two_priors(tmp_path):
    """The learned preset's own model as the main prior, and again as the second one: the
    job wires the joint prior and trains through it."""
    cfg = load_job_config("learned", overrides=[
        *SMALL, "recon.steps=3", "joint.model.type=learned", "joint.model.name=builtin",
        "joint.model.dtype=fp32", "joint.weight=[0, 0.0, 1.0, 2]"])
    with quiet():
        metrics = reconstruct(EXAMPLE, None, tmp_path / "run", cfg)
    assert metrics["steps"] == 3
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "joint:" in saved and "type: learned" in saved
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
