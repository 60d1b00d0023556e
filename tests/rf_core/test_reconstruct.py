"""The Reconstructor and the run folder: losses, exact resume, NaN handling, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rf_core.config import Schedule, load_config
from rf_core.files.checkpoint import (
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from rf_core.fitting.reconstruct import NonFiniteLossError, Reconstructor, ReconstructorConfig

FAST = ["steps=8", "input_size=24", "input_rays=256", "sds_size=16", "albedo_steps=3",
        "renderer.num_samples=24", "renderer.occupancy.resolution=16",
        "renderer.occupancy.warmup_steps=2", "renderer.occupancy.update_every=2",
        "field.grid.n_levels=4", "field.grid.log2_hashmap_size=12", "levels=[0,2,4,4]",
        "weights.sds=0.01", "lambertian_p=0.5", "textureless_p=0.5"]


def _photo(size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    mask = ((xx**2 + yy**2) < 0.35).float()[None]
    rgb = torch.ones(3, size, size)
    rgb[:, mask[0] > 0] = torch.tensor([0.8, 0.3, 0.1])[:, None]
    return rgb, mask


def _recon(prior, overrides=()) -> Reconstructor:
    cfg = load_config(ReconstructorConfig, overrides=[*FAST, *overrides])
    rgb, mask = _photo()
    return Reconstructor(cfg, rgb, mask, prior, device="cpu")


class RecordingPrior:
    """Any object with ``sds_grad`` is a prior; this one records calls and returns a fixed grad."""

    def __init__(self, value: float = 0.0):
        self.calls, self.value = [], value

    def sds_grad(self, images, conditioning, cfg=None, *, step=0, generator=None):
        self.calls.append((tuple(images.shape), list(conditioning.prompts), step))
        return torch.full_like(images, self.value)


def test_steps_fit_the_input_view_and_call_the_prior(tiny_prior):
    tiny_prior.register_embedding("<e>", torch.randn(32) * 0.02)
    recon = _recon(tiny_prior, ["steps=40", "input_rays=0"])
    first = recon.step()
    for _ in range(39):
        last = recon.step()
    assert last["loss/rgb"] < 0.5 * first["loss/rgb"]
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert recon.input_view_metrics()["input_psnr"] > 12


def test_prior_is_injected_with_view_dependent_prompts():
    prior = RecordingPrior()
    # The authors' bands in our frame: back is [120, 180] degrees from the input view.
    recon = _recon(prior, ["sds_batch=2", "camera.random.azimuth_range=[130,140]",
                           "camera.random.elevation_range=[0,30]",
                           "camera.random.uniform_sphere_rate=0"])
    recon.step()
    shape, prompts, step = prior.calls[0]
    assert shape == (2, 3, 16, 16) and step == 0
    assert all(p.endswith(", back view") and "<e>" in p for p in prompts)


def test_sds_weight_zero_skips_the_prior():
    prior = RecordingPrior()
    recon = _recon(prior, ["weights.sds=0"])
    recon.step()
    assert prior.calls == []


def test_schedules_are_built_once(monkeypatch):
    """The config keeps the written specs; the reconstructor parses them once, not per step."""
    recon = _recon(RecordingPrior(), ["weights.sds=[0,0,1,4]", "lr=[0,1e-2,1e-3,8,log]"])
    assert recon.cfg.lr == [0, 1e-2, 1e-3, 8, "log"]  # unchanged, as written

    def no_parsing(*args, **kwargs):
        raise AssertionError("a schedule was parsed during a step")

    monkeypatch.setattr(Schedule, "parse", staticmethod(no_parsing))
    metrics = [recon.step() for _ in range(3)]
    assert metrics[2]["lr"] == pytest.approx(1e-2 * (1e-3 / 1e-2) ** (2 / 8))
    assert "loss/sds" not in metrics[0] and "loss/sds" in metrics[1]  # weight 0 at step 0


def test_resume_from_checkpoint_equals_uninterrupted(tiny_prior, tmp_path):
    tiny_prior.register_embedding("<e>", torch.randn(32) * 0.02)
    straight = _recon(tiny_prior)
    for _ in range(8):
        straight.step()
    first = _recon(tiny_prior)
    for _ in range(5):  # past the albedo phase and two occupancy updates
        first.step()
    save_checkpoint(tmp_path / "ckpt", first.state_dict(), "x: 1\n")
    state, text = load_checkpoint(tmp_path / "ckpt")
    resumed = _recon(tiny_prior)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["step"] == b["step"] == 8 and text == "x: 1\n"
    for key in a["field"]:
        assert torch.equal(a["field"][key], b["field"][key]), key
    assert torch.equal(a["occupancy"]["occupied"], b["occupancy"]["occupied"])


def test_non_finite_loss_skips_steps_then_is_a_clear_error():
    """A NaN step is skipped (weights untouched, counted); only many in a row abort."""
    recon = _recon(RecordingPrior(float("nan")), ["max_nonfinite_steps=3"])
    before = {k: v.clone() for k, v in recon.field.state_dict().items()}
    for i in range(2):
        metrics = recon.step()
        assert metrics["nonfinite_steps"] == i + 1 and recon.step_count == i + 1
    assert all(torch.equal(before[k], v) for k, v in recon.field.state_dict().items())
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*sds"):
        recon.step()


def test_checkpoint_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "gen": torch.Generator().get_state(), "t": (1, "a"),
             "none": None}
    tensors, skeleton = flatten_state(state)
    back = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    assert back["t"] == (1, "a") and back["none"] is None
    assert torch.equal(back["gen"], state["gen"])
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("override, match", [
    ("lambertian_p=0.9", "sum to <= 1"), ("steps=0", "steps"),
    ("mixed_precision=fp8", "mixed_precision"), ("weights.sds=[0,1,2]", "weights.sds"),
])
def test_config_validation(override, match):
    from rf_core.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=match):
        load_config(ReconstructorConfig, overrides=[override])


class HalfNaNPrior(RecordingPrior):
    """Returns a NaN gradient for the first view of each request, a finite one for the rest."""

    def sds_grad(self, images, conditioning, cfg=None, *, step=0, generator=None):
        grad = torch.full_like(images, 0.01)
        grad[0] = float("nan")
        return grad


def test_nonfinite_sds_views_are_dropped_counted_and_trained_around():
    """A view whose SDS gradient is not finite is dropped and counted (``sds/nonfinite``,
    cumulative ``sds/nonfinite_total``, saved with the state); the step still updates."""
    recon = _recon(HalfNaNPrior(), ["sds_batch=2"])
    before = {k: v.clone() for k, v in recon.field.state_dict().items()}
    m1 = recon.step()
    m2 = recon.step()
    assert m1["sds/nonfinite"] == 1 and m2["sds/nonfinite_total"] == 2
    assert m2["nonfinite_steps"] == 0 and math.isfinite(m2["loss/total"])
    assert any(not torch.equal(before[k], v) for k, v in recon.field.state_dict().items())
    again = _recon(RecordingPrior(), ["sds_batch=2"])
    again.load_state_dict(recon.state_dict())
    assert again.sds_nonfinite_total == 2


def test_fp16_overflow_is_a_counted_skipped_step():
    """Under fp16 the GradScaler skips a step whose scaled gradients overflow and halves its
    scale; the step says so (``amp/skipped_steps``, ``amp/scale``)."""
    # a finite loss whose gradient, times the initial scale 2^16, overflows fp16 activations
    recon = _recon(RecordingPrior(10.0), ["mixed_precision=fp16", "weights.sds=1"])
    before = {k: v.clone() for k, v in recon.field.state_dict().items()}
    m = recon.step()
    assert m["amp/skipped_steps"] == 1 and recon.skipped_steps == 1
    assert recon.step()["amp/scale"] == m["amp/scale"] / 2
    assert all(torch.equal(before[k], v) for k, v in recon.field.state_dict().items())


def test_a_step_reads_the_device_once():
    """After the first step, a step waits for the device twice: once for how many samples
    each render marches (every render's counts in one read), once for everything it reports
    (one transfer): no .item(), float() or bool() of a device tensor, no nonzero."""
    from rf_bench.syncs import SyncCounter

    recon = _recon(RecordingPrior(0.01))
    recon.step()
    with SyncCounter("cpu") as syncs:
        recon.step()
    assert dict(syncs.by_kind) == {"to_host": 2}, syncs.by_kind


def test_occupancy_is_seeded_from_the_initial_field():
    """With ``init_from_field`` the first step refreshes the grid from the blob, so the
    warm-up renders the blob, not the whole cube; off, every cell is occupied until the
    warm-up ends. (The realfusion preset's density rule: the initial field has density
    exp(0) = 1 away from the blob, which the default alpha rule counts as occupied.)"""
    common = ["renderer.occupancy.warmup_steps=4", "renderer.occupancy.density_threshold=8.6"]
    on = _recon(RecordingPrior(), common)
    off = _recon(RecordingPrior(), [*common, "renderer.occupancy.init_from_field=false"])
    for recon in (on, off):
        recon.field.reset_counters()
        recon.step()
    assert int(on.renderer.occupancy.updates) == 1 and int(off.renderer.occupancy.updates) == 0
    assert off.renderer.occupancy.occupied.all() and not on.renderer.occupancy.occupied.all()
    # The seed keeps no densities: the first regular refresh does not decay the initial
    # field's (which would keep its empty space occupied for tens of refreshes).
    assert torch.isinf(on.renderer.occupancy.density).all()
    res = on.cfg.renderer.occupancy.resolution ** 3
    assert on.field.points_forward - res < 0.5 * off.field.points_forward


def test_many_skipped_steps_are_reported_at_the_end():
    from types import SimpleNamespace

    from rf_core.fitting.engine import skipped_steps_warning

    ok = SimpleNamespace(step_count=100, skipped_steps=5, nonfinite_steps=5)
    bad = SimpleNamespace(step_count=100, skipped_steps=6, nonfinite_steps=2)
    assert skipped_steps_warning(ok) is None
    line = skipped_steps_warning(bad)
    assert "6 of 100 steps (6%)" in line and "2 with a non-finite loss" in line
    assert "\n" not in line
