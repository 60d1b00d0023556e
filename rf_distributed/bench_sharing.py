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
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import ray
import torch

from rf_core.bench.common import cpu_name, write_json
from rf_core.config import build, to_dict
from rf_core.prior.conditioning import PromptConfig, make_conditioning
from rf_core.prior.loading import ModelConfig, describe
from rf_core.prior.prior import StableDiffusionPrior
from rf_core.prior.sds import SDSConfig
from rf_core.prior.tiny import cache_root, tiny_model_path, tiny_vocab
from rf_distributed.prior_server import PriorClient, PriorServerImpl

MEDIUM_VERSION = 1
"""Bump when the medium model's architecture changes so stale caches are rebuilt."""
MEDIUM_SEED = 0
RENDER = 64
"""Side of each request's render (RealFusion's training renders)."""
TOKEN = "<e>"
NO_CUDA = "skipped: no CUDA GPU"
GPU_TRIALS = 8
SETTLE_REQUESTS = 2
"""Untimed requests per trial after weights were made private, to sample memory under load."""
TARGETS = {"memory_ratio": 0.5, "throughput_ratio": 1.5}
"""CPU targets for K=4: shared/separate memory at most, throughput at least."""
GPU_THROUGHPUT_TARGET = 3.0
BUSY_MACHINE = 0.25
"""Background cores above which the table warns that a scheme's timing is distorted."""


# ---------------------------------------------------------------------------- models on disk
def _saved(folder: str, make_pipeline: Callable[[], object]) -> Path:
    """``cache_root()/models/<folder>``, saved with ``save_pretrained`` on first use; written to
    a temporary folder and renamed, so concurrent builders and crashes leave no half model."""
    path = cache_root() / "models" / folder
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=path.parent))
    try:
        make_pipeline().save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "model_index.json").exists():
                raise  # a real failure, not another process finishing the same build first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _pipeline(unet, vae, text_encoder):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()  # the tiny model's tokenizer: vocabulary size costs no compute
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
        prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_medium_pipeline(seed: int = MEDIUM_SEED):
    """Stable Diffusion's architecture scaled to ~220M RANDOM parameters (0.9 GB fp32): UNet
    (192, 384, 768) at 32x32 latents, a 3-level VAE (128 px images), a 6-layer 768-wide CLIP
    text encoder. Big enough that weights dominate a process's memory, small enough that one
    SDS call takes about a second on a CPU core."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = tiny_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(192, 384, 768), cross_attention_dim=768, attention_head_dim=8,
            norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(64, 128, 256), norm_num_groups=32, sample_size=128,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=6,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    return _pipeline(unet, vae, text_encoder)


def medium_model_path() -> Path:
    """Folder of the saved medium model; built (deterministically, seconds) on first use."""
    return _saved(f"medium-v{MEDIUM_VERSION}", build_medium_pipeline)


def sd15_model_path() -> Path:
    """Folder of SD 1.5's architecture with random weights, saved in fp16 (~2 GB). UNTESTED."""
    from rf_core.bench.prior import sd15_sized_components

    def make():
        sd = sd15_sized_components("cpu", torch.float16)
        return _pipeline(sd.unet, sd.vae, sd.text_encoder)

    return _saved("sd15-size-v1", make)


# ---------------------------------------------------------------------------- actors
def _privatise(prior: StableDiffusionPrior) -> None:
    """Copy every weight out of the memory-mapped checkpoint into this process's own memory."""
    with torch.no_grad():
        for module in (prior.sd.unet, prior.sd.vae, prior.sd.text_encoder):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()


class BenchPriorServer(PriorServerImpl):
    """``PriorServerImpl`` unchanged (same batching), plus its pid and ``privatise`` for the
    benchmark."""

    def __init__(self, model: dict, max_batch: int, max_wait_ms: float, threads: int):
        super().__init__(model, max_batch=max_batch, max_wait_ms=max_wait_ms, threads=threads)

    def pid(self) -> int:
        return os.getpid()

    async def privatise(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, _privatise, self.prior)


