"""``rf bench gpu-check``: every GPU test and benchmark in one run, in at most 8 minutes.

One call on a CUDA machine (sized for one H100/H200) runs six parts, in this order:

1. ``hashgrid``: tiny-cuda-nn vs our torch hash grid (parity of values and parameter gradients
   on random points, points/s forward and forward+backward), via ``rf_core.bench.hashgrid``;
   skipped, with the install hint, when ``tinycudann`` does not import.
2. ``attention``: xformers vs PyTorch SDPA on Stable-Diffusion-1.5-sized attention calls
   (parity against an fp32 reference, calls/s) and on the full SD-1.5-size UNet output;
   skipped (SDPA numbers still reported) when xformers is not usable.
3. ``reconstruct``: ``sd15-random`` (SD 1.5's architecture, random weights) under the
   ``realfusion`` preset at fp16: ``Reconstructor`` steps/s after one warm-up step, and the
   peak GPU memory (``torch.cuda.max_memory_allocated``).
4. ``prior``: ``rf bench prior`` (``run_prior_bench``) at batch 1/4/8.
5. ``sharing``: ``rf bench prior-sharing`` (``run_sharing_bench``) with K = 8; its GPU part
   puts the priors on the GPU (SD-1.5 size, fp16, K = 8). Its CPU part runs first, as always.
6. ``pytest``: ``pytest -m gpu -q`` with the pass/fail/skip counts.

Each part runs in its own child process (a CUDA error or an out-of-memory cannot poison the
next part, and a hung part can be killed) under an explicit wall-clock limit (``BUDGETS_S``);
a part may also use the time earlier parts left unused, but never the time reserved for the
parts after it. When the total budget is nearly spent, the remaining parts are skipped with a
note. Every part records ``status`` (``ok``, ``skipped: why`` or ``failed: one-line error``),
its numbers and its wall time; the JSON report (and the Markdown table) are rewritten
atomically after each part, so a killed run keeps what it did.

Without CUDA the check refuses to run (``GPUCheckUnavailable``) unless ``cpu_smoke=True``: then
every part runs in a tiny CPU configuration (tiny model, few points, K = 2, one step) to prove
the plumbing, in about a minute.

The GPU sizes and budgets were written on a machine without a GPU: on the first GPU run,
check the per-part ``wall_s`` against ``limit_s`` in the report and adjust ``BUDGETS_S``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from rf_core.bench.common import cpu_name, write_json
from rf_core.errors import UserError

PARTS: tuple[tuple[str, str], ...] = (
    ("hashgrid", "hash grid: tiny-cuda-nn vs torch"),
    ("attention", "attention: xformers vs SDPA"),
    ("reconstruct", "sd15-random, realfusion preset, fp16: Reconstructor steps"),
    ("prior", "rf bench prior, batch 1/4/8"),
    ("sharing", "prior sharing, K = 8"),
    ("pytest", "pytest -m gpu"),
)
PART_NAMES = tuple(name for name, _ in PARTS)
SMOKE_TITLES = {
    "hashgrid": "hash grid on the CPU: torch vs reference (tcnn needs CUDA)",
    "attention": "attention on the CPU: SDPA vs fp32, tiny UNet SDPA vs plain",
    "reconstruct": "tiny, realfusion preset shrunk, fp32: 1 Reconstructor step",
    "prior": "rf bench prior, tiny, batch 1",
    "sharing": "prior sharing, K = 2, tiny",
    "pytest": "pytest -m gpu on one file (all skip without CUDA)",
}
BUDGETS_S = {
    "hashgrid": 30,     # 2^16 and 2^18 points x (torch, tcnn, reference): seconds of GPU work
    "attention": 45,    # attention calls: seconds; SD-1.5-size UNet build + 2 x 7 forwards
    "reconstruct": 90,  # build/save/load sd15-random (first use), warm-up + up to 20 steps
    "prior": 70,        # tiny on the CPU, then SD-1.5-size SDS b1/4/8 x 2 backends, inversion
    "sharing": 140,     # CPU K=8 (medium model), then GPU K=8 (SD-1.5-size fp16), 8 req/trial
    "pytest": 90,       # collection + the gpu-marked tests (each builds what it needs)
}
"""Per-part wall-clock limits on a CUDA machine, seconds (sum 465 of the default 480)."""
SMOKE_BUDGETS_S = {"hashgrid": 30, "attention": 30, "reconstruct": 45, "prior": 45,
                   "sharing": 90, "pytest": 60}
"""Per-part limits of the tiny CPU configuration (``cpu_smoke``); each takes far less."""
DEFAULT_BUDGET_S = 480
RESERVE_S = 10
"""Kept back from the total for the environment, the kill grace and the final writes."""
MIN_PART_S = 15
"""A part with less time than this left is skipped with a note instead of started."""
KILL_GRACE_S = 5
"""After a part's limit: SIGINT (its ``finally`` blocks run, e.g. Ray shuts down), then this
many seconds, then SIGKILL to its whole process group."""
NO_CUDA_MESSAGE = ("gpu-check needs a CUDA GPU; torch sees none (torch.cuda.is_available() is "
                   "False). Run it on a CUDA machine, or pass --cpu-smoke for a tiny CPU run "
                   "of its plumbing")
LOG_TAIL_CHARS = 3000
REPO_ROOT = Path(__file__).resolve().parents[2]


class GPUCheckUnavailable(UserError, RuntimeError):
    """Raised when the check cannot run here (no CUDA and no ``cpu_smoke``)."""


# ---------------------------------------------------------------------------- environment
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def environment() -> dict:
    """Versions and devices: GPU name and memory, CUDA, driver, torch, diffusers, xformers,
    tinycudann (None: not installed)."""
    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None,
           "diffusers": _version("diffusers"), "transformers": _version("transformers"),
           "xformers": _version("xformers"), "tinycudann": _version("tinycudann"),
           "ray": _version("ray"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "cuda_available": cuda, "gpu_count": torch.cuda.device_count() if cuda else 0,
           "gpu": None, "gpu_memory_gb": None, "driver": None}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   driver=_nvidia_smi("driver_version"))
    return env


# ---------------------------------------------------------------------------- helpers
def _device(smoke: bool) -> torch.device:
    return torch.device("cpu" if smoke else "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 1)


def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _g(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _xformers_reason(device: torch.device) -> str | None:
    """None when xformers runs on ``device``, else the ``skipped: ...`` status."""
    from rf_core.bench.prior import _xformers_skip_reason
    from rf_core.prior.attention import xformers_usable

    if xformers_usable(str(device)):
        return None
    if importlib.util.find_spec("xformers") is None or device.type == "cuda":
        return _xformers_skip_reason()
    return "skipped: xformers runs only on CUDA (cpu smoke)"


# ---------------------------------------------------------------------------- 1. hash grid
def part_hashgrid(smoke: bool, deadline: float) -> dict:
    """tcnn vs torch parity and speed, through ``rf_core.bench.hashgrid``'s measurement."""
    from rf_core.bench.hashgrid import _bench_device, _encoders
    from rf_core.encoding import HashGridConfig
    from rf_core.encoding.backends import TCNN_INSTALL_HINT, _tcnn_import_error
    from rf_core.encoding.layout import grid_layout

    device = _device(smoke)
    if smoke:
        cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12)
        sizes, repeats, reference_repeats = (2**10,), 1, 1
    else:
        cfg = HashGridConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=19)
        sizes, repeats, reference_repeats = (2**16, 2**18), 5, 2
    if importlib.util.find_spec("tinycudann") is None:
        status = f"skipped: tinycudann not installed; {TCNN_INSTALL_HINT}"
    elif _tcnn_import_error() is not None:
        status = f"skipped: tinycudann does not import ({_tcnn_import_error()}); " \
                 f"{TCNN_INSTALL_HINT}"
    elif device.type != "cuda":
        status = "skipped: tiny-cuda-nn runs only on CUDA (cpu smoke)"
    else:
        status = "ok"
    rows, accuracy = _bench_device(cfg, device, sizes, repeats, reference_repeats)
    numbers: dict = {"device": device.type, "config": {"n_levels": cfg.n_levels,
                     "n_features_per_level": cfg.n_features_per_level,
                     "log2_hashmap_size": cfg.log2_hashmap_size},
                     "sizes": list(sizes), "results": rows, "accuracy_vs_reference": accuracy,
                     "tcnn_vs_torch": None}
    encoders = _encoders(cfg, device)
    if "tcnn" in encoders:
        layout = grid_layout(cfg)
        n = sizes[-1]
        gen = torch.Generator().manual_seed(1)
        # fp16-representable parameters: only tcnn's half-precision arithmetic differs.
        params = (torch.rand(layout.n_params, generator=gen) * 2 - 1).half().float() \
            .to(device).requires_grad_()
        x = torch.rand(n, 3, generator=gen).to(device)
        upstream = (torch.rand(n, layout.n_levels * layout.n_features, generator=gen) * 2 - 1
                    ).to(device)
        res = {}
        for name in ("torch", "tcnn"):
            out = encoders[name](x, params)
            res[name] = (out.detach().float(),
                         torch.autograd.grad(out, params, upstream)[0].float())
        (o_t, g_t), (o_c, g_c) = res["torch"], res["tcnn"]
        numbers["tcnn_vs_torch"] = {
            "n_points": n, "max_abs_value_diff": (o_c - o_t).abs().max().item(),
            "max_abs_grad_diff": (g_c - g_t).abs().max().item(),
            "grad_rel_l2_diff": ((g_c - g_t).norm() / g_t.norm().clamp_min(1e-30)).item(),
            "max_abs_value": o_t.abs().max().item(), "max_abs_grad": g_t.abs().max().item()}
    big = {r["backend"]: r for r in rows if r["n_points"] == sizes[-1]}
    speed = ", ".join(f"{b} {_g(r['forward_points_per_s'] / 1e6)}/"
                      f"{_g(r['forward_backward_points_per_s'] / 1e6)}" for b, r in big.items())
    summary = f"{sizes[-1]} pts, Mpt/s fwd/fwd+bwd: {speed}"
    p = numbers["tcnn_vs_torch"]
    if p is not None:
        summary = (f"tcnn vs torch: max |value diff| {p['max_abs_value_diff']:.2e}, max |grad "
                   f"diff| {p['max_abs_grad_diff']:.2e} (rel L2 {p['grad_rel_l2_diff']:.1e}); "
                   + summary)
    return {"status": status, "summary": summary, "numbers": numbers}


