"""The gpu-check: the tiny CPU configuration runs every part through the real harness (one
child process per part; JSON, Markdown and log rewritten after each) with the packages the
bare GPU machine lacks made unimportable, and without CUDA the commands refuse with one line
unless ``--cpu-smoke`` is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rf_bench.gpu_check import NO_CUDA_MESSAGE, PART_NAMES, parse_pytest_counts

ROOT = Path(__file__).resolve().parents[2]
STATUS_PREFIXES = ("ok", "skipped: ", "failed: ")
LACKING = ("ray", "mlflow", "pybullet", "pybullet_data", "trimesh", "imageio_ffmpeg")
"""What the bare GPU machine has not (tests/test_layering.py: BARE_GPU_MACHINE_LACKS)."""


def _without(tmp_path: Path, names: tuple[str, ...]) -> dict:
    """An environment whose Python processes (the parts' too) cannot import ``names``."""
    site = tmp_path / "block"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_without_ray_mlflow_pybullet_trimesh(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rf_bench.gpu_check", "--cpu-smoke", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=_without(tmp_path, LACKING), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log",
                                                      "gpu_check.md"]
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["benchmark"] == "gpu-check" and saved["cpu_smoke"] is True
    env = saved["environment"]
    for key in ("gpu", "torch_cuda", "torch", "torch_path", "triton", "diffusers", "xformers",
                "tinycudann", "ray"):
        assert key in env
    assert env["ray"] is None or "ray" in LACKING  # blocked, whatever is installed
    assert list(saved["parts"]) == list(PART_NAMES)
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("gpu-check [")]
    assert len(progress) == len(PART_NAMES)
    for name, part in saved["parts"].items():
        assert part["status"].startswith(STATUS_PREFIXES), (name, part)
        assert not part["status"].startswith("failed"), (name, part.get("log_tail"))
        assert 0 < part["wall_s"] <= part["limit_s"] + 15, (name, part)
        assert isinstance(part["numbers"], dict), name
        assert isinstance(part["summary"], str), name
    assert saved["ok"] is True and saved["total_wall_s"] <= saved["budget_s"]
    parts = saved["parts"]
    recon = parts["reconstruct"]["numbers"]
    assert recon["warmup_steps"] == 2 and recon["steady_steps"] == 1
    assert recon["steady_step_ms"] > 0 and recon["nonfinite_steps"] == 0
    assert recon["losses_finite"] is True and recon["estimated_object_gb"] > 0
    inversion = parts["inversion"]["numbers"]["rows"]
    assert [(r["batch_size"], r["grad_accum"]) for r in inversion] == [(4, 1), (1, 4)]
    assert all(r["ms_per_step"] > 0 and r["losses_finite"] for r in inversion)
    sharing = parts["sharing"]["numbers"]["rows"]
    assert [r["trials"] for r in sharing] == [1, 2]
    for row in sharing:
        assert row["finite"] and row["shared"]["requests_per_s"] > 0
        # one batched call answers each request as it would be answered alone (fp32, CPU)
        assert row["max_rel_diff_batched_vs_alone"] < 1e-3
        assert row["weights_mb"]["separate"] == pytest.approx(
            row["trials"] * row["weights_mb"]["shared"], rel=1e-3)
    if not parts["step"]["status"].startswith("skipped"):
        assert {"baseline", "optimised"} <= set(parts["step"]["numbers"]["result"])
    assert parts["hashgrid"]["numbers"]["results"]
    assert parts["attention"]["numbers"]["unet"]["finite"] is True
    counts = parts["pytest"]["numbers"]["counts"]
    assert counts["failed"] == counts["errors"] == 0 and counts["skipped"] >= 1
    table = (out / "gpu_check.md").read_text()
    assert "| # | part | what | status |" in table
    for i, name in enumerate(PART_NAMES, 1):
        assert f"| {i} | {name} | " in table
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name} =====" in log for name in PART_NAMES)


def test_without_cuda_the_command_exits_with_one_line(tmp_path):
    out = tmp_path / "gc.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "rf_cli.main", "bench", "gpu-check", "--json",
                           str(out), "--table", str(tmp_path / "gc.md")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"rf: error: {NO_CUDA_MESSAGE}"], proc.stderr
    assert lines[0].startswith("rf: error: gpu-check needs a CUDA GPU; ")
    assert not out.exists() and not (tmp_path / "gc.md").exists()


def test_the_bare_machine_script_without_cuda_exits_with_one_line(tmp_path):
    """``scripts/gpu_check.sh`` (what ``make gpu-check`` runs) with this Python and Ray,
    MLflow, pybullet and trimesh unimportable: one line, exit 2, nothing written."""
    out = tmp_path / "gc"
    env = {**_without(tmp_path, LACKING), "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"gpu-check: error: {NO_CUDA_MESSAGE}"]
    assert not out.exists()


def test_an_unusable_gpu_is_named_in_the_no_cuda_line(monkeypatch):
    import torch

    from rf_bench import gpu_check
    from rf_core import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "nvidia_gpu_present", lambda: True)
    message = gpu_check.no_cuda_message()
    assert message.startswith("gpu-check needs CUDA: an NVIDIA GPU is present but torch ")
    assert "driver >= 580" in message and "\n" not in message
    with pytest.raises(gpu_check.GPUCheckUnavailable, match="driver >= 580"):
        gpu_check.run_gpu_check("unused.json", None)


def test_the_wheels_script_fetches_wheels_for_the_machines_python():
    text = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    for flag in ("--only-binary=:all:", "--python-version 3.12", "--no-deps",
                 "manylinux2014_x86_64", "diffusers=="):
        assert flag in text
    assert "torch" not in text.split("WHEELS=(", 1)[1].split(")", 1)[0]  # never torch


def test_pytest_summary_counts_are_parsed():
    text = "....s\nFAILED tests/x.py::t\n2 failed, 3 passed, 1 skipped, 9 deselected in 4.2s\n"
    counts = parse_pytest_counts(text)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["deselected"]) \
        == (3, 2, 1, 9)
    assert parse_pytest_counts("1 error in 0.1s")["errors"] == 1
