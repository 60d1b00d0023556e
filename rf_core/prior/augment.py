"""Heavy augmentations for single-image textual inversion (RealFusion, Melas-Kyriazi et al. 2023).

From one object photo, make a batch of views that differ in framing, pose, colour and
background, so that the learned token binds to the object and not to one picture of it. The
steps follow the torchvision pipeline RealFusion uses (rotation, random resized crop, flip,
colour jitter, grayscale, blur), rebuilt on plain tensors so that:

- every random number comes from the caller's ``torch.Generator``: the same state gives the
  same batch bit for bit, so textual inversion resumes exactly;
- the geometry is one affine map per view, and a single ``grid_sample`` moves rgb and mask
  together;
- the object is put on a new background through the moved mask, before the colour changes;
- with the photo and the generator on the model's device, a batch is made there without one
  host sync or host-made tensor (a test counts them), so it overlaps the UNet's queued work.

Convention: images are ``[C, H, W]`` with y pointing down; a positive angle turns the picture
counter-clockwise as seen on screen (90 degrees matches ``torch.rot90(img, 1, (-2, -1))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rf_core.config import bounded

BACKGROUNDS = ("keep", "white", "black", "random", "noise")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision
_CROP_TRIES = 10  # candidate crops per view, as torchvision's RandomResizedCrop


@dataclass
class AugmentConfig:
    """How far the augmented views stray from the photo. Defaults are the authors' ranges
    (their textual_inversion.py: rotation ±10° with p 0.75, random resized crop of scale
    (0.85, 1.15), which torchvision can only satisfy up to 1, colour jitter 0.04 with p 0.75,
    grayscale p 0.1, blur sigma 0.1-2 with p 0.1, flip p 0.5). Not copied: their 1.5x zoom
    after a rotation, which hides the white corners that their rotation leaves; our warp fills
    those with the background instead."""

    resolution: int = bounded(512, lo=1)
    """Side of the square output views, in pixels (Stable Diffusion v1 works at 512)."""
    scale: tuple[float, float] = bounded((0.85, 1.0), lo=0, hi=1, lo_open=True)
    """Random resized crop: range of the crop's area, as a fraction of the photo's area."""
    ratio: tuple[float, float] = bounded((3 / 4, 4 / 3), lo=0, lo_open=True)
    """Random resized crop: range of the crop's width / height, drawn log-uniformly."""
    rotation_degrees: float = bounded(10.0, lo=0, hi=180)
    """Rotation drawn uniformly from [-d, d] degrees, counter-clockwise positive."""
    rotation_p: float = bounded(0.75, lo=0, hi=1)
    """Probability of rotating a view."""
    hflip_p: float = bounded(0.5, lo=0, hi=1)
    """Probability of mirroring a view left-right."""
    brightness: float = bounded(0.04, lo=0)
    """Colour jitter: brightness factor drawn from [max(0, 1 - b), 1 + b]."""
    contrast: float = bounded(0.04, lo=0)
    """Colour jitter: contrast factor drawn from [max(0, 1 - c), 1 + c]."""
    saturation: float = bounded(0.04, lo=0)
    """Colour jitter: saturation factor drawn from [max(0, 1 - s), 1 + s]."""
    hue: float = bounded(0.04, lo=0, hi=0.5)
    """Colour jitter: hue shift drawn from [-h, h] turns of the colour wheel (h <= 0.5)."""
    jitter_p: float = bounded(0.75, lo=0, hi=1)
    """Probability of colour-jittering a view (brightness, contrast, saturation, hue, in order)."""
    grayscale_p: float = bounded(0.1, lo=0, hi=1)
    """Probability of turning a view gray."""
    blur_p: float = bounded(0.1, lo=0, hi=1)
    """Probability of blurring a view with a Gaussian."""
    blur_sigma: tuple[float, float] = bounded((0.1, 2.0), lo=0, lo_open=True)
    """Range of the blur's standard deviation, in output pixels."""
    background: str = "random"
    """What fills the view where the mask is 0 (and outside the photo): "keep" (the photo's
    own, edge pixels repeated outside it), "white", "black", "random" (one random solid
    colour per view) or "noise" (uniform noise per pixel)."""

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) \
                or self.resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {self.resolution!r}")
        self.scale = _pair(self.scale, "scale")
        if not (0 < self.scale[0] and self.scale[1] <= 1):
            raise ValueError(f"scale must lie in (0, 1] (area fractions), got {self.scale}")
        self.ratio = _pair(self.ratio, "ratio")
        if not self.ratio[0] > 0:
            raise ValueError(f"ratio must be positive (width / height), got {self.ratio}")
        self.blur_sigma = _pair(self.blur_sigma, "blur_sigma")
        if not self.blur_sigma[0] > 0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must lie in [0, 180], got {self.rotation_degrees}")
        for name in ("rotation_p", "hflip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] turns of the colour wheel, got {self.hue}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, "
                             f"got {self.background!r}")


