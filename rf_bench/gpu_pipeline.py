"""gpu-check parts 3 to 7, the pipeline: ``Reconstructor`` steps of the realfusion preset,
textual inversion at batch 4, prior sharing in one process, ``rf bench step`` and
``pytest -m gpu``. Each ``part_*(smoke, deadline)`` returns ``{"status", "summary",
"numbers"}``; ``rf_bench.gpu_check`` runs them, each in its own process.

None of them imports Ray, MLflow, pybullet or trimesh: the bare GPU machine has none of them.
The SD-1.5-size prior is ``sd15-random``'s seeded random weights built in memory straight on
the GPU (``sd15_sized_components``): nothing is written to disk, and its build takes seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import re
import statistics
import subprocess
import sys
import time

import torch

from rf_bench.common import LOG_TAIL_CHARS, REPO_ROOT, fmt, megabytes, part_device, sync

__all__ = ["SMOKE_RECON", "STEADY_AFTER", "parse_pytest_counts", "part_inversion",
           "part_pytest", "part_reconstruct", "part_sharing", "part_step"]

SMOKE_RECON = ["recon.input_size=24", "recon.input_rays=256", "recon.sds_size=16",
               "recon.renderer.num_samples=24", "recon.renderer.occupancy.resolution=16",
               "recon.field.grid.n_levels=4", "recon.field.grid.log2_hashmap_size=12",
               "recon.levels=[0,2,4,4]", "recon.grad_norm_every=0"]
STEADY_AFTER = 50
"""Steps before the steady state (the issue's definition): the occupancy grid's warm-up
(first update at step 16) and the allocator's growth are over by then."""
SHARING_RENDER = 64
"""Side of each sharing request's render (RealFusion's training renders; as
``rf bench prior-sharing``)."""
TOKEN = "<e>"


def _sd15(device: torch.device):
    """``sd15-random``'s architecture and weights at fp16 on ``device``, as a prior."""
    from rf_core.prior import StableDiffusionPrior
    from rf_core.prior.attention import resolve_attention
    from rf_core.prior.random_models import sd15_sized_components

    attention = resolve_attention("auto", str(device))
    return StableDiffusionPrior(sd15_sized_components(device, torch.float16, attention,
                                                      name="sd15-random"))


def _tiny():
    from rf_core.prior import ModelConfig, StableDiffusionPrior

    return StableDiffusionPrior(ModelConfig(name="tiny", device="cpu", dtype="fp32",
                                            attention="sdpa"))


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _register_mean_token(prior, token: str = TOKEN) -> None:
    rows = prior.sd.text_encoder.get_input_embeddings().weight
    prior.register_embedding(token, rows.detach().float().mean(0).to(rows.dtype))


def _time_left(deadline: float) -> float:
    return deadline - time.monotonic()


# ---------------------------------------------------------------------------- 3. reconstruct
def _counters(metrics: dict) -> dict[str, float]:
    """The step's silent-failure counters, whatever the reconstructor names them: non-finite
    SDS values, skipped steps, the loss scale."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and any(w in k for w in ("nonfinite", "skipped",
                                                                    "scale"))}


def part_reconstruct(smoke: bool, deadline: float) -> dict:
    """``Reconstructor`` steps of the realfusion preset with sd15-random at fp16: the warm-up
    (steps 1..50: time, peak memory), then the steady state after step 50 (step time, peak
    memory), the GradScaler's scale and the non-finite counts."""
    from rf_bench.prior import synthetic_photo
    from rf_core.fitting.reconstruct import Reconstructor
    from rf_core.jobs.job_config import load_job_config
    from rf_distributed.placement import object_memory_estimate

    device = part_device(smoke)
    if smoke:
        overrides = ["model.name=tiny", "model.dtype=fp32", "model.device=cpu", *SMOKE_RECON]
        steady_after, steady_steps = 2, 1
    else:
        overrides = ["model.name=sd15-random", "model.dtype=fp16", "model.device=cuda",
                     "recon.mixed_precision=fp16"]
        steady_after, steady_steps = STEADY_AFTER, 20
    cfg = load_job_config("realfusion", overrides=overrides)
    t0 = time.perf_counter()
    prior = _tiny() if smoke else _sd15(device)
    load_s = time.perf_counter() - t0
    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    _register_mean_token(prior, cfg.recon.prompt.token)
    rgb, mask = synthetic_photo(cfg.recon.input_size)
    recon = Reconstructor(cfg.recon, rgb, mask, prior, device=device)
    _reset_peak(device)
    warm, steady, counters, metrics = [], [], {}, {}
    stopped = ""
    while len(warm) + len(steady) < steady_after + steady_steps:
        last = (steady or warm or [0.0])[-1]
        if warm and _time_left(deadline) < 3 * last + 5:
            stopped = f"stopped at step {len(warm) + len(steady)}: the part's time ran out"
            break
        t = time.perf_counter()
        metrics = recon.step()
        sync(device)
        (warm if len(warm) < steady_after else steady).append(time.perf_counter() - t)
        for k, v in _counters(metrics).items():
            counters[k] = counters.get(k, 0.0) + v if "scale" not in k else v
        if len(warm) == steady_after and not steady:
            warm_peak = _peak(device)
            _reset_peak(device)
    if not steady:
        warm_peak = _peak(device)
    steady_peak = _peak(device) if steady else None
    finite = all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/"))
    scale = float(recon.scaler.get_scale()) if recon.scaler.is_enabled() else None
    estimate = object_memory_estimate(cfg)
    numbers = {
        "model": "sd15-random weights built in memory" if not smoke else "tiny",
        "device": device.type, "dtype": str(prior.sd.dtype), "attention": prior.sd.attention,
        "hashgrid_backend": recon.field.encoding.backend,
        "mixed_precision": str(recon.amp_dtype), "overrides": overrides, "load_s": load_s,
        "model_mem_mb": megabytes(model_bytes), "warmup_steps": len(warm),
        "warmup_s": sum(warm), "first_step_s": warm[0] if warm else None,
        "warmup_peak_mem_mb": megabytes(warm_peak), "steady_after": steady_after,
        "steady_steps": len(steady),
        "steady_step_ms": statistics.mean(steady) * 1e3 if steady else None,
        "steady_median_step_ms": statistics.median(steady) * 1e3 if steady else None,
        "steady_peak_mem_mb": megabytes(steady_peak), "grad_scaler_scale": scale,
        "nonfinite_steps": recon.nonfinite_steps, "counters": counters,
        "losses_finite": finite,
        "last_losses": {k: v for k, v in metrics.items() if k.startswith("loss/")},
        "estimated_object_gb": estimate.total_gb, "estimate": estimate.as_dict(),
        "note": stopped or f"steady state: steps {steady_after + 1}.."
                           f"{steady_after + len(steady)}"}
    if steady:
        summary = (f"steady {numbers['steady_step_ms']:.0f} ms/step (steps {steady_after + 1}"
                   f"-{steady_after + len(steady)}), ")
    else:
        summary = f"steady state not reached ({stopped}), "
    peak_gb = (warm_peak - (model_bytes or 0)) / 2**30 if warm_peak is not None else None
    warm_mb = fmt(megabytes(warm_peak), ".0f")
    summary += (f"warm-up {len(warm)} steps {sum(warm):.1f} s, peak {warm_mb} MB (object "
                f"{fmt(peak_gb, '.1f')} GB vs estimate "
                f"{estimate.total_gb:.1f} GB); scale {fmt(scale, '.0f')}, non-finite steps "
                f"{recon.nonfinite_steps}; {prior.sd.attention}, grid "
                f"{numbers['hashgrid_backend']}")
    status = "ok" if finite else "failed: non-finite losses in the last step"
    return {"status": status, "summary": summary, "numbers": numbers}


# ---------------------------------------------------------------------------- 4. inversion
def part_inversion(smoke: bool, deadline: float) -> dict:
    """Textual-inversion step time at batch 4 (one batch) and as 1 x 4 accumulated
    micro-batches (the preset's), with the peak memory of each."""
    from rf_bench.prior import synthetic_photo
    from rf_core.prior.inversion import InversionConfig, invert
    from rf_core.progress import quiet

    device = part_device(smoke)
    prior = _tiny() if smoke else _sd15(device)
    rgb, mask = synthetic_photo(prior.resolution)
    steps = 1 if smoke else 5
    rows = []
    for batch, accum in ((4, 1), (1, 4)):
        label = f"batch {batch} x accum {accum}"
        if rows and _time_left(deadline) < 4 * rows[-1]["call_s"] + 5:
            rows.append({"setting": label, "note": "skipped: the part's time ran out"})
            continue
        cfg = InversionConfig(steps=steps, batch_size=batch, grad_accum=accum,
                              checkpoint_every=0, initializer="cat" if smoke else "object")
        warm_cfg = dataclasses.replace(cfg, steps=1)
        try:
            with quiet():
                invert(prior, rgb, mask, warm_cfg)
                _reset_peak(device)
                sync(device)
                t = time.perf_counter()
                result = invert(prior, rgb, mask, cfg)
                sync(device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"setting": label, "note": "failed: CUDA out of memory"})
            continue
        call_s = time.perf_counter() - t
        rows.append({"setting": label, "batch_size": batch, "grad_accum": accum,
                     "steps": steps, "call_s": call_s, "ms_per_step": call_s / steps * 1e3,
                     "peak_mem_mb": megabytes(_peak(device)),
                     "losses_finite": all(math.isfinite(x) for x in result.losses),
                     "note": ""})
    timed = [r for r in rows if "ms_per_step" in r]
    failed = [r for r in rows if r["note"].startswith("failed")]
    nonfinite = [r for r in timed if not r["losses_finite"]]
    summary = "; ".join(f"{r['setting']}: {r['ms_per_step']:.0f} ms/step, peak "
                        f"{fmt(r['peak_mem_mb'], '.0f')} MB" for r in timed) or "none measured"
    status = ("failed: " + failed[0]["note"] if failed else
              "failed: non-finite inversion loss" if nonfinite else "ok")
    return {"status": status, "summary": summary,
            "numbers": {"device": device.type, "resolution": prior.resolution,
                        "attention": prior.sd.attention, "rows": rows}}