# ---------------------------------------------------------------------------- 2. attention
def _attention_cases(smoke: bool) -> list[tuple[str, int, int, int, int, int]]:
    """(label, batch, query tokens, key tokens, heads, head dim). SD 1.5 at 512 px: its largest
    attention is at 64x64 latents, 320 channels = 8 heads x 40; classifier-free guidance makes
    one SDS image a batch of 2, SDS batch 8 a batch of 16."""
    if smoke:
        return [("self 8x8 b2", 2, 64, 64, 2, 8), ("cross 8x8x7 b2", 2, 64, 7, 2, 8)]
    return [("self 64x64 b2", 2, 4096, 4096, 8, 40), ("cross 64x64x77 b2", 2, 4096, 77, 8, 40),
            ("self 64x64 b16", 16, 4096, 4096, 8, 40)]


def _attention_call(device: torch.device, dtype: torch.dtype, case, xformers: bool,
                    repeats: int, warmup: int) -> dict:
    import torch.nn.functional as F

    from rf_core.bench.common import median_time

    label, b, m, n, h, k = case
    gen = torch.Generator().manual_seed(0)
    # Inputs in xformers' [B, M, H, K]; SDPA gets the [B, H, M, K] views diffusers gives it.
    q, key, v = (torch.randn(b, t, h, k, generator=gen).to(device, dtype) for t in (m, n, n))
    grad_out = torch.randn(b, m, h, k, generator=gen).to(device, dtype)
    impls: dict[str, Callable] = {"sdpa": lambda q, k_, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k_.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)}
    if xformers:
        import xformers.ops

        impls["xformers"] = xformers.ops.memory_efficient_attention
    row: dict = {"case": label, "shape_bmhk": [b, m, h, k], "key_tokens": n,
                 "dtype": str(dtype).removeprefix("torch.")}
    ref = None
    if b * h * m * n * 4 <= 2**32:  # fp32 reference with its attention matrix: <= 4 GiB
        leaves = [t.detach().float().requires_grad_() for t in (q, key, v)]
        ql, kl, vl = (t.transpose(1, 2) for t in leaves)
        att = ((ql @ kl.transpose(-1, -2)) * k ** -0.5).softmax(-1)
        out = (att @ vl).transpose(1, 2)
        ref = (out.detach(), torch.autograd.grad(out, leaves, grad_out.float()))
        del att, out, leaves
    results = {}
    for name, fn in impls.items():
        leaves = [t.detach().requires_grad_() for t in (q, key, v)]

        def forward(fn=fn):
            with torch.no_grad():
                return fn(q, key, v)

        def forward_backward(fn=fn, leaves=leaves):
            out = fn(*leaves)
            return out.detach(), torch.autograd.grad(out, leaves, grad_out)

        t_f, _ = median_time(forward, device, repeats, warmup)
        t_fb, results[name] = median_time(forward_backward, device, repeats, warmup)
        entry = {"forward_ms": t_f * 1e3, "forward_backward_ms": t_fb * 1e3,
                 "forward_calls_per_s": 1 / t_f, "forward_backward_calls_per_s": 1 / t_fb}
        if ref is not None:
            out, grads = results[name]
            entry["max_abs_out_diff_vs_fp32"] = (out.float() - ref[0]).abs().max().item()
            entry["max_abs_grad_diff_vs_fp32"] = max(
                (g.float() - r).abs().max().item() for g, r in zip(grads, ref[1]))
        row[name] = entry
    if "xformers" in results:
        (o_s, g_s), (o_x, g_x) = results["sdpa"], results["xformers"]
        row["xformers_vs_sdpa"] = {
            "max_abs_out_diff": (o_x.float() - o_s.float()).abs().max().item(),
            "max_abs_grad_diff": max((a.float() - b_.float()).abs().max().item()
                                     for a, b_ in zip(g_x, g_s))}
    return row


