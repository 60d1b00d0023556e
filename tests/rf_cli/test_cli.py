"""One reduced end-to-end run per user-facing command, and the bad-input contract."""

import json
from pathlib import Path

import pytest

from rf_cli.main import main

DUCK = "pybullet_data:duck.obj"


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_render_gt_command(tmp_path, capsys):
    out = tmp_path / "gt"
    code, stdout, _ = run(["render-gt", DUCK, "--out", str(out), "--views", "3", "--size", "24"],
                          capsys)
    assert code == 0 and "wrote 3 views" in stdout
    cams = json.loads((out / "cameras.json").read_text())
    assert len(cams["frames"]) == 3 and cams["width"] == 24
    assert len(list((out / "rgb").glob("*.png"))) == 3


@pytest.mark.parametrize("argv, message", [
    (["render-gt", "missing.obj", "--views", "2"], "not found"),
    (["render-gt", DUCK, "--views", "0"], "views"),
    (["render-gt", DUCK, "--size", "0"], "size"),
])
def test_render_gt_bad_input(tmp_path, capsys, argv, message):
    out = tmp_path / "gt"
    code, _, err = run(argv + ["--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rf: error:") and message in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_bench_multiview_fits_and_reports(tmp_path, capsys):
    js = tmp_path / "mv.json"
    code, stdout, _ = run(["bench", "multiview", DUCK, "--json", str(js), "--size", "32",
                           "--train-views", "12", "--test-views", "2", "--steps", "150",
                           "batch_rays=1024", "renderer.num_samples=64",
                           "field.grid.log2_hashmap_size=14", "--out", str(tmp_path / "renders")],
                          capsys)
    assert code == 0 and "held-out PSNR" in stdout
    r = json.loads(js.read_text())
    assert r["steps"] == 150 and r["size"] == 32
    # a real fit, not a constant: well above the ~11 dB of an empty white image
    assert r["train_subset"]["psnr"] > 20 and r["test"]["psnr"] > 17
    assert r["test"]["mask_iou"] > 0.8
    assert (tmp_path / "renders" / "config.yaml").exists()
    assert len(list((tmp_path / "renders").glob("test_*.png"))) == 2


@pytest.mark.parametrize("extra, message", [
    (["field.grid.bogus=1"], "unknown config key 'field.grid.bogus'"),
    (["--size", "0"], "size must be positive"),
    (["batch_rays=many"], "batch_rays: expected an integer"),
    (["--test-views", "0"], "test_views must be positive"),
])
def test_bench_multiview_bad_config(tmp_path, capsys, extra, message):
    js = tmp_path / "mv.json"
    code, _, err = run(["bench", "multiview", DUCK, "--json", str(js)] + extra, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not js.exists()


def test_bench_multiview_untextured_mesh(tmp_path, capsys):
    obj = tmp_path / "plain.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    code, _, err = run(["bench", "multiview", str(obj), "--steps", "1"], capsys)
    assert code == 2 and "rf: error:" in err and len(err.strip().splitlines()) == 1


EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "realfusion-examples"


def _example_photo(tmp_path) -> tuple[str, str]:
    """The authors' cat photo when ../shared is present, else a synthetic RGB + mask."""
    if (EXAMPLES / "cat_statue").exists():
        return str(EXAMPLES / "cat_statue" / "image.png"), str(EXAMPLES / "cat_statue" / "mask.png")
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    mask = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(img).ellipse((20, 20, 76, 76), fill=(200, 40, 40))
    ImageDraw.Draw(mask).ellipse((20, 20, 76, 76), fill=255)
    img.save(tmp_path / "photo.png")
    mask.save(tmp_path / "mask.png")
    return str(tmp_path / "photo.png"), str(tmp_path / "mask.png")


def test_invert_command_writes_a_loadable_embedding(tmp_path, capsys):
    from safetensors import safe_open

    from rf_core.prior import load_embedding

    image, mask = _example_photo(tmp_path)
    out = tmp_path / "emb" / "cat.safetensors"
    code, stdout, stderr = run(["invert", image, "--mask", mask, "--model", "tiny",
                                "--out", str(out), "inversion.steps=3",
                                "inversion.initializer=cat", "input.size=128"], capsys)
    assert code == 0, stderr
    assert "random weights" in stderr and f"wrote {out}" in stdout
    token, vec = load_embedding(out)
    assert token == "<e>" and vec.shape == (32,)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["random_weights"] == "true" and "steps: 3" in meta["config"]
    assert (out.parent / "cat.input" / "rgba.png").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["cat.input", "cat.safetensors"]


@pytest.mark.parametrize("extra, message", [
    (["--model", "nobody/missing-model"], "not in the local Hugging Face cache"),
    (["--model", "tiny", "inversion.stepz=3"], "inversion.stepz"),
    (["--model", "tiny", "inversion.initializer=two words"], "single-token word"),
])
def test_invert_bad_input(tmp_path, capsys, extra, message):
    image, mask = _example_photo(tmp_path)
    out = tmp_path / "e.safetensors"
    code, _, stderr = run(["invert", image, "--mask", mask, "--out", str(out),
                           "inversion.steps=1", *extra], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("rf: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_invert_needs_a_mask_or_alpha(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "plain.png")
    code, _, stderr = run(["invert", str(tmp_path / "plain.png"), "--model", "tiny",
                           "--out", str(tmp_path / "e.safetensors")], capsys)
    assert code == 2 and "--mask" in stderr


def test_bench_singleview_unknown_prior(tmp_path, capsys):
    out = tmp_path / "sv"
    code, _, err = run(["bench", "singleview", DUCK, "--prior", "bogus", "--out", str(out),
                        "--json", str(tmp_path / "sv.json")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("rf: error:")
    assert "unknown prior 'bogus'" in lines[0] and "oracle" in lines[0]
    assert not out.exists() and not (tmp_path / "sv.json").exists()


def test_bench_singleview_oracle_untextured_mesh(tmp_path, capsys):
    obj = tmp_path / "plain.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    out = tmp_path / "sv"
    code, _, err = run(["bench", "singleview", str(obj), "--prior", "oracle", "--out", str(out)],
                       capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "untextured" in lines[0]
    assert not out.exists()


# The smallest end-to-end run: 3 steps, 32 px GT, tiny renders, video and mesh.
_SMALL = ["--size", "32", "--views", "3", "recon.steps=3", "recon.sds_size=16",
          "recon.input_size=16", "recon.input_rays=256", "recon.renderer.num_samples=16",
          "export.video.frames=2", "export.video.size=16", "export.mesh_resolution=24"]


def test_bench_singleview_oracle_end_to_end(tmp_path, capsys):
    js = tmp_path / "sv.json"
    code, stdout, _ = run(["bench", "singleview", DUCK, "--prior", "oracle", "--out",
                           str(tmp_path / "sv"), "--json", str(js), *_SMALL], capsys)
    assert code == 0 and "prior oracle: held-out PSNR" in stdout
    r = json.loads(js.read_text())
    assert r["prior"] == "oracle" and r["steps"] == 3 and r["oracle"]["calls"] == 3
    assert r["oracle"]["mesh_loads"] == 1
    assert r["heldout_psnr"] > 0 and 0 <= r["heldout_mask_iou"] <= 1 and r["wall_seconds"] > 0
    assert len(r["evaluation"]["views"]["views"]) == 2  # views 1 and 2 held out
    assert any(o.startswith("recon.weights.sds=") for o in r["prior_overrides"])


# ---------------------------------------------------------------------------- unusable GPU
def test_unusable_gpu_is_said_once_with_the_fix(monkeypatch, caplog):
    import torch

    from rf_core import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(precision.GPU_NOTED_ENV, raising=False)
    monkeypatch.setattr(precision, "nvidia_gpu_present", lambda: False)
    assert precision.unusable_gpu_message() is None  # no NVIDIA GPU: nothing to say
    monkeypatch.setattr(precision, "nvidia_gpu_present", lambda: True)
    message = precision.unusable_gpu_message()
    assert "driver >= 580" in message and precision.CUDA12_INSTALL in message
    with caplog.at_level("WARNING", logger="rf_core.precision"):
        for _ in range(3):
            assert precision.resolve_device("auto") == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == [message]
    assert precision.resolve_device("cpu") == torch.device("cpu")


def test_rf_says_an_unusable_gpu_in_one_line_per_command(tmp_path):
    """A real `rf invert` (tiny model) in a fresh interpreter where an NVIDIA GPU is present
    but torch cannot use it: exactly one line, with the fix, though devices resolve often."""
    import os
    import subprocess
    import sys

    image, mask = _example_photo(tmp_path)
    argv = ["invert", image, "--mask", mask, "--model", "tiny", "--out",
            str(tmp_path / "e.safetensors"), "inversion.steps=1", "input.size=64"]
    code = ("import sys, torch\n"
            "from rf_core import precision\n"
            "precision.nvidia_gpu_present = lambda: True\n"
            "torch.cuda.is_available = lambda: False\n"
            "from rf_cli.main import main\n"
            f"codes = [main({argv!r}) for _ in range(2)]\n"  # two commands, one process
            "sys.exit(max(codes))\n")
    env = {k: v for k, v in os.environ.items() if k != "RF_GPU_NOTED"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "NVIDIA GPU is present" in ln]
    assert len(lines) == 2, proc.stderr  # once per command
    assert lines[0].startswith("rf: warning: ") and "driver >= 580" in lines[0]
    assert "TORCH_SPEC=torch==2.13.0+cu126" in lines[0]
