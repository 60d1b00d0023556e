"""gpu-check parts 3 to 6, the pipeline: ``Reconstructor`` steps of the realfusion preset, the
prior benchmark, prior sharing and ``pytest -m gpu``. Each ``part_*(smoke, deadline)``
returns ``{"status", "summary", "numbers"}``; ``rf_bench.gpu_check`` runs them."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import torch

from rf_bench.common import LOG_TAIL_CHARS, REPO_ROOT, fmt, megabytes, part_device, sync

__all__ = ["SMOKE_RECON", "parse_pytest_counts", "part_prior", "part_pytest", "part_reconstruct",
           "part_sharing"]


# ---------------------------------------------------------------------------- 3. reconstruct
SMOKE_RECON = ["recon.input_size=24", "recon.input_rays=256", "recon.sds_size=16",
               "recon.renderer.num_samples=24", "recon.renderer.occupancy.resolution=16",
               "recon.field.grid.n_levels=4", "recon.field.grid.log2_hashmap_size=12",
               "recon.levels=[0,2,4,4]", "recon.grad_norm_every=0"]


def _sd15_prior(cfg_model, device: torch.device):
    """(prior, how it was made): ``sd15-random`` through ``load_components`` when registered,
    else SD 1.5's architecture built in memory (``sd15_sized_components``)."""
    from rf_core.prior import StableDiffusionPrior

    try:
        from rf_core.prior.random_models import RANDOM_MODELS
        registered = "sd15-random" in RANDOM_MODELS
    except ImportError:
        registered = False
    if registered:
        return StableDiffusionPrior(cfg_model), "sd15-random via load_components"
    from rf_core.prior.attention import resolve_attention
    from rf_core.prior.random_models import sd15_sized_components

    attention = resolve_attention(cfg_model.attention, device)
    sd = sd15_sized_components(device, torch.float16, attention, name="sd15-size")
    return (StableDiffusionPrior(sd), "NOTE: sd15-random is not a registered model name here; "
            "fell back to rf_core.prior.random_models.sd15_sized_components (same "
            "architecture)")


