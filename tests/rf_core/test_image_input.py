import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rf_core.input.image_input import InputConfig, InputError, ProcessedInput, load_input

RED, GREEN = (255, 0, 0), (0, 128, 0)
CAT = Path(__file__).resolve().parents[3] / "shared" / "data" / "realfusion-examples" / "cat_statue"


def scene(w=200, h=100, box=(20, 30, 60, 70), color=RED, bg=GREEN):
    """A coloured rectangle at ``box`` = (x0, y0, x1, y1) on a flat background: rgb and mask."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = bg
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0:x1] = color
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return rgb, mask


def save(tmp_path, name, array_or_image, **kwargs) -> Path:
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(
        array_or_image)
    path = tmp_path / name
    im.save(path, **kwargs)
    return path


def mode_of(path) -> str:
    with Image.open(path) as im:
        return im.mode


def bbox(mask: torch.Tensor, threshold=0.5):
    """(x0, y0, x1, y1) pixel edges of mask [1, S, S] > threshold."""
    ys, xs = torch.nonzero(mask[0] > threshold, as_tuple=True)
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


def assert_box(mask, expected, tol=1):
    assert np.abs(np.array(bbox(mask)) - np.array(expected)).max() <= tol, bbox(mask)


def rgb_plus_mask(tmp_path, **kwargs):
    rgb, mask = scene(**kwargs)
    return save(tmp_path, "rgb.png", rgb), save(tmp_path, "mask.png", mask)


def test_rgba_is_recentred_with_expected_size(tmp_path):
    rgb, mask = scene()
    path = save(tmp_path, "rgba.png", np.dstack([rgb, mask]))
    out = load_input(path, cfg=InputConfig(size=64, fill_ratio=0.5))
    assert out.source == "alpha"
    assert out.rgb.shape == (3, 64, 64) and out.mask.shape == (1, 64, 64)
    assert out.rgb.dtype == out.mask.dtype == torch.float32
    assert_box(out.mask, (16, 16, 48, 48))  # 40 px object -> 0.5 * 64 = 32 px, centred
    assert torch.allclose(out.rgb[:, 32, 32], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(out.rgb[:, 2, 2], torch.ones(3), atol=1e-3)  # green bg -> white
    assert out.mask[0, 32, 32] > 0.999 and out.mask[0, 2, 2] < 1e-3
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1


def test_mask_file_gives_same_result_as_alpha(tmp_path):
    rgb, mask = scene()
    from_alpha = load_input(save(tmp_path, "rgba.png", np.dstack([rgb, mask])))
    from_file = load_input(*rgb_plus_mask(tmp_path))
    assert from_file.source == "mask file"
    assert torch.allclose(from_file.rgb, from_alpha.rgb, atol=1e-5)
    assert torch.allclose(from_file.mask, from_alpha.mask, atol=1e-5)


def test_mask_file_wins_over_alpha_and_hidden_colours_turn_white(tmp_path):
    rgb, alpha = scene(box=(20, 30, 60, 70))
    rgb[30:70, 60:100] = (255, 0, 255)  # garbage colour under alpha = 0
    _, mask = scene(box=(20, 30, 100, 70))  # the mask file also covers the garbage
    image = save(tmp_path, "i.png", np.dstack([rgb, alpha]))
    out = load_input(image, save(tmp_path, "m.png", mask), InputConfig(size=100, fill_ratio=0.8))
    assert out.source == "mask file"
    assert_box(out.mask, (10, 30, 90, 70))  # 80x40 box from the mask file, not 40x40 from alpha
    assert torch.allclose(out.rgb[:, 50, 30], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(out.rgb[:, 50, 70], torch.ones(3), atol=1e-3)


def test_longer_side_of_a_rectangle_fills_ratio(tmp_path):
    out = load_input(*rgb_plus_mask(tmp_path, box=(100, 10, 160, 30)),
                     cfg=InputConfig(size=100, fill_ratio=0.6))
    assert_box(out.mask, (20, 40, 80, 60))  # 60x20 -> 60x20 at scale 1, centred at 50


def test_no_recenter_pads_to_square_and_resizes(tmp_path):
    out = load_input(*rgb_plus_mask(tmp_path), cfg=InputConfig(size=100, recenter=False))
    # 200x100 -> 100x50 placed in rows 25..75; object (20..60, 30..70) -> (10..30, 40..60)
    assert_box(out.mask, (10, 40, 30, 60))
    assert torch.allclose(out.rgb[:, 5, 50], torch.ones(3)) and out.mask[0, 5, 50] == 0


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grayscale_images(tmp_path, mode):
    rgb, mask = scene(color=(90, 90, 90), bg=(200, 200, 200))
    gray = rgb[..., 0]
    if mode == "L":
        out = load_input(save(tmp_path, "g.png", gray), save(tmp_path, "m.png", mask))
    else:
        out = load_input(save(tmp_path, "g.png", Image.fromarray(np.dstack([gray, mask]), "LA")))
    assert out.source == ("mask file" if mode == "L" else "alpha")
    assert torch.allclose(out.rgb[:, 256, 256], torch.full((3,), 90 / 255), atol=1e-3)


@pytest.mark.parametrize("ext, dtype, mode", [("png", np.uint16, "I;16"), ("tif", np.int32, "I")])
def test_16bit_values_scale_to_unit_range(tmp_path, ext, dtype, mode):
    _, mask = scene()
    values = np.full(mask.shape, 1000, dtype)
    values[mask > 0] = 50000  # 0.76295..., between two 8-bit levels
    path = save(tmp_path, f"deep.{ext}", values)
    assert mode_of(path) == mode
    out = load_input(path, save(tmp_path, "m.png", mask))
    assert abs(out.rgb[0, 256, 256].item() - 50000 / 65535) < 1e-4
    assert torch.allclose(out.rgb[:, 256, 256], out.rgb[0, 256, 256].expand(3))


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images(tmp_path, transparent):
    _, mask = scene()
    im = Image.frombytes("P", (200, 100), (mask // 255).astype(np.uint8).tobytes())
    im.putpalette([0, 128, 0, 255, 0, 0])
    kwargs = {"transparency": 0} if transparent else {}
    path = save(tmp_path, "p.png", im, **kwargs)
    assert mode_of(path) == "P"
    mask_path = None if transparent else save(tmp_path, "m.png", mask)
    out = load_input(path, mask_path, cfg=InputConfig(size=64, fill_ratio=0.5))
    assert out.source == ("alpha" if transparent else "mask file")
    assert_box(out.mask, (16, 16, 48, 48))
    assert torch.allclose(out.rgb[:, 32, 32], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)


def test_cmyk_jpeg(tmp_path):
    rgb, mask = scene()
    path = save(tmp_path, "c.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    assert mode_of(path) == "CMYK"
    out = load_input(path, save(tmp_path, "m.png", mask))
    assert torch.allclose(out.rgb[:, 256, 256], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)


def jpeg_rotated(tmp_path, name, array) -> Path:
    """Save ``array`` as a JPEG tagged Orientation=6 (displayed rotated 90 degrees clockwise)."""
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = 6
    return save(tmp_path, name, im, exif=exif, quality=95)


def test_exif_orientation_rotates_image(tmp_path):
    raw = np.zeros((40, 60, 3), np.uint8)  # stored 60 wide, 40 tall: red left, blue right
    raw[:, :30] = RED
    raw[:, 30:] = (0, 0, 255)
    mask = np.zeros((60, 40), np.uint8)  # upright: 40 wide, 60 tall
    mask[2:-2, 2:-2] = 255
    out = load_input(jpeg_rotated(tmp_path, "r.jpg", raw), save(tmp_path, "m.png", mask),
                     cfg=InputConfig(size=60, recenter=False))
    # rotated 90 degrees clockwise, the left (red) half is on top
    assert torch.allclose(out.rgb[:, 15, 30], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)
    assert torch.allclose(out.rgb[:, 45, 30], torch.tensor([0.0, 0.0, 1.0]), atol=0.05)


def test_exif_orientation_rotates_mask_file(tmp_path):
    rgb = np.full((60, 40, 3), 128, np.uint8)  # upright image, 40 wide, 60 tall
    raw_mask = np.zeros((40, 60), np.uint8)  # stored rotated; its left half becomes the top
    raw_mask[5:35, 5:30] = 255
    out = load_input(save(tmp_path, "i.png", rgb), jpeg_rotated(tmp_path, "m.jpg", raw_mask),
                     cfg=InputConfig(size=60, recenter=False))
    assert_box(out.mask, (15, 5, 45, 30), tol=2)  # 10 px padding left and right


def test_mask_with_matching_aspect_is_resized(tmp_path):
    rgb, mask = scene()
    half = np.asarray(Image.fromarray(mask).resize((100, 50), Image.Resampling.NEAREST))
    full = load_input(save(tmp_path, "i.png", rgb), save(tmp_path, "m.png", mask))
    out = load_input(save(tmp_path, "i.png", rgb), save(tmp_path, "h.png", half))
    assert torch.allclose(out.mask, full.mask) and torch.allclose(out.rgb, full.rgb)


def test_mask_file_modes_are_binarised(tmp_path):
    rgb, mask = scene()
    soft = (mask > 0) * 200 + (mask == 0) * 100  # 0.78 object, 0.39 background
    ref = load_input(save(tmp_path, "i.png", rgb), save(tmp_path, "m.png", mask))
    masks = {
        "soft.png": soft.astype(np.uint8),
        "rgb.png": np.repeat(mask[..., None], 3, axis=-1),
        "deep.png": mask.astype(np.uint16) * 257,
        "alpha.png": np.dstack([np.zeros((100, 200, 3), np.uint8), mask]),
    }
    for name, array in masks.items():
        out = load_input(save(tmp_path, "i.png", rgb), save(tmp_path, name, array))
        assert torch.equal(out.mask, ref.mask), name
    one_bit = save(tmp_path, "bits.png", Image.fromarray(mask).convert("1"))
    assert torch.equal(load_input(tmp_path / "i.png", one_bit).mask, ref.mask)


def test_opaque_alpha_is_not_a_mask(tmp_path):
    rgb, _ = scene()
    path = save(tmp_path, "o.png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    with pytest.raises(InputError, match="alpha channel is fully opaque"):
        load_input(path, cfg=InputConfig(remove_background="never"))


def test_rembg_is_used_when_available(tmp_path, monkeypatch):
    rgb, mask = scene()

    def remove(im):
        assert im.mode == "RGB" and im.size == (200, 100)
        return Image.fromarray(np.dstack([np.asarray(im), mask]))

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=remove))
    out = load_input(save(tmp_path, "i.png", rgb), cfg=InputConfig(size=64, fill_ratio=0.5))
    assert out.source == "rembg"
    assert_box(out.mask, (16, 16, 48, 48))


def test_rembg_failure_is_an_input_error(tmp_path, monkeypatch):
    def remove(im):
        raise RuntimeError("cannot download\nu2net.onnx")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=remove))
    with pytest.raises(InputError, match="rembg failed") as e:
        load_input(save(tmp_path, "i.png", scene()[0]))
    assert "\n" not in str(e.value) and "--mask" in str(e.value)


def test_rembg_without_its_model_and_network_says_how_to_get_it(tmp_path, monkeypatch):
    """rembg 2.0.86 offline raises requests' ConnectionError naming the GitHub release URL
    (seen for real with `pip install -e .[rembg]` on a machine without internet)."""
    class ConnectionError(OSError):  # noqa: A001 - the class name is what rf recognises
        pass

    def remove(im):
        raise ConnectionError("HTTPSConnectionPool(host='github.com', port=443): Max retries "
                              "exceeded with url: /danielgatis/rembg/releases/download/v0.0.0/"
                              "bria-rmbg-2.0.onnx")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=remove))
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.setenv("REMBG_HOME", "/models/rembg")
    with pytest.raises(InputError, match="could not download its segmentation model") as e:
        load_input(save(tmp_path, "i.png", scene()[0]))
    text = str(e.value)
    assert "\n" not in text and "/models/rembg" in text and "--mask" in text


def error_cases(tmp_path):
    """name -> (call, words the message must contain)."""
    rgb, mask = scene()
    image = save(tmp_path, "i.png", rgb)
    (tmp_path / "junk.png").write_bytes(b"not an image at all\n" * 10)
    whole = (tmp_path / "i.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    empty = save(tmp_path, "empty.png", np.zeros_like(mask))
    full = save(tmp_path, "full.png", np.full_like(mask, 255))
    odd = save(tmp_path, "odd.png", np.zeros((100, 150), np.uint8))
    tiny = save(tmp_path, "tiny.png", np.dstack([rgb, mask])[:20, :20])
    return {
        "missing": (lambda: load_input(tmp_path / "nope.png"), ["not found", "nope.png"]),
        "directory": (lambda: load_input(tmp_path), ["is a folder", "rf dataset"]),
        "0/1 mask": (lambda: load_input(image, save(tmp_path, "01.png", (mask > 0).astype(
            np.uint8))), ["only the values 0 and 1", "255"]),
        "missing mask": (lambda: load_input(image, tmp_path / "m.png"), ["mask", "not found"]),
        "corrupt": (lambda: load_input(tmp_path / "junk.png", empty), ["cannot read", "junk.png"]),
        "truncated": (lambda: load_input(tmp_path / "cut.png", empty), ["cannot read", "cut.png"]),
        "tiny": (lambda: load_input(tiny), ["20x20", "min_size=32"]),
        "huge": (lambda: load_input(tmp_path / "cut.png", cfg=InputConfig(max_pixels=10_000)),
                 ["20000 pixels", "max_pixels=10000"]),  # rejected before decoding
        "empty mask": (lambda: load_input(image, empty), ["empty", "mask file"]),
        "full mask": (lambda: load_input(image, full), ["covers the whole image", "real object"]),
        "aspect": (lambda: load_input(image, odd), ["150x100", "200x100", "aspect ratio"]),
        "never": (lambda: load_input(image, cfg=InputConfig(remove_background="never")),
                  ["no alpha channel", "--mask"]),
        "no rembg": (lambda: load_input(image),
                     ["rembg is not installed", "pip install -e .[rembg]"]),
        "load folder": (lambda: ProcessedInput.load(tmp_path / "none"), ["image", "not found"]),
    }


CASES = ["missing", "directory", "missing mask", "corrupt", "truncated", "tiny", "huge",
         "empty mask", "full mask", "aspect", "never", "no rembg", "load folder"]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_and_name_the_problem(tmp_path, monkeypatch, case):
    monkeypatch.setitem(sys.modules, "rembg", None)  # as if not installed: import fails
    call, words = error_cases(tmp_path)[case]
    with pytest.raises(InputError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and not isinstance(e.value, OSError)
    for word in words:
        assert word in message, (word, message)


def test_config_is_validated():
    for bad in [{"size": 0}, {"fill_ratio": 1.5}, {"remove_background": "sam"},
                {"mask_threshold": 1.0}]:
        with pytest.raises(ValueError):
            InputConfig(**bad)


def test_save_load_round_trip(tmp_path):
    out = load_input(*rgb_plus_mask(tmp_path), cfg=InputConfig(size=48))
    out.save(tmp_path / "prep")
    names = sorted(p.name for p in (tmp_path / "prep").iterdir())
    assert names == ["image.png", "mask.png", "rgba.png"]  # no temporary files left
    with Image.open(tmp_path / "prep" / "rgba.png") as rgba, \
            Image.open(tmp_path / "prep" / "mask.png") as mask:
        assert rgba.mode == "RGBA" and rgba.size == (48, 48)
        assert np.array_equal(np.asarray(rgba)[..., 3], np.asarray(mask))
    back = ProcessedInput.load(tmp_path / "prep")
    assert back.source == "mask file"
    assert torch.allclose(back.rgb, out.rgb, atol=0.5 / 255 + 1e-6)
    assert torch.allclose(back.mask, out.mask, atol=0.5 / 255 + 1e-6)


def test_cat_statue_example():
    if not CAT.is_dir():
        pytest.skip(f"{CAT} is absent")
    cfg = InputConfig(size=128)
    from_mask = load_input(CAT / "image.png", CAT / "mask.png", cfg)
    from_rgba = load_input(CAT / "rgba.png", cfg=cfg)
    assert from_mask.source == "mask file" and from_rgba.source == "alpha"
    for out in (from_mask, from_rgba):
        x0, y0, x1, y1 = bbox(out.mask)
        assert abs(max(x1 - x0, y1 - y0) - 0.7 * 128) <= 2
        assert abs((x0 + x1) / 2 - 64) <= 2 and abs((y0 + y1) / 2 - 64) <= 2
        assert torch.allclose(out.rgb[:, 0, 0], torch.ones(3), atol=1e-3)
    a, b = from_mask.mask[0] > 0.5, from_rgba.mask[0] > 0.5
    assert (a & b).sum() / (a | b).sum() > 0.9


def test_unreadable_image_says_permission_denied(tmp_path, monkeypatch):
    """Not "re-save it as PNG": the file is fine, the user cannot read it (root reads anything,
    so the denial is simulated)."""
    path = tmp_path / "locked.png"
    Image.new("RGBA", (64, 64)).save(path)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(InputError, match="permission denied.*chmod"):
        load_input(path)