# ---------------------------------------------------------------------------- 5. sharing
def _requests(prior, trials: int, step: int):
    """One SDS request per trial, as the prior server receives them: a fresh 64 px render,
    its own view prompt, generator and step."""
    from rf_core.prior.base import SDSRequest
    from rf_core.prior.conditioning import PromptConfig, make_conditioning
    from rf_core.prior.sds import SDSConfig

    out = []
    for i in range(trials):
        gen = torch.Generator().manual_seed(1000 * i + step)
        azimuth = float((90 * i + 37 * step) % 360 - 180)
        cond = make_conditioning(PromptConfig(token=TOKEN), azimuth=torch.tensor([azimuth]),
                                 elevation=torch.tensor([15.0]))
        images = torch.rand(1, 3, SHARING_RENDER, SHARING_RENDER, generator=gen)
        out.append(SDSRequest(images, cond, SDSConfig(), step, gen))
    return out


def _round(prior, trials: int, step: int, shared: bool, device: torch.device
           ) -> tuple[float, list[torch.Tensor]]:
    reqs = _requests(prior, trials, step)
    sync(device)
    t = time.perf_counter()
    if shared:  # what the prior server does with concurrent requests: one batched call
        grads = prior.sds_grad_batch(reqs)
    else:  # K trials with a prior each, one request at a time on the one GPU
        grads = [prior.sds_grad(r.images, r.conditioning, r.cfg, step=r.step,
                                generator=r.generator) for r in reqs]
    grads = [g.float() for g in grads]
    sync(device)
    return time.perf_counter() - t, grads


