"""The configuration users run, at full size on the CPU: ``--preset realfusion`` with a
Stable-Diffusion-1.5-sized model (random weights) under bf16 autocast, end to end.

bf16 runs where the CPU computes it in hardware (AVX512-BF16 or AMX). An AVX2-only CPU emulates
bf16 (one inversion step took over 17 minutes on such a CI machine), so there the same run is
made in fp32; the mixed-precision code paths are then covered by ``rf_core/test_precision.py``
(CPU autocast with the tiny model), and the full-size shapes, memory and pipeline by this test.

Same shapes, compute and dtypes as a real run (512 px SDS through the full VAE, UNet and
CLIP-L text encoder; 96 px renders upsampled; the 128 px input view), cut to one inversion
step and two reconstruction steps, a short video and a coarse mesh.
"""

from __future__ import annotations

import json

import pytest

from tests.full_size import full_size_precision, read_history, run_reconstruct


@pytest.mark.slow
@pytest.mark.full_size
def test_realfusion_preset_at_full_size_under_bf16(tmp_path):
    precision = full_size_precision()
    out = tmp_path / "run"
    run_reconstruct(
        ["--model", "sd15-random", "--preset", "realfusion", "--invert", "--initializer", "duck",
         "--out", str(out), "inversion.steps=1", "inversion.grad_accum=1", "recon.steps=2",
         f"recon.mixed_precision={precision}", f"inversion.mixed_precision={precision}",
         # per-term gradient norms (one backward per loss term) at the asserted step only
         "recon.grad_norm_every=2", "log_every=1"],
        # The preset's own 256 samples per ray: the occupancy grid seeded from the blob
        # bounds the warm-up (it reached 23.9 GB on a 24 GB machine before).
        timeout=1500, label=f"realfusion preset, sd15-random, {precision}, CPU")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 if "steps" in metrics else True
    for name in ("orbit.mp4", "orbit.gif", "mesh.glb", "mesh.obj", "mesh_preview.png",
                 "embedding.safetensors",
                 "config.yaml", "history.jsonl"):
        assert (out / name).is_file(), name
    config = (out / "config.yaml").read_text()
    assert "sds_size: 96" in config and "input_size: 128" in config
    history = read_history(out)
    assert len(history) == 2 and all(row["nonfinite_steps"] == 0 for row in history)
    norms = {k: v for k, v in history[-1].items() if k.startswith("gradnorm/")}
    print("gradient norms on the field at step 1:", json.dumps(norms))
    assert norms["gradnorm/sds"] > 0 and norms["gradnorm/rgb"] > 0
