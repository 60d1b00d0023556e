"""``rf bench step``: the counters it reads count what they claim, and a reduced run writes
baseline and optimised side by side (no timing is asserted: counts only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rf_bench.syncs import SyncCounter
from rf_core.host_sync import to_device, to_host

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["recon.input_size=32", "recon.input_rays=256", "recon.sds_size=16",
         "recon.renderer.occupancy.resolution=16", "recon.renderer.occupancy.warmup_steps=2",
         "recon.renderer.occupancy.update_every=2",
         "recon.renderer.occupancy.density_threshold=8.6", "recon.levels=[0,4,8,2]"]


def test_sync_counter_sees_reads_data_shapes_and_deliberate_reads():
    x = torch.rand(16)
    with SyncCounter("cpu") as syncs:
        x.sum().item()
        float(x[0])
        bool(x[1] > 0.5)
        (x > 0.5).nonzero()
        to_host(x[:3])
        x.tolist()  # invisible to the mode: only deliberate reads go through to_host
        y = to_device(x, "cpu") * 2  # no sync
    assert syncs.by_kind == {"scalar_read": 3, "nonzero": 1, "to_host": 1}
    assert torch.equal(y, x * 2)


def test_sync_counter_on_an_accelerator_ignores_host_tensors():
    """On a CUDA run, reading a CPU tensor (a host-side random draw) is not a sync."""
    with SyncCounter("cuda") as syncs:
        torch.rand(4).sum().item()
        to_host(torch.rand(2))
    assert syncs.total == 0


def test_peak_memory_on_the_cpu_sees_a_block_allocation():
    # In a fresh process: an earlier test may have left freed heap pages (or a raised mmap
    # threshold) that 64 MiB blocks would reuse without growing the resident set.
    code = """
import torch
from rf_bench.syncs import peak_memory
with peak_memory("cpu") as mem:
    a = torch.ones(16 << 20)
    b = a * 2  # another 64 MiB at once
    del a, b
print(mem["bytes"], mem["method"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split(maxsplit=1)
    peak, method = int(out[0]), out[1]
    assert peak >= 96 << 20 and ("profiler" in method or "VmHWM" in method), out


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    from rf_bench.step import run_step_bench

    path = tmp_path_factory.mktemp("step") / "out" / "step.json"
    result = run_step_bench("tiny", "tiny", steps=4, device="cpu", json_path=str(path),
                            overrides=SMALL, steady_from=2, progress=lambda *_: None)
    return path, result


def test_step_bench_writes_both_variants_with_the_issue_keys(step_run):
    path, result = step_run
    on_disk = json.loads(path.read_text())
    for variant in ("baseline", "optimised"):
        for key in ("grid_points_per_step", "warmup_peak_mem_gb", "syncs_per_step", "step_s"):
            assert key in on_disk[variant], (variant, key)
        assert on_disk[variant]["grid_points_per_step"] > 0
        assert on_disk[variant]["warmup_peak_mem_gb"] > 0
        assert on_disk[variant]["unet_calls_per_step"] == 1
    assert "recon.renderer.early_stop_eps=0" in on_disk["baseline"]["overrides"]
    assert on_disk["optimised"]["overrides"] == []
    assert result["ratios"]["grid_points_per_step"] is not None


def test_optimised_step_does_less_work_and_reads_the_device_twice(step_run):
    _, result = step_run
    b, o = result["baseline"], result["optimised"]
    # The seeded occupancy grid bounds the warm-up (the per-sample savings are compared on
    # one field in tests/rf_core/test_render_fast_paths.py: two short runs' fields differ).
    assert o["warmup_grid_points_max"] < 0.5 * b["warmup_grid_points_max"]
    # The renders' sample counts, then the metrics: nothing else waits for the device.
    assert o["syncs_by_kind"] == {"to_host": 2}, o["syncs_by_kind"]
    assert sum(o["syncs_by_site"].values()) == 2 and all(
        "rf_core/" in site for site in o["syncs_by_site"]), o["syncs_by_site"]


def test_step_table_lists_every_quantity(step_run):
    from rf_bench.step import format_step_table

    table = format_step_table(step_run[1])
    for label in ("hash-grid points / step", "normal probes", "host syncs / step",
                  "warm-up peak memory (GB)", "UNet calls / step", "step time (s)"):
        assert label in table