def part_sharing(smoke: bool, deadline: float) -> dict:
    """Prior sharing without Ray: K trials' SDS requests answered by one batched call
    (``sds_grad_batch``, the prior server's batching) vs one call each, K = 1, 4, 8."""
    device = part_device(smoke)
    prior = _tiny() if smoke else _sd15(device)
    dim = prior.sd.text_encoder.get_input_embeddings().weight.shape[1]
    prior.register_embedding(TOKEN, torch.randn(dim, generator=torch.Generator()
                                                .manual_seed(0)) * 0.02)
    weights = sum(p.numel() * p.element_size() for m in (prior.sd.unet, prior.sd.vae,
                                                        prior.sd.text_encoder)
                  for p in m.parameters())
    ks, rounds = ((1, 2), 1) if smoke else ((1, 4, 8), 5)
    for step in range(4):  # warm-up of both paths: kernels, and every view prompt's encoding
        for shared in (True, False):
            _round(prior, max(ks), 1000 + step, shared, device)
    rows = []
    for k in ks:
        row: dict = {"trials": k, "rounds": rounds}
        if rows and _time_left(deadline) < 6 * rows[-1].get("round_s", 1.0) * k + 5:
            rows.append({**row, "note": "skipped: the part's time ran out"})
            continue
        for shared in (True, False):
            name = "shared" if shared else "separate"
            _round(prior, k, 0, shared, device)  # warm-up: kernels for this batch size
            _reset_peak(device)
            times = [_round(prior, k, r + 1, shared, device)[0] for r in range(rounds)]
            per_round = statistics.median(times)
            row[name] = {"ms_per_round": per_round * 1e3, "requests_per_s": k / per_round,
                         "peak_mem_mb": megabytes(_peak(device))}
        row["round_s"] = row["separate"]["ms_per_round"] / 1e3 / k
        row["throughput_ratio"] = (row["shared"]["requests_per_s"]
                                   / row["separate"]["requests_per_s"])
        # K separate priors would each hold the weights; the shared one holds them once
        row["weights_mb"] = {"shared": megabytes(weights), "separate": megabytes(k * weights)}
        _, batched = _round(prior, k, 99, True, device)
        _, alone = _round(prior, k, 99, False, device)
        scale = max(g.abs().max().item() for g in alone) or 1.0
        row["max_rel_diff_batched_vs_alone"] = max(
            (a - b).abs().max().item() for a, b in zip(batched, alone)) / scale
        row["finite"] = all(bool(torch.isfinite(g).all()) for g in batched)
        row["note"] = ""
        rows.append(row)
    done = [r for r in rows if "shared" in r]
    summary = ", ".join(f"K={r['trials']}: {r['shared']['requests_per_s']:.1f} vs "
                        f"{r['separate']['requests_per_s']:.1f} req/s "
                        f"({r['throughput_ratio']:.2f}x)" for r in done)
    summary += f"; weights {megabytes(weights):.0f} MB once instead of K times"
    bad = [r for r in done if not r["finite"]]
    status = f"failed: non-finite SDS gradient at K={bad[0]['trials']}" if bad else "ok"
    return {"status": status, "summary": summary,
            "numbers": {"device": device.type, "render": SHARING_RENDER,
                        "attention": prior.sd.attention, "rows": rows,
                        "note": "one process, no Ray: shared = one sds_grad_batch call over "
                                "the K requests (the prior server's batching); separate = "
                                "one sds_grad call per request on the same GPU"}}