def part_reconstruct(smoke: bool, deadline: float) -> dict:
    """A few ``Reconstructor`` steps under the realfusion preset: steps/s and peak memory."""
    from rf_bench.prior import synthetic_photo
    from rf_core.prior import StableDiffusionPrior
    from rf_core.reconstruct import Reconstructor
    from rf_core.reconstruct_job import load_job_config

    device = part_device(smoke)
    if smoke:
        overrides = ["model.name=tiny", "model.dtype=fp32", "model.device=cpu", *SMOKE_RECON]
        max_steps = 1
    else:
        overrides = ["model.name=sd15-random", "model.dtype=fp16", "model.device=cuda"]
        max_steps = 20
    cfg = load_job_config("realfusion", overrides=overrides)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    if smoke:
        prior, source = StableDiffusionPrior(cfg.model), "tiny via load_components (cpu smoke)"
    else:
        prior, source = _sd15_prior(cfg.model, device)
    load_s = time.perf_counter() - t0
    model_bytes = torch.cuda.memory_allocated(device) if cuda else None
    token = cfg.recon.prompt.token
    rows = prior.sd.text_encoder.get_input_embeddings().weight
    prior.register_embedding(token, rows.detach().float().mean(0).to(rows.dtype))
    rgb, mask = synthetic_photo(cfg.recon.input_size)
    recon = Reconstructor(cfg.recon, rgb, mask, prior, device=device)
    t0 = time.perf_counter()
    recon.step()  # warm-up: kernel selection, autotuning, allocator growth
    sync(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, metrics = [], {}
    step_budget = 0.8 * (deadline - time.monotonic())
    start = time.perf_counter()
    while len(times) < max_steps and (not times or time.perf_counter() - start < step_budget
                                      - 2 * times[-1]):
        t = time.perf_counter()
        metrics = recon.step()
        sync(device)
        times.append(time.perf_counter() - t)
    total = sum(times)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    finite = all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/"))
    numbers = {"model": source, "device": device.type, "dtype": str(prior.sd.dtype),
               "attention": prior.sd.attention, "hashgrid_backend": recon.field.encoding.backend,
               "mixed_precision": str(recon.amp_dtype), "overrides": overrides,
               "load_s": load_s, "warmup_step_s": warmup_s, "timed_steps": len(times),
               "steps_per_s": len(times) / total, "median_step_ms":
               sorted(times)[len(times) // 2] * 1e3, "step_ms": [x * 1e3 for x in times],
               "model_mem_mb": megabytes(model_bytes), "peak_mem_mb": megabytes(peak),
               "losses_finite": finite,
               "last_losses": {k: v for k, v in metrics.items() if k.startswith("loss/")},
               "note": "steps 1.. of the preset: albedo phase; occupancy grid still warming up"
                       " (its first update is at step 16)"}
    summary = (f"{numbers['steps_per_s']:.2f} steps/s over {len(times)} steps after warm-up, "
               f"peak {fmt(numbers['peak_mem_mb'], '.0f')} MB; {prior.sd.attention}, grid "
               f"{numbers['hashgrid_backend']}, load {load_s:.0f} s")
    if source.startswith("NOTE"):
        summary += "; " + source
    status = "ok" if finite else "failed: non-finite losses in the timed steps"
    return {"status": status, "summary": summary, "numbers": numbers}


# ---------------------------------------------------------------------------- 4. prior bench
def part_prior(smoke: bool, deadline: float) -> dict:
    """``run_prior_bench`` (what ``rf bench prior`` calls) at batch 1/4/8."""
    from rf_bench.prior import SD15, run_prior_bench

    if smoke:
        report = run_prior_bench(None, steps=1, warmup=0, batches=(1,), inversion_steps=1,
                                 gpu=False)
    else:
        report = run_prior_bench(None, steps=5, warmup=2, batches=(1, 4, 8), inversion_steps=2)
    rows = report["rows"]
    failed = [r for r in rows if r["note"].startswith("failed")]
    model = "tiny" if smoke else SD15
    parts = []
    for attention in ("sdpa", "xformers"):
        sds = [r for r in rows if r["model"] == model and r["attention"] == attention
               and r["op"] == "sds" and r["ms_per_step"] is not None]
        if sds:
            parts.append(f"{attention} " + "/".join(f"{r['ms_per_step']:.0f}" for r in sds))
    batches = "/".join(str(b) for b in report["settings"]["batches"])
    inv = [r for r in rows if r["model"] == model and r["op"] == "inversion_step"
           and r["ms_per_step"] is not None]
    summary = f"{model} SDS ms/step at batch {batches}: {', '.join(parts) or 'none measured'}"
    if inv:
        summary += f"; inversion {inv[0]['ms_per_step']:.0f} ms/step"
    peaks = [r["peak_mem_mb"] for r in rows if r["peak_mem_mb"] is not None]
    if peaks:
        summary += f"; peak {max(peaks):.0f} MB"
    status = (f"failed: {len(failed)} row(s): {failed[0]['note']}" if failed else "ok")
    return {"status": status, "summary": summary, "numbers": report}


# ---------------------------------------------------------------------------- 5. sharing
def part_sharing(smoke: bool, deadline: float) -> dict:
    """``run_sharing_bench`` (``rf bench prior-sharing``) with K = 8 (smoke: K = 2, tiny)."""
    # Imported here, so only this part's child process imports Ray.
    from rf_bench.sharing import run_sharing_bench

    if smoke:
        report = run_sharing_bench(2, None, quick=True, requests_per_trial=2, gpu=False)
    else:
        report = run_sharing_bench(8, None, requests_per_trial=8)
    gpu, cpu = report["gpu"], report["cpu"]
    summary = (f"CPU K={report['settings']['trials']} ({cpu['model']['label']}): memory "
               f"{cpu['ratios']['memory_ratio']:.2f}x, throughput "
               f"{cpu['ratios']['throughput_ratio']:.2f}x shared/separate")
    if "rows" in gpu:
        sep, sha = gpu["rows"]
        summary = (f"GPU K={sha['trials']} ({gpu['model']['label']}): throughput "
                   f"{gpu['ratios']['throughput_ratio']:.2f}x ({sep['requests_per_s']:.1f} -> "
                   f"{sha['requests_per_s']:.1f} req/s), GPU memory "
                   f"{fmt(sep['gpu_mem_mb'], '.0f')} -> {fmt(sha['gpu_mem_mb'], '.0f')} MB; "
                   + summary)
        status = "ok"
    elif smoke:
        status = "ok"
        summary += f"; GPU part: {gpu['status']} (cpu smoke)"
    else:
        gs = gpu["status"]
        status = gs if gs.startswith(("failed", "skipped")) else f"failed: {gs}"
    return {"status": status, "summary": summary, "numbers": report}


# ---------------------------------------------------------------------------- 6. pytest
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def parse_pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 2 skipped, 9 deselected in 4.1s")."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0,
              "xfailed": 0, "xpassed": 0}
    lines = [ln for ln in text.splitlines() if _COUNT.search(ln) and " in " in ln]
    for value, key in _COUNT.findall(lines[-1] if lines else ""):
        counts["errors" if key.startswith("error") else key] = int(value)
    return counts


def part_pytest(smoke: bool, deadline: float) -> dict:
    """``pytest -m gpu -q`` as a subprocess with a timeout (smoke: one test file, all skip)."""
    if not (REPO_ROOT / "tests").is_dir():
        return {"status": f"skipped: no tests/ folder beside {REPO_ROOT / 'rf_core'}",
                "summary": "", "numbers": {}}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if smoke:
        cmd.append("tests/rf_core/test_encoding.py")
    timeout = max(5.0, deadline - time.monotonic() - 3)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else \
            (err.stdout or "")
        rc = None
    counts = parse_pytest_counts(output)
    problems = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    numbers = {"command": " ".join(cmd[1:]), "returncode": rc, "counts": counts,
               "failures": problems[:30], "seconds": time.perf_counter() - t0,
               "output_tail": output[-LOG_TAIL_CHARS:]}
    c = counts
    summary = (f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
               f"{c['skipped']} skipped, {c['deselected']} deselected")
    if rc is None:
        status = f"failed: pytest -m gpu timed out after {timeout:.0f} s"
    elif rc == 5:
        status = "skipped: no test marked gpu was collected"
    elif rc != 0 or c["failed"] or c["errors"]:
        first = problems[0] if problems else output.strip().splitlines()[-1:]
        status = f"failed: {c['failed']} failed, {c['errors']} errors; {first}"
    else:
        status = "ok"
    return {"status": status[:400], "summary": summary, "numbers": numbers}
