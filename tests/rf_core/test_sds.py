"""Score distillation: the prior's gradients against a direct reference built from the diffusers
components, each option's formula, batching/determinism, schedules, guards, AMP and prompts."""

import pytest
import torch
import torch.nn.functional as F

from rf_core.prior import (
    Conditioning,
    PromptConfig,
    SDSConfig,
    make_conditioning,
    sds_loss,
    view_directions,
)
from rf_core.prior.sds import epsilon_from_output, latent_grad, sds_weights

LAT = (1, 4, 16, 16)  # one request's latent for the tiny models' 64 px images
COND = Conditioning(["a photo of a duck", "a red teddy bear, side view"], ["", "blurry"])
T = torch.tensor([700, 250])


def _first(cond, i=0):
    """Request i of a conditioning, alone."""
    return Conditioning(cond.prompts[i:i + 1], cond.negative_prompts[i:i + 1])


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _post_eps(seeds):
    """Each request's VAE posterior eps, as the prior draws it when timesteps and noise are
    given: the first (and only) draw from that request's generator."""
    return torch.cat([torch.randn(LAT, generator=g) for g in _gens(seeds)])


def _inputs(size=48, batch=2, seed=0):
    """Images [B,3,size,size] in [0,1] and noise [B,4,16,16]."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=gen),
            torch.randn(batch, *LAT[1:], generator=gen))


def _encoder(prior, eps_post):
    """The map images [B,3,H,W] in [0,1] -> scaled posterior sample z, posterior eps fixed."""
    vae = prior.sd.vae

    def encode(images):
        x = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
        post = vae.encode(x * 2 - 1).latent_dist
        return (post.mean + post.std * eps_post) * vae.config.scaling_factor
    return encode


def _unet_eps(prior, z_t, t, prompts):
    """One UNet call for one CFG branch; v outputs turned into eps by the formula."""
    tok = prior.sd.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt")
    with torch.no_grad():
        text = prior.sd.text_encoder(tok.input_ids)[0]
        out = prior.sd.unet(z_t, t, encoder_hidden_states=text).sample
    if prior.sd.scheduler.config.prediction_type == "v_prediction":
        a = prior.sd.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        out = a.sqrt() * out + (1 - a).sqrt() * z_t  # z_t = sqrt(a)x0 + sqrt(1-a)eps
    return out


def _weights(name, a):
    return {"sds": 1 - a, "uniform": torch.ones_like(a), "sqrt_alpha": a.sqrt() * (1 - a)}[name]


def _reference(prior, images, cond, t, noise, eps_post, combine, weighting="sds"):
    """(image grad, latent grad) computed the long way: two separate UNet calls, then
    ``combine(eps_u, eps_c) -> eps_hat`` and autograd through the encoder."""
    images = images.clone().requires_grad_(True)
    z = _encoder(prior, eps_post)(images)
    a = prior.sd.scheduler.alphas_cumprod[t].float()
    z_t = a.sqrt().view(-1, 1, 1, 1) * z.detach() + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    eps_hat = combine(_unet_eps(prior, z_t, t, cond.negative_prompts),
                      _unet_eps(prior, z_t, t, cond.prompts))
    g_lat = _weights(weighting, a).view(-1, 1, 1, 1) * (eps_hat - noise)
    (g_img,) = torch.autograd.grad(z, images, g_lat)
    return g_img, g_lat


def _cfg(s):
    return lambda u, c: u + s * (c - u)


def _close(a, b, rtol=1e-4, atol=2e-5):
    """allclose with atol relative to the reference's scale.

    Batched and separate UNet calls round differently in float32, and guidance up to 100
    amplifies that by 100x: seen up to 4e-6 of the scale, CPU-dependent. A wrong weighting,
    guidance or timestep is off by O(1)."""
    scale = b.abs().max().item()
    assert scale > 0
    assert torch.allclose(a, b, rtol=rtol, atol=atol * scale), (a - b).abs().max().item() / scale


def _lib(prior, images, noise, seeds=(1, 2), cond=COND, t=T, **kw):
    return prior.sds(images, cond, kw.pop("cfg", SDSConfig()), timesteps=t, noise=noise,
                     generator=_gens(seeds), **kw)


@pytest.mark.parametrize("size", [48, 64])
@pytest.mark.parametrize("scale", [7.5, 100.0])
def test_sds_matches_direct_reference(tiny_prior, size, scale):
    """The prior's image gradient equals the two-call reference, through the resize or not."""
    images, noise = _inputs(size)
    out = _lib(tiny_prior, images, noise, guidance_scale=scale)
    ref, g_lat = _reference(tiny_prior, images, COND, T, noise, _post_eps((1, 2)), _cfg(scale))
    _close(out.grad, ref)
    assert torch.equal(out.timesteps, T) and out.nonfinite.sum() == 0
    assert torch.allclose(out.latent_grad_norm, g_lat.flatten(1).norm(dim=1), rtol=1e-4)


