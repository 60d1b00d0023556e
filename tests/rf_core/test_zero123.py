"""The Zero-1-to-3 prior (``rf_core.prior.zero123``): its gradient is Zero-1-to-3's guided SDS
computed by hand (photo latent and context zeroed in the unconditional branch), the camera
vector follows Zero-1-to-3's convention, batching changes nothing, the photo is encoded once;
the loader reads the diffusers layouts and refuses pickled code and incomplete folders in one
line; ``zero123-random`` has the real architecture's shapes (on ``meta``)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rf_core.errors import UserError
from rf_core.prior import (
    ModelConfig,
    ModelNotFoundError,
    Prior,
    PromptConfig,
    SDSConfig,
    SDSRequest,
    make_conditioning,
    make_prior,
)
from rf_core.prior.learned import MissingReferenceError
from rf_core.prior.random_models import MARKER_FILE, seeded_uniform
from rf_core.prior.registry import check_available, needs_inversion
from rf_core.prior.zero123 import CLIP_MEAN, CLIP_STD, Zero123Prior, zero123_camera
from rf_core.prior.zero123_loading import (
    COMPONENTS,
    UnsafeWeightsError,
    load_cc_projection,
    load_zero123,
    locate_zero123,
)
from rf_core.prior.zero123_random import (
    MODEL_INDEX,
    ZERO123_MODELS,
    ZERO123_TINY,
    ZERO123_VISION,
    is_zero123_random,
    random_zero123_parts,
)
from rf_core.scene.cameras import orbit_cameras

REF = {"elevation": 10.0, "azimuth": 20.0, "radius": 2.0}
VIEWS = {"elevation": [30.0, -15.0], "azimuth": [110.0, -150.0], "radius": [2.5, 1.8]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``zero123-tiny`` saved into a fresh cache (built from configs in code, no download)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RF_CACHE", str(tmp_path_factory.mktemp("cache")))
        return locate_zero123(ZERO123_TINY)


@pytest.fixture(scope="module")
def prior(folder):
    return Zero123Prior(ModelConfig(type="zero123", name=str(folder), device="cpu", dtype="fp32"))


def _photo():
    gen = torch.Generator().manual_seed(1)
    rgba = torch.rand(4, 32, 32, generator=gen)
    return rgba, orbit_cameras(REF["radius"], REF["elevation"], REF["azimuth"], 40.0, 32, 32)


def _cond(n: int = 2, reference: bool = True):
    cams = orbit_cameras(torch.tensor(VIEWS["radius"][:n]), torch.tensor(VIEWS["elevation"][:n]),
                         torch.tensor(VIEWS["azimuth"][:n]), 40.0, 24, 24)
    return make_conditioning(PromptConfig(), batch=n, cameras=cams,
                             background=torch.rand(n, 3, generator=torch.Generator()),
                             reference=_photo() if reference else None)


def _by_hand_camera(stable: bool = False) -> torch.Tensor:
    el, az, r = (torch.tensor(VIEWS[k], dtype=torch.float64) for k in ("elevation", "azimuth",
                                                                         "radius"))
    d_polar = torch.deg2rad((90 - el) - (90 - REF["elevation"]))
    d_az = torch.deg2rad(az - REF["azimuth"])
    last = (torch.full_like(el, math.radians(90 - REF["elevation"])) if stable
            else r - REF["radius"])
    return torch.stack([d_polar, d_az.sin(), d_az.cos(), last], -1).float()


def test_camera_vector_is_zero123s():
    cond = _cond()
    assert torch.allclose(zero123_camera(cond), _by_hand_camera(), atol=1e-5)
    assert torch.allclose(zero123_camera(cond, "stable-zero123"), _by_hand_camera(True),
                          atol=1e-5)
    # Zero-1-to-3's azimuth turns counter-clockwise seen from +z (Blender, z up): a camera
    # moving that way moves towards its own right. Ours is the same: at azimuth 0 the camera's
    # right axis (c2w column 0) is +y, and det(R) = +1 (no mirror).
    cam = orbit_cameras(2.0, 0.0, 0.0, 40.0, 8, 8)
    assert torch.allclose(cam.c2w[0, :3, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.linalg.det(cam.c2w[0, :3, :3]) > 0
    with pytest.raises(MissingReferenceError):
        zero123_camera(_cond(reference=False))


def test_sds_is_zero123_guidance_by_hand(prior):
    """Against Zero-1-to-3's SDS written out (threestudio's zero123 guidance, with the
    gradient pushed through the encoder as ours): latent of the render, photo latent (posterior
    mode, unscaled) concatenated, CLIP embedding + camera through cc_projection, guidance with
    both zeroed."""
    assert isinstance(prior, Prior) and prior.resolution == 64
    cond, z = _cond(), prior.z
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 700])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = prior.sds(images, cond, SDSConfig(guidance_scale=3.0),
                    generator=torch.Generator().manual_seed(5), timesteps=t, noise=noise)

    gen = torch.Generator().manual_seed(5)
    post = torch.cat([torch.randn(1, 4, 16, 16, generator=gen) for _ in range(2)])
    with torch.no_grad():
        rgb = cond.reference[:, :3]
        photo = z.vae.encode(F.interpolate(rgb, size=(64, 64), mode="bilinear",
                                           antialias=True) * 2 - 1).latent_dist.mode()
        clip_in = F.interpolate(rgb, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
        clip_in = (clip_in - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        emb = z.image_encoder(pixel_values=clip_in).image_embeds
        ctx = z.cc_projection(torch.cat([emb, _by_hand_camera()], -1))[:, None]
    x = images.clone().requires_grad_(True)
    dist = z.vae.encode(F.interpolate(x, size=(64, 64), mode="bilinear") * 2 - 1).latent_dist
    latents = (dist.mean + dist.std * post) * z.vae.config.scaling_factor
    a = z.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    with torch.no_grad():
        eps_c = z.unet(torch.cat([noisy, photo], 1), t, encoder_hidden_states=ctx).sample
        eps_u = z.unet(torch.cat([noisy, torch.zeros_like(photo)], 1), t,
                       encoder_hidden_states=torch.zeros_like(ctx)).sample
    g_lat = (1 - a) * (eps_u + 3.0 * (eps_c - eps_u) - noise)
    (g_img,) = torch.autograd.grad(latents, x, g_lat)
    scale = g_img.abs().max()
    assert scale > 0 and torch.allclose(out.grad, g_img, atol=1e-4 * scale, rtol=1e-4)
    assert torch.equal(out.timesteps, t)
    # Guidance matters: with scale 1 the conditional branch alone is the estimate.
    one = prior.sds(images, cond, SDSConfig(guidance_scale=1.0),
                    generator=torch.Generator().manual_seed(5), timesteps=t, noise=noise)
    assert not torch.allclose(one.grad, out.grad)


def test_batch_equals_each_alone_and_the_photo_is_encoded_once(prior, monkeypatch):
    cond = _cond()
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    cfg = SDSConfig(guidance_scale=5.0)
    alone = [prior.sds_grad(images[i:i + 1], cond.select([i]), cfg,
                            generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    calls = []
    encode = prior._encode_photos
    monkeypatch.setattr(prior, "_encode_photos", lambda rgb: calls.append(len(rgb))
                        or encode(rgb))
    batched = prior.sds_grad_batch([
        SDSRequest(images[i:i + 1], cond.select([i]), cfg, 0, torch.Generator().manual_seed(10 + i))
        for i in range(2)])
    for a, b in zip(alone, batched):
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max(), rtol=1e-4)
    assert calls == []  # the photo was cached by the calls alone
    other = _cond()
    other.reference = other.reference.flip(-1)  # another photo: one new encoding, one row
    prior.sds_grad(images, other, cfg, generator=torch.Generator().manual_seed(0))
    assert calls == [1]


def test_reads_no_text_and_names_its_needs(prior):
    for kind in ("zero123", "stable-zero123"):
        assert not needs_inversion(ModelConfig(type=kind))
    assert prior.needs_reference and not prior.needs_inversion
    prior.register_embedding("<e>", torch.ones(4))  # recorded, harmless
    with pytest.raises(UserError, match="run without --invert"):
        prior.invert(torch.rand(3, 8, 8), torch.ones(1, 8, 8))
    with pytest.raises(MissingReferenceError):
        prior.sds_grad(torch.rand(2, 3, 24, 24), _cond(reference=False))
    assert prior.describe()["camera"] == "zero123"


def test_stable_zero123_type_reads_the_photos_polar_angle(folder):
    prior = make_prior(ModelConfig(type="stable-zero123", name=str(folder), device="cpu"))
    assert prior.camera == "stable-zero123"


# ---------------------------------------------------------------------------- loading
def _copy(folder, tmp_path):
    dst = tmp_path / "z123"
    shutil.copytree(folder, dst)
    (dst / MARKER_FILE).unlink()
    return dst


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bennyguo_layout_and_weights_only_bin_load_the_same_projection(folder, tmp_path):
    ref = load_cc_projection(folder / "cc_projection")
    assert (ref.in_features, ref.out_features) == (36, 32)
    state = load_file(folder / "cc_projection" / "diffusion_pytorch_model.safetensors")
    benny = tmp_path / "clip_camera_projection"
    benny.mkdir()
    save_file({"proj.weight": state["projection.weight"], "proj.bias": state["projection.bias"]},
              str(benny / "diffusion_pytorch_model.safetensors"))
    bin_dir = tmp_path / "cc_projection"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "diffusion_pytorch_model.bin")  # a dict of tensors: allowed
    for other in (load_cc_projection(benny), load_cc_projection(bin_dir)):
        assert torch.equal(other.weight, ref.weight) and torch.equal(other.bias, ref.bias)


def test_pickled_projection_is_refused_in_one_line(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    (dst / "cc_projection" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(torch.nn.Linear(36, 32), dst / "cc_projection" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError) as err:
        load_zero123(ModelConfig(type="zero123", name=str(dst), device="cpu"))
    assert "refusing" in _one_line(err) and "safetensors" in str(err.value)


@pytest.mark.parametrize("component", [*COMPONENTS, "cc_projection"])
def test_missing_component_says_what_and_where(folder, tmp_path, component):
    dst = _copy(folder, tmp_path)
    shutil.rmtree(dst / component)
    with pytest.raises(ModelNotFoundError) as err:
        check_available(ModelConfig(type="zero123", name=str(dst)))
    line = _one_line(err)
    assert f"{component}/" in line and str(dst) in line and "docs/zero123.md" in line


def test_missing_weights_and_a_stable_diffusion_unet(folder, tmp_path):
    from rf_core.prior.tiny import tiny_model_path

    dst = _copy(folder, tmp_path)
    (dst / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="has no weights"):
        locate_zero123(dst)
    shutil.copytree(folder / "vae", dst / "vae", dirs_exist_ok=True)
    shutil.rmtree(dst / "unet")
    shutil.copytree(tiny_model_path() / "unet", dst / "unet")  # SD's 4-channel UNet
    with pytest.raises(ModelNotFoundError, match="4 input channels") as err:
        load_zero123(ModelConfig(type="zero123", name=str(dst), device="cpu"))
    assert "model.type=stable-diffusion" in _one_line(err)


def test_missing_model_says_where_it_looked(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        locate_zero123(tmp_path / "nowhere")
    assert "no folder" in _one_line(err) and "zero123-random" in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:
        locate_zero123("nobody-zz/zero123-not-cached")
    line = _one_line(err)
    assert "Hugging Face cache" in line and "hf download nobody-zz/zero123-not-cached" in line
    with pytest.raises(ModelNotFoundError, match="add model.type=zero123"):
        make_prior(ModelConfig(name="zero123-random", device="cpu"))  # as Stable Diffusion


# ---------------------------------------------------------------------------- random weights
def test_zero123_random_has_the_real_architecture():
    """Parameter counts of kxic/zero123-xl: SD 1.5's UNet (859,520,964) + 4 x 320 x 3 x 3 for
    the 4 extra input channels; the SD VAE; CLIP ViT-L/14's vision tower with its projection;
    cc_projection 772 x 768 + 768."""
    parts = random_zero123_parts(device="meta")
    count = {k: sum(p.numel() for p in getattr(parts, k).parameters())
             for k in ("unet", "vae", "image_encoder", "cc_projection")}
    assert count == {"unet": 859_532_484, "vae": 83_653_863, "image_encoder": 303_966_208,
                     "cc_projection": 593_664}
    assert parts.unet.config.in_channels == 8 and parts.unet.config.sample_size == 32
    assert parts.unet.config.cross_attention_dim == 768
    assert parts.image_encoder.config.projection_dim == ZERO123_VISION["projection_dim"] == 768
    assert ZERO123_MODELS["zero123-random"].resolution == 256
    assert parts.scheduler.config.prediction_type == "epsilon"


def test_saved_random_model_is_seeded_and_marked(folder):
    import json

    assert json.loads((folder / "model_index.json").read_text()) == json.loads(
        json.dumps(MODEL_INDEX))
    assert is_zero123_random(folder) and is_zero123_random(ZERO123_TINY)
    assert not is_zero123_random("tiny")
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    w = unet["conv_in.weight"]
    assert w.shape[1] == 8
    assert torch.equal(w, seeded_uniform(0, "conv_in.weight", w.shape, 1 / math.sqrt(w[0].numel())))
    clip = load_file(folder / "image_encoder" / "model.safetensors")
    cls = clip["vision_model.embeddings.class_embedding"]
    assert torch.equal(cls, seeded_uniform(0, "vision_model.embeddings.class_embedding",
                                           cls.shape, math.sqrt(3 / cls.shape[0])))