def _set_attention(sd, backend: str) -> None:
    if backend == "math":  # diffusers' plain processor: the smoke run's second backend
        from diffusers.models.attention_processor import AttnProcessor

        sd.unet.set_attn_processor(AttnProcessor())
    else:
        from rf_core.prior.attention import configure_models

        configure_models(sd.unet, sd.vae, backend=backend)


def _unet_parity(sd, backends: tuple[str, str], repeats: int, warmup: int) -> dict:
    """The UNet's output for one input under two attention backends: difference and speed."""
    from rf_core.bench.common import median_time

    unet, device, dtype = sd.unet, sd.device, sd.dtype
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    side = cfg.sample_size
    latents = torch.randn(2, cfg.in_channels, side, side, generator=gen).to(device, dtype)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    outs, out = {}, {"backends": list(backends), "latent_shape": list(latents.shape)}
    for backend in backends:
        _set_attention(sd, backend)

        def forward():
            with torch.no_grad():
                return unet(latents, t, encoder_hidden_states=text).sample

        seconds, outs[backend] = median_time(forward, device, repeats, warmup)
        out[f"{backend}_forward_ms"] = seconds * 1e3
    a, b = (outs[x].float() for x in backends)
    diff = (b - a).abs().max().item()
    out.update(max_abs_diff=diff, max_abs_output=a.abs().max().item(),
               rel_diff=diff / max(a.abs().max().item(), 1e-30),
               finite=bool(torch.isfinite(a).all() and torch.isfinite(b).all()))
    _set_attention(sd, "sdpa")
    return out


