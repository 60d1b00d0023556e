"""The single input photo: load, validate, mask and recentre it.

``load_input`` turns a user's photo (and optional mask file) into a square, white-background
``rgb`` [3, S, S] and a soft ``mask`` [1, S, S], both float32 in [0, 1]. The object is recentred
as in RealFusion (Melas-Kyriazi et al. 2023, sec. 4): its bounding box is scaled so that its longer
side is ``fill_ratio * S`` and placed in the middle of the canvas.

The mask comes from, in order of preference: a mask file, the image's alpha channel, or rembg
(an optional dependency, imported only when needed). Every problem with the input is reported as
a one-line ``InputError`` that says what was wrong and what to do; where rf can tell what the
user meant (an inverted mask file, rounded corners with rembg installed) it does that and says
so in a note (``ProcessedInput.notes``, also logged as ``rf: note: ...``). Files are read by
``rf_core.input.photo_file``; masks are judged by ``rf_core.input.mask_checks``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from rf_core.config import bounded
from rf_core.files.atomic import atomic_write
from rf_core.input import mask_checks as checks
from rf_core.input.photo_file import (
    PILLOW_HARD_LIMIT,
    TRANSPOSE,
    InputError,
    Photo,
    one_line,
    open_photo,
)

# Single-channel modes whose values are not 8-bit: mode -> value that maps to 1.0.
# 16-bit PNGs open as "I;16" (or "I" in older Pillow); "F" is taken to be in [0, 1] already.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
               "I": 65535.0, "F": 1.0}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's convert("L")
WORK_SIDE_FACTOR = 4
"""Photos are decoded downscaled to a longer side of at least this many times ``input.size``
(a 108 MP JPEG is never decoded at full size): the object keeps detail when it fills only part
of the frame."""
MIN_FIT_PIXELS = 4
"""The recentred mask must be above ``mask_threshold`` at this many pixels at every size the
object is fitted at."""
_log = logging.getLogger(__name__)


@dataclass
class InputConfig:
    """How the input photo is validated and preprocessed."""

    size: int = bounded(512, lo=8)
    """Side of the square output, in pixels."""
    fill_ratio: float = bounded(0.7, lo=0, hi=1, lo_open=True)
    """After recentring, the object's bounding-box longer side as a fraction of ``size``."""
    recenter: bool = True
    """Recentre and rescale the object; if False, pad the image to a square and resize it."""
    remove_background: str = "auto"
    """Used only without a mask file and alpha: "auto" or "rembg" segment with rembg (optional
    dependency); "never" rejects such images."""
    min_size: int = bounded(32, lo=1)
    """Images (and mask files) with a side shorter than this are rejected."""
    max_pixels: int = bounded(PILLOW_HARD_LIMIT, lo=1)
    """Images with more pixels are rejected before decoding (guards against decompression bombs;
    default Pillow's hard limit, 179 MP). Large photos are decoded downscaled."""
    mask_threshold: float = bounded(0.5, lo=0, hi=1, hi_open=True)
    """Mask values above this are foreground: mask files are binarised at it, and it defines the
    bounding box used for recentring."""

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if not 0.0 < self.fill_ratio <= 1.0:
            raise ValueError(f"fill_ratio must be in (0, 1], got {self.fill_ratio}")
        if self.remove_background not in ("auto", "rembg", "never"):
            raise ValueError("remove_background must be 'auto', 'rembg' or 'never', "
                             f"got {self.remove_background!r}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {self.mask_threshold}")


