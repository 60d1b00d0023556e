"""Diffusion-prior step times: score distillation and textual inversion, in one run.

``rf bench prior --json OUT.json`` times the two things a reconstruction waits on:

- one SDS evaluation (``StableDiffusionPrior.sds``: VAE encode, both classifier-free-guidance
  branches in one UNet call, backward through the encoder) at several batch sizes;
- one textual-inversion optimizer step (``invert``; batch 1 x 4 accumulated passes, as
  RealFusion), timed as whole ``invert`` calls divided by their steps.

The tiny offline model always runs on the CPU. A model of Stable Diffusion 1.5's size and shape
(random weights, built in memory, nothing downloaded) runs in fp16 on a CUDA GPU when there is
one, once per attention backend; where it cannot run, its rows say why and carry no numbers.
Times are medians of repeated calls after warm-up calls, with the GPU synchronized around each.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
from collections.abc import Callable, Sequence

import torch

from rf_bench.common import cpu_name, fmt, median_time, package_version, write_json
from rf_core.prior.attention import configure_models, xformers_usable
from rf_core.prior.conditioning import PromptConfig, make_conditioning
from rf_core.prior.inversion import InversionConfig, invert
from rf_core.prior.loading import DTYPES, ModelConfig, describe
from rf_core.prior.prior import StableDiffusionPrior
from rf_core.prior.random_models import sd15_sized_components
from rf_core.prior.sds import SDSConfig
from rf_core.progress import quiet

__all__ = ["COLUMNS", "NO_CUDA", "SD15", "TINY", "format_prior_table", "run_prior_bench",
           "synthetic_photo", "xformers_skip_reason"]

TINY = "tiny"
SD15 = "sd15-size"
"""Stable Diffusion 1.5's architecture with random weights (timing only; it knows nothing): the
weights of ``--model sd15-random``, built in memory."""
TINY_RENDER = 64
"""Side of the tiny model's input renders: its native resolution."""
SD15_RENDER = 128
"""Side of the SD-size model's input renders; ``sds`` upsamples them to 512, as in training."""
NO_CUDA = "skipped: no CUDA GPU"
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COLUMNS = ("model", "device", "dtype", "attention", "op", "batch", "ms_per_step", "steps_per_s",
           "peak_mem_mb", "note")


# ---------------------------------------------------------------------------- environment
def _environment(cpu_threads: int) -> dict:
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"),
            "xformers": package_version("xformers"), "cpu": cpu_name(),
            "cpu_threads": cpu_threads,
            "cuda_device": torch.cuda.get_device_name() if cuda else None,
            "cuda_version": torch.version.cuda if cuda else None}


# ---------------------------------------------------------------------------- timing
def _row(model: str, device: str, dtype: str, attention: str, op: str, batch: int, *,
         seconds: float | None = None, peak_bytes: int | None = None, note: str = "") -> dict:
    ms = None if seconds is None else seconds * 1e3
    return {"model": model, "device": device, "dtype": dtype, "attention": attention, "op": op,
            "batch": batch, "ms_per_step": ms, "steps_per_s": None if ms is None else 1e3 / ms,
            "peak_mem_mb": None if peak_bytes is None else peak_bytes / 2**20, "note": note}


def _measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
             divide: int = 1) -> tuple[float | None, int | None, str]:
    """(seconds per step, peak CUDA bytes or None, failure note). A CUDA out-of-memory error
    becomes a note, so one batch too large for the card does not lose the other rows."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = median_time(fn, device, repeats, warmup)[0] / divide
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, "failed: CUDA out of memory"
    return seconds, (torch.cuda.max_memory_allocated(device) if cuda else None), ""


# ---------------------------------------------------------------------------- workloads
def synthetic_photo(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shaded disc on grey, a stand-in input photo for timing: rgb [3,S,S] in [0,1] and its
    mask [1,S,S]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                          indexing="ij")
    mask = ((x**2 + y**2) < 0.5).float()[None]
    colour = torch.stack([0.5 + 0.4 * x, 0.5 + 0.4 * y, 0.6 - 0.3 * x * y]).clamp(0, 1)
    return colour * mask + 0.5 * (1 - mask), mask


def _sds_call(prior: StableDiffusionPrior, batch: int, side: int) -> Callable[[], object]:
    """One training-like SDS call: B renders, view-dependent prompts around the object."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, side, side, generator=gen).to(prior.device)
    azimuth = torch.linspace(-180.0, 180.0, batch + 1)[:batch]
    cond = make_conditioning(PromptConfig(), azimuth=azimuth, elevation=torch.zeros(batch))
    cfg = SDSConfig()
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    return lambda: prior.sds(images, cond, cfg, generator=gens)