def part_attention(smoke: bool, deadline: float) -> dict:
    """xformers vs SDPA: SD-1.5-sized attention calls, then the SD-1.5-size UNet output."""
    device = _device(smoke)
    dtype = torch.float32 if smoke else torch.float16
    reason = _xformers_reason(device)
    xformers = reason is None
    repeats, warmup = (2, 1) if smoke else (20, 3)
    calls = [_attention_call(device, dtype, case, xformers, repeats, warmup)
             for case in _attention_cases(smoke)]
    numbers: dict = {"device": device.type, "calls": calls, "unet": None}
    if smoke:  # tiny UNet, SDPA vs diffusers' plain processor: the same code path
        from rf_core.prior.loading import ModelConfig, load_components

        sd = load_components(ModelConfig(name="tiny", device="cpu", dtype="fp32",
                                         attention="sdpa"))
        numbers["unet"] = {"model": "tiny", **_unet_parity(sd, ("sdpa", "math"), 1, 0)}
    elif xformers and deadline - time.monotonic() > 30:
        from rf_core.prior.random_models import sd15_sized_components

        sd = sd15_sized_components(device, torch.float16, "sdpa")
        numbers["unet"] = {"model": "sd15-size", **_unet_parity(sd, ("sdpa", "xformers"), 5, 2)}
        del sd
    elif xformers:
        numbers["unet"] = "skipped: not enough of the part's time left"
    first = calls[0]
    summary = f"{first['case']}: sdpa {first['sdpa']['forward_backward_ms']:.2f} ms fwd+bwd"
    if "xformers" in first:
        summary += (f", xformers {first['xformers']['forward_backward_ms']:.2f} ms; xformers vs "
                    f"sdpa max |out diff| {first['xformers_vs_sdpa']['max_abs_out_diff']:.1e}")
    if "sdpa" in first and "max_abs_out_diff_vs_fp32" in first["sdpa"]:
        summary += f"; sdpa vs fp32 {first['sdpa']['max_abs_out_diff_vs_fp32']:.1e}"
    unet = numbers["unet"]
    if isinstance(unet, dict):
        summary += (f"; UNet ({unet['model']}) {unet['backends'][1]} vs {unet['backends'][0]} "
                    f"rel diff {unet['rel_diff']:.1e}")
    return {"status": reason or "ok", "summary": summary, "numbers": numbers}


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
    from rf_core.bench.prior import sd15_sized_components
    from rf_core.prior.attention import resolve_attention

    attention = resolve_attention(cfg_model.attention, device)
    sd = sd15_sized_components(device, torch.float16, attention, name="sd15-size")
    return (StableDiffusionPrior(sd), "NOTE: sd15-random is not a registered model name here; "
            "fell back to rf_core.bench.prior.sd15_sized_components (same architecture)")