@dataclass
class ProcessedInput:
    """A preprocessed input view.

    rgb: [3, S, S] float32 in [0, 1], composited on white outside the object.
    mask: [1, S, S] float32 in [0, 1], 1 on the object.
    source: where the mask came from: "alpha", "mask file" or "rembg".
    """

    rgb: torch.Tensor
    mask: torch.Tensor
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)
    """One-line notes on what was done to the input (e.g. an inverted mask file was inverted)."""

    def save(self, folder) -> None:
        """Write ``image.png`` (RGB), ``mask.png`` (L) and ``rgba.png`` (8-bit) into ``folder``.

        Each file is written to a temporary name and then renamed, so a crash never leaves a
        half-written PNG under the final name. The mask source is kept as PNG text in mask.png.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rgb8 = _to_u8(self.rgb.detach().cpu().permute(1, 2, 0).numpy())
        mask8 = _to_u8(self.mask.detach().cpu()[0].numpy())
        info = PngInfo()
        info.add_text("source", self.source)
        _write_png(folder / "image.png", Image.fromarray(rgb8))
        _write_png(folder / "mask.png", Image.fromarray(mask8), pnginfo=info)
        _write_png(folder / "rgba.png", Image.fromarray(np.dstack([rgb8, mask8])))

    @classmethod
    def load(cls, folder) -> ProcessedInput:
        """Read what ``save`` wrote (``image.png`` and ``mask.png``) from ``folder``."""
        folder = Path(folder)
        image = open_photo(folder / "image.png", "image").image
        mask = open_photo(folder / "mask.png", "mask").image
        if image.size != mask.size or image.width != image.height:
            raise InputError(f"{folder}: image.png is {_wh(image)} and mask.png is {_wh(mask)}; "
                             "both must be the same square size, re-run preprocessing")
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        m = np.asarray(mask.convert("L"), dtype=np.float32) / 255
        return cls(rgb=torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
                   mask=torch.from_numpy(m)[None], source=mask.info.get("source", "mask file"))


def load_input(image_path, mask_path=None, cfg: InputConfig | None = None,
               fit_size: int | None = None) -> ProcessedInput:
    """Load the input photo, find its object mask, and recentre it on a white square canvas.

    image_path: any image Pillow reads (RGB, RGBA, L, LA, P, 16-bit, CMYK, GIF frame 0, ...);
        EXIF orientation is applied. Its alpha channel, unless entirely opaque, is the mask.
    mask_path: optional mask file (any mode, white = object), binarised at ``cfg.mask_threshold``;
        it takes precedence over alpha. It must match the image's size or aspect ratio.
    fit_size: the side the object is fitted at (``recon.input_size``), when smaller than
        ``cfg.size``: the mask must still mark the object there.
    Returns rgb [3, S, S] and mask [1, S, S] with S = ``cfg.size``, and the notes said.
    Raises InputError for missing, unreadable, too small or too large files and for masks that
    are not a cut-out of one object (see ``rf_core.input.mask_checks``).
    """
    cfg = cfg or InputConfig()
    photo = open_photo(image_path, "image", max_pixels=cfg.max_pixels, min_size=cfg.min_size,
                       work_side=WORK_SIDE_FACTOR * cfg.size)
    notes = list(photo.notes)
    planes, alpha = _planes(photo.image)
    rgb = np.repeat(planes, 3, axis=-1) if planes.shape[-1] == 1 else planes
    opaque = alpha is not None and alpha.min() == 1.0
    if opaque:
        alpha = None
    if mask_path is not None:
        mask, source = _mask_from_file(mask_path, image_path, photo, rgb, cfg, notes), "mask file"
        if alpha is not None:  # pixels hidden by alpha hold arbitrary colours: make them white
            rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])
    elif alpha is not None:
        mask, source = _alpha_mask(alpha, rgb, image_path, cfg, notes)
    else:
        why = "its alpha channel is fully opaque" if opaque else "it has no alpha channel"
        mask, source = _rembg_mask(rgb, image_path, cfg, f"{why} and no mask was given"), "rembg"

    fg = mask > cfg.mask_threshold
    origin = f"mask file {mask_path}" if mask_path is not None else source
    if not fg.any():
        raise InputError(f"{image_path}: the mask (from {origin}) is empty, no pixel is above "
                         f"mask_threshold={cfg.mask_threshold}; pass a mask that marks the object")
    if fg.all():
        raise InputError(f"{image_path}: the mask (from {origin}) covers the whole image; "
                         "pass a real object mask (white object on black background)")

    white = rgb * mask[..., None] + (1.0 - mask[..., None])
    h, w = mask.shape
    box = _object_box(fg, cfg.fill_ratio) if cfg.recenter else _square_box(w, h, 1.0)
    out_rgb = np.stack([_resample(white[..., c], box, 1.0, cfg.size, Image.Resampling.LANCZOS)
                        for c in range(3)])
    out_mask = torch.from_numpy(_resample(mask, box, 0.0, cfg.size,
                                          Image.Resampling.BILINEAR)[None])
    _check_fit(out_mask, fg, photo, image_path, origin, cfg, fit_size)
    for note in notes:
        _log.warning("rf: note: %s", note)
    return ProcessedInput(rgb=torch.from_numpy(out_rgb), mask=out_mask, source=source,
                          notes=notes)


def _check_fit(out_mask: torch.Tensor, fg: np.ndarray, photo: Photo, image_path, origin: str,
               cfg: InputConfig, fit_size: int | None) -> None:
    """The mask, recentred and resized to each size it is used at, still marks the object."""
    for side in sorted({cfg.size, min(fit_size or cfg.size, cfg.size)}):
        small = out_mask if side == cfg.size else F.interpolate(
            out_mask[None], size=(side, side), mode="area")[0]
        covered = int((small > cfg.mask_threshold).sum())
        if covered >= MIN_FIT_PIXELS:
            continue
        ys, xs = np.nonzero(fg)
        scale = photo.size[0] / fg.shape[1]
        bw = round((xs.max() + 1 - xs.min()) * scale)
        bh = round((ys.max() + 1 - ys.min()) * scale)
        about = "about " if scale > 1 else ""  # measured on the downscaled decode
        at = "input.size" if side == cfg.size else "recon.input_size"
        raise InputError(
            f"{image_path}: the object (from {origin}) is {about}{bw}x{bh} px in a {photo.size[0]}x"
            f"{photo.size[1]} photo, so recentred to {side}x{side} px ({at}={side}) its mask is "
            f"above mask_threshold={cfg.mask_threshold} at only {covered} pixel(s); crop the "
            "photo closer to the object, or mark more of it in the mask")


def _planes(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Image -> (colour [H, W, C] with C = 1 or 3, alpha [H, W] or None if absent)."""
    if im.mode in _WIDE_MODES:
        values = np.asarray(im, dtype=np.float32) / _WIDE_MODES[im.mode]
        return np.clip(values, 0.0, 1.0)[..., None], None
    if im.mode in _ALPHA_MODES or "transparency" in im.info:  # incl. palette transparency
        with warnings.catch_warnings():  # Pillow's note on palette transparency as bytes
            warnings.simplefilter("ignore")
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255
        return rgba[..., :3], rgba[..., 3]
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255, None


