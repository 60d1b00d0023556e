"""Any photo a user has, generated (issue 23): each is accepted and preprocessed right, or
refused in one line that names the fix.

One table: every case builds its files from one scene (the image the user meant) and says
what must happen. Accepted cases write ``input/`` as ``rf reconstruct`` does, and its image and
mask must match a reference preprocessing of the meant image (mask IoU >= 0.98, colours close,
and closer than the same picture turned by 90°: the orientation is right). No case may let a
library warning through. The dataset reader and ``rf dataset``'s failures are checked below.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import tempfile
import types
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from rf_core.input.dataset_listing import read_dataset
from rf_core.input.image_input import InputConfig, InputError, load_input

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
FILL = 0.7
BG, RED, BLUE = (40, 140, 60), (220, 30, 30), (30, 40, 220)


def scene(w: int = 96, h: int = 64, box=(14, 12, 50, 52)) -> tuple[np.ndarray, np.ndarray]:
    """The image the user meant: a red block with a blue top band (so a turn shows) on green.
    Returns rgb [H, W, 3] and mask [H, W], uint8."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = BG
    mask = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0:x1] = RED
    rgb[y0:y0 + (y1 - y0) // 4, x0:x1] = BLUE
    mask[y0:y1, x0:x1] = 255
    return rgb, mask


def square_scene():
    return scene(64, 64, (6, 8, 30, 44))  # off-centre: turned by 90° it lands elsewhere


def reference(rgb: np.ndarray, mask: np.ndarray, size: int = SIZE):
    """RealFusion's preprocessing of the meant image, written out on its own: composite on
    white, a square box around the object whose side is its longer side / 0.7, resampled.
    Returns rgb [S, S, 3] and mask [S, S], float in [0, 1]."""
    m = mask.astype(np.float32) / 255
    white = rgb.astype(np.float32) / 255 * m[..., None] + (1 - m[..., None])
    ys, xs = np.nonzero(m > 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) / FILL
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pad = int(side) + 2

    def sample(plane, fill, resample):
        im = Image.fromarray(np.pad(plane, pad, constant_values=fill).astype(np.float32))
        box = (cx - side / 2 + pad, cy - side / 2 + pad, cx + side / 2 + pad, cy + side / 2 + pad)
        return np.clip(np.asarray(im.resize((size, size), resample, box=box)), 0, 1)

    ref_rgb = np.stack([sample(white[..., c], 1.0, Image.Resampling.LANCZOS) for c in range(3)],
                       axis=-1)
    return ref_rgb, sample(m, 0.0, Image.Resampling.BILINEAR)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(1, np.count_nonzero(a | b))


@dataclass
class Case:
    image: Path
    mask: Path | None = None
    meant: tuple | None = None
    """(rgb, mask) the user meant, for an accepted case; None: the case must be refused."""
    words: list[str] = field(default_factory=list)
    """Accepted: words of a note that must be said. Refused: words of the error line."""
    cfg: dict = field(default_factory=dict)
    rgb_tol: float = 0.04


def _png(path: Path, array, mode=None, **kw) -> Path:
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(
        path, **kw)
    return path


def _exif_jpeg(path: Path, displayed: np.ndarray, orientation: int = 6) -> Path:
    """A JPEG storing ``displayed`` turned back by EXIF orientation 6 (shown turned 90° cw)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(np.rot90(displayed, 1))).save(path, quality=95,
                                                                       exif=exif)
    return path


def _rgba(rgb, alpha) -> np.ndarray:
    return np.dstack([rgb, alpha])


def _corners(h: int, w: int, r: int) -> np.ndarray:
    """Alpha of a rounded rectangle the size of the image: 255 inside, 0 in the corners."""
    yy, xx = np.mgrid[:h, :w]
    cx = np.clip(xx, r, w - 1 - r)
    cy = np.clip(yy, r, h - 1 - r)
    return np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, 255, 0).astype(np.uint8)


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims to be w x h (no pixel data): rf must refuse it before decoding."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _fake_rembg(monkeypatch, mask: np.ndarray) -> None:
    """A background remover that finds exactly ``mask``."""
    def remove(im):
        return Image.fromarray(_rgba(np.asarray(im.convert("RGB")), mask))
    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=remove))


# ---------------------------------------------------------------------------- the cases


def build(name: str, d: Path, monkeypatch) -> Case:
    rgb, mask = scene()
    sq_rgb, sq_mask = square_scene()
    monkeypatch.setitem(sys.modules, "rembg", None)  # not installed, unless a case fakes it
    if name == "rgba png":
        return Case(_png(d / "a.png", _rgba(rgb, mask)), meant=(rgb, mask))
    if name == "rgb + mask":
        return Case(_png(d / "a.png", rgb), _png(d / "m.png", mask), meant=(rgb, mask))
    if name == "palette png, transparency":
        index = np.where(mask > 0, 1 + (rgb[..., 2] > 100), 0).astype(np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette([*BG, *RED, *BLUE])
        im.save(d / "p.png", transparency=0)
        return Case(d / "p.png", meant=(rgb, mask))
    if name == "webp rgba":
        return Case(_png(d / "a.webp", _rgba(rgb, mask), lossless=True), meant=(rgb, mask))
    if name == "avif rgba":
        return Case(_png(d / "a.avif", _rgba(rgb, mask), quality=95), meant=(rgb, mask),
                    rgb_tol=0.06)
    if name == "animated gif":
        frames = [Image.fromarray(_rgba(rgb, mask)), Image.fromarray(_rgba(rgb[::-1], mask[::-1]))]
        frames[0].save(d / "a.gif", save_all=True, append_images=frames[1:], duration=100,
                       loop=0, disposal=2)
        return Case(d / "a.gif", meant=(rgb, mask), words=["2 frames", "frame 0 is used"])
    if name == "bmp + mask":
        return Case(_png(d / "a.bmp", rgb), _png(d / "m.png", mask), meant=(rgb, mask))
    if name == "cmyk jpeg + mask":
        Image.fromarray(rgb).convert("CMYK").save(d / "c.jpg", quality=95)
        return Case(d / "c.jpg", _png(d / "m.png", mask), meant=(rgb, mask), rgb_tol=0.06)
    if name == "16-bit gray png + mask":
        gray = (rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint16) * 257
        Image.fromarray(gray).save(d / "g.png")
        g8 = np.repeat((gray // 257).astype(np.uint8)[..., None], 3, axis=-1)
        return Case(d / "g.png", _png(d / "m.png", mask), meant=(g8, mask))
    if name == "exif-6 jpeg + mask as shown":
        return Case(_exif_jpeg(d / "e.jpg", rgb), _png(d / "m.png", mask), meant=(rgb, mask),
                    rgb_tol=0.06)
    if name == "exif-6 square jpeg + mask as shown":
        return Case(_exif_jpeg(d / "e.jpg", sq_rgb), _png(d / "m.png", sq_mask),
                    meant=(sq_rgb, sq_mask), rgb_tol=0.06)
    if name == "exif-6 jpeg + mask of the stored pixels":
        return Case(_exif_jpeg(d / "e.jpg", rgb), _png(d / "m.png", np.rot90(mask, 1).copy()),
                    words=["64x96", "96x64 after its EXIF orientation", "stored 64x96",
                           "turn the mask"])
    if name == "exif-6 square jpeg + mask of the stored pixels":
        return Case(_exif_jpeg(d / "e.jpg", sq_rgb),
                    _png(d / "m.png", np.rot90(sq_mask, 1).copy()),
                    words=["stored pixels", "EXIF orientation", "turn the mask"])
    if name == "large jpeg, decoded downscaled":
        big_rgb, big_mask = (np.kron(a, np.ones((16, 16) + (1,) * (a.ndim - 2), np.uint8))
                             for a in (rgb, mask))
        Image.fromarray(big_rgb).save(d / "big.jpg", quality=90)
        return Case(d / "big.jpg", _png(d / "m.png", big_mask), meant=(big_rgb, big_mask),
                    rgb_tol=0.06)
    if name == "in pillow's warning zone":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 96x64 = 6144: warn, not refuse
        return Case(_png(d / "a.png", _rgba(rgb, mask)), meant=(rgb, mask))
    if name == "16000x12000":
        return Case(_png_header_only(d / "huge.png", 16000, 12000),
                    words=["16000x12000", "192000000 pixels", "rf's limit",
                           "input.max_pixels=178956970", "downscale it"])
    if name == "4000x40 strip":
        strip = np.zeros((40, 4000, 4), np.uint8)
        strip[..., :3] = RED
        strip[10:30, 100:3900, 3] = 255
        return Case(_png(d / "s.png", strip), words=["recentred to 64x64", "crop the photo"])
    if name == "thin after recon.input_size":
        strip = np.zeros((64, 1200, 4), np.uint8)
        strip[..., :3] = RED
        strip[28:36, 20:1180, 3] = 255
        return Case(_png(d / "s.png", strip), cfg={"fit_size": 16},
                    words=["recon.input_size=16", "crop the photo"])
    if name == "noise alpha":
        noise = np.random.default_rng(0).integers(1, 256, mask.shape, dtype=np.uint8)
        return Case(_png(d / "n.png", _rgba(rgb, noise)), words=["noise", "--mask"])
    if name == "opaque photo, rounded corners, no rembg":
        return Case(_png(d / "r.png", _rgba(rgb, _corners(64, 96, 10))),
                    words=["transparent corners", "--mask", "pip install -e .[rembg]"])
    if name == "opaque photo, rounded corners, rembg":
        _fake_rembg(monkeypatch, mask)
        return Case(_png(d / "r.png", _rgba(rgb, _corners(64, 96, 10))), meant=(rgb, mask),
                    words=["transparent corners", "segmented with rembg"])
    if name == "opaque photo, transparent border":
        alpha = np.full_like(mask, 255)
        alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1] = 0, 0, 0, 0
        return Case(_png(d / "b.png", _rgba(rgb, alpha)), words=["transparent corners or edges"])
    if name == "inverted mask":
        return Case(_png(d / "a.png", rgb), _png(d / "m.png", 255 - mask), meant=(rgb, mask),
                    words=["looks inverted", "black part is used as the object"])
    if name == "inverted alpha":
        return Case(_png(d / "a.png", _rgba(rgb, 255 - mask)), words=["looks inverted",
                                                                       "--mask"])
    if name == "soft-edged alpha":
        soft = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(1.5)))
        return Case(_png(d / "a.png", _rgba(rgb, soft)), meant=(rgb, soft))
    if name == "ball touching all four borders":
        yy, xx = np.mgrid[:64, :64]
        ball = np.where((xx - 31.5) ** 2 + (yy - 31.5) ** 2 <= 32 ** 2, 255, 0).astype(np.uint8)
        return Case(_png(d / "a.png", _rgba(sq_rgb, ball)), meant=(sq_rgb, ball))
    if name == "object cut by the bottom edge":
        rgb2, mask2 = scene(box=(30, 20, 70, 64))
        return Case(_png(d / "a.png", _rgba(rgb2, mask2)), meant=(rgb2, mask2))
    if name == "all-opaque rgba":
        return Case(_png(d / "o.png", _rgba(rgb, np.full_like(mask, 255))),
                    words=["alpha channel is fully opaque", "--mask", "rembg"])
    if name == "0/1 mask":
        return Case(_png(d / "a.png", rgb), _png(d / "m.png", mask // 255),
                    words=["only the values 0 and 1", "255"])
    if name == "empty mask":
        return Case(_png(d / "a.png", rgb), _png(d / "m.png", mask * 0), words=["is empty"])
    if name == "full mask":
        return Case(_png(d / "a.png", rgb), _png(d / "m.png", mask * 0 + 255),
                    words=["covers the whole image"])
    if name == "folder as the image":
        (d / "photos").mkdir()
        return Case(d / "photos", words=["is a folder", "rf dataset"])
    if name == "missing file":
        return Case(d / "nope.jpg", words=["not found", "nope.jpg"])
    if name == "1x1 image":
        return Case(_png(d / "dot.png", _rgba(rgb, mask)[:1, :1]),
                    words=["1x1", "input.min_size=32"])
    if name == "not an image":
        (d / "x.png").write_text("hello")
        return Case(d / "x.png", words=["cannot read image", "x.png"])
    raise KeyError(name)


CASES = ["rgba png", "rgb + mask", "palette png, transparency", "webp rgba", "avif rgba",
         "animated gif", "bmp + mask", "cmyk jpeg + mask", "16-bit gray png + mask",
         "exif-6 jpeg + mask as shown", "exif-6 square jpeg + mask as shown",
         "exif-6 jpeg + mask of the stored pixels",
         "exif-6 square jpeg + mask of the stored pixels", "large jpeg, decoded downscaled",
         "in pillow's warning zone", "16000x12000", "4000x40 strip",
         "thin after recon.input_size", "noise alpha", "opaque photo, rounded corners, no rembg",
         "opaque photo, rounded corners, rembg", "opaque photo, transparent border",
         "inverted mask", "inverted alpha", "soft-edged alpha", "ball touching all four borders",
         "object cut by the bottom edge", "all-opaque rgba", "0/1 mask", "empty mask",
         "full mask", "folder as the image", "missing file", "1x1 image", "not an image"]


@pytest.mark.parametrize("name", CASES)
def test_photo_is_accepted_right_or_refused_in_one_line(name, tmp_path, monkeypatch):
    case = build(name, tmp_path, monkeypatch)
    cfg = dict(case.cfg)
    fit_size = cfg.pop("fit_size", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = load_input(case.image, case.mask, InputConfig(size=SIZE, **cfg), fit_size)
        except InputError as err:
            out, error = None, str(err)
    assert not caught, [str(w.message) for w in caught]  # no library warning reaches the user
    if case.meant is None:
        assert out is None, f"{name}: accepted, but must be refused"
        assert "\n" not in error and len(error) < 500, error
        for word in case.words:
            assert word in error, (word, error)
        return
    assert out is not None, f"{name}: refused: {error}"
    said = " | ".join(out.notes)
    for word in case.words:
        assert word in said, (word, said)
    if not case.words:
        assert not out.notes, out.notes
    out.save(tmp_path / "input")  # what `rf reconstruct` writes
    monkeypatch.undo()  # Pillow's own limit, for reading it back here
    with Image.open(tmp_path / "input" / "image.png") as im, \
            Image.open(tmp_path / "input" / "mask.png") as m:
        got_rgb = np.asarray(im.convert("RGB"), np.float32) / 255
        got_mask = np.asarray(m, np.float32) / 255
    ref_rgb, ref_mask = reference(*case.meant)
    assert iou(got_mask > 0.5, ref_mask > 0.5) >= 0.98, iou(got_mask > 0.5, ref_mask > 0.5)
    err = np.abs(got_rgb - ref_rgb).mean()
    turned = np.abs(got_rgb - np.rot90(ref_rgb)).mean()
    assert err < case.rgb_tol and err < turned / 3, (err, turned)


def test_notes_reach_the_console_once_as_rf_notes(tmp_path, caplog):
    rgb, mask = scene()
    with caplog.at_level("WARNING"):
        out = load_input(_png(tmp_path / "a.png", rgb), _png(tmp_path / "m.png", 255 - mask),
                         InputConfig(size=SIZE))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"rf: note: {out.notes[0]}"]


def test_permission_denied_as_a_user(tmp_path):
    """Root reads anything: the unreadable file is read as the user nobody (setpriv)."""
    if os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs root and setpriv to read as another user (root reads any file)")
    folder = Path(tempfile.mkdtemp(prefix="rf-perm-"))  # tmp_path's parents are root-only
    try:
        folder.chmod(0o755)
        path = _png(folder / "locked.png", _rgba(*scene()))
        path.chmod(0)
        code = ("from rf_core.input.image_input import load_input, InputError\n"
                f"try:\n    load_input({str(path)!r})\nexcept InputError as e:\n    print(e)")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env={**os.environ, "HOME": "/tmp"})
        if "Permission denied" in proc.stderr and "locked.png" not in proc.stderr:
            pytest.skip(f"the user nobody cannot run this Python: {proc.stderr[-200:]}")
        assert "permission denied" in proc.stdout and "chmod +r" in proc.stdout, proc
        assert "re-save" not in proc.stdout
    finally:
        os.chmod(folder / "locked.png", stat.S_IRUSR | stat.S_IWUSR)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


# ---------------------------------------------------------------------------- rf dataset


def test_dataset_folder_lists_every_file(tmp_path):
    """Every file is an object or skipped with its reason; GIF and AVIF are objects, names keep
    their script and do not collide, and image.jpg + mask.png is one object."""
    rgb, mask = scene()
    _png(tmp_path / "写真.png", _rgba(rgb, mask))
    _png(tmp_path / "画像.png", _rgba(rgb, mask))
    _png(tmp_path / "anim.gif", _rgba(rgb, mask))
    _png(tmp_path / "photo.avif", _rgba(rgb, mask))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("no suffix")
    (tmp_path / "cat").mkdir()
    Image.fromarray(rgb).save(tmp_path / "cat" / "image.jpg")
    _png(tmp_path / "cat" / "mask.png", mask)
    (tmp_path / "two").mkdir()
    _png(tmp_path / "two" / "a.png", rgb)
    _png(tmp_path / "two" / "b.png", rgb)
    objects, bad = read_dataset(tmp_path)
    by_name = {o.name: o for o in objects}
    assert sorted(by_name) == sorted(["写真", "画像", "anim", "photo", "cat"])
    assert by_name["cat"].image.name == "image.jpg" and by_name["cat"].mask.name == "mask.png"
    skipped = {Path(b.where).name: b.error for b in bad if b.skipped}
    assert set(skipped) == {"notes.txt", "README"}
    assert "a .txt file, not an image" in skipped["notes.txt"]
    failed = [b for b in bad if not b.skipped]
    assert [b.name for b in failed] == ["two"] and "image.*" in failed[0].error
    for obj in objects:  # the same reader as `rf reconstruct`
        load_input(obj.image, obj.mask, InputConfig(size=SIZE))


def test_new_nested_out_is_not_created_for_a_bad_photo(tmp_path):
    """`rf reconstruct` with a photo it refuses: one line, exit 2, and no folder left behind."""
    noise = np.random.default_rng(0).integers(1, 256, (64, 96), dtype=np.uint8)
    photo = _png(tmp_path / "noise.png", _rgba(scene()[0], noise))
    out = tmp_path / "new" / "nested" / "run"
    proc = subprocess.run([sys.executable, "-m", "rf_cli.main", "reconstruct", str(photo),
                           "--preset", "tiny", "--out", str(out)], capture_output=True,
                          text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("rf: error: ") and "noise" in lines[-1], proc.stderr
    assert not any("Warning" in line or "Traceback" in line for line in lines), proc.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_large_photos_are_decoded_downscaled(tmp_path, suffix):
    """A photo far larger than rf needs is never kept at full size (JPEG: not even decoded)."""
    from rf_core.input.photo_file import open_photo

    rgb, _ = scene()
    big = np.kron(rgb, np.ones((16, 16, 1), np.uint8))  # 1536x1024
    Image.fromarray(big).save(tmp_path / f"big{suffix}")
    photo = open_photo(tmp_path / f"big{suffix}", work_side=256)
    assert photo.size == (1536, 1024)
    assert 256 <= max(photo.image.size) <= 512, photo.image.size
