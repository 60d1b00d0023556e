"""``rf_bench.prior``: a quick run on the CPU writes an honest report; the SD-1.5-size rows
are measured on a CUDA GPU and marked skipped, with the reason, everywhere else."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rf_bench.prior import COLUMNS, NO_CUDA, SD15, TINY, format_prior_table, run_prior_bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run shared by the tests (and the GPU test, where there is a GPU)."""
    path = tmp_path_factory.mktemp("bench") / "nested" / "b.json"
    # One thread: immune to CPU oversubscription when test files run side by side.
    report = run_prior_bench(json_path=path, quick=True, threads=1)
    return path, report


def _measured(row: dict) -> bool:
    ms = row["ms_per_step"]
    return ms is not None and math.isfinite(ms) and ms > 0


def test_json_written_atomically_and_equal_to_report(quick_run):
    path, report = quick_run
    assert json.loads(path.read_text()) == report
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]  # no temp file left
    assert report["quick"] is True and report["settings"]["batches"] == [1]
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_threads"] == 1
    assert all(list(r) == list(COLUMNS) for r in report["rows"])


def test_tiny_rows_are_measured_on_cpu(quick_run):
    _, report = quick_run
    tiny = [r for r in report["rows"] if r["model"] == TINY]
    assert [(r["op"], r["batch"]) for r in tiny] == [("sds", 1), ("inversion_step", 1)]
    for r in tiny:
        assert (r["device"], r["dtype"], r["attention"]) == ("cpu", "fp32", "sdpa")
        assert _measured(r), r
        assert r["steps_per_s"] == pytest.approx(1e3 / r["ms_per_step"])
        assert r["peak_mem_mb"] is None
    assert report["models"][TINY]["resolution"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report without a GPU")
def test_sd15_rows_skipped_without_cuda(quick_run):
    _, report = quick_run
    sd = [r for r in report["rows"] if r["model"] == SD15]
    assert [(r["attention"], r["op"]) for r in sd] == [
        ("sdpa", "sds"), ("xformers", "sds"), ("sdpa", "inversion_step")]
    for r in sd:
        assert r["note"] == NO_CUDA
        assert r["ms_per_step"] is None and r["steps_per_s"] is None and r["peak_mem_mb"] is None
    assert report["models"][SD15] is None


def test_table_lists_header_and_every_row(quick_run):
    _, report = quick_run
    table = format_prior_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("prior step times: torch ")
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert all(c in lines[header] for c in ("ms/step", "steps/s", "peak MB", "note"))
    body = lines[header + 2:]
    assert len(body) == len(report["rows"])
    for line, r in zip(body, report["rows"], strict=True):
        assert line.split()[:6] == [r["model"], r["device"], r["dtype"], r["attention"],
                                    r["op"], str(r["batch"])]
        assert line.rstrip().endswith(r["note"])
        if r["ms_per_step"] is not None:
            assert f"{r['ms_per_step']:.1f}" in line


def test_table_formats_numbers_and_missing_values():
    env = {"torch": "2.x", "diffusers": "0.x", "xformers": None, "cpu": "cpu", "cpu_threads": 2,
           "cuda_device": "GPU"}
    rows = [{"model": SD15, "device": "cuda", "dtype": "fp16", "attention": "sdpa", "op": "sds",
             "batch": 4, "ms_per_step": 12.5, "steps_per_s": 80.0, "peak_mem_mb": 2048.4,
             "note": "n"},
            {"model": SD15, "device": "cuda", "dtype": "fp16", "attention": "xformers",
             "op": "sds", "batch": 4, "ms_per_step": None, "steps_per_s": None,
             "peak_mem_mb": None, "note": "skipped: why"}]
    table = format_prior_table({"environment": env, "rows": rows})
    measured, skipped = table.splitlines()[-2:]
    assert measured.split()[-4:] == ["12.5", "80.00", "2048", "n"]
    assert skipped.split()[6:9] == ["-", "-", "-"] and skipped.endswith("skipped: why")
    assert "xformers not installed" in table and "cuda: GPU" in table


def test_bad_settings_are_rejected_before_any_work():
    with pytest.raises(ValueError, match="steps >= 1"):
        run_prior_bench(None, steps=0)
    with pytest.raises(ValueError, match="batch sizes"):
        run_prior_bench(None, batches=())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sd15_size_rows_measured_on_cuda(quick_run):
    _, report = quick_run
    params = report["models"][SD15]["parameters"]
    assert params == {"unet": 859520964, "vae": 83653863, "text_encoder": 123060480}
    sd = {(r["attention"], r["op"]): r for r in report["rows"] if r["model"] == SD15}
    for key in (("sdpa", "sds"), ("sdpa", "inversion_step")):
        r = sd[key]
        assert (r["device"], r["dtype"], r["batch"]) == ("cuda", "fp16", 1)
        assert _measured(r), r
        # fp16 weights alone are ~2 GB; activations come on top.
        assert r["peak_mem_mb"] > 2000
    xf = sd[("xformers", "sds")]
    assert _measured(xf) or xf["note"].startswith("skipped: xformers"), xf
