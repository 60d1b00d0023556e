import math

import pytest
import torch
import torch.nn.functional as F

from rf_core.config import ConfigError, build
from rf_core.prior.augment import (
    AugmentConfig,
    _adjust_hue,
    _affine,
    _sample_params,
    _warp,
    augment_views,
)

# Every augmentation off: the view is the photo, resized.
PLAIN = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation_degrees=0.0, hflip_p=0.0,
             jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, background="keep")


def _photo(size=16, seed=0):
    """A random rgb photo and a mask with the object in a centred square."""
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(3, size, size, generator=gen)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return rgb, mask


def _views(rgb, mask, n=4, seed=0, **cfg):
    return augment_views(rgb, mask, n, AugmentConfig(**cfg), torch.Generator().manual_seed(seed))


def _to01(x):
    return (x + 1) / 2


def test_default_views_shape_range_and_variety():
    rgb, mask = _photo(40)
    out = _views(rgb, mask, n=6, resolution=24)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out.min() < -0.5 and out.max() > 0.5  # really spans the [-1, 1] range
    assert (out[1:] - out[:1]).abs().amax((1, 2, 3)).min() > 0.05  # views differ


def test_same_seed_same_views_other_seed_differs():
    rgb, mask = _photo(20)
    for background in ("random", "noise"):
        a = _views(rgb, mask, seed=3, resolution=16, background=background)
        b = _views(rgb, mask, seed=3, resolution=16, background=background)
        c = _views(rgb, mask, seed=4, resolution=16, background=background)
        assert torch.equal(a, b)
        assert (a - c).abs().max() > 0.1


def test_the_generator_resumes_where_it_stopped():
    rgb, mask = _photo(20)
    gen = torch.Generator().manual_seed(7)
    augment_views(rgb, mask, 2, AugmentConfig(resolution=16), gen)
    state = gen.get_state()
    second = augment_views(rgb, mask, 2, AugmentConfig(resolution=16), gen)
    resumed = augment_views(rgb, mask, 2, AugmentConfig(resolution=16),
                            torch.Generator().set_state(state))
    assert torch.equal(second, resumed)


@pytest.mark.parametrize("size,resolution", [(12, 20), (16, 16), (40, 16)])
def test_no_augmentation_is_the_resized_photo(size, resolution):
    rgb, mask = _photo(size)
    out = _views(rgb, mask, n=2, resolution=resolution, **PLAIN)
    # Larger photos are shrunk with an antialiased filter first; smaller ones only upsampled.
    ref = F.interpolate(rgb[None], size=resolution, mode="bilinear", align_corners=False,
                        antialias=size > resolution)
    assert torch.allclose(out, (ref * 2 - 1).expand(2, -1, -1, -1), atol=1e-5)


def test_hflip_alone_mirrors_exactly():
    rgb, mask = _photo(16)
    out = _views(rgb, mask, n=3, resolution=16, **{**PLAIN, "hflip_p": 1.0})
    assert torch.allclose(_to01(out), rgb.flip(-1).expand(3, -1, -1, -1), atol=1e-6)


@pytest.mark.parametrize("background,value", [("white", 1.0), ("black", -1.0)])
def test_solid_background_fills_where_mask_is_zero(background, value):
    rgb, mask = _photo(16)
    out = _views(rgb, mask, n=2, resolution=16, **{**PLAIN, "background": background})
    outside = (mask == 0).expand(2, 3, -1, -1)
    assert torch.allclose(out[outside], torch.full_like(out[outside], value), atol=1e-5)
    inside = (mask == 1).expand(2, 3, -1, -1)
    assert torch.allclose(out[inside], (rgb * 2 - 1).expand(2, -1, -1, -1)[inside], atol=1e-6)


def test_random_background_is_one_colour_per_view_and_noise_is_not():
    rgb, mask = _photo(16)
    outside = (mask[0] == 0)
    solid = _views(rgb, mask, n=4, resolution=16, **{**PLAIN, "background": "random"})
    colours = solid[:, :, outside]  # [4, 3, pixels]
    assert torch.allclose(colours, colours[:, :, :1].expand_as(colours), atol=1e-6)
    assert (colours[1:, :, 0] - colours[:1, :, 0]).abs().amax(1).min() > 1e-3
    noise = _views(rgb, mask, n=2, resolution=16, **{**PLAIN, "background": "noise"})
    assert noise[:, :, outside].std(-1).min() > 0.4  # uniform in [-1, 1] has std 0.58


