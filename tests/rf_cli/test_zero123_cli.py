"""``rf reconstruct`` with a Zero-1-to-3 prior: a reduced end-to-end run with ``zero123-tiny``,
the bad inputs of issue 24 (a folder missing a component, a pickled ``cc_projection``: one line,
exit 2, nothing written, by the contract of tests/test_bad_inputs.py), and, marked slow, the
full-size ``zero123-random`` under bf16 autocast."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rf_cli.main import main
from rf_core.prior.random_models import MARKER_FILE
from rf_core.prior.zero123_loading import locate_zero123
from rf_core.prior.zero123_random import ZERO123_TINY
from tests.full_size import full_size_precision, read_history, run_reconstruct
from tests.test_bad_inputs import TINY, rf, ws  # noqa: F401  (ws: the shared fixture)

ROOT = Path(__file__).resolve().parents[2]
ZERO123 = ["model.type=zero123", "recon.sds.guidance_scale=3.0"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """``zero123-tiny`` as a plain folder (not marked random), outside the workspace."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RF_CACHE", str(tmp_path_factory.mktemp("cache")))
        built = locate_zero123(ZERO123_TINY)
    folder = tmp_path_factory.mktemp("models") / "zero123"
    shutil.copytree(built, folder)
    (folder / MARKER_FILE).unlink()
    return folder


def test_reconstruct_with_zero123(tmp_path, capsys, tiny_folder):
    out = tmp_path / "run"
    code = main(["reconstruct", str(ROOT / "examples/duck.png"), "--preset", "tiny", "--invert",
                 "--out", str(out), *TINY, *ZERO123, f"model.name={tiny_folder}",
                 "recon.grad_norm_every=2", "log_every=1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "reads no text" in err  # --invert skipped: Zero-1-to-3 reads the photo
    assert not (out / "embedding.safetensors").exists()
    history = read_history(out)
    assert len(history) == 2 and all(row["nonfinite_steps"] == 0 for row in history)
    assert history[-1]["gradnorm/sds"] > 0  # the prior's gradient reaches the field
    assert "type: zero123" in (out / "config.yaml").read_text()


def _bad_folder(tiny_folder: Path, where: Path, break_it) -> Path:
    folder = where / "zero123-bad"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_folder, folder)
    break_it(folder)
    return folder


def _argv(ws, folder):  # noqa: F811
    return ["reconstruct", ws.photo, "--mask", ws.mask, "--preset", "tiny", "--out", ws.out,
            *TINY, *ZERO123, f"model.name={folder}"]


@pytest.mark.parametrize("component", ["unet", "vae", "image_encoder", "cc_projection",
                                       "scheduler"])
def test_folder_missing_a_component(ws, tiny_folder, tmp_path, component):  # noqa: F811
    folder = _bad_folder(tiny_folder, tmp_path, lambda f: shutil.rmtree(f / component))
    line = rf(ws, _argv(ws, folder), f"{component}/")
    assert str(folder) in line and "docs/zero123.md" in line


def test_pickled_cc_projection(ws, tiny_folder, tmp_path):  # noqa: F811
    def pickle_it(folder: Path) -> None:
        (folder / "cc_projection" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(torch.nn.Linear(36, 32), folder / "cc_projection" / "model.bin")

    folder = _bad_folder(tiny_folder, tmp_path, pickle_it)
    line = rf(ws, _argv(ws, folder), "refusing")
    assert "cc_projection" in line and "safetensors" in line


def test_missing_zero123_model(ws, tmp_path):  # noqa: F811
    rf(ws, _argv(ws, tmp_path / "no-such-zero123"), "not found")


@pytest.mark.slow
@pytest.mark.full_size
def test_zero123_random_at_full_size_under_bf16(tmp_path):
    """The full-size architecture (1.25B parameters, 256 px through the VAE encoder and the
    8-channel UNet, CLIP ViT-L/14 at 224 px) in ``rf reconstruct`` for two steps of the
    realfusion preset's field and renders, bf16 autocast for the field and bf16 weights for the
    prior where the CPU computes bf16 in hardware (else fp32, as tests/test_paper_config.py)."""
    precision = full_size_precision()
    out = tmp_path / "run"
    run_reconstruct(
        ["--preset", "realfusion", "--out", str(out), *ZERO123, "model.name=zero123-random",
         f"model.dtype={precision}", f"recon.mixed_precision={precision}", "recon.steps=2",
         "recon.grad_norm_every=2", "log_every=1", "recon.renderer.num_samples=64"],
        timeout=900, label=f"zero123-random, realfusion preset, {precision}, CPU (the model's "
                           "build included on first use)")
    for name in ("orbit.mp4", "mesh.glb", "metrics.json", "config.yaml", "history.jsonl"):
        assert (out / name).is_file(), name
    history = read_history(out)
    assert len(history) == 2 and all(row["nonfinite_steps"] == 0 for row in history)
    assert history[-1]["gradnorm/sds"] > 0 and history[-1]["loss/sds"] > 0