def _inversion_call(prior: StableDiffusionPrior, steps: int, photo_side: int
                    ) -> Callable[[], object]:
    """``steps`` optimizer steps of textual inversion as RealFusion runs it (batch 1 x 4)."""
    rgb, mask = synthetic_photo(photo_side)
    cfg = InversionConfig(steps=steps, batch_size=1, grad_accum=4, checkpoint_every=0)

    def call():
        with quiet():
            return invert(prior, rgb, mask, cfg)
    return call


def _bench_prior(prior: StableDiffusionPrior, model: str, *, batches: Sequence[int], side: int,
                 warmup: int, repeats: int, sds_note: str) -> list[dict]:
    sd = prior.sd
    dtype = _DTYPE_NAMES[sd.dtype]
    rows = []
    for batch in batches:
        seconds, peak, failed = _measure(_sds_call(prior, batch, side), sd.device, warmup,
                                         repeats)
        rows.append(_row(model, sd.device.type, dtype, sd.attention, "sds", batch,
                         seconds=seconds, peak_bytes=peak, note=failed or sds_note))
    return rows


def _bench_inversion(prior: StableDiffusionPrior, model: str, *, steps: int, photo_side: int,
                     warmup: int, repeats: int) -> dict:
    sd = prior.sd
    dtype = _DTYPE_NAMES[sd.dtype]
    seconds, peak, failed = _measure(_inversion_call(prior, steps, photo_side), sd.device,
                                     warmup, repeats, divide=steps)
    note = failed or (f"batch 1 x grad_accum 4, {prior.resolution} px views; "
                      f"invert() call time / {steps} steps")
    return _row(model, sd.device.type, dtype, sd.attention, "inversion_step", 1,
                seconds=seconds, peak_bytes=peak, note=note)


# ---------------------------------------------------------------------------- SD-1.5-size model
# ``sd15_sized_components`` (rf_core.prior.random_models): ``sd15-random``'s seeded random
# weights built in memory on the GPU; re-exported here for older callers.


def _sd15_rows(batches: Sequence[int], note: str) -> list[dict]:
    """The SD-size rows, without numbers, each saying why."""
    rows = [_row(SD15, "cuda", "fp16", attn, "sds", b, note=note)
            for attn in ("sdpa", "xformers") for b in batches]
    return rows + [_row(SD15, "cuda", "fp16", "sdpa", "inversion_step", 1, note=note)]


def xformers_skip_reason() -> str:
    """The ``skipped: ...`` note of an xformers row where xformers cannot run: not installed,
    or installed but not usable on this GPU."""
    if importlib.util.find_spec("xformers") is None:
        return "skipped: xformers not installed (pip install xformers matching your torch)"
    return "skipped: xformers installed but not usable on this GPU"


def _bench_sd15(*, batches: Sequence[int], warmup: int, repeats: int, inversion_steps: int
                ) -> tuple[list[dict], dict]:
    device = torch.device("cuda")
    sd = sd15_sized_components(device, torch.float16, "sdpa", name=SD15)
    info = describe(sd)
    note = f"{SD15_RENDER} px renders -> 512; random weights"
    rows = []
    for attention in ("sdpa", "xformers"):
        if attention == "xformers" and not xformers_usable(str(device)):
            reason = xformers_skip_reason()
            rows += [_row(SD15, "cuda", "fp16", attention, "sds", b, note=reason)
                     for b in batches]
            continue
        configure_models(sd.unet, sd.vae, backend=attention)
        prior = StableDiffusionPrior(dataclasses.replace(sd, attention=attention))
        rows += _bench_prior(prior, SD15, batches=batches, side=SD15_RENDER, warmup=warmup,
                             repeats=repeats, sds_note=note)
    configure_models(sd.unet, sd.vae, backend="sdpa")
    prior = StableDiffusionPrior(dataclasses.replace(sd, attention="sdpa"))
    rows.append(_bench_inversion(prior, SD15, steps=inversion_steps, photo_side=512,
                                 warmup=min(warmup, 1), repeats=repeats))
    del prior, sd
    torch.cuda.empty_cache()
    return rows, info


