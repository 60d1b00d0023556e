"""Single-image textual inversion: learns, touches nothing else, resumes exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rf_core.prior import AugmentConfig, InversionConfig, invert
from rf_core.prior import inversion as inversion_module
from rf_core.prior.embeddings import add_token
from rf_core.prior.inversion import (
    TEMPLATES,
    _draw,
    _TokenSubstitution,
    backward_step,
    denoising_loss,
)
from rf_core.prior.sds import randn_from
from rf_core.progress import quiet


@pytest.fixture(autouse=True)
def _quiet():
    """The inversions here run without progress bars."""
    with quiet():
        yield


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
    result = invert(tiny_prior, rgb, mask, _cfg(steps=40))
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
    straight = invert(tiny_prior, rgb, mask, _cfg(steps=6))
    ckpt = tmp_path / "state.ckpt"
    first = invert(tiny_prior, rgb, mask, _cfg(steps=3), checkpoint=ckpt)
    assert first.resumed_from == 0 and ckpt.exists()
    resumed = invert(tiny_prior, rgb, mask, _cfg(steps=6), checkpoint=ckpt)
    assert resumed.resumed_from == 3
    assert torch.equal(resumed.vector, straight.vector)
    assert resumed.losses == straight.losses


def test_incompatible_checkpoint_starts_fresh(tiny_prior, tmp_path):
    rgb, mask = _photo()
    ckpt = tmp_path / "state.ckpt"
    invert(tiny_prior, rgb, mask, _cfg(steps=2), checkpoint=ckpt)
    other = invert(tiny_prior, rgb, mask, _cfg(steps=3, lr=1e-3), checkpoint=ckpt)
    assert other.resumed_from == 0 and len(other.losses) == 3


def test_same_seed_same_embedding(tiny_prior):
    rgb, mask = _photo()
    a = invert(tiny_prior, rgb, mask, _cfg(steps=2, seed=5))
    b = invert(tiny_prior, rgb, mask, _cfg(steps=2, seed=5))
    c = invert(tiny_prior, rgb, mask, _cfg(steps=2, seed=6))
    assert torch.equal(a.vector, b.vector) and not torch.equal(a.vector, c.vector)


def test_bf16_autocast_runs_and_learns_the_same_direction(tiny_prior):
    rgb, mask = _photo()
    fp32 = invert(tiny_prior, rgb, mask, _cfg(steps=2))
    bf16 = invert(tiny_prior, rgb, mask, _cfg(steps=2, mixed_precision="bf16"))
    init = tiny_prior.sd.text_encoder.get_input_embeddings().weight[
        tiny_prior.sd.tokenizer.convert_tokens_to_ids("toy")]
    d32, d16 = fp32.vector - init, bf16.vector - init
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9


def test_v_prediction_model_inverts(tiny_v_prior):
    rgb, mask = _photo()
    result = invert(tiny_v_prior, rgb, mask, _cfg(steps=2))
    assert len(result.losses) == 2 and all(v > 0 for v in result.losses)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"token": "two words"}, "token"), ({"grad_accum": 0}, "grad_accum"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        InversionConfig(**kw)


def _step_gradient(prior, fuse: bool, batch_size: int, grad_accum: int, seed: int = 3):
    """One optimizer step's loss and gradient on the token vector, from fixed draws."""
    token_id = add_token(prior.sd.tokenizer, prior.sd.text_encoder, "<g>", initializer="toy")
    table = prior.sd.text_encoder.get_input_embeddings()
    vector = torch.nn.Parameter(table.weight[token_id].detach().float().clone())
    templates = torch.stack([prior.sd.tokenizer(tpl.format("<g>"), padding="max_length",
                                                max_length=77, return_tensors="pt").input_ids[0]
                             for tpl in TEMPLATES])
    rgb, mask = _photo()
    gen = torch.Generator().manual_seed(seed)
    aug = AugmentConfig(resolution=prior.resolution)
    draws = [_draw(prior, rgb, mask, batch_size, aug, gen, templates) for _ in range(grad_accum)]
    hook = _TokenSubstitution(table, token_id, vector)
    try:
        loss = backward_step(prior, draws, fuse, None, torch.amp.GradScaler("cpu", enabled=False))
    finally:
        hook.remove()
    return float(loss), vector.grad.clone(), draws


@pytest.mark.parametrize("batch_size,grad_accum", [(1, 4), (2, 3)])
def test_fused_batch_gives_the_accumulated_gradient(tiny_prior, batch_size, grad_accum):
    """The same views, timesteps, prompts and noise: one UNet call of all micro-batches
    gives the gradient of accumulating them one by one, and both equal the gradient of the
    plain mean loss over every view (the simple reference)."""
    fused_loss, fused, draws = _step_gradient(tiny_prior, True, batch_size, grad_accum)
    accum_loss, accum, _ = _step_gradient(tiny_prior, False, batch_size, grad_accum)
    assert len({tuple(d.t.tolist()) for d in draws}) == grad_accum  # really different draws
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, accum, rtol=1e-4, atol=1e-6 * float(accum.abs().max()))
    assert fused_loss == pytest.approx(accum_loss, rel=1e-5)
    # reference: the mean loss over every view, its gradient by autograd
    token_id = tiny_prior.sd.tokenizer.convert_tokens_to_ids("<g>")
    table = tiny_prior.sd.text_encoder.get_input_embeddings()
    vector = torch.nn.Parameter(table.weight[token_id].detach().float().clone())
    hook = _TokenSubstitution(table, token_id, vector)
    try:
        losses = []
        for mb in draws:
            with torch.no_grad():
                latents = tiny_prior.encode_latents(mb.views, mb.posterior_eps).float()
            for i in range(len(mb.views)):  # one view at a time
                losses.append(denoising_loss(tiny_prior, latents[i:i + 1], mb.noise[i:i + 1],
                                             mb.t[i:i + 1], mb.input_ids[i:i + 1]))
        torch.stack(losses).mean().backward()
    finally:
        hook.remove()
    torch.testing.assert_close(fused, vector.grad, rtol=1e-4,
                               atol=1e-6 * float(vector.grad.abs().max()))