# ---------------------------------------------------------------------------- 6. rf bench step
def part_step(smoke: bool, deadline: float) -> dict:
    """``rf bench step`` (``rf_bench.step.run_step_bench``): baseline vs optimised per step."""
    if importlib.util.find_spec("rf_bench.step") is None:
        return {"status": "skipped: rf_bench.step (rf bench step) is not in this checkout",
                "summary": "", "numbers": {}}
    from rf_bench.step import run_step_bench

    if smoke:
        kwargs = {"preset": "tiny", "model": "tiny", "steps": 2, "device": "cpu"}
    else:
        kwargs = {"preset": "realfusion", "model": "sd15-random", "steps": STEADY_AFTER + 10,
                  "device": "cuda"}
    accepted = inspect.signature(run_step_bench).parameters
    result = run_step_bench(**{k: v for k, v in kwargs.items() if k in accepted},
                            **({"json_path": None} if "json_path" in accepted else {}))
    parts = []
    for variant in ("baseline", "optimised"):
        v = result.get(variant) if isinstance(result, dict) else None
        if isinstance(v, dict):
            parts.append(f"{variant}: {fmt(v.get('step_s'), '.3f')} s/step, warm-up peak "
                         f"{fmt(v.get('warmup_peak_mem_gb'), '.2f')} GB, "
                         f"{fmt(v.get('grid_points_per_step'), '.3g')} grid points, "
                         f"{fmt(v.get('syncs_per_step'), '.1f')} syncs")
    return {"status": "ok", "summary": "; ".join(parts) or "no baseline/optimised in result",
            "numbers": {"arguments": kwargs, "result": result}}