def test_guidance_scale_one_and_zero_select_a_branch(tiny_prior):
    """s = 1 is the conditional prediction alone, s = 0 the unconditional one."""
    images, noise = _inputs()
    eps_post = _post_eps((1, 2))
    for s, branch in ((1.0, lambda u, c: c), (0.0, lambda u, c: u)):
        ref, _ = _reference(tiny_prior, images, COND, T, noise, eps_post, branch)
        _close(_lib(tiny_prior, images, noise, guidance_scale=s).grad, ref)


def test_per_sample_guidance_scale(tiny_prior):
    """A [B] guidance tensor applies each sample's own scale."""
    images, noise = _inputs()
    both = _lib(tiny_prior, images, noise, guidance_scale=torch.tensor([3.0, 50.0])).grad
    for i, s in enumerate((3.0, 50.0)):
        _close(both[i], _lib(tiny_prior, images, noise, guidance_scale=s).grad[i], atol=1e-6)
    other = _lib(tiny_prior, images, noise, guidance_scale=50.0).grad
    assert (both[0] - other[0]).abs().max() > 1e-2 * other[0].abs().max()


def test_weightings(tiny_prior):
    """``sds_weights`` are the documented formulas, and the gradient scales exactly with w(t)."""
    a = tiny_prior.alphas_cumprod[torch.tensor([0, 20, 500, 980, 999])]
    for name in ("sds", "uniform", "sqrt_alpha"):
        assert torch.allclose(sds_weights(name, a), _weights(name, a), rtol=1e-6, atol=0)
    assert torch.equal(sds_weights("uniform", a), torch.ones(5))
    with pytest.raises(ValueError, match="weighting"):
        sds_weights("snr", a)
    images, noise = _inputs()
    grads = {name: _lib(tiny_prior, images, noise, cfg=SDSConfig(weighting=name))
             for name in ("sds", "uniform", "sqrt_alpha")}
    a = tiny_prior.alphas_cumprod[T]
    for name in ("sds", "sqrt_alpha"):
        assert torch.allclose(grads[name].weights, _weights(name, a), rtol=1e-6)
        for i in range(2):
            _close(grads[name].grad[i], _weights(name, a)[i] * grads["uniform"].grad[i], rtol=1e-5)


def test_epsilon_from_v_prediction_is_exact():
    """eps = sqrt(a) v + sqrt(1-a) z_t inverts v = sqrt(a) eps - sqrt(1-a) x0."""
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 4, 8, 8, generator=gen)
    a = torch.tensor([0.999, 0.05, 0.5])
    ab = a.view(-1, 1, 1, 1)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(epsilon_from_output(v, x_t, a, "v_prediction"), eps, atol=1e-5)
    assert torch.equal(epsilon_from_output(v, x_t, a, "epsilon"), v)
    with pytest.raises(ValueError, match="prediction type"):
        epsilon_from_output(v, x_t, a, "sample")