_CUTOUT_HINT = ("pass --mask with the object white on black, or re-export the image with a "
                "clean transparent background")


def _alpha_mask(alpha: np.ndarray, rgb: np.ndarray, image_path, cfg: InputConfig,
                notes: list[str]) -> tuple[np.ndarray, str]:
    """The alpha channel as the mask, if it is a cut-out of an object (see mask_checks)."""
    fg = alpha > cfg.mask_threshold
    if not fg.any() and 0 < alpha.max() <= 1.5 / 255:
        raise InputError(f"{image_path}: its alpha channel holds only the values 0 and 1 (a 0/1 "
                         "mask saved as 8-bit alpha); save the object with alpha 255")
    if checks.transparent_only_at_edges(fg):
        what = ("it is an opaque photo with transparent corners or edges (a sticker or "
                "screenshot export), not a cut-out of the object")
        white = rgb * alpha[..., None] + (1.0 - alpha[..., None])
        mask = _rembg_mask(white, image_path, cfg, what)  # refuses if rembg is not there
        notes.append(f"{image_path}: {what}: the object was segmented with rembg instead")
        return mask, "rembg"
    if checks.is_noise(fg):
        raise InputError(f"{image_path}: its alpha channel is not an object cut-out but looks "
                         f"like noise ({checks.boundary_share(fg):.0%} of neighbouring pixels "
                         f"flip between object and background); {_CUTOUT_HINT}")
    if checks.is_inverted(fg):
        raise InputError(f"{image_path}: its alpha channel is opaque along all four borders "
                         "and transparent inside, so it looks inverted (background opaque, "
                         f"object transparent); {_CUTOUT_HINT}")
    return alpha, "alpha"