def _pair(value, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not low <= high:
        raise ValueError(f"{name}: low {low} > high {high}; write it as (low, high)")
    return low, high


def augment_views(rgb: Tensor, mask: Tensor, n: int, cfg: AugmentConfig,
                  generator: torch.Generator) -> Tensor:
    """Random views of one object photo, ready for the Stable Diffusion VAE.

    rgb: [3, H, W] in [0, 1]; mask: [1, H, W] in [0, 1], 1 on the object.
    Returns [n, 3, R, R] in [-1, 1], R = ``cfg.resolution``, float32 on ``rgb``'s device.
    All randomness is drawn from ``generator`` (on its own device, so a CPU generator
    drives CUDA inputs too).
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"rgb must be [3, H, W], got {list(rgb.shape)}")
    if tuple(mask.shape) != (1, *rgb.shape[1:]):
        raise ValueError(f"mask must be [1, H, W] = {[1, *rgb.shape[1:]]}, got {list(mask.shape)}")
    if n < 1:
        raise ValueError(f"n must be a positive number of views, got {n}")
    image = torch.cat([rgb, mask.to(rgb.device)]).to(torch.float32)[None]  # [1, 4, H, W]
    image = _prefilter(image, cfg.resolution, cfg.scale[0])
    p = _sample_params(n, *image.shape[-2:], cfg, generator)
    p = {k: v.to(rgb.device) for k, v in p.items()}

    theta = _affine(p["angle"], p["flip"], p["box"], *image.shape[-2:])
    x, alpha = _warp(image, theta, cfg.resolution)
    if cfg.background != "keep":
        x = x * alpha + p["background"] * (1 - alpha)
    if cfg.jitter_p > 0:
        x = _color_jitter(x, p["jitter"])
    x = torch.where(p["gray"][:, None, None, None], _gray(x).expand_as(x), x)
    if cfg.blur_p > 0:
        x = _gaussian_blur(x, p["sigma"], radius=math.ceil(3 * cfg.blur_sigma[1]))
    return x.clamp(0, 1) * 2 - 1


def _prefilter(image: Tensor, resolution: int, min_scale: float) -> Tensor:
    """Shrink, antialiased, a photo much larger than the views need: [1, C, H, W].

    The bilinear warp does not low-pass; after this even the smallest crop maps about one
    photo pixel to one view pixel, and the whole photo shrinks by at most 1/sqrt(min_scale).
    """
    height, width = image.shape[-2:]
    short, target = min(height, width), math.ceil(resolution / math.sqrt(min_scale))
    if short <= target:
        return image
    size = (max(1, round(height * target / short)), max(1, round(width * target / short)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def _sample_params(n: int, height: int, width: int, cfg: AugmentConfig,
                   generator: torch.Generator) -> dict[str, Tensor]:
    """Every random choice for n views, drawn from ``generator`` in a fixed order."""
    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device)

    def lerp(bounds: tuple[float, float], u: Tensor) -> Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * u

    # Random resized crop as torchvision's, but continuous and with all tries drawn at once.
    area = height * width * lerp(cfg.scale, rand(n, _CROP_TRIES))
    aspect = torch.exp(lerp((math.log(cfg.ratio[0]), math.log(cfg.ratio[1])), rand(n, _CROP_TRIES)))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    ok = (w <= width * (1 + 1e-6)) & (h <= height * (1 + 1e-6))
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first fitting try
    w, h = w.gather(1, first)[:, 0].clamp(max=width), h.gather(1, first)[:, 0].clamp(max=height)
    # No try fits: the largest centred crop whose aspect lies within ratio.
    fw, fh = float(width), float(height)
    if width / height < cfg.ratio[0]:
        fh = width / cfg.ratio[0]
    elif width / height > cfg.ratio[1]:
        fw = height * cfg.ratio[1]
    fits = ok.any(1)
    w, h = torch.where(fits, w, fw), torch.where(fits, h, fh)
    corner = torch.where(fits[:, None], rand(n, 2), 0.5)  # the fallback crop is centred
    cx = (width - w) * corner[:, 0] + (w - width) / 2  # crop centre relative to photo centre
    cy = (height - h) * corner[:, 1] + (h - height) / 2

    angle = lerp((-cfg.rotation_degrees, cfg.rotation_degrees), rand(n))
    angle = angle * (rand(n) < cfg.rotation_p)
    flip = rand(n) < cfg.hflip_p
    jitter = rand(n, 4)
    strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
    jitter = torch.stack([lerp((max(0.0, 1 - s), 1 + s), u) for s, u in zip(strengths, jitter.T)]
                         + [lerp((-cfg.hue, cfg.hue), jitter[:, 3])], 1)
    neutral = (torch.arange(4, device=jitter.device) < 3).to(jitter.dtype)  # (1, 1, 1, 0)
    jitter = torch.where((rand(n) < cfg.jitter_p)[:, None], jitter, neutral)
    gray = rand(n) < cfg.grayscale_p
    sigma = lerp(cfg.blur_sigma, rand(n)) * (rand(n) < cfg.blur_p)  # 0: not blurred

    res = cfg.resolution
    background = {
        "keep": lambda: torch.zeros(n, 3, 1, 1, device=generator.device),
        "white": lambda: torch.ones(n, 3, 1, 1, device=generator.device),
        "black": lambda: torch.zeros(n, 3, 1, 1, device=generator.device),
        "random": lambda: rand(n, 3, 1, 1),
        "noise": lambda: rand(n, 3, res, res),
    }[cfg.background]()
    return {"box": torch.stack([cx, cy, w, h], 1), "angle": angle, "flip": flip,
            "jitter": jitter, "gray": gray, "sigma": sigma, "background": background}


def _affine(angle: Tensor, flip: Tensor, box: Tensor, height: int, width: int) -> Tensor:
    """Output-to-photo sampling map, as ``F.affine_grid`` wants it: [n, 2, 3].

    angle: [n] degrees, counter-clockwise positive; flip: [n] bool; box: [n, 4] crop centre
    (x, y) relative to the photo centre and crop size (w, h), in pixels of the rotated photo.
    From a view point in [-1, 1]^2: mirror x, place it in the crop box, undo the rotation
    about the photo centre, normalise by the photo's half-size.
    """
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # Turning the picture by +angle (y down) sends p to [[c, s], [-s, c]] p; sample the inverse.
    unrotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    sign = 1 - 2 * flip.to(box.dtype)
    place = torch.diag_embed(torch.stack([sign * box[:, 2] / 2, box[:, 3] / 2], -1))
    # Normalising is diag(2 / width, 2 / height) on the left: a row scaling, done in place of
    # a matrix that would be made on the host and copied to the device every call.
    normalise = torch.stack([box.new_full((), 2 / width), box.new_full((), 2 / height)])
    normalise_unrotate = normalise[:, None] * unrotate
    linear = normalise_unrotate @ place
    shift = normalise_unrotate @ box[:, :2, None]
    return torch.cat([linear, shift], -1)


def _warp(image: Tensor, theta: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Resample a [1, 4, H, W] rgb+mask photo under theta [n, 2, 3] -> rgb, mask [n, 3|1, R, R].

    Colours repeat the photo's edge outside it (bilinear interpolation then matches
    ``F.interpolate`` at the border); the mask is 0 outside the photo.
    """
    n = theta.shape[0]
    grid = F.affine_grid(theta, [n, 4, resolution, resolution], align_corners=False)
    out = F.grid_sample(image.expand(n, -1, -1, -1), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    inside = (grid.abs() <= 1).all(-1)[:, None]
    return out[:, :3], out[:, 3:] * inside


def _gray(x: Tensor) -> Tensor:
    """Luma of [n, 3, H, W] rgb -> [n, 1, H, W]."""
    return sum(w * c for w, c in zip(_LUMA, x.unbind(1)))[:, None]


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's blend: factor 1 is x, 0 is other, clamped to [0, 1]."""
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _color_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast, saturation, hue; factors [n, 4], identity (1, 1, 1, 0)."""
    b, c, s, h = factors[:, :, None, None, None].unbind(1)
    x = _blend(x, torch.zeros_like(x), b)
    x = _blend(x, _gray(x).mean((-3, -2, -1), keepdim=True), c)
    x = _blend(x, _gray(x), s)
    return _adjust_hue(x, h)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Turn the hue of [n, 3, H, W] rgb by shift [n, 1, 1, 1] turns, through HSV."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value, low = x.max(1, keepdim=True).values, x.min(1, keepdim=True).values
    chroma = value - low
    sat = chroma / value.clamp_min(1e-8)
    c = chroma.clamp_min(1e-8)  # where chroma is 0, sat is 0 and the hue does not matter
    hue6 = torch.where(value == r, (g - b) / c,
                       torch.where(value == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue6 = torch.remainder(hue6 + 6 * shift, 6)
    # HSV -> RGB, branch-free: channel k = v - v s clamp(min(m, 4 - m), 0, 1), m = (n_k + h) % 6.
    n_k = 5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype)  # (5, 3, 1), made on x's device
    m = torch.remainder(n_k[:, None, None] + hue6, 6)
    return value - value * sat * torch.clamp(torch.minimum(m, 4 - m), 0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur of [n, C, H, W], one sigma [n] per view (0 leaves it)."""
    n, channels, height, width = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    # A tiny sigma makes every tap but the centre exp(-huge) = 0: the identity kernel.
    kernel = torch.exp(-(t**2) / (2 * sigma.clamp_min(1e-6)[:, None] ** 2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(channels, 0)
    y = F.pad(x.reshape(1, n * channels, height, width), [radius] * 4, mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * channels)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * channels)
    return y.reshape(n, channels, height, width)