def test_sds_v_prediction_matches_reference(tiny_v_prior):
    """On a v model, the prior converts v to eps before guidance, as the reference does."""
    images, noise = _inputs()
    out = _lib(tiny_v_prior, images, noise, guidance_scale=7.5)
    ref, _ = _reference(tiny_v_prior, images, COND, T, noise, _post_eps((1, 2)), _cfg(7.5))
    _close(out.grad, ref)


def test_image_grad_is_encoder_vjp_of_latent_grad(tiny_prior):
    """sds_grad = J_E^T w(t)(eps_hat - eps), by torch.func.vjp of the encoder map."""
    images, noise = _inputs()
    encode = _encoder(tiny_prior, _post_eps((1, 2)))
    z, vjp_fn = torch.func.vjp(encode, images)
    a = tiny_prior.sd.scheduler.alphas_cumprod[T].float().view(-1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    eps_hat = _cfg(20.0)(_unet_eps(tiny_prior, z_t, T, COND.negative_prompts),
                         _unet_eps(tiny_prior, z_t, T, COND.prompts))
    (expect,) = vjp_fn((1 - a) * (eps_hat - noise))
    grad = tiny_prior.sds(images, COND, timesteps=T, noise=noise, generator=_gens((1, 2)),
                          guidance_scale=20.0).grad
    _close(grad, expect)


def test_sds_loss_gradient_is_grad_exactly():
    """sds_loss has gradient exactly ``grad`` (to the last bit) and value 0.5 |grad|^2."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 8, 8, generator=gen) * 1e3).requires_grad_(True)
    grad = torch.randn(2, 3, 8, 8, generator=gen) * 1e-6
    loss = sds_loss(images, grad)
    loss.backward()
    assert torch.equal(images.grad, grad)
    assert torch.allclose(loss, 0.5 * grad.pow(2).sum(), rtol=1e-6, atol=0)


def test_batching_invariance_and_determinism(tiny_prior):
    """A request's gradient and timestep do not depend on what it is batched with; a seed
    reproduces its result; timesteps stay within [int(T t_min), int(T t_max)]."""
    images, _ = _inputs()
    cfg = SDSConfig(guidance_scale=10.0, t_min=0.3, t_max=0.6)
    both = tiny_prior.sds(images, COND, cfg, generator=_gens((5, 6)))
    for i, seed in enumerate((5, 6)):
        alone = tiny_prior.sds(images[i:i + 1], _first(COND, i), cfg, generator=_gens((seed,)))
        assert alone.timesteps.item() == both.timesteps[i].item()
        _close(alone.grad[0], both.grad[i], rtol=1e-5, atol=1e-5)
    again = tiny_prior.sds(images, COND, cfg, generator=_gens((5, 6)))
    assert torch.equal(again.grad, both.grad) and torch.equal(again.timesteps, both.timesteps)
    many = tiny_prior.sds(torch.rand(32, 3, 8, 8), make_conditioning(PromptConfig(), batch=32),
                          cfg, generator=torch.Generator().manual_seed(0))
    assert many.timesteps.min() >= 300 and many.timesteps.max() <= 600
    assert len(set(many.timesteps.tolist())) > 10


def test_sds_grad_batch_gives_each_request_its_own_gradient(tiny_prior):
    """The batched entry point (what the prior server calls) splits requests by image size,
    weighting and conditioning fields; each request still gets exactly its lone gradient, and
    its generator ends where a lone call leaves it."""
    from rf_core.prior import SDSRequest
    from rf_core.scene.cameras import sphere_views

    cams = sphere_views(2, 3.0, 20.0, 16, 16)
    with_cams = make_conditioning(PromptConfig(), batch=2, cameras=cams,
                                  background=torch.rand(2, 3))
    cases = [(torch.rand(1, 3, 16, 16), _first(COND, 0), SDSConfig(guidance_scale=5.0)),
             (torch.rand(2, 3, 16, 16), COND, SDSConfig(t_max=0.5)),
             (torch.rand(1, 3, 24, 24), _first(COND, 1), SDSConfig(weighting="uniform")),
             (torch.rand(2, 3, 16, 16), with_cams, SDSConfig(guidance_scale=30.0))]
    requests = [SDSRequest(x, c, cfg, step=3, generator=torch.Generator().manual_seed(20 + i))
                for i, (x, c, cfg) in enumerate(cases)]
    grads = tiny_prior.sds_grad_batch(requests)
    for i, (x, c, cfg) in enumerate(cases):
        gen = torch.Generator().manual_seed(20 + i)
        alone = tiny_prior.sds_grad(x, c, cfg, step=3, generator=gen)
        _close(grads[i], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(requests[i].generator.get_state(), gen.get_state())


def test_randomness_order_per_request(tiny_prior):
    """With nothing overridden, each request draws from its own generator, in order: its
    timestep in [lo, hi], its posterior eps, its noise (the module's documented order)."""
    images, _ = _inputs()
    cfg = SDSConfig(guidance_scale=10.0, t_min=0.3, t_max=0.6)
    t, eps_post, noise = [], [], []
    for g in _gens((7, 8)):
        t.append(torch.randint(300, 601, (1,), generator=g))
        eps_post.append(torch.randn(LAT, generator=g))
        noise.append(torch.randn(LAT, generator=g))
    t, eps_post, noise = torch.cat(t), torch.cat(eps_post), torch.cat(noise)
    out = tiny_prior.sds(images, COND, cfg, generator=_gens((7, 8)))
    ref, _ = _reference(tiny_prior, images, COND, t, noise, eps_post, _cfg(10.0))
    assert torch.equal(out.timesteps, t)
    _close(out.grad, ref)


def test_t_max_schedule_and_invalid_configs(tiny_prior):
    """A scheduled t_max bounds the sampled timesteps at that step; bad settings say what's
    wrong."""
    cfg = SDSConfig(t_max=[0, 0.98, 0.5, 100])
    assert cfg.at(100)[2] == 0.5 and cfg.at(0)[2] == 0.98
    out = tiny_prior.sds(torch.rand(48, 3, 8, 8), make_conditioning(PromptConfig(), batch=48),
                         cfg, step=100, generator=torch.Generator().manual_seed(1))
    assert out.timesteps.max() <= 500 and out.timesteps.min() >= 20
    assert out.timesteps.max() > 250  # the range is really [20, 500], not something narrower
    bad = SDSConfig(t_min=0.4, t_max=[0, 0.98, 0.3, 100])
    bad.at(0)
    with pytest.raises(ValueError, match="t_min <= t_max"):
        bad.at(100)
    with pytest.raises(ValueError, match="t_max <= 1 at step 100, got 0.4, 0.3"):
        tiny_prior.sds(torch.rand(2, 3, 8, 8), COND, bad, step=100)
    with pytest.raises(ValueError, match="weighting must be one of"):
        SDSConfig(weighting="snr")
    for clip in (0.0, -1.0):
        with pytest.raises(ValueError, match="grad_clip must be positive"):
            SDSConfig(grad_clip=clip)


def test_latent_grad_nan_guard_and_clipping():
    """Non-finite entries are zeroed and counted per image; clipping sets each too-large
    image's norm to the limit, keeps its direction and leaves the others bit-identical."""
    gen = torch.Generator().manual_seed(0)
    eps_hat, noise = torch.randn(2, 3, 4, 4, 4, generator=gen)
    w = torch.tensor([0.5, 2.0, 1.0])
    eps_hat[0, 0, 0, 0] = float("nan")
    eps_hat[0, 1, 2, 3] = float("inf")
    eps_hat[2, 3, 3, 3] = -float("inf")
    grad, bad = latent_grad(eps_hat, noise, w)
    assert bad.tolist() == [2, 0, 1] and torch.isfinite(grad).all()
    assert grad[0, 0, 0, 0] == 0 and grad[0, 1, 2, 3] == 0 and grad[2, 3, 3, 3] == 0
    ok = torch.isfinite(eps_hat)
    assert torch.equal(grad[ok], (w.view(-1, 1, 1, 1) * (eps_hat - noise))[ok])
    norms = grad.flatten(1).norm(dim=1)
    limit = norms[1].item() * 0.5  # image 1 above it; image 0 and 2 below it
    assert norms[0] < limit and norms[2] < limit
    clipped, _ = latent_grad(eps_hat, noise, w, grad_clip=limit)
    assert torch.allclose(clipped[1].norm(), torch.tensor(limit), rtol=1e-6)
    assert torch.allclose(clipped[1], grad[1] * limit / norms[1], rtol=1e-6)
    assert torch.equal(clipped[0], grad[0]) and torch.equal(clipped[2], grad[2])


def test_prior_grad_clip_scales_image_grad(tiny_prior):
    """With grad_clip the image gradient is the unclipped one times limit/|g_lat| (linearity)."""
    images, noise = _inputs()
    free = _lib(tiny_prior, images, noise)
    limit = free.latent_grad_norm.min().item() * 0.5
    clipped = _lib(tiny_prior, images, noise, cfg=SDSConfig(grad_clip=limit))
    assert torch.allclose(clipped.latent_grad_norm, torch.full((2,), limit), rtol=1e-5)
    ratio = (limit / free.latent_grad_norm).view(-1, 1, 1, 1)
    _close(clipped.grad, free.grad * ratio, rtol=1e-5)


def test_nonfinite_request_is_marked_without_touching_others(tiny_prior):
    """A NaN in one request's noise gives that image a count and an all-NaN gradient, which
    the Reconstructor counts and drops (``drop_nonfinite``); the other image's gradient is
    unchanged."""
    from rf_core.fitting.reconstruct import drop_nonfinite

    images, noise = _inputs()
    clean = _lib(tiny_prior, images, noise)
    noise = noise.clone()
    noise[0, 0, 0, 0] = float("nan")
    out = _lib(tiny_prior, images, noise)
    assert out.nonfinite[0] > 0 and out.nonfinite[1] == 0
    assert torch.isnan(out.grad[0]).all() and torch.isfinite(out.grad[1]).all()
    _close(out.grad[1], clean.grad[1], rtol=1e-5)
    dropped, bad = drop_nonfinite(out.grad)
    assert bad.tolist() == [True, False]
    assert torch.equal(dropped[0], torch.zeros_like(dropped[0]))
    assert torch.equal(dropped[1], out.grad[1])


class _Renderer(torch.nn.Module):
    """A tiny differentiable 'renderer': learnable image -> sigmoid -> 3x3 conv."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.theta = torch.nn.Parameter(torch.randn(1, 3, 32, 32, generator=gen))
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 3, 3, 3, generator=gen) * 0.3)
            self.conv.bias.zero_()

    def forward(self):
        return self.conv(torch.sigmoid(self.theta))


def _sgd_update(prior, amp):
    """One SGD step on SDS + 0.1 mean(image) with fixed t/noise/seed: the parameter change."""
    model = _Renderer()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = torch.randn(LAT, generator=torch.Generator().manual_seed(9))
    # bf16 autocast on the CPU; its GradScaler is supported (and harmless with bf16's range).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        images = model()
        assert images.dtype == (torch.bfloat16 if amp else torch.float32)
        grad = prior.sds(images.detach(), _first(COND), timesteps=T[:1], noise=noise,
                         generator=_gens((4,)), guidance_scale=20.0).grad
        loss = sds_loss(images.float(), grad) + 0.1 * images.float().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if amp:
        assert scaler.get_scale() == 2.0**10  # no inf/NaN found: the step was not skipped
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_amp_step_matches_fp32_step(tiny_prior):
    """A bf16-autocast step with a GradScaler moves the parameters like the fp32 step."""
    ref = _sgd_update(tiny_prior, amp=False)
    amp = _sgd_update(tiny_prior, amp=True)
    assert ref.norm() > 0.1 and amp.norm() > 0.5 * ref.norm()  # the AMP step really moved
    # Measured ~1.7e-2: mostly the bf16 backward of sigmoid/conv (~1.5e-2 with the fp32 SDS
    # gradient), the rest bf16 images amplified by the random VAE; a wrong loss scale is 2^10x.
    assert ((amp - ref).norm() / ref.norm()).item() < 3e-2


def test_view_directions():
    """The authors' one-sided bands in our frame, relative to the input view's azimuth: front
    [-60, 0] (their phi in [0, 60) turns towards the photo's left; our positive azimuth turns
    towards its right), back [120, 180], side elsewhere; overhead above 60 degrees of
    elevation, bottom below -60."""
    az = torch.tensor([0.0, -59, -60, 1, 90, -90, 120, 150, 180, 181, 0, 45, -30, -400])
    el = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, -20, 0, 70, -70, 59.9, 0])
    expect = ["front", "front", "front", "side", "side", "side", "back", "back", "back", "side",
              "overhead", "bottom", "front", "front"]
    assert view_directions(az, el) == expect
    assert view_directions(az + 90, el, front_azimuth=90.0) == expect
    centred = PromptConfig(front_range=[-30.0, 30.0])
    assert view_directions(torch.tensor([-29.0, 31.0, 160.0, -160.0]), torch.zeros(4),
                           cfg=centred) == ["front", "side", "back", "back"]
    shifted = view_directions(torch.tensor([90.0, 0.0]), torch.zeros(2), front_azimuth=90.0)
    assert shifted == ["front", "side"]


def test_positive_azimuth_turns_towards_the_photos_right():
    """Why our front band is [-60, 0]: in our frame a point right of the input view's centre
    lies on +y, and a positive azimuth moves the camera towards +y."""
    from rf_core.scene.cameras import orbit_cameras, orbit_position, project

    uv, _ = project(torch.tensor([[0.0, 0.5, 0.0]]), orbit_cameras(3.0, 0.0, 0.0, 40.0, 64, 64))
    assert uv[0, 0, 0] > 32 + 5
    assert orbit_position(3.0, 0.0, 30.0)[1] > 0


def test_make_conditioning_prompts():
    """Prompts carry the learned token and the view suffix; negatives follow the config."""
    cfg = PromptConfig(token="<cat-toy>", negative="blurry")
    cond = make_conditioning(cfg, azimuth=torch.tensor([0.0, 180.0]), elevation=torch.zeros(2))
    assert cond.prompts == ["A high-resolution DSLR image of a <cat-toy>, front view",
                            "A high-resolution DSLR image of a <cat-toy>, back view"]
    assert cond.negative_prompts == ["blurry", "blurry"]
    plain = make_conditioning(cfg, batch=3)
    assert plain.prompts == ["A high-resolution DSLR image of a <cat-toy>"] * 3


def test_text_cache_follows_registered_token(tiny_prior):
    """Repeated prompts give identical embeddings; re-registering the token's vector changes
    the embedding of prompts using it (and only those)."""
    token = "<sds-test-cache-token>"
    dim = tiny_prior.embedding_dim
    # Random vectors: CLIP's pre-LayerNorms make a constant vector (ones vs -ones) invisible.
    v1, v2 = torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    tiny_prior.register_embedding(token, v1)
    prompts = [f"a photo of a {token}", "a photo of a duck"]
    first = tiny_prior.encode_text(prompts)
    assert torch.equal(first, tiny_prior.encode_text(prompts))
    tiny_prior.register_embedding(token, v2)
    second = tiny_prior.encode_text(prompts)
    assert (first[0] - second[0]).abs().max() > 1e-3
    assert torch.equal(first[1], second[1])
    tok = tiny_prior.sd.tokenizer(prompts[:1], padding="max_length", max_length=77,
                                  return_tensors="pt")
    with torch.no_grad():
        fresh = tiny_prior.sd.text_encoder(tok.input_ids)[0][0]
    assert torch.equal(second[0], fresh)
    tiny_prior.register_embedding(token, v1)
    assert torch.equal(tiny_prior.encode_text(prompts), first)