def test_pixels_turned_in_from_outside_the_photo_are_background():
    image = torch.ones(1, 4, 8, 8)  # white photo, mask 1 everywhere
    theta = _affine(torch.tensor([45.0]), torch.tensor([False]), torch.tensor([[0, 0, 8.0, 8.0]]),
                    8, 8)
    rgb, alpha = _warp(image, theta, 8)
    assert torch.all(rgb == 1)  # colours repeat the edge
    assert alpha[0, 0, 0, 0] == 0 and alpha[0, 0, 7, 7] == 0  # corners come from outside
    assert torch.all(alpha[0, 0, 2:6, 2:6] == 1)


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 4, 6, 6, generator=gen)
    box = torch.tensor([[0.0, 0.0, 6.0, 6.0]] * 2)
    theta = _affine(torch.tensor([90.0, -90.0]), torch.tensor([False, False]), box, 6, 6)
    rgb, _ = _warp(image, theta, 6)
    assert torch.allclose(rgb[0], torch.rot90(image[0, :3], 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(rgb[1], torch.rot90(image[0, :3], -1, (-2, -1)), atol=1e-5)
    # The convention on a known pixel: the top-left corner turns counter-clockwise to the
    # bottom-left at +90 degrees and clockwise to the top-right at -90 degrees.
    dot = torch.zeros(1, 4, 6, 6)
    dot[:, :, 0, 0] = 1
    rgb, _ = _warp(dot, theta, 6)
    assert rgb[0, 0, 5, 0] > 0.999 and rgb[0, 0].sum() < 1.001
    assert rgb[1, 0, 0, 5] > 0.999 and rgb[1, 0].sum() < 1.001


def test_crop_box_selects_the_expected_pixels():
    image = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    # Centre (-2, -2) from the photo centre, 4x4 pixels: the top-left quadrant.
    box = torch.tensor([[-2.0, -2.0, 4.0, 4.0], [2.0, -2.0, 4.0, 4.0]])
    theta = _affine(torch.zeros(2), torch.tensor([False, True]), box, 8, 8)
    rgb, alpha = _warp(image, theta, 4)
    assert torch.allclose(rgb[0], image[0, :3, :4, :4], atol=1e-6)
    assert torch.allclose(rgb[1], image[0, :3, :4, 4:].flip(-1), atol=1e-6)  # mirrored
    assert torch.allclose(alpha[0], image[0, 3:, :4, :4], atol=1e-6)
    assert torch.allclose(alpha[1], image[0, 3:, :4, 4:].flip(-1), atol=1e-6)


def test_crops_stay_inside_the_photo_with_the_asked_area_and_aspect():
    cfg = AugmentConfig(rotation_degrees=30.0)
    p = _sample_params(500, 30, 40, cfg, torch.Generator().manual_seed(0))
    cx, cy, w, h = p["box"].unbind(1)
    assert torch.all(cx.abs() + w / 2 <= 20 + 1e-4) and torch.all(cy.abs() + h / 2 <= 15 + 1e-4)
    area = w * h / (30 * 40)
    assert torch.all(area >= 0.5 - 1e-5) and torch.all(area <= 1 + 1e-5)
    assert torch.all(w / h >= 3 / 4 - 1e-5) and torch.all(w / h <= 4 / 3 + 1e-5)
    assert p["angle"].abs().max() <= 30 and p["angle"].abs().max() > 25
    assert 0.4 < p["flip"].float().mean() < 0.6
    # A crop that cannot fit (area 1, square, in a wide photo) falls back to the centred square.
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    p = _sample_params(3, 30, 40, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(p["box"], torch.tensor([[0.0, 0.0, 30.0, 30.0]] * 3))


def test_grayscale_gives_the_luma_in_every_channel():
    rgb, mask = _photo(16)
    out = _to01(_views(rgb, mask, n=2, resolution=16, **{**PLAIN, "grayscale_p": 1.0}))
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert torch.allclose(out, luma.expand(2, 3, -1, -1), atol=1e-6)


def test_zero_strength_jitter_is_the_identity():
    rgb, mask = _photo(16)
    plain = _views(rgb, mask, n=2, resolution=16, **PLAIN)
    jittered = _views(rgb, mask, n=2, resolution=16, **{**PLAIN, "jitter_p": 1.0},
                      brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert torch.allclose(jittered, plain, atol=1e-5)


def test_brightness_scales_each_view_by_one_factor_in_range():
    rgb = 0.2 + 0.4 * torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, 16, 16)
    out = _to01(_views(rgb, mask, n=8, resolution=16, **{**PLAIN, "jitter_p": 1.0},
                       brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0))
    factor = out / rgb
    per_view = factor.mean((1, 2, 3))
    assert torch.allclose(factor, per_view[:, None, None, None].expand_as(factor), atol=1e-4)
    assert torch.all(per_view >= 0.5) and torch.all(per_view <= 1.5)
    assert per_view.max() - per_view.min() > 0.2


def test_hue_rotation_follows_the_colour_wheel():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(_adjust_hue(x, torch.zeros(2, 1, 1, 1)), x, atol=1e-6)
    primaries = torch.eye(3)[:, :, None, None]  # red, green, blue as three 1x1 images
    third = torch.full((3, 1, 1, 1), 1 / 3)
    # a third of a turn: red -> green -> blue -> red
    assert torch.allclose(_adjust_hue(primaries, third), primaries.roll(-1, 0), atol=1e-5)
    assert torch.allclose(_adjust_hue(primaries, -third), primaries.roll(1, 0), atol=1e-5)
    shifted = _adjust_hue(x, torch.tensor([0.1, -0.3])[:, None, None, None])
    # hue leaves HSV value (max) and chroma (max - min) alone
    assert torch.allclose(shifted.amax(1), x.amax(1), atol=1e-5)
    assert torch.allclose(shifted.amax(1) - shifted.amin(1), x.amax(1) - x.amin(1), atol=1e-5)
    gray = torch.rand(1, 1, 4, 4).expand(1, 3, 4, 4)
    assert torch.allclose(_adjust_hue(gray, torch.full((1, 1, 1, 1), 0.25)), gray, atol=1e-6)


def test_blur_spreads_an_impulse_as_a_unit_gaussian():
    rgb = torch.zeros(3, 21, 21)
    rgb[:, 10, 10] = 1
    out = _to01(_views(rgb, torch.ones(1, 21, 21), n=1, resolution=21,
                       **{**PLAIN, "blur_p": 1.0}, blur_sigma=(1.0, 1.0)))[0, 0]
    assert abs(out.sum().item() - 1) < 1e-5
    assert torch.allclose(out, out.T, atol=1e-7) and torch.allclose(out, out.flip(0), atol=1e-7)
    t = torch.arange(21.0) - 10
    variance = (out.sum(0) * t**2).sum().item()
    assert abs(variance - 1) < 0.02
    expected = math.exp(-0.5) / (2 * math.pi)  # separable unit Gaussian one pixel off-centre
    assert abs(out[10, 11].item() / out.sum().item() - expected) < 0.01
    flat = _views(torch.full((3, 8, 8), 0.3), torch.ones(1, 8, 8), n=2, resolution=8,
                  **{**PLAIN, "blur_p": 1.0})
    assert torch.allclose(flat, torch.full_like(flat, -0.4), atol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    ({"resolution": 0}, "resolution"),
    ({"scale": (0.0, 1.0)}, "scale"),
    ({"scale": (0.9, 0.5)}, "scale"),
    ({"scale": (0.5, 1.5)}, "scale"),
    ({"ratio": (-1.0, 1.0)}, "ratio"),
    ({"ratio": (1.0,)}, "ratio"),
    ({"rotation_degrees": -5.0}, "rotation_degrees"),
    ({"hflip_p": 1.5}, "hflip_p"),
    ({"jitter_p": -0.1}, "jitter_p"),
    ({"grayscale_p": 2.0}, "grayscale_p"),
    ({"blur_p": float("nan")}, "blur_p"),
    ({"brightness": -0.1}, "brightness"),
    ({"saturation": -1.0}, "saturation"),
    ({"hue": 0.6}, "hue"),
    ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
    ({"background": "green"}, "background"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


def test_config_builds_from_yaml_style_dicts():
    cfg = build(AugmentConfig, {"scale": [0.3, 0.9], "background": "white"})
    assert cfg.scale == (0.3, 0.9) and cfg.background == "white"
    with pytest.raises(ConfigError, match="hue"):
        build(AugmentConfig, {"hue": 1.0})


def test_bad_inputs_are_rejected():
    rgb, mask = _photo(8)
    with pytest.raises(ValueError, match="mask"):
        _views(rgb, mask[:, :4])
    with pytest.raises(ValueError, match="rgb"):
        _views(rgb[:2], mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_views_match_cpu_views_from_the_same_generator():
    rgb, mask = _photo(48)
    cfg = AugmentConfig(resolution=32, jitter_p=1.0, blur_p=1.0, grayscale_p=0.5)
    cpu = augment_views(rgb, mask, 4, cfg, torch.Generator().manual_seed(0))
    cuda = augment_views(rgb.cuda(), mask.cuda(), 4, cfg, torch.Generator().manual_seed(0))
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-4)
    gen = torch.Generator("cuda").manual_seed(0)
    a = augment_views(rgb.cuda(), mask.cuda(), 4, cfg, gen)
    b = augment_views(rgb.cuda(), mask.cuda(), 4, cfg, torch.Generator("cuda").manual_seed(0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("background", ["random", "noise", "white"])
def test_views_need_no_host_sync_and_no_host_made_tensor(background):
    """Made on the model's device without waiting for it: no ``.item()``/``nonzero`` and no
    ``torch.tensor(...)`` from host data (which a CUDA run would copy per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(("aten._local_scalar_dense", "aten.item", "aten.nonzero",
                                     "aten.lift_fresh")):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    rgb, mask = _photo(40)
    cfg = AugmentConfig(resolution=24, jitter_p=1.0, blur_p=1.0, grayscale_p=0.5,
                        background=background)
    with Watch():
        out = augment_views(rgb, mask, 3, cfg, torch.Generator().manual_seed(0))
    assert seen == [] and out.shape == (3, 3, 24, 24)
