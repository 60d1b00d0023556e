"""`rf reconstruct` / `rf export` / `rf evaluate`: run folders, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rf_cli.main import main
from rf_core.config import preset_names
from rf_core.files.checkpoint import load_checkpoint
from rf_core.fitting.engine import StopAfter
from rf_core.jobs.job_config import load_job_config
from rf_core.jobs.reconstruct_job import reconstruct
from rf_core.progress import quiet
from tests.small_run import SMALL

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "duck.png")


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_presets_build():
    assert {"realfusion", "tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = load_job_config(name)
        assert cfg.recon.steps > 0


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg = load_job_config("tiny", overrides=SMALL)
    with quiet():
        straight = reconstruct(EXAMPLE, None, tmp_path / "a", cfg, learn_embedding=True)
        partial = reconstruct(EXAMPLE, None, tmp_path / "b", cfg, learn_embedding=True,
                              callbacks=[StopAfter(4)])
    assert partial == {"finished": False, "step": 4}
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.partial" / "checkpoint").exists()
    seen = []
    with quiet():
        resumed = reconstruct(EXAMPLE, None, tmp_path / "b", cfg, learn_embedding=True,
                              on_step=lambda step, total, m: seen.append((step, total,
                                                                          "loss/total" in m)))
    assert seen == [(5, 6, True), (6, 6, True)]  # progress reports continue where it resumed
    assert resumed["resumed_from"] == 4 and not (tmp_path / ".b.partial").exists()
    assert resumed["input_psnr"] == straight["input_psnr"]
    a, _ = load_checkpoint(tmp_path / "a" / "checkpoint")
    b, _ = load_checkpoint(tmp_path / "b" / "checkpoint")
    for key in a["field"]:
        assert torch.equal(a["field"][key], b["field"][key]), key
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.yaml", "input", "embedding.safetensors", "checkpoint", "orbit.mp4",
            "orbit.gif", "mesh.glb", "mesh.obj", "metrics.json", "history.jsonl"} <= names


def test_cli_reconstruct_export_evaluate(tmp_path, capsys):
    from rf_core.ground_truth.gt_render import render_gt

    gt = render_gt("pybullet_data:duck.obj", tmp_path / "gt", views=3, size=32)
    emb = tmp_path / "e.safetensors"
    code, _, err = run(["invert", str(gt / "rgb" / "000.png"), "--mask",
                        str(gt / "mask" / "000.png"), "--model", "tiny", "--out", str(emb),
                        "inversion.steps=1", "input.size=64"], capsys)
    assert code == 0, err
    cams = json.loads((gt / "cameras.json").read_text())["frames"][0]
    eye = torch.tensor(cams["c2w"])[:3, 3]
    el = float(torch.rad2deg(torch.asin(eye[2] / eye.norm())))
    az = float(torch.rad2deg(torch.atan2(eye[1], eye[0])))
    out = tmp_path / "run"
    code, stdout, err = run(["reconstruct", str(gt / "rgb" / "000.png"), "--mask",
                             str(gt / "mask" / "000.png"), "--embedding", str(emb),
                             "--preset", "tiny", "--out", str(out), *SMALL,
                             "input.recenter=false", "input.size=32",
                             f"recon.camera.input_elevation={el}",
                             f"recon.camera.input_azimuth={az}"], capsys)
    assert code == 0, err
    assert "input view: PSNR" in stdout and (out / "metrics.json").exists()
    code, stdout, err = run(["export", str(out), "video.frames=3"], capsys)
    assert code == 0, err
    import imageio.v3 as iio

    assert iio.imread(out / "orbit.gif").shape[0] == 3
    code, stdout, err = run(["evaluate", str(out), "--gt", str(gt)], capsys)
    assert code == 0, err
    report = json.loads((out / "evaluation.json").read_text())
    assert [v["index"] for v in report["views"]["views"]] == [1, 2]
    assert 0 <= report["input"]["mask_iou"] <= 1 and "mesh" in report
    assert report["optional"]["lpips"]["available"] is False


@pytest.mark.parametrize("extra, message", [
    (["--preset", "nope", "--invert"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--embedding", "missing.safetensors"], "not found"),
    (["--preset", "tiny"], "pass --embedding FILE"),
    (["--preset", "tiny", "--invert", "recon.stepz=3"], "recon.stepz"),
    (["--preset", "tiny", "--invert", "--model", "nobody/missing"], "not in the local"),
])
def test_reconstruct_bad_input(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code, _, err = run(["reconstruct", EXAMPLE, "--out", str(out), *extra, *SMALL], capsys)
    errors = [line for line in err.splitlines() if line.startswith("rf: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_reconstruct_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, _, err = run(["reconstruct", EXAMPLE, "--preset", "tiny", "--invert", "--out",
                        str(out), *SMALL], capsys)
    assert code == 2 and "--overwrite" in err


def test_bad_photo_leaves_no_run_folder(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "run"
    code, _, err = run(["reconstruct", str(bad), "--preset", "tiny", "--invert", "--out",
                        str(out), *SMALL], capsys)
    assert code == 2 and "rf: error:" in err
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_out_dot_is_the_current_folder_not_an_internal_error(tmp_path, monkeypatch):
    """`--out .` names the folder itself: an existing folder rf did not write, refused in one
    line (it was `ValueError: PosixPath('.') has an empty name`)."""
    from rf_core.errors import OutputExistsError

    monkeypatch.chdir(tmp_path)
    cfg = load_job_config("tiny")
    with pytest.raises(OutputExistsError, match="choose another --out"):
        reconstruct(EXAMPLE, None, Path("."), cfg, learn_embedding=True)
    assert list(tmp_path.iterdir()) == []