# ---------------------------------------------------------------------------- report
def format_prior_table(result: dict) -> str:
    """The report of :func:`run_prior_bench` as an aligned plain-text table."""
    env = result["environment"]
    lines = [f"prior step times: torch {env['torch']}, diffusers {env['diffusers']}, "
             f"xformers {env['xformers'] or 'not installed'}, "
             f"{env['cpu_threads']} CPU thread(s){' (quick)' if result.get('quick') else ''}",
             f"  cpu:  {env['cpu']}",
             f"  cuda: {env['cuda_device'] or 'none'}"]
    header = (f"{'model':<10} {'device':<6} {'dtype':<5} {'attention':<9} {'op':<14} "
              f"{'batch':>5} {'ms/step':>9} {'steps/s':>8} {'peak MB':>8}  note")
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['model']:<10} {r['device']:<6} {r['dtype']:<5} {r['attention']:<9} "
                     f"{r['op']:<14} {r['batch']:>5} {fmt(r['ms_per_step'], '.1f'):>9} "
                     f"{fmt(r['steps_per_s'], '.2f'):>8} {fmt(r['peak_mem_mb'], '.0f'):>8}  "
                     f"{r['note']}")
    return "\n".join(lines)


def run_prior_bench(json_path: str | os.PathLike | None = None, *, quick: bool = False,
                    steps: int = 10, warmup: int = 2, batches: Sequence[int] = (1, 4, 8),
                    inversion_steps: int = 4, gpu: bool = True, threads: int | None = None
                    ) -> dict:
    """Time SDS and textual-inversion steps of the tiny model (CPU) and, with a CUDA GPU, of a
    Stable-Diffusion-1.5-size model (fp16, SDPA and xformers). Prints nothing.

    Args:
        json_path: where to write the report as JSON (None: don't); folders are created and
            the file is replaced atomically.
        quick: a seconds-long smoke run: batch 1 only, 2 timed repeats, 1 warm-up, 1-step
            inversion calls (overrides the four settings below).
        steps: timed repeats per measurement; the median is reported.
        warmup: untimed calls before each measurement (one for inversion on the GPU).
        batches: SDS batch sizes (images per call).
        inversion_steps: optimizer steps per timed ``invert`` call; a row reports the call's
            time divided by this.
        gpu: run the SD-size model on CUDA when available (False: report its rows skipped).
        threads: CPU threads for the tiny model (None: torch's current setting).
    Returns:
        ``{"benchmark", "quick", "settings", "environment", "models", "rows"}``; each row has
        ``COLUMNS``, with ``ms_per_step``, ``steps_per_s`` and ``peak_mem_mb`` None (and the
        reason in ``note``) where nothing was measured.
    """
    if quick:
        batches, steps, warmup, inversion_steps = (1,), min(steps, 2), 1, 1
    if steps < 1 or warmup < 0 or inversion_steps < 1 or not batches or min(batches) < 1:
        raise ValueError("need steps >= 1, warmup >= 0, inversion_steps >= 1 and batch sizes "
                         f">= 1; got steps={steps}, warmup={warmup}, "
                         f"inversion_steps={inversion_steps}, batches={list(batches)}")
    batches = [int(b) for b in batches]
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        env = _environment(torch.get_num_threads())
        tiny = StableDiffusionPrior(ModelConfig(name=TINY, device="cpu", dtype="fp32",
                                                attention="sdpa"))
        models = {TINY: describe(tiny.sd)}
        rows = _bench_prior(tiny, TINY, batches=batches, side=TINY_RENDER, warmup=warmup,
                            repeats=steps, sds_note=f"{TINY_RENDER} px renders")
        rows.append(_bench_inversion(tiny, TINY, steps=inversion_steps, photo_side=TINY_RENDER,
                                     warmup=warmup, repeats=steps))
        del tiny
    finally:
        torch.set_num_threads(saved_threads)
    if not torch.cuda.is_available():
        rows += _sd15_rows(batches, NO_CUDA)
        models[SD15] = None
    elif not gpu:
        rows += _sd15_rows(batches, "skipped: GPU part disabled (gpu=False)")
        models[SD15] = None
    else:
        sd_rows, models[SD15] = _bench_sd15(batches=batches, warmup=warmup, repeats=steps,
                                            inversion_steps=inversion_steps)
        rows += sd_rows
    report = {"benchmark": "prior", "quick": quick,
              "settings": {"steps": steps, "warmup": warmup, "batches": batches,
                           "inversion_steps": inversion_steps, "tiny_render": TINY_RENDER,
                           "sd15_render": SD15_RENDER},
              "environment": env, "models": models, "rows": rows}
    if json_path:
        write_json(json_path, report)
    return report
