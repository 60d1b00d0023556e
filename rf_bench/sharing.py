"""One shared prior server vs one prior per process: total memory and SDS requests per second.

``rf bench prior-sharing --trials K --json OUT.json`` sends the same SDS traffic two ways, in one
run, on one machine, with one model:

- **separate**: K Ray actors, each loading its own ``StableDiffusionPrior`` from the same folder
  and computing its requests locally, one image per UNet call;
- **shared**: one prior server (``PriorServerImpl``, the production batching code) and K actors
  holding no model that talk to it through ``PriorClient``; concurrent requests become one call.

A trial stands in for one reconstruction: N back-to-back requests, each one 64 px render with a
view-dependent prompt, its own learned token, generator and step. Throughput is all requests
over the wall time from the first trial's start to the last reply, timed after every process
has loaded its model and answered one warm-up request. "separate" always runs first; its actors
have exited before "shared" starts.

Memory is summed over a scheme's processes as PSS (proportional set size): a page mapped by n
processes counts 1/n in each, so the sum is the RAM the scheme really occupies. USS (private
pages only) would drop pages shared between processes entirely, and the loader memory-maps
fp32 safetensors: K separate priors loaded from one folder share their weights through the page
cache, so the USS sum would count their weights not at all and the one server's copy in
full. USS and RSS sums are reported beside PSS. Because mapped weights are shared on the CPU
but not on a GPU (or after a dtype conversion), memory is measured twice: peak while the
weights are as loaded, and again over a few more requests after every model-holding process
copied its weights into private memory ("private weights": what K processes each holding its
own prior cost).

Fairness: both schemes get all CPU cores. Each separate process runs torch with
``max(1, cpus // K)`` threads; the server computes on ``cpus`` cores (on the CPU as ``cpus``
single-threaded workers, one request each, see ``prior_server``) and its clients use one thread
(they only wait). Every actor reserves no Ray CPU (``num_cpus=0``), so no scheme waits for slots.
Other processes on the machine distort the comparison (the scheduler shares cores per thread,
so K single-threaded processes take a bigger share from a competitor than a server with fewer
threads): each row reports ``background_cores``, the cores used by processes outside the scheme
during its timed window.

On a CPU, batching cannot buy throughput: an SDS image costs the same CPU time alone or in a
batch (measured on the medium model: 1.15 s per image at batch 1 and at batch 4, one thread), so
"shared" can at best match "separate" (ratio ~1, a little more where K processes on fewer cores
thrash caches); the 1.5x CPU throughput target is out of reach for this workload. Sharing's CPU
gain is memory. On a GPU, batching fills the device and is where throughput gains come from.

The CPU model is "medium": Stable Diffusion's architecture at about 220M random parameters
(0.9 GB in fp32, 128 px native, so renders are upsampled as in training), saved to disk once
like a real checkpoint. On a CUDA GPU the same comparison runs for K=8 with a model of SD 1.5's
size in fp16. That GPU code path is UNTESTED: it was written on a machine without a GPU.

The inversion part (``--part inversion`` or ``all``) asks whether one textual inversion on
the shared server stalls the other trials: K trials' SDS latency (p50, p95) on one server with
no inversion, while an inversion takes turns with SDS (the server's default: it hands the model
over between its steps and starts a step only after a grace window without SDS requests, or
when ``invert_yield_batches`` batches went by), and while one holds the model to its end (the
server before; its first requests wait for the whole inversion). Each row also counts the
inversion's handovers and forced steps and gives the server's grace window at the end. The
inversion is RealFusion's (batch 1 x 4 accumulation, fused into one call) on the tiny model, at
any ``--quick``; target: p95 with an interleaved inversion at most 2x the p95 without.

The models are in ``rf_bench.sharing_models``, the actors and the measuring of one scheme in
``rf_bench.sharing_schemes``.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import ray
import torch

from rf_bench.common import cpu_name, fmt, package_version, write_json
from rf_bench.sharing_models import MEDIUM_VERSION, medium_model_path, sd15_model_path
from rf_bench.sharing_schemes import RENDER, SETTLE_REQUESTS, run_inversion_part, run_scheme
from rf_core.config import to_dict
from rf_core.prior.loading import ModelConfig
from rf_core.prior.tiny import tiny_model_path

__all__ = ["NO_CUDA", "PARTS", "format_sharing_table", "run_sharing_bench"]

PARTS = ("schemes", "inversion", "all")
"""What ``run_sharing_bench`` measures: the shared-vs-separate comparison, the SDS latency
with an inversion running, or both."""
INVERSION = {"batch_size": 1, "grad_accum": 4, "fuse_accumulation": True}
"""The inversion part's inversion: the realfusion preset's batch, on the tiny model."""
INVERSION_P95_TARGET = 2.0
BLOCKING_STEPS = 40

NO_CUDA = "skipped: no CUDA GPU"
GPU_TRIALS = 8
TARGETS = {"memory_ratio": 0.5, "throughput_ratio": 1.5}
"""CPU targets for K=4: shared/separate memory at most, throughput at least."""
GPU_THROUGHPUT_TARGET = 3.0
BUSY_MACHINE = 0.25
"""Background cores above which the table warns that a scheme's timing is distorted."""