def _mask_from_file(mask_path, image_path, photo: Photo, rgb: np.ndarray, cfg: InputConfig,
                    notes: list[str]) -> np.ndarray:
    """Mask file -> binary mask [H, W] float32 matching the decoded image; alpha wins over
    luminance."""
    mask = open_photo(mask_path, "mask", max_pixels=cfg.max_pixels, min_size=cfg.min_size,
                      work_side=WORK_SIDE_FACTOR * cfg.size)
    planes, alpha = _planes(mask.image)
    if alpha is not None and alpha.min() == 1.0:
        alpha = None
    gray = alpha if alpha is not None else (planes @ _LUMA if planes.shape[-1] == 3
                                            else planes[..., 0])
    binary = gray > cfg.mask_threshold
    if not binary.any() and 0 < gray.max() <= 1.5 / 255:
        raise InputError(f"mask {mask_path} holds only the values 0 and 1 (a 0/1 mask saved as "
                         "8-bit): save the object as 255 (white) on 0 (black)")
    (w, h), (mw, mh), (sw, sh) = photo.size, mask.size, photo.stored_size
    if abs(mw * h - mh * w) > 0.01 * mh * w:
        if photo.orientation != 1 and abs(mw * sh - mh * sw) <= 0.01 * mh * sw:
            raise InputError(
                f"mask {mask_path} is {mw}x{mh} but image {image_path} is "
                f"{photo.describe_size()}: the mask matches the stored pixels, not the photo "
                "as shown; turn the mask the same way, or save the photo without its EXIF "
                "orientation")
        raise InputError(f"mask {mask_path} is {mw}x{mh} but image {image_path} is "
                         f"{photo.describe_size()}; pass a mask with the image's size or aspect "
                         "ratio")
    iw, ih = photo.image.size
    if binary.shape != (ih, iw):
        resized = Image.fromarray(binary.astype(np.uint8) * 255).resize(
            (iw, ih), Image.Resampling.NEAREST)
        binary = np.asarray(resized) > 127
    _check_orientation(binary, rgb, photo, mask, mask_path, image_path)
    if binary.any() and not binary.all():
        if checks.transparent_only_at_edges(binary):
            raise InputError(f"mask {mask_path} covers all of image {image_path} but its "
                             "corners or edges; pass a mask of the object (white) on its "
                             "background (black)")
        if checks.is_noise(binary):
            raise InputError(f"mask {mask_path} is not an object outline but looks like noise "
                             f"({checks.boundary_share(binary):.0%} of neighbouring pixels "
                             "flip); pass a mask with the object white on black")
        if checks.is_inverted(binary):
            binary = ~binary
            notes.append(f"mask {mask_path} looks inverted (white along all four borders, "
                         "black inside): the black part is used as the object; save the object "
                         "white on black to silence this note")
    return binary.astype(np.float32)


def _check_orientation(binary: np.ndarray, rgb: np.ndarray, photo: Photo, mask: Photo,
                       mask_path, image_path) -> None:
    """Refuse a mask drawn on the stored pixels of an EXIF-turned photo (same-size case)."""
    if photo.orientation == 1 or mask.orientation == photo.orientation:
        return
    turned = np.asarray(Image.fromarray(binary).transpose(TRANSPOSE[photo.orientation]))
    if turned.shape != binary.shape or not checks.fits_edges_better(rgb @ _LUMA, binary, turned):
        return
    raise InputError(f"mask {mask_path} fits the stored pixels of image {image_path}, which "
                     f"its EXIF orientation shows {photo.rotation}: the mask's outline follows "
                     "the photo's edges only when turned the same way; turn the mask the same "
                     "way, or save the photo without its EXIF orientation")


