"""The full-size CLI runs (tests/test_paper_config.py, tests/rf_cli/test_zero123_cli.py): one
``rf reconstruct`` subprocess at SD-1.5 / Zero-1-to-3 size, timed, with its peak memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL_SIZE_EXPORT = ["export.video.frames=2", "export.video.size=64",
                    "export.mesh_resolution=48", "device=cpu", "model.device=cpu"]
"""A short video and a coarse mesh on the CPU: the run's cost stays in the model."""


def full_size_precision() -> str:
    """bf16 where the CPU computes it in hardware, else fp32: an AVX2-only CPU emulates bf16
    (one full-size inversion step took over 17 minutes on one)."""
    from rf_core.precision import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def run_reconstruct(args: list[str], *, timeout: int, label: str) -> subprocess.CompletedProcess:
    """``rf reconstruct examples/duck.png ARGS`` in a subprocess (quiet), asserting exit 0 and
    the random-weights note; prints ``label``, the wall time and the peak RSS of the run."""
    argv = [sys.executable, "-m", "rf_cli.main", "reconstruct", str(ROOT / "examples/duck.png"),
            *args, *FULL_SIZE_EXPORT]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RF_QUIET": "1"})
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"{label}: {seconds:.0f} s, peak RSS {peak_gb:.1f} GB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random weights" in proc.stderr
    return proc


def read_history(out: Path) -> list[dict]:
    """The run's ``history.jsonl`` rows."""
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