def _compare(folder: Path, model: dict, trials: int, requests: int, *, cpus: int,
             max_wait_ms: float, gpu: bool) -> dict:
    """Both schemes ("separate" first), their ratios and the model's description."""
    rows, info = [], None
    for scheme in ("separate", "shared"):
        row, described = run_scheme(scheme, model, folder, trials, requests, cpus=cpus,
                                     max_wait_ms=max_wait_ms, gpu=gpu)
        rows.append(row)
        info = info or described
    sep, sha = rows
    ratios = {"memory_ratio": sha["total_pss_mb"] / sep["total_pss_mb"],
              "memory_ratio_private": sha["private_pss_mb"] / sep["private_pss_mb"],
              "memory_ratio_uss": sha["total_uss_mb"] / sep["total_uss_mb"],
              "throughput_ratio": sha["requests_per_s"] / sep["requests_per_s"]}
    clients = [p for p in sha["per_process"] if p["role"] == "client"]
    baseline = {k: statistics.mean(p[k] for p in clients) for k in ("pss_mb", "uss_mb", "rss_mb")}
    params = info["parameters"]
    model_info = {**info, "folder": str(folder), "total_parameters": sum(params.values()),
                  "disk_mb": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                  / 2**20}
    return {"rows": rows, "ratios": ratios, "model": model_info,
            "baseline_process": {**baseline, "note": "a client actor: Ray worker with torch and "
                                 "rf_core imported, no model"}}


def _target(value: float, bound: float, at_most: bool) -> dict:
    return {"value": value, "bound": bound, "met": value <= bound if at_most else value >= bound}


