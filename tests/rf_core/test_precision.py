"""Every precision is a first-class path: names, autocast runs close to fp32, loss scaling.

CPU autocast follows CUDA autocast's dtype rules for fp16 and bf16, so these run the code
paths of a GPU run on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rf_core.config import ConfigError, load_config
from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig
from rf_core.precision import autocast_dtype, parse_precision
from rf_core.prior.inversion import InversionConfig, invert
from rf_core.progress import quiet
from tests.rf_core.test_reconstruct import FAST, _photo


@pytest.mark.parametrize("written, name", [
    ("auto", "auto"), ("no", "fp32"), (False, "fp32"), ("fp32", "fp32"), ("FP16", "fp16"),
    ("half", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")])
def test_precision_names(written, name):
    assert parse_precision(written) == name


def test_precision_from_yaml_overrides():
    """A bare ``no`` is YAML's false: it must mean fp32, not be refused."""
    for text in ("mixed_precision=no", "mixed_precision=false", "mixed_precision=fp32"):
        assert load_config(ReconstructorConfig, overrides=[text]).mixed_precision == "fp32"
    with pytest.raises(ConfigError, match="mixed_precision: unknown precision 'fp8'.*bf16"):
        load_config(ReconstructorConfig, overrides=["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="inversion.mixed_precision"):
        from rf_core.jobs.job_config import load_job_config
        load_job_config(None, [], ["inversion.mixed_precision=int8"])


def test_autocast_dtype_resolution():
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("auto", "cuda") == torch.float16
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16


def _run(prior, precision: str, steps: int, extra=()):
    cfg = load_config(ReconstructorConfig, overrides=[*FAST, f"mixed_precision={precision}",
                                                      "input_rays=0", *extra])
    rgb, mask = _photo()
    recon = Reconstructor(cfg, rgb, mask, prior, device="cpu")
    losses = [recon.step() for _ in range(steps)]
    return recon, losses


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reconstructor_under_autocast_is_close_to_fp32(tiny_prior, precision):
    """A few steps with the tiny prior under autocast: finite, the same losses and the same
    input-view render as fp32 to within the precision's rounding."""
    tiny_prior.register_embedding("<e>", torch.randn(32, generator=torch.Generator()
                                                     .manual_seed(0)) * 0.02)
    ref, ref_losses = _run(tiny_prior, "fp32", 4)
    amp, amp_losses = _run(tiny_prior, precision, 4)
    assert amp.amp_dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])
    assert amp.scaler.is_enabled() == (precision == "fp16")
    for a, b in zip(amp_losses, ref_losses):
        assert all(torch.isfinite(torch.tensor(v)) for v in a.values())
        assert a["nonfinite_steps"] == 0
        assert a["loss/rgb"] == pytest.approx(b["loss/rgb"], rel=0.05)
        assert a["loss/mask"] == pytest.approx(b["loss/mask"], rel=0.05, abs=1e-4)
    img_ref = ref.render(ref.input_camera())["rgb"]
    img_amp = amp.render(amp.input_camera())["rgb"]
    mse = (img_ref - img_amp).pow(2).mean().item()
    # Measured: ~38 dB (fp16) and ~33 dB (bf16) after 4 steps; a broken path is < 15 dB.
    assert -10 * torch.log10(torch.tensor(mse)).item() > 25


class ConstantPrior:
    """An SDS gradient that is the same whatever the precision: isolates the loss scaling."""

    def sds_grad(self, images, conditioning, cfg=None, *, step=0, generator=None):
        g = torch.Generator().manual_seed(1)
        return torch.randn(images.shape, generator=g) * 1e-3