class Trial:
    """One reconstruction's SDS traffic. With ``model`` it loads its own prior (separate);
    with ``server`` it holds no model and asks the server (shared)."""

    def __init__(self, index: int, threads: int, embedding_dim: int, *,
                 model: dict | None = None, server=None):
        torch.set_num_threads(threads)
        self.local = model is not None
        self.prior = (StableDiffusionPrior(build(ModelConfig, model, "model")) if self.local
                      else PriorClient(server))
        vector = torch.randn(embedding_dim, generator=torch.Generator().manual_seed(index))
        self.prior.register_embedding(TOKEN, vector * 0.02)
        self.index, self.step = index, 0
        self.generator = torch.Generator().manual_seed(1000 + index)
        self.prompts, self.cfg = PromptConfig(token=TOKEN), SDSConfig()

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        return describe(self.prior.sd)

    def request(self) -> bool:
        """One SDS call on a fresh render seen from a new azimuth; True if the gradient is
        finite."""
        azimuth = float((90 * self.index + 37 * self.step) % 360 - 180)
        cond = make_conditioning(self.prompts, azimuth=torch.tensor([azimuth]),
                                 elevation=torch.tensor([15.0]))
        images = torch.rand(1, 3, RENDER, RENDER, generator=self.generator)
        grad = self.prior.sds_grad(images, cond, self.cfg, step=self.step,
                                   generator=self.generator)
        self.step += 1
        return bool(torch.isfinite(grad).all())

    def run(self, requests: int) -> dict:
        """``requests`` calls back to back: {start, end (epoch s), latencies [s], finite}."""
        latencies, finite = [], True
        start = time.time()
        for _ in range(requests):
            t0 = time.perf_counter()
            finite &= self.request()
            latencies.append(time.perf_counter() - t0)
        return {"start": start, "end": time.time(), "latencies": latencies, "finite": finite}

    def privatise(self) -> None:
        if self.local:
            _privatise(self.prior)


_ServerActor = ray.remote(BenchPriorServer)
_TrialActor = ray.remote(Trial)


# ---------------------------------------------------------------------------- measuring
def _memory(pids: list[int]) -> dict:
    """Sums over ``pids`` in MB: pss, uss, rss (pss and uss fall back to rss where the OS
    does not give them, and ``kind`` says so)."""
    pss = uss = rss = 0
    kind = "pss"
    for pid in pids:
        proc = psutil.Process(pid)
        try:
            info = proc.memory_full_info()
            pss += getattr(info, "pss", info.uss)
            uss += info.uss
            rss += info.rss
            kind = kind if hasattr(info, "pss") else "uss"
        except (psutil.AccessDenied, NotImplementedError):
            r = proc.memory_info().rss
            pss, uss, rss, kind = pss + r, uss + r, rss + r, "rss"
    mb = 2**20
    return {"pss_mb": pss / mb, "uss_mb": uss / mb, "rss_mb": rss / mb, "kind": kind}


class _PeakMemory:
    """Samples ``_memory(pids)`` every ``period`` seconds in a thread; keeps each field's max."""

    def __init__(self, pids: list[int], period: float = 1.0):
        self.pids, self.period = pids, period
        self.peak = _memory(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._update(_memory(self.pids))

    def _update(self, sample: dict) -> None:
        for key in ("pss_mb", "uss_mb", "rss_mb"):
            self.peak[key] = max(self.peak[key], sample[key])

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update(_memory(self.pids))


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of ``pids``) so far."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)
    own = 0.0
    for pid in pids:
        try:
            c = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue  # exited during the window: its seconds can no longer be read
        own += c.user + c.system
    return busy, own


def _gpu_memory_mb(pids: list[int]) -> float | None:
    """GPU memory of ``pids`` (CUDA contexts included) from nvidia-smi; None when it cannot
    say (no nvidia-smi, or it lists other pids, as inside some containers). UNTESTED."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = {int(p): float(m) for p, m in (line.split(",") for line in out.splitlines() if line)}
    found = [used[p] for p in pids if p in used]
    return sum(found) if found else None


def _kill(actors: list, pids: list[int]) -> None:
    """Kill the actors and wait for their processes to exit (memory freed, cores idle)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=60)