# ---------------------------------------------------------------------------- entry point
def run_sharing_bench(trials: int, json_path: str | os.PathLike | None = None, *,
                      quick: bool = False, requests_per_trial: int | None = None,
                      max_wait_ms: float = 20.0, cpus: int | None = None,
                      gpu: bool = True, part: str = "schemes",
                      server_options: dict | None = None) -> dict:
    """Compare K trials sharing one prior server with K processes each holding its own prior:
    total memory and SDS requests per second, on the CPU and, with CUDA, on the GPU (K=8,
    SD-1.5-size fp16; untested code path). Prints nothing.

    Args:
        trials: K, concurrent trials (reconstructions) on the CPU.
        json_path: where to write the report as JSON (None: don't); replaced atomically.
        quick: a seconds-long smoke run: the tiny model (also on a GPU, with K trials there
            too) and 4 requests per trial.
        requests_per_trial: timed SDS requests per trial (default 16, quick 4).
        max_wait_ms: how long the server waits for more requests to batch.
        cpus: cores both schemes share (default ``os.cpu_count()``); also Ray's CPU count when
            this function starts Ray. An initialised Ray is reused.
        gpu: run the GPU comparison when CUDA is available.
        part: "schemes" (the comparison above), "inversion" (K trials' SDS latency on the
            shared server with and without an inversion running there, tiny model, CPU) or
            "all".
        server_options: more ``PriorServerImpl`` arguments for the inversion part's server
            (e.g. ``{"invert_yield_batches": 8}``; default: the server's defaults).
    Returns:
        ``{"benchmark", "quick", "settings", "environment", "cpu", "gpu"}``; ``cpu`` has
        ``model``, ``rows`` (one per scheme), ``ratios`` (shared / separate), ``targets`` and
        ``baseline_process``; ``gpu`` has a ``status`` and, when measured, the same keys;
        ``inversion`` (parts "inversion" and "all") has ``rows`` (mode none / interleaved /
        blocking: p50_s, p95_s, ...), ``ratios`` and ``targets``. Parts not run are absent.
    """
    requests = requests_per_trial or (4 if quick else 16)
    if trials < 1 or requests < 1:
        raise ValueError(f"need trials >= 1 and requests_per_trial >= 1; got trials={trials}, "
                         f"requests_per_trial={requests}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}; got {part!r}")
    cpus = cpus or os.cpu_count() or 1
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    report: dict = {}
    try:
        if part in ("inversion", "all"):
            report["inversion"] = _inversion_part(trials, requests, cpus, max_wait_ms,
                                                  server_options)
        if part in ("schemes", "all"):
            report.update(_schemes_part(quick, trials, requests, cpus, max_wait_ms, gpu))
    finally:
        if started:
            ray.shutdown()
    report = {
        "benchmark": "prior-sharing", "quick": quick, "part": part,
        "settings": {"trials": trials, "requests_per_trial": requests, "render": RENDER,
                     "max_wait_ms": max_wait_ms, "max_batch": trials, "order": "separate first",
                     "memory": "sum of PSS over the scheme's processes; peak of 1 s samples "
                               "from after warm-up to the last reply",
                     "settle_requests": SETTLE_REQUESTS,
                     "fairness": f"all {cpus} cores to each scheme: separate trials "
                                 f"{max(1, cpus // trials)} torch thread(s) each, server "
                                 f"{cpus} (CPU: {cpus} single-threaded workers), clients 1; "
                                 "no Ray CPU reservations"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "diffusers": package_version("diffusers"), "ray": ray.__version__,
                        "cpu": cpu_name(), "cpus": cpus,
                        "cuda_device": (torch.cuda.get_device_name()
                                        if torch.cuda.is_available() else None)},
        **report}
    if json_path:
        write_json(json_path, report)
    return report


def _inversion_part(trials: int, requests: int, cpus: int, max_wait_ms: float,
                    server_options: dict | None = None) -> dict:
    folder = tiny_model_path("tiny")
    model = to_dict(ModelConfig(name=str(folder), device="cpu", dtype="fp32"))
    out = run_inversion_part(model, folder, trials, requests, cpus=cpus,
                             max_wait_ms=max_wait_ms, inversion=INVERSION,
                             blocking_steps=BLOCKING_STEPS, server_options=server_options)
    out["model"] = {"label": "tiny", "folder": str(folder)}
    ratio = out["ratios"]["p95_interleaved/p95_none"]
    out["targets"] = {"p95_interleaved/p95_none<=2": _target(ratio, INVERSION_P95_TARGET,
                                                              True)}
    return out