def test_fused_and_accumulated_runs_learn_the_same_vector(tiny_prior):
    rgb, mask = _photo()
    cfg = dict(steps=3, batch_size=1, grad_accum=4)
    fused = invert(tiny_prior, rgb, mask, _cfg(**cfg))
    accum = invert(tiny_prior, rgb, mask, _cfg(**cfg, fuse_accumulation=False))
    torch.testing.assert_close(fused.vector, accum.vector, rtol=0, atol=1e-5)
    assert fused.losses == pytest.approx(accum.losses, rel=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_resume_with_accumulation_equals_uninterrupted(tiny_prior, tmp_path, fuse):
    rgb, mask = _photo()
    cfg = dict(batch_size=1, grad_accum=2, fuse_accumulation=fuse)
    straight = invert(tiny_prior, rgb, mask, _cfg(steps=4, **cfg))
    ckpt = tmp_path / "state.ckpt"
    invert(tiny_prior, rgb, mask, _cfg(steps=2, **cfg), checkpoint=ckpt)
    resumed = invert(tiny_prior, rgb, mask, _cfg(steps=4, **cfg), checkpoint=ckpt)
    assert resumed.resumed_from == 2
    assert torch.equal(resumed.vector, straight.vector)
    assert resumed.losses == straight.losses


def test_checkpoint_resumes_across_the_fusion_switch(tiny_prior, tmp_path):
    """Fusing groups the same draws differently: a checkpoint of one resumes the other."""
    rgb, mask = _photo()
    ckpt = tmp_path / "state.ckpt"
    invert(tiny_prior, rgb, mask, _cfg(steps=2, grad_accum=2), checkpoint=ckpt)
    other = invert(tiny_prior, rgb, mask, _cfg(steps=3, grad_accum=2, fuse_accumulation=False),
                   checkpoint=ckpt)
    assert other.resumed_from == 2 and len(other.losses) == 3


class _HostSyncs(TorchDispatchMode):
    """Counts ops that wait for the device (``.item()``, ``nonzero``) or make a tensor from
    host data (``torch.tensor(...)``, which a CUDA run would copy to the device)."""

    WATCH = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.lift_fresh")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.WATCH):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_step_makes_no_host_syncs_and_no_host_tensors(tiny_prior, monkeypatch):
    """Augmentations, draws, forward and backward of every step: nothing that would wait for
    a GPU or copy a host-made tensor to it (counted on the CPU by a dispatch mode; the
    optimizer's CPU step counter is outside it). Losses are read every LOSS_READ_EVERY steps."""
    counter = _HostSyncs()
    with counter:
        torch.tensor([1.0])
    assert counter.seen == ["aten.lift_fresh.default"]  # the counter sees host-made tensors
    counter.seen.clear()

    def counted(fn):
        def run(*args, **kwargs):
            with counter:
                return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(inversion_module, "_draw", counted(inversion_module._draw))
    monkeypatch.setattr(inversion_module, "backward_step",
                        counted(inversion_module.backward_step))
    reads = []
    rgb, mask = _photo()
    result = invert(tiny_prior, rgb, mask, _cfg(steps=3, batch_size=1, grad_accum=2,
                                                augment=AugmentConfig(blur_p=1.0, jitter_p=1.0)),
                    between_steps=lambda done: reads.append(done))
    assert counter.seen == []
    assert reads == [1, 2, 3] and len(result.losses) == 3


def test_between_steps_may_resize_the_embedding_table(tiny_prior):
    """A prior server registers other trials' tokens between two inversion steps; adding a
    token can replace the embedding layer, and the inversion must follow it."""
    rgb, mask = _photo()
    added = []

    def other_trial(done):
        token = f"<other{done}>"
        tiny_prior.register_embedding(token, torch.randn(32) * 0.02)
        added.append(token)
        if done == 2:  # transformers versions that resize by building a new layer
            encoder = tiny_prior.sd.text_encoder
            old = encoder.get_input_embeddings()
            new = torch.nn.Embedding(*old.weight.shape).requires_grad_(False)
            new.weight.copy_(old.weight)
            encoder.set_input_embeddings(new)

    straight = invert(tiny_prior, rgb, mask, _cfg(steps=3))
    layer = tiny_prior.sd.text_encoder.get_input_embeddings()
    busy = invert(tiny_prior, rgb, mask, _cfg(steps=3), between_steps=other_trial)
    assert len(added) == 3
    assert tiny_prior.sd.text_encoder.get_input_embeddings() is not layer  # it was replaced
    assert torch.equal(busy.vector, straight.vector) and busy.losses == straight.losses
    rows = tiny_prior.sd.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[tiny_prior.sd.tokenizer.convert_tokens_to_ids("<t>")], busy.vector)
