"""Single-image textual inversion: learns, touches nothing else, resumes exactly."""

from __future__ import annotations

import pytest
import torch

from rf_core.prior import AugmentConfig, InversionConfig, invert
from rf_core.prior.embeddings import add_token
from rf_core.prior.inversion import TEMPLATES, denoising_loss
from rf_core.prior.sds import randn_from


def _photo(size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A red disc with a blue stripe on white, and its mask."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    mask = ((xx**2 + yy**2) < 0.5).float()[None]
    rgb = torch.ones(3, size, size)
    rgb[:, mask[0] > 0] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    rgb[:, (mask[0] > 0) & (yy.abs() < 0.15)] = torch.tensor([0.1, 0.2, 0.9])[:, None]
    return rgb, mask


def _cfg(**kw) -> InversionConfig:
    base = dict(token="<t>", initializer="toy", steps=4, batch_size=2, grad_accum=1, lr=5e-2,
                checkpoint_every=0, augment=AugmentConfig(blur_p=0.0))
    base.update(kw)
    return InversionConfig(**base)


def _fixed_eval_loss(prior, token: str, n: int = 8) -> float:
    """Mean denoising loss on a fixed set of views, timesteps and noise."""
    from rf_core.prior.augment import augment_views

    gen = torch.Generator().manual_seed(99)
    rgb, mask = _photo()
    cfg = AugmentConfig(resolution=prior.resolution, blur_p=0.0)
    views = augment_views(rgb, mask, n, cfg, gen)
    with torch.no_grad():
        latents = prior.encode_latents(views, None)
        noise = randn_from(tuple(latents.shape), gen, prior.device)
        t = torch.linspace(50, 950, n).long()
        ids = prior.sd.tokenizer([TEMPLATES[0].format(token)] * n, padding="max_length",
                                 max_length=77, return_tensors="pt").input_ids
        return float(denoising_loss(prior, latents, noise, t, ids))


def test_inversion_lowers_loss_and_leaves_other_rows_bit_identical(tiny_prior):
    table = tiny_prior.sd.text_encoder.get_input_embeddings()
    token_id = add_token(tiny_prior.sd.tokenizer, tiny_prior.sd.text_encoder, "<t>",
                         initializer="toy")
    before_rows = table.weight.detach().clone()
    loss_before = _fixed_eval_loss(tiny_prior, "<t>")
    rgb, mask = _photo()
    result = invert(tiny_prior, rgb, mask, _cfg(steps=40), show_progress=False)
    loss_after = _fixed_eval_loss(tiny_prior, "<t>")
    after_rows = tiny_prior.sd.text_encoder.get_input_embeddings().weight
    # Deterministic (fixed views, t, noise). The tiny UNet's weights are random, so text moves
    # its output only a little: ~1% of the loss is all a token can win here.
    assert loss_after < loss_before * 0.995, (loss_before, loss_after)
    others = torch.arange(after_rows.shape[0]) != token_id
    assert torch.equal(after_rows[others], before_rows[others])
    assert not torch.equal(after_rows[token_id], before_rows[token_id])
    assert torch.equal(after_rows[token_id], result.vector)
    assert not any(p.requires_grad for p in tiny_prior.sd.text_encoder.parameters())


def test_resume_equals_uninterrupted(tiny_prior, tmp_path):
    rgb, mask = _photo()
    straight = invert(tiny_prior, rgb, mask, _cfg(steps=6), show_progress=False)
    ckpt = tmp_path / "state.ckpt"
    first = invert(tiny_prior, rgb, mask, _cfg(steps=3), checkpoint=ckpt, show_progress=False)
    assert first.resumed_from == 0 and ckpt.exists()
    resumed = invert(tiny_prior, rgb, mask, _cfg(steps=6), checkpoint=ckpt, show_progress=False)
    assert resumed.resumed_from == 3
    assert torch.equal(resumed.vector, straight.vector)
    assert resumed.losses == straight.losses


def test_incompatible_checkpoint_starts_fresh(tiny_prior, tmp_path):
    rgb, mask = _photo()
    ckpt = tmp_path / "state.ckpt"
    invert(tiny_prior, rgb, mask, _cfg(steps=2), checkpoint=ckpt, show_progress=False)
    other = invert(tiny_prior, rgb, mask, _cfg(steps=3, lr=1e-3), checkpoint=ckpt,
                   show_progress=False)
    assert other.resumed_from == 0 and len(other.losses) == 3


def test_same_seed_same_embedding(tiny_prior):
    rgb, mask = _photo()
    a = invert(tiny_prior, rgb, mask, _cfg(steps=2, seed=5), show_progress=False)
    b = invert(tiny_prior, rgb, mask, _cfg(steps=2, seed=5), show_progress=False)
    c = invert(tiny_prior, rgb, mask, _cfg(steps=2, seed=6), show_progress=False)
    assert torch.equal(a.vector, b.vector) and not torch.equal(a.vector, c.vector)


def test_bf16_autocast_runs_and_learns_the_same_direction(tiny_prior):
    rgb, mask = _photo()
    fp32 = invert(tiny_prior, rgb, mask, _cfg(steps=2), show_progress=False)
    bf16 = invert(tiny_prior, rgb, mask, _cfg(steps=2, mixed_precision="bf16"),
                  show_progress=False)
    init = tiny_prior.sd.text_encoder.get_input_embeddings().weight[
        tiny_prior.sd.tokenizer.convert_tokens_to_ids("toy")]
    d32, d16 = fp32.vector - init, bf16.vector - init
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9


def test_v_prediction_model_inverts(tiny_v_prior):
    rgb, mask = _photo()
    result = invert(tiny_v_prior, rgb, mask, _cfg(steps=2), show_progress=False)
    assert len(result.losses) == 2 and all(v > 0 for v in result.losses)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"token": "two words"}, "token"), ({"grad_accum": 0}, "grad_accum"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        InversionConfig(**kw)