def _sds_only_grads(precision: str) -> tuple[dict[str, torch.Tensor], float, dict]:
    """The field's gradients as the optimizer sees them (after unscaling), SDS term only."""
    zero = [f"weights.{k}=0" for k in ("rgb", "mask", "entropy", "orientation",
                                       "normal_smooth", "opacity")]
    cfg = load_config(ReconstructorConfig, overrides=[*FAST, *zero, "weights.sds=1",
                                                      f"mixed_precision={precision}",
                                                      "grad_norm_every=1"])
    rgb, mask = _photo()
    recon = Reconstructor(cfg, rgb, mask, ConstantPrior(), device="cpu")
    seen = {}
    real_step = recon.optimizer.step

    def capture(*args, **kwargs):
        # The fused Adam unscales inside its kernel: GradScaler hands it the scale as
        # ``grad_scale`` (None once unscaled) instead of dividing the gradients first.
        scale = getattr(recon.optimizer, "grad_scale", None)
        for name, p in recon.field.named_parameters():
            grad = p.grad.detach().float().clone()
            seen[name] = grad / scale.float() if scale is not None else grad
        return real_step(*args, **kwargs)

    recon.optimizer.step = capture
    metrics = recon.step()
    return seen, float(recon.scaler.get_scale()) if recon.scaler.is_enabled() else 1.0, metrics


def test_sds_gradient_scale_is_right_under_the_grad_scaler():
    """Under fp16 the loss is multiplied by the scaler's scale (2^16) before backward and the
    gradients divided by it before the update. The SDS term is a real loss, so the field gets
    the same gradient as in fp32; an SDS gradient that bypassed the scaler (the authors'
    ``latents.backward(grad)``) would arrive 2^16 times too small."""
    ref, _, ref_metrics = _sds_only_grads("fp32")
    amp, scale, amp_metrics = _sds_only_grads("fp16")
    assert scale == 2.0 ** 16
    ref_norm = torch.sqrt(sum(g.pow(2).sum() for g in ref.values()))
    diff = torch.sqrt(sum((amp[k] - ref[k]).pow(2).sum() for k in ref))
    assert ref_norm > 0 and (diff / ref_norm).item() < 0.05
    assert amp_metrics["gradnorm/sds"] == pytest.approx(ref_metrics["gradnorm/sds"], rel=0.05)
    assert amp_metrics["gradnorm/sds"] == pytest.approx(ref_norm.item(), rel=0.05)
    assert amp_metrics["gradnorm/rgb"] == 0.0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_inversion_under_autocast_is_close_to_fp32(tiny_prior, precision):
    from tests.rf_core.test_inversion import _photo as photo

    rgb, mask = photo()
    cfg = dict(steps=3, batch_size=1, grad_accum=1, initializer="toy", checkpoint_every=0)
    with quiet():
        ref = invert(tiny_prior, rgb, mask, InversionConfig(**cfg))
        amp = invert(tiny_prior, rgb, mask, InversionConfig(**cfg, mixed_precision=precision))
    init = tiny_prior.sd.text_encoder.get_input_embeddings().weight[
        tiny_prior.sd.tokenizer.convert_tokens_to_ids("toy")].detach()
    assert torch.isfinite(amp.vector).all()
    cos = torch.nn.functional.cosine_similarity(ref.vector - init, amp.vector - init, dim=0)
    assert cos > 0.9
    assert amp.losses == pytest.approx(ref.losses, rel=0.05)


def test_model_dtype_accepts_every_precision_name():
    from rf_core.prior.loading import ModelConfig

    for text, dtype in (("model.dtype=no", torch.float32), ("model.dtype=bf16", torch.bfloat16),
                        ("model.dtype=auto", torch.float32), ("model.dtype=half", torch.float16)):
        from rf_core.jobs.job_config import load_job_config
        cfg = load_job_config("tiny", [], [text])
        assert cfg.model.resolved_dtype(torch.device("cpu")) == dtype
    assert ModelConfig(dtype="auto").resolved_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(ConfigError, match="model.dtype: unknown precision 'fp64'"):
        load_job_config("tiny", [], ["model.dtype=fp64"])


def test_cli_bad_precision_and_model_are_one_line_errors(tmp_path, capsys):
    from rf_cli.main import main

    for extra, message in ((["recon.mixed_precision=fp8"], "unknown precision 'fp8'"),
                           (["--model", "sd15-randm"], "did you mean sd15-random")):
        out = tmp_path / "run"
        code = main(["reconstruct", str(Path(__file__).parents[2] / "examples/duck.png"),
                     "--preset", "tiny", "--invert",
                     "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("rf: error:") and message in err[-1]
        assert not out.exists() and not any(tmp_path.glob(".run*"))
