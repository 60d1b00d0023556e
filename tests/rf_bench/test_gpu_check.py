"""``rf bench gpu-check``: the tiny CPU configuration runs every part through the real harness
(one child process per part, JSON and Markdown rewritten after each), and without CUDA the
command refuses with one line unless ``--cpu-smoke`` is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rf_bench.gpu_check import NO_CUDA_MESSAGE, PART_NAMES, parse_pytest_counts, run_gpu_check

STATUS_PREFIXES = ("ok", "skipped: ", "failed: ")


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_the_report(tmp_path):
    json_path, table_path = tmp_path / "out" / "gpu_check.json", tmp_path / "out" / "gpu_check.md"
    lines: list[str] = []
    report = run_gpu_check(json_path, table_path, cpu_smoke=True, log=lines.append)
    saved = json.loads(json_path.read_text())
    assert saved == json.loads(json.dumps(report))  # the file is the returned report
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["gpu_check.json",
                                                                   "gpu_check.md"]
    assert saved["benchmark"] == "gpu-check" and saved["cpu_smoke"] is True
    env = saved["environment"]
    for key in ("gpu", "torch_cuda", "torch", "diffusers", "xformers", "tinycudann"):
        assert key in env
    assert list(saved["parts"]) == list(PART_NAMES) and len(lines) == len(PART_NAMES)
    for name, part in saved["parts"].items():
        assert part["status"].startswith(STATUS_PREFIXES), (name, part)
        assert not part["status"].startswith("failed"), (name, part.get("log_tail"))
        assert 0 < part["wall_s"] <= part["limit_s"] + 15, (name, part)
        assert isinstance(part["numbers"], dict) and part["numbers"], name
        assert isinstance(part["summary"], str), name
    assert saved["ok"] is True and saved["total_wall_s"] <= saved["budget_s"]
    parts = saved["parts"]
    assert parts["reconstruct"]["numbers"]["steps_per_s"] > 0
    assert parts["reconstruct"]["numbers"]["timed_steps"] == 1
    assert parts["hashgrid"]["numbers"]["results"]
    assert parts["attention"]["numbers"]["unet"]["finite"] is True
    assert parts["prior"]["numbers"]["benchmark"] == "prior"
    assert parts["sharing"]["numbers"]["settings"]["trials"] == 2
    counts = parts["pytest"]["numbers"]["counts"]
    assert counts["failed"] == counts["errors"] == 0 and counts["skipped"] >= 1
    table = table_path.read_text()
    assert "| # | part | what | status |" in table
    for i, name in enumerate(PART_NAMES, 1):
        assert f"| {i} | {name} | " in table


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


def test_pytest_summary_counts_are_parsed():
    text = "....s\nFAILED tests/x.py::t\n2 failed, 3 passed, 1 skipped, 9 deselected in 4.2s\n"
    counts = parse_pytest_counts(text)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["deselected"]) \
        == (3, 2, 1, 9)
    assert parse_pytest_counts("1 error in 0.1s")["errors"] == 1
