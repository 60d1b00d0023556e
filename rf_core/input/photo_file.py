"""Reading one image file, the same way for every command (``rf reconstruct``, ``rf invert``,
``rf dataset``): size limits checked before decoding, large photos decoded downscaled, EXIF
orientation applied, and no library warnings on the console.

Pillow warns (``DecompressionBombWarning``) between 89.5 and 179 MP and refuses above; rf owns
the limit instead (``input.max_pixels``, by default Pillow's hard limit) and says it in its own
words. A photo much larger than rf needs is decoded at a reduced scale (JPEG ``draft``: never
decoded at full size) or reduced right after decoding, so later float copies stay small.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from rf_core.errors import UserError

PILLOW_HARD_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
"""Pixels above which Pillow refuses an image as a decompression bomb (178,956,970)."""
_STUB_FORMATS = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF"}  # Pillow names them, cannot decode them
_SWAPS = {5, 6, 7, 8}  # EXIF orientations that turn the stored image by 90 degrees
_ROTATION = {2: "mirrored", 3: "turned 180°", 4: "flipped", 5: "transposed",
             6: "turned 90° clockwise", 7: "transversed", 8: "turned 90° counter-clockwise"}
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # as ImageOps.exif_transpose
_PIL_LIMIT = threading.Lock()


class InputError(UserError, ValueError):
    """The input image or mask cannot be used; the message says why and what to do."""


def image_suffixes() -> frozenset[str]:
    """Lower-case suffixes (``.png``) of the formats Pillow decodes here (incl. GIF, AVIF)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _STUB_FORMATS)


@dataclass
class Photo:
    """One decoded image file.

    image: EXIF-rotated, possibly reduced; its size may be smaller than ``size``.
    size: (w, h) the user sees: after EXIF rotation, before any reduction.
    stored_size: (w, h) as stored in the file, before EXIF rotation.
    orientation: the EXIF orientation tag (1: none).
    notes: one-line notes for the user (e.g. frame 0 of an animation is used).
    """

    image: Image.Image
    size: tuple[int, int]
    stored_size: tuple[int, int]
    orientation: int = 1
    notes: list[str] = field(default_factory=list)

    def describe_size(self) -> str:
        """``300x200`` plus, for an EXIF-rotated file, how it was stored."""
        w, h = self.size
        if self.orientation == 1:
            return f"{w}x{h}"
        sw, sh = self.stored_size
        return (f"{w}x{h} after its EXIF orientation ({_ROTATION.get(self.orientation, '?')}; "
                f"stored {sw}x{sh})")

    @property
    def rotation(self) -> str:
        return _ROTATION.get(self.orientation, "")


@contextlib.contextmanager
def _quiet_pillow():
    """rf checks sizes itself: Pillow's bomb check and its warnings are off inside."""
    with _PIL_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_photo(path, what: str = "image", *, max_pixels: int = PILLOW_HARD_LIMIT,
               min_size: int = 1, work_side: int | None = None) -> Photo:
    """Open, size-check (before decoding), decode and EXIF-rotate one image file.

    work_side: decode at a reduced scale whose longer side stays >= this (None: full size).
    Raises InputError (one line) for a folder, a missing, unreadable, too small or too large
    file.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not an image file; pass one image (rf "
                         "dataset reconstructs every object of a folder)")
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}; check the path")
    try:
        with _quiet_pillow(), Image.open(path) as im:
            return _decode(im, path, what, max_pixels, min_size, work_side)
    except PermissionError:
        raise InputError(f"cannot read {what} {path}: permission denied; make it readable "
                         f"(chmod +r) or copy it somewhere you can read") from None
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise InputError(f"cannot read {what} {path} ({one_line(e)}); "
                         "check the file or re-save it as PNG or JPEG") from None


def _decode(im: Image.Image, path: Path, what: str, max_pixels: int, min_size: int,
            work_side: int | None) -> Photo:
    sw, sh = im.size
    orientation = _orientation(im)
    w, h = (sh, sw) if orientation in _SWAPS else (sw, sh)
    if sw * sh > max_pixels:
        raise InputError(f"{what} {path} is {w}x{h} = {sw * sh} pixels, more than rf's limit "
                         f"input.max_pixels={max_pixels} ({_mp(max_pixels)}); downscale it "
                         "first")
    if min(sw, sh) < min_size:
        raise InputError(f"{what} {path} is {w}x{h}, smaller than input.min_size={min_size} on "
                         "a side; use a larger image")
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"{what} {path} holds {frames} frames (animated or multi-page): "
                     "frame 0 is used")
    reduce = max(1, max(sw, sh) // work_side) if work_side else 1
    if reduce > 1 and im.format == "JPEG":
        im.draft(im.mode, (-(-sw // reduce), -(-sh // reduce)))
    im.load()
    out = _reduce(im, max(1, max(im.size) // work_side)) if reduce > 1 else im
    if orientation != 1:
        out = out.transpose(TRANSPOSE[orientation])
    if out is im:  # the caller closes the file's image
        out = im.copy()
    return Photo(out, (w, h), (sw, sh), orientation, notes)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1
    return value if value in _ROTATION else 1


def _reduce(im: Image.Image, factor: int) -> Image.Image:
    """Box-reduce by an integer factor (alpha-weighted), in a mode ``reduce`` supports."""
    if factor <= 1:
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("L" if im.mode == "1" else "RGB")
    elif im.mode.startswith("I;16"):
        im = im.convert("I")
    return im.reduce(factor)


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