def _schemes_part(quick: bool, trials: int, requests: int, cpus: int, max_wait_ms: float,
                  gpu: bool) -> dict:
    """{cpu, gpu}: the shared-vs-separate comparison."""
    folder = tiny_model_path("tiny") if quick else medium_model_path()
    model = to_dict(ModelConfig(name=str(folder), device="cpu", dtype="fp32"))
    cpu = _compare(folder, model, trials, requests, cpus=cpus, max_wait_ms=max_wait_ms,
                   gpu=False)
    cpu["model"]["label"] = "tiny" if quick else f"medium-v{MEDIUM_VERSION}"
    r = cpu["ratios"]
    cpu["targets"] = {
        "memory_ratio<=0.5": _target(r["memory_ratio"], TARGETS["memory_ratio"], True),
        "memory_ratio_private<=0.5": _target(r["memory_ratio_private"],
                                             TARGETS["memory_ratio"], True),
        "throughput_ratio>=1.5": _target(r["throughput_ratio"],
                                         TARGETS["throughput_ratio"], False)}
    if not torch.cuda.is_available():
        gpu_part = {"status": NO_CUDA}
    elif not gpu:
        gpu_part = {"status": "skipped: GPU part disabled (gpu=False)"}
    elif ray.cluster_resources().get("GPU", 0) < 1:
        gpu_part = {"status": "skipped: the Ray cluster offers no GPU"}
    else:
        gpu_part = _gpu_compare(quick, trials, requests, max_wait_ms)
    return {"cpu": cpu, "gpu": gpu_part}


def _gpu_compare(quick: bool, trials: int, requests: int, max_wait_ms: float) -> dict:
    """K=8 trials, SD-1.5-size random model in fp16 on one GPU (quick: the tiny model, K as on
    the CPU). UNTESTED: written without a GPU. A failure (e.g. out of memory with 8 separate
    copies) becomes the status; the CPU part stays valid."""
    trials = trials if quick else GPU_TRIALS
    try:
        folder = tiny_model_path("tiny") if quick else sd15_model_path()
        model = to_dict(ModelConfig(name=str(folder), device="cuda", dtype="fp16"))
        out = _compare(folder, model, trials, requests, cpus=os.cpu_count() or 1,
                       max_wait_ms=max_wait_ms, gpu=True)
    except Exception as err:  # the CPU numbers are still worth reporting
        return {"status": f"failed: {type(err).__name__}: {err}"}
    out["model"]["label"] = "tiny fp16" if quick else "sd15-size fp16"
    out["status"] = "measured (UNTESTED code path)"
    r = out["ratios"]
    out["targets"] = {"throughput_ratio>=3": _target(r["throughput_ratio"],
                                                     GPU_THROUGHPUT_TARGET, False)}
    return out


# ---------------------------------------------------------------------------- report
def _section(title: str, part: dict) -> list[str]:
    m = part["model"]
    lines = [f"{title}: {m['label']}, {m['total_parameters'] / 1e6:.0f}M parameters "
             f"({m['dtype']}, {m['disk_mb']:.0f} MB on disk), {m['resolution']} px native"]
    header = (f"{'scheme':<9} {'K':>2} {'req':>4} {'wall s':>7} {'req/s':>6} {'p50 s':>6} "
              f"{'PSS MB':>7} {'USS MB':>7} {'RSS MB':>7} {'PSS priv':>8} {'GPU MB':>7} "
              f"{'procs':>5} {'batches':>7} {'img/batch':>9} {'bg cores':>8}")
    lines += [header, "-" * len(header)]
    for r in part["rows"]:
        lines.append(
            f"{r['scheme']:<9} {r['trials']:>2} {r['requests']:>4} {r['wall_s']:>7.1f} "
            f"{r['requests_per_s']:>6.2f} {r['latency_s']:>6.2f} {r['total_pss_mb']:>7.0f} "
            f"{r['total_uss_mb']:>7.0f} {r['total_rss_mb']:>7.0f} {r['private_pss_mb']:>8.0f} "
            f"{fmt(r['gpu_mem_mb'], '.0f'):>7} {r['processes']:>5} {r['batches']:>7} "
            f"{r['mean_batch']:>9.2f} {fmt(r.get('background_cores'), '.2f'):>8}")
    busy = part["rows"][-1].get("server_busy")
    if busy is not None:
        lines.append(f"server computing {100 * busy:.0f}% of the shared scheme's wall time")
    r = part["ratios"]
    lines.append(f"shared/separate: memory {r['memory_ratio']:.2f}x (PSS, weights as loaded), "
                 f"{r['memory_ratio_private']:.2f}x (private weights), "
                 f"{r['memory_ratio_uss']:.2f}x (USS); "
                 f"throughput {r['throughput_ratio']:.2f}x")
    if "baseline_process" in part:
        b = part["baseline_process"]
        lines.append(f"baseline process (no model): PSS {b['pss_mb']:.0f} MB, "
                     f"USS {b['uss_mb']:.0f} MB, RSS {b['rss_mb']:.0f} MB")
    for row in part["rows"]:
        if (row.get("background_cores") or 0.0) > BUSY_MACHINE:
            lines.append(f"note: other processes used {row['background_cores']:.2f} cores "
                         f"during the {row['scheme']} run; its numbers are distorted")
    for name, t in part.get("targets", {}).items():
        lines.append(f"target {name}: {t['value']:.2f} -> {'met' if t['met'] else 'MISSED'}")
    return lines


