"""``rf_bench.sharing``: a quick run (tiny model, K=2) in the session's Ray measures
both schemes with finite numbers, shows the server batching, and derives its ratios from its
rows; the GPU part is skipped, with the reason, where there is no CUDA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rf_bench.sharing import NO_CUDA, format_sharing_table, run_sharing_bench

TRIALS, REQUESTS = 2, 4  # quick mode: 4 requests per trial
MEASURED = ("wall_s", "requests_per_s", "latency_s", "total_pss_mb", "total_uss_mb",
            "total_rss_mb", "private_pss_mb")


@pytest.fixture(scope="module")
def quick_run(ray_local, tmp_path_factory):
    """One quick run shared by the tests. A generous batching window: on a busy test machine a
    client's next request may arrive late, and batching must still be visible."""
    path = tmp_path_factory.mktemp("sharing") / "nested" / "b.json"
    report = run_sharing_bench(TRIALS, path, quick=True, max_wait_ms=100.0)
    return path, report


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_reuses_the_running_ray_and_writes_the_report_atomically(quick_run, ray_local):
    path, report = quick_run
    assert ray_local.is_initialized()  # the fixture's Ray was reused, not shut down
    assert json.loads(path.read_text()) == report
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]  # no temp file left
    assert report["benchmark"] == "prior-sharing" and report["quick"] is True
    s = report["settings"]
    assert (s["trials"], s["requests_per_trial"], s["max_batch"]) == (TRIALS, REQUESTS, TRIALS)
    assert s["order"] == "separate first" and "fairness" in s
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["cpus"] >= 1
    model = report["cpu"]["model"]
    assert model["label"] == "tiny" and model["resolution"] == 64
    assert model["total_parameters"] == sum(model["parameters"].values()) > 0


def test_both_schemes_are_measured_with_positive_finite_numbers(quick_run):
    _, report = quick_run
    rows = report["cpu"]["rows"]
    assert [r["scheme"] for r in rows] == ["separate", "shared"]
    for r in rows:
        assert (r["trials"], r["requests"]) == (TRIALS, TRIALS * REQUESTS)
        for key in MEASURED:
            assert _positive(r[key]), (r["scheme"], key, r[key])
        assert r["requests_per_s"] == pytest.approx(r["requests"] / r["wall_s"])
        assert r["total_rss_mb"] >= r["total_pss_mb"] >= r["total_uss_mb"]
        assert r["gpu_mem_mb"] is None
        assert math.isfinite(r["background_cores"]) and r["background_cores"] >= 0
    sep, sha = rows
    assert [p["role"] for p in sep["per_process"]] == ["trial+prior"] * TRIALS
    assert [p["role"] for p in sha["per_process"]] == ["server"] + ["client"] * TRIALS
    assert (sep["processes"], sha["processes"]) == (TRIALS, TRIALS + 1)
    baseline = report["cpu"]["baseline_process"]
    assert all(_positive(baseline[k]) for k in ("pss_mb", "uss_mb", "rss_mb"))


def test_the_server_batched_and_the_separate_priors_did_not(quick_run):
    _, report = quick_run
    sep, sha = report["cpu"]["rows"]
    assert (sep["batches"], sep["mean_batch"]) == (sep["requests"], 1.0)
    assert sha["batches"] < sha["requests"] and sha["mean_batch"] > 1
    # one image per request: images per batch is requests per batch
    assert sha["mean_batch"] == pytest.approx(sha["requests"] / sha["batches"])
    assert sep["server_busy"] is None and 0 < sha["server_busy"] <= 1.05


def test_ratios_and_targets_follow_from_the_rows(quick_run):
    _, report = quick_run
    cpu = report["cpu"]
    sep, sha = cpu["rows"]
    ratios = cpu["ratios"]
    assert ratios["memory_ratio"] == pytest.approx(sha["total_pss_mb"] / sep["total_pss_mb"])
    assert ratios["memory_ratio_private"] == pytest.approx(
        sha["private_pss_mb"] / sep["private_pss_mb"])
    assert ratios["memory_ratio_uss"] == pytest.approx(sha["total_uss_mb"] / sep["total_uss_mb"])
    assert ratios["throughput_ratio"] == pytest.approx(
        sha["requests_per_s"] / sep["requests_per_s"])
    targets = cpu["targets"]
    assert targets["memory_ratio<=0.5"]["met"] == (ratios["memory_ratio"] <= 0.5)
    assert targets["memory_ratio_private<=0.5"]["met"] == (ratios["memory_ratio_private"] <= 0.5)
    assert targets["throughput_ratio>=1.5"]["met"] == (ratios["throughput_ratio"] >= 1.5)


def test_table_shows_both_schemes_and_the_ratios(quick_run):
    _, report = quick_run
    text = format_sharing_table(report)
    lines = text.splitlines()
    assert any(line.startswith("separate ") for line in lines)
    assert any(line.startswith("shared ") for line in lines)
    assert f"throughput {report['cpu']['ratios']['throughput_ratio']:.2f}x" in text
    assert "fairness" in text and "(quick)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report without a GPU")
def test_gpu_part_skipped_without_cuda(quick_run):
    _, report = quick_run
    assert report["gpu"] == {"status": NO_CUDA}
    assert f"GPU: {NO_CUDA}" in format_sharing_table(report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_part_measured_with_cuda(quick_run):
    _, report = quick_run
    gpu = report["gpu"]
    assert "rows" in gpu, gpu["status"]
    assert [r["scheme"] for r in gpu["rows"]] == ["separate", "shared"]
    assert all(_positive(r["requests_per_s"]) for r in gpu["rows"])
    assert gpu["model"]["dtype"] == "float16"


def test_inversion_part_reports_sds_latency_with_and_without_an_inversion(ray_local):
    """``--part inversion``: the three modes measured on one server, percentiles ordered,
    the interleaved inversion really ran, handed the model over and took the steps it is
    owed under load (server options reach the server), ratios from the rows."""
    report = run_sharing_bench(2, None, quick=True, requests_per_trial=4, part="inversion",
                               server_options={"invert_yield_batches": 1})
    assert "cpu" not in report and report["part"] == "inversion"
    part = report["inversion"]
    rows = {r["mode"]: r for r in part["rows"]}
    assert list(rows) == ["none", "interleaved", "blocking"]
    for r in rows.values():
        assert r["requests"] == 2 * 4 and 0 < r["p50_s"] <= r["p95_s"] <= r["max_s"]
    assert rows["none"]["inversion_steps"] == 0
    assert rows["interleaved"]["inversion_steps"] >= 1
    assert rows["blocking"]["inversion_steps"] == part["inversion"]["blocking_steps"]
    assert rows["blocking"]["handovers"] == 0
    # every batch in the way forces a step (invert_yield_batches=1): the guaranteed progress
    assert part["server_options"] == {"invert_yield_batches": 1}
    assert 1 <= rows["interleaved"]["forced_steps"] <= rows["interleaved"]["inversion_steps"]
    assert rows["none"]["forced_steps"] == rows["blocking"]["forced_steps"] == 0
    assert all(r["grace_ms"] > 0 for r in rows.values())
    ratio = part["ratios"]["p95_interleaved/p95_none"]
    assert ratio == pytest.approx(rows["interleaved"]["p95_s"] / rows["none"]["p95_s"])
    assert part["targets"]["p95_interleaved/p95_none<=2"]["met"] == (ratio <= 2)
    text = format_sharing_table(report)
    assert "interleaved" in text and "p95 vs no inversion" in text