def part_reconstruct(smoke: bool, deadline: float) -> dict:
    """A few ``Reconstructor`` steps under the realfusion preset: steps/s and peak memory."""
    from rf_core.bench.prior import _synthetic_photo
    from rf_core.prior import StableDiffusionPrior
    from rf_core.reconstruct import Reconstructor
    from rf_core.reconstruct_job import load_job_config

    device = _device(smoke)
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
    rgb, mask = _synthetic_photo(cfg.recon.input_size)
    recon = Reconstructor(cfg.recon, rgb, mask, prior, device=device)
    t0 = time.perf_counter()
    recon.step()  # warm-up: kernel selection, autotuning, allocator growth
    _sync(device)
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
        _sync(device)
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
               "model_mem_mb": _mb(model_bytes), "peak_mem_mb": _mb(peak),
               "losses_finite": finite,
               "last_losses": {k: v for k, v in metrics.items() if k.startswith("loss/")},
               "note": "steps 1.. of the preset: albedo phase; occupancy grid still warming up"
                       " (its first update is at step 16)"}
    summary = (f"{numbers['steps_per_s']:.2f} steps/s over {len(times)} steps after warm-up, "
               f"peak {_g(numbers['peak_mem_mb'], '.0f')} MB; {prior.sd.attention}, grid "
               f"{numbers['hashgrid_backend']}, load {load_s:.0f} s")
    if source.startswith("NOTE"):
        summary += "; " + source
    status = "ok" if finite else "failed: non-finite losses in the timed steps"
    return {"status": status, "summary": summary, "numbers": numbers}