def _inversion_section(part: dict) -> list[str]:
    inv = part["inversion"]
    lines = [f"SDS latency on the shared server while one inversion runs ({part['model']['label']}"
             f" model; inversion batch {inv['batch_size']} x {inv['grad_accum']}, "
             f"{'fused' if inv['fuse_accumulation'] else 'accumulated'}; blocking: "
             f"{inv['blocking_steps']} steps)"]
    header = (f"{'inversion':<12} {'K':>2} {'req':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
              f"{'req/s':>6} {'inv steps':>9} {'inv step/s':>10} {'handovers':>9} {'forced':>6} "
              f"{'grace ms':>8}")
    lines += [header, "-" * len(header)]
    for r in part["rows"]:
        lines.append(f"{r['mode']:<12} {r['trials']:>2} {r['requests']:>4} {r['p50_s']:>7.3f} "
                     f"{r['p95_s']:>7.3f} {r['max_s']:>7.3f} {r['requests_per_s']:>6.2f} "
                     f"{r['inversion_steps']:>9} {fmt(r['inversion_steps_per_s'], '.2f'):>10} "
                     f"{r['handovers']:>9} {r['forced_steps']:>6} {r['grace_ms']:>8.1f}")
    ratios = part["ratios"]
    lines.append("p95 vs no inversion: interleaved "
                 f"{ratios['p95_interleaved/p95_none']:.2f}x, blocking "
                 f"{ratios['p95_blocking/p95_none']:.2f}x; p50 interleaved "
                 f"{ratios['p50_interleaved/p50_none']:.2f}x")
    for name, t in part["targets"].items():
        lines.append(f"target {name}: {t['value']:.2f} -> {'met' if t['met'] else 'MISSED'}")
    return lines


def format_sharing_table(result: dict) -> str:
    """The report of :func:`run_sharing_bench` as aligned plain text."""
    env, s = result["environment"], result["settings"]
    lines = [f"prior sharing: torch {env['torch']}, diffusers {env['diffusers']}, "
             f"ray {env['ray']}{' (quick)' if result.get('quick') else ''}",
             f"  cpu:  {env['cpu']} ({env['cpus']} cores)",
             f"  {s['requests_per_trial']} requests/trial of one {s['render']} px render; "
             f"server max_batch {s['max_batch']}, max_wait {s['max_wait_ms']:g} ms; "
             f"{s['order']}",
             f"  fairness: {s['fairness']}",
             f"  memory: {s['memory']}; 'PSS priv': the same over {s['settle_requests']} more "
             "requests/trial after each model-holding process copied its memory-mapped weights "
             "into private memory",
             ""]
    if "cpu" in result:
        lines += _section("CPU", result["cpu"])
        gpu = result["gpu"]
        lines.append("")
        if "rows" in gpu:
            lines += _section(f"GPU ({gpu['status']})", gpu)
        else:
            lines.append(f"GPU: {gpu['status']}")
    if "inversion" in result:
        if "cpu" in result:
            lines.append("")
        lines += _inversion_section(result["inversion"])
    return "\n".join(lines)