def _rembg_mask(rgb: np.ndarray, image_path, cfg: InputConfig, why: str) -> np.ndarray:
    """Segment the object with rembg: rgb [H, W, 3] in [0, 1] -> soft mask [H, W].

    why: the one-line reason rembg is needed (said if it cannot run)."""
    hint = "pass --mask or an RGBA image with the object in its alpha channel"
    if cfg.remove_background == "never":
        raise InputError(f"{image_path}: {why}; {hint}")
    try:
        import rembg
    except ImportError:
        raise InputError(f"{image_path}: {why}, and rembg is not installed; {hint}, or install "
                         "background removal with `pip install -e .[rembg]` (pip install "
                         "rembg)") from None
    try:
        out = rembg.remove(Image.fromarray(_to_u8(rgb)))
        alpha = np.asarray(out.convert("RGBA"), dtype=np.float32)[..., 3] / 255
    except Exception as e:  # rembg fails in many ways, e.g. no model and no network
        if _is_download_error(e):
            home = os.environ.get("U2NET_HOME") or os.environ.get("REMBG_HOME", "~/.rembg")
            raise InputError(
                f"rembg could not download its segmentation model for {image_path} (no "
                f"network? {one_line(e)[:160]}); run `python -c \"import rembg; "
                f"rembg.new_session()\"` on a machine with internet and copy {home} here "
                f"(or set REMBG_HOME), or {hint}") from None
        raise InputError(f"rembg failed on {image_path} ({one_line(e)}); {hint}") from None
    if alpha.shape != rgb.shape[:2]:
        raise InputError(f"rembg returned a {alpha.shape[1]}x{alpha.shape[0]} mask for "
                         f"{image_path}; {hint}")
    return alpha


def _is_download_error(err: BaseException) -> bool:
    """Whether rembg failed fetching its model (requests/urllib/pooch network errors)."""
    names = {c.__name__ for c in type(err).__mro__}
    text = str(err)
    return bool(names & {"ConnectionError", "RequestException", "URLError", "HTTPError",
                         "Timeout"}) or any(
        t in text for t in ("HTTPSConnectionPool", "Failed to resolve", "releases/download"))


def _object_box(fg: np.ndarray, fill_ratio: float) -> tuple[float, float, float, float]:
    """Square source box (x0, y0, x1, y1), pixel edges, in which the foreground's bounding box is
    centred and its longer side is ``fill_ratio`` of the box side."""
    ys, xs = np.nonzero(fg)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) / fill_ratio
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def _square_box(w: int, h: int, fill_ratio: float) -> tuple[float, float, float, float]:
    """Square source box around the whole image, centred (the image padded to a square)."""
    return _object_box(np.ones((h, w), dtype=bool), fill_ratio)


def _resample(plane: np.ndarray, box, fill: float, size: int, resample) -> np.ndarray:
    """Resample ``plane`` [H, W] over ``box`` (may extend past the image, where it is ``fill``)
    onto a [size, size] grid with Pillow's antialiasing filters; result clipped to [0, 1]."""
    h, w = plane.shape
    x0, y0, x1, y1 = box
    pad = max(0.0, -x0, -y0, x1 - w, y1 - h)
    pad = math.ceil(pad) + 1 if pad > 0 else 0
    if pad:
        plane = np.pad(plane, pad, constant_values=fill)
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    out = im.resize((size, size), resample, box=(x0 + pad, y0 + pad, x1 + pad, y1 + pad))
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _write_png(path: Path, im: Image.Image, **kwargs) -> None:
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG", **kwargs))


def _wh(im: Image.Image) -> str:
    return f"{im.width}x{im.height}"