# ---------------------------------------------------------------------------- 4. prior bench
def part_prior(smoke: bool, deadline: float) -> dict:
    """``run_prior_bench`` (what ``rf bench prior`` calls) at batch 1/4/8."""
    from rf_core.bench.prior import SD15, run_prior_bench

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
    # rf_core never imports Ray at module level; this part runs in its own child process.
    bench = importlib.import_module("rf_distributed.bench_sharing")
    if smoke:
        report = bench.run_sharing_bench(2, None, quick=True, requests_per_trial=2, gpu=False)
    else:
        report = bench.run_sharing_bench(8, None, requests_per_trial=8)
    gpu, cpu = report["gpu"], report["cpu"]
    summary = (f"CPU K={report['settings']['trials']} ({cpu['model']['label']}): memory "
               f"{cpu['ratios']['memory_ratio']:.2f}x, throughput "
               f"{cpu['ratios']['throughput_ratio']:.2f}x shared/separate")
    if "rows" in gpu:
        sep, sha = gpu["rows"]
        summary = (f"GPU K={sha['trials']} ({gpu['model']['label']}): throughput "
                   f"{gpu['ratios']['throughput_ratio']:.2f}x ({sep['requests_per_s']:.1f} -> "
                   f"{sha['requests_per_s']:.1f} req/s), GPU memory "
                   f"{_g(sep['gpu_mem_mb'], '.0f')} -> {_g(sha['gpu_mem_mb'], '.0f')} MB; "
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
        cmd.append("tests/test_encoding.py")
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


PART_FUNCTIONS: dict[str, Callable[[bool, float], dict]] = {
    "hashgrid": part_hashgrid, "attention": part_attention, "reconstruct": part_reconstruct,
    "prior": part_prior, "sharing": part_sharing, "pytest": part_pytest}


# ---------------------------------------------------------------------------- report
def _cell(value) -> str:
    return str(value or "").replace("|", "\\|").replace("\n", " ")


def format_table(report: dict) -> str:
    """The report as Markdown: an environment line and one row per part."""
    env = report["environment"]
    mode = " (cpu smoke)" if report["cpu_smoke"] else ""
    lines = [f"# gpu-check{mode}", "",
             f"GPU: {env['gpu'] or 'none'} ({_g(env['gpu_memory_gb'], '.0f')} GB), driver "
             f"{env['driver'] or '-'}, CUDA {env['torch_cuda'] or '-'}; torch {env['torch']}, "
             f"diffusers {env['diffusers'] or '-'}, xformers {env['xformers'] or '-'}, "
             f"tinycudann {env['tinycudann'] or '-'}; CPU {env['cpu']} ({env['cpu_count']} "
             f"cores)", "",
             f"Total {report['total_wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| # | part | what | status | result | wall s / limit s |",
             "|---|---|---|---|---|---|"]
    for i, name in enumerate(PART_NAMES, 1):
        p = report["parts"][name]
        lines.append(f"| {i} | {name} | {_cell(p['title'])} | {_cell(p['status'])} | "
                     f"{_cell(p.get('summary'))} | {_g(p.get('wall_s'), '.1f')} / "
                     f"{_g(p.get('limit_s'), '.0f')} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(report: dict, json_path: Path, table_path: Path | None, t0: float) -> None:
    report["total_wall_s"] = time.monotonic() - t0
    write_json(json_path, report)
    if table_path is not None:
        _write_text(table_path, format_table(report))


# ---------------------------------------------------------------------------- running parts
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGINT the part's process group (its cleanup runs, e.g. Ray shuts down), wait
    ``KILL_GRACE_S``, then SIGKILL whatever of the group is left."""
    for sig, wait in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def _run_part(name: str, smoke: bool, limit: float, log_dir: Path) -> dict:
    """Run one part in a child process under ``limit`` seconds; its record (without wall_s)."""
    result_path = log_dir / f"{name}.json"
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "rf_core.bench.gpu_check", "--part", name,
           "--result", str(result_path), "--limit", f"{limit:.1f}"]
    if smoke:
        cmd.append("--cpu-smoke")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=REPO_ROOT)
        try:
            rc = proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.returncode, True
        except BaseException:  # e.g. Ctrl-C here: the child has its own session, stop it too
            _kill_group(proc)
            raise
    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    record = None
    if result_path.is_file():
        try:
            record = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            record = None
    if timed_out:
        record = {**(record or {}), "status": f"failed: timed out after its {limit:.0f} s limit"}
    elif record is None:
        last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
        record = {"status": f"failed: part process exited with code {rc} and no result: "
                            f"{last[:200]}"}
    if not record["status"].startswith(("ok", "skipped")) or timed_out:
        record["log_tail"] = tail
    return record


def _limit_for(index: int, names: list[str], budgets: dict[str, float], remaining: float
               ) -> float:
    """This part's limit: its budget plus whatever earlier parts left unused, but never the
    budgets of the parts after it; squeezed to what is left when the total is short."""
    later = sum(budgets[n] for n in names[index + 1:])
    own = budgets[names[index]]
    limit = remaining - later
    return limit if limit >= own else min(own, remaining)


def run_gpu_check(json_path: str | os.PathLike, table_path: str | os.PathLike | None,
                  cpu_smoke: bool = False, budget_s: float = DEFAULT_BUDGET_S,
                  parts: list[str] | None = None, log: Callable[[str], None] | None = None
                  ) -> dict:
    """Run every GPU test and benchmark (see the module docstring); returns the report.

    Args:
        json_path: the JSON report, rewritten atomically after every part.
        table_path: the Markdown table, rewritten with the JSON (None: don't write one).
        cpu_smoke: run every part in a tiny CPU configuration (no GPU needed).
        budget_s: the whole run's wall-clock limit, seconds (default 480 = 8 minutes).
        parts: a subset of ``PART_NAMES`` to run (default all); the others say skipped.
        log: called with one progress line per part (default: print to stderr).
    Returns:
        ``{"benchmark", "cpu_smoke", "budget_s", "budgets_s", "environment", "parts",
        "total_wall_s", "ok"}``; ``parts[name]`` has ``title``, ``status``, ``summary``,
        ``numbers``, ``budget_s``, ``limit_s``, ``wall_s`` (and ``log_tail`` on failure).
    Raises:
        GPUCheckUnavailable: no CUDA and not ``cpu_smoke``; nothing is written.
    """
    if not cpu_smoke and not torch.cuda.is_available():
        raise GPUCheckUnavailable(NO_CUDA_MESSAGE)
    unknown = sorted(set(parts or ()) - set(PART_NAMES))
    if unknown:
        raise ValueError(f"unknown gpu-check part(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PART_NAMES)}")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    json_path = Path(json_path)
    table_path = Path(table_path) if table_path is not None else None
    budgets = dict(SMOKE_BUDGETS_S if cpu_smoke else BUDGETS_S)
    titles = {**dict(PARTS), **(SMOKE_TITLES if cpu_smoke else {})}
    selected = [n for n in PART_NAMES if parts is None or n in parts]
    report = {"benchmark": "gpu-check", "cpu_smoke": cpu_smoke, "budget_s": budget_s,
              "budgets_s": budgets, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "environment": environment(),
              "parts": {n: {"title": titles[n], "status": "pending" if n in selected else
                            "skipped: not selected", "budget_s": budgets[n]}
                        for n in PART_NAMES},
              "total_wall_s": 0.0, "ok": None}
    _save(report, json_path, table_path, t0)
    with tempfile.TemporaryDirectory(prefix="rf-gpu-check-") as tmp:
        for i, name in enumerate(selected):
            remaining = budget_s - RESERVE_S - KILL_GRACE_S - (time.monotonic() - t0)
            limit = _limit_for(i, selected, budgets, remaining)
            entry = report["parts"][name]
            if limit < MIN_PART_S:
                entry.update(status=f"skipped: total budget of {budget_s:.0f} s nearly spent "
                                    f"({max(0.0, remaining):.0f} s left)", limit_s=0.0,
                             wall_s=0.0)
            else:
                entry.update(status="running", limit_s=round(limit, 1))
                _save(report, json_path, table_path, t0)
                start = time.monotonic()
                try:
                    entry.update(_run_part(name, cpu_smoke, limit, Path(tmp)))
                except Exception as err:  # the harness itself failed for this part
                    entry["status"] = f"failed: {_one_line(err)}"
                entry["wall_s"] = round(time.monotonic() - start, 2)
            log(f"gpu-check [{i + 1}/{len(selected)}] {name}: {entry['status']} "
                f"({entry['wall_s']:.1f} s)")
            _save(report, json_path, table_path, t0)
    report["ok"] = not any(p["status"].startswith("failed") for p in report["parts"].values())
    _save(report, json_path, table_path, t0)
    return report


# ---------------------------------------------------------------------------- child entry
def _child_main(argv: list[str] | None = None) -> int:
    """``python -m rf_core.bench.gpu_check --part NAME --result OUT.json [--cpu-smoke]``: run
    one part here and write its record (status, summary, numbers) atomically."""
    p = argparse.ArgumentParser(description="run one gpu-check part (internal)")
    p.add_argument("--part", required=True, choices=PART_NAMES)
    p.add_argument("--result", required=True)
    p.add_argument("--limit", type=float, default=60.0)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.limit
    try:
        record = PART_FUNCTIONS[args.part](args.cpu_smoke, deadline)
    except BaseException as err:  # KeyboardInterrupt too: the parent's timeout
        record = {"status": f"failed: {_one_line(err)}",
                  "traceback": traceback.format_exc()[-LOG_TAIL_CHARS:]}
        traceback.print_exc()
    write_json(args.result, record)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
