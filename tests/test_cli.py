"""One reduced end-to-end run per user-facing command, and the bad-input contract."""

import json

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