def _embedding_dim(folder: Path) -> int:
    return int(json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"])


def _run_scheme(scheme: str, model: dict, folder: Path, trials: int, requests: int, *,
                cpus: int, max_wait_ms: float, gpu: bool) -> tuple[dict, dict]:
    """Start the scheme's actors, warm up, time the traffic, measure memory, tear down.
    Returns (row, the model's description)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    dim = _embedding_dim(folder)
    actors: list = []
    pids: list[int] = []
    server = None
    try:
        if scheme == "separate":
            opts = {"num_cpus": 0, "num_gpus": 1.0 / trials if gpu else 0}
            trial_threads = max(1, cpus // trials)
            clients = [_TrialActor.options(scheduling_strategy=here, **opts).remote(
                i, trial_threads, dim, model=model) for i in range(trials)]
            actors += clients
        else:
            server = _ServerActor.options(
                scheduling_strategy=here, num_cpus=0, num_gpus=1.0 if gpu else 0,
                max_concurrency=1000, max_restarts=0).remote(model, trials, max_wait_ms, cpus)
            actors.append(server)
            clients = [_TrialActor.options(scheduling_strategy=here, num_cpus=0).remote(
                i, 1, dim, server=server) for i in range(trials)]
            actors += clients
        pids = ray.get([a.pid.remote() for a in actors])
        ray.get([c.request.remote() for c in clients])  # loads done, one warm-up request each
        info = ray.get((clients[0] if server is None else server).describe.remote())
        before = ray.get(server.stats.remote()) if server is not None else None
        busy0, own0, t0 = *_cpu_seconds(pids), time.perf_counter()
        with _PeakMemory(pids) as memory:
            runs = ray.get([c.run.remote(requests) for c in clients])
        busy1, own1 = _cpu_seconds(pids)
        background = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - t0)
        gpu_mb = _gpu_memory_mb(pids) if gpu else None
        after = ray.get(server.stats.remote()) if server is not None else None
        per_process = [_memory([p]) for p in pids]
        ray.get([a.privatise.remote() for a in actors])
        with _PeakMemory(pids) as private:  # the same peak, now with private weights
            ray.get([c.run.remote(SETTLE_REQUESTS) for c in clients])
    finally:
        _kill(actors, pids)
    if not all(r["finite"] for r in runs):
        raise RuntimeError(f"{scheme}: a non-finite SDS gradient; the benchmark is invalid")
    total = trials * requests
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    if after is not None:
        batches = after["batches"] - before["batches"]
        mean_batch = (after["images"] - before["images"]) / batches
    else:
        batches, mean_batch = total, 1.0
    busy_s = (after["compute_s"] - before["compute_s"]) if after is not None else None
    row = {"scheme": scheme, "trials": trials, "requests": total, "wall_s": wall,
           "requests_per_s": total / wall,
           "latency_s": statistics.median(x for r in runs for x in r["latencies"]),
           "total_pss_mb": memory.peak["pss_mb"], "total_uss_mb": memory.peak["uss_mb"],
           "total_rss_mb": memory.peak["rss_mb"], "private_pss_mb": private.peak["pss_mb"],
           "memory_kind": memory.peak["kind"], "processes": len(pids), "batches": batches,
           "mean_batch": mean_batch, "gpu_mem_mb": gpu_mb,
           "background_cores": background,
           "server_busy": busy_s / wall if busy_s is not None else None,
           "per_process": [{"role": role, **{k: m[k] for k in ("pss_mb", "uss_mb", "rss_mb")}}
                           for role, m in zip(_roles(scheme, trials), per_process)]}
    return row, info


def _roles(scheme: str, trials: int) -> list[str]:
    if scheme == "separate":
        return ["trial+prior"] * trials
    return ["server"] + ["client"] * trials


def _compare(folder: Path, model: dict, trials: int, requests: int, *, cpus: int,
             max_wait_ms: float, gpu: bool) -> dict:
    """Both schemes ("separate" first), their ratios and the model's description."""
    rows, info = [], None
    for scheme in ("separate", "shared"):
        row, described = _run_scheme(scheme, model, folder, trials, requests, cpus=cpus,
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
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_sharing_bench(trials: int, json_path: str | os.PathLike | None = None, *,
                      quick: bool = False, requests_per_trial: int | None = None,
                      max_wait_ms: float = 20.0, cpus: int | None = None,
                      gpu: bool = True) -> dict:
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
    Returns:
        ``{"benchmark", "quick", "settings", "environment", "cpu", "gpu"}``; ``cpu`` has
        ``model``, ``rows`` (one per scheme), ``ratios`` (shared / separate), ``targets`` and
        ``baseline_process``; ``gpu`` has a ``status`` and, when measured, the same keys.
    """
    requests = requests_per_trial or (4 if quick else 16)
    if trials < 1 or requests < 1:
        raise ValueError(f"need trials >= 1 and requests_per_trial >= 1; got trials={trials}, "
                         f"requests_per_trial={requests}")
    cpus = cpus or os.cpu_count() or 1
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
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
    finally:
        if started:
            ray.shutdown()
    report = {
        "benchmark": "prior-sharing", "quick": quick,
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
                        "diffusers": _version("diffusers"), "ray": ray.__version__,
                        "cpu": cpu_name(), "cpus": cpus,
                        "cuda_device": (torch.cuda.get_device_name()
                                        if torch.cuda.is_available() else None)},
        "cpu": cpu, "gpu": gpu_part}
    if json_path:
        write_json(json_path, report)
    return report


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
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
            f"{_fmt(r['gpu_mem_mb'], '.0f'):>7} {r['processes']:>5} {r['batches']:>7} "
            f"{r['mean_batch']:>9.2f} {_fmt(r.get('background_cores'), '.2f'):>8}")
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
    lines += _section("CPU", result["cpu"])
    gpu = result["gpu"]
    lines.append("")
    if "rows" in gpu:
        lines += _section(f"GPU ({gpu['status']})", gpu)
    else:
        lines.append(f"GPU: {gpu['status']}")
    return "\n".join(lines)


__all__ = ["BenchPriorServer", "Trial", "build_medium_pipeline", "format_sharing_table",
           "medium_model_path", "run_sharing_bench", "sd15_model_path"]