# ---------------------------------------------------------------------------- 7. pytest
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def parse_pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 2 skipped, 9 deselected in 4.1s")."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0,
              "xfailed": 0, "xpassed": 0}
    lines = [ln for ln in text.splitlines() if _COUNT.search(ln) and " in " in ln]
    for value, key in _COUNT.findall(lines[-1] if lines else ""):
        counts["errors" if key.startswith("error") else key] = int(value)
    return counts


def _gpu_test_files(smoke: bool) -> list[str]:
    """The test files that mark tests ``gpu`` (smoke: one of them)."""
    if smoke:
        return ["tests/rf_core/test_encoding.py"]
    files = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    return files


def part_pytest(smoke: bool, deadline: float) -> dict:
    """``pytest -m gpu`` over the files holding gpu tests; a file that cannot be collected here
    (it needs Ray, absent on a bare machine) is reported, not failed."""
    if not (REPO_ROOT / "tests").is_dir():
        return {"status": f"skipped: no tests/ folder beside {REPO_ROOT / 'rf_core'}",
                "summary": "", "numbers": {}}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped: pytest is not installed here", "summary": "",
                "numbers": {}}
    files = _gpu_test_files(smoke)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *files]
    timeout = max(5.0, _time_left(deadline) - 3)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        rc = None
    counts = parse_pytest_counts(output)
    problems = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    missing = sorted(set(re.findall(r"No module named '([\w.]+)'", output)))
    uncollected = [ln for ln in problems if ln.startswith("ERROR") and missing]
    numbers = {"command": " ".join(cmd[1:]), "returncode": rc, "counts": counts,
               "failures": problems[:30], "missing_modules": missing,
               "seconds": time.perf_counter() - t0, "output_tail": output[-LOG_TAIL_CHARS:]}
    c = counts
    summary = (f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
               f"{c['skipped']} skipped, {c['deselected']} deselected")
    if uncollected:
        summary += (f"; {len(uncollected)} file(s) not collected here (no module "
                    f"{', '.join(missing)})")
    real_errors = c["errors"] - len(uncollected)
    if rc is None:
        status = f"failed: pytest -m gpu timed out after {timeout:.0f} s"
    elif rc == 5 or (c["passed"] + c["failed"] + c["skipped"] == 0 and not real_errors):
        status = "skipped: no test marked gpu was collected"
    elif c["failed"] or real_errors > 0:
        first = problems[0] if problems else output.strip().splitlines()[-1:]
        status = f"failed: {c['failed']} failed, {real_errors} errors; {first}"
    else:
        status = "ok"
    return {"status": status[:400], "summary": summary, "numbers": numbers}
