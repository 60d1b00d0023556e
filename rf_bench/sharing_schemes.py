"""The two schemes of ``rf bench prior-sharing`` (see ``rf_bench.sharing``): the Ray actors
(a trial's SDS traffic, the benchmark's prior server) and how one scheme is run and measured
(PSS/USS/RSS memory, background CPU load, GPU memory); and the inversion part, K trials' SDS
latency on the shared server while one textual inversion runs there (``run_inversion_part``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from rf_core.config import build
from rf_core.prior.conditioning import PromptConfig, make_conditioning
from rf_core.prior.loading import ModelConfig, describe
from rf_core.prior.prior import StableDiffusionPrior
from rf_core.prior.sds import SDSConfig
from rf_distributed.prior_server import PriorClient, PriorServerImpl

__all__ = ["INVERSION_MODES", "RENDER", "SETTLE_REQUESTS", "TOKEN", "BenchPriorServer", "Trial",
           "latency_percentiles", "privatise_weights", "run_inversion_part", "run_scheme"]

RENDER = 64
"""Side of each request's render (RealFusion's training renders)."""
TOKEN = "<e>"
SETTLE_REQUESTS = 2
"""Untimed requests per trial after weights were made private, to sample memory under load."""


# ---------------------------------------------------------------------------- actors
def privatise_weights(prior: StableDiffusionPrior) -> None:
    """Copy every weight out of the memory-mapped checkpoint into this process's own memory."""
    with torch.no_grad():
        for module in (prior.sd.unet, prior.sd.vae, prior.sd.text_encoder):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()


class _Stopped(Exception):
    """Raised between inversion steps once the benchmark has measured enough."""


class BenchPriorServer(PriorServerImpl):
    """``PriorServerImpl`` unchanged (same batching, same turn-taking with inversions), plus
    its pid, ``privatise`` and a way to stop an endless inversion, for the benchmark."""

    def __init__(self, model: dict, max_batch: int, max_wait_ms: float, threads: int,
                 invert_interleave: bool = True, **server):
        super().__init__(model, max_batch=max_batch, max_wait_ms=max_wait_ms, threads=threads,
                         invert_interleave=invert_interleave, **server)
        self._stop_inversion = False

    def pid(self) -> int:
        return os.getpid()

    def set_interleave(self, interleave: bool) -> None:
        self.invert_interleave = interleave

    def stop_inversion(self) -> None:
        """The running inversion ends after its current step (interleaved mode only)."""
        self._stop_inversion = True

    async def bench_invert(self, rgb, mask, cfg) -> dict:
        """``invert`` until it ends or is stopped: {steps, stopped}."""
        self._stop_inversion = False
        before = self._stats["inversion_steps"]
        try:
            out = await self.invert(rgb, mask, cfg)
        except _Stopped:
            return {"steps": self._stats["inversion_steps"] - before, "stopped": True}
        return {"steps": len(out["losses"]), "stopped": False}

    def _between_inversion_steps(self, done: int) -> None:
        super()._between_inversion_steps(done)
        if self._stop_inversion:
            raise _Stopped

    async def privatise(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, privatise_weights,
                                                         self.prior)


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
            privatise_weights(self.prior)


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
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that already exited
            procs.append(psutil.Process(pid))
    psutil.wait_procs(procs, timeout=60)


def _embedding_dim(folder: Path) -> int:
    return int(json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"])


def run_scheme(scheme: str, model: dict, folder: Path, trials: int, requests: int, *,
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


# ---------------------------------------------------------------------------- inversion part
INVERSION_MODES = ("none", "interleaved", "blocking")
"""SDS traffic with no inversion, with one taking turns with SDS (the server's default), and
with one holding the model to its end (``invert_interleave=False``, the server before)."""


def latency_percentiles(latencies: list[float]) -> dict:
    """{p50_s, p95_s, max_s, n} of request latencies in seconds (inclusive quantiles)."""
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 \
        else [latencies[0]] * 99
    return {"p50_s": q[49], "p95_s": q[94], "max_s": max(latencies), "n": len(latencies)}


def run_inversion_part(model: dict, folder: Path, trials: int, requests: int, *, cpus: int,
                       max_wait_ms: float, inversion: dict, blocking_steps: int,
                       server_options: dict | None = None) -> dict:
    """K trials' SDS latency on one shared server, three ways (``INVERSION_MODES``), in one
    server process: without an inversion, while an endless inversion takes turns with SDS
    (stopped once the traffic is done), and while a ``blocking_steps`` inversion holds the
    model. ``server_options``: more ``PriorServerImpl`` arguments (e.g.
    ``invert_yield_batches``). Returns {rows, ratio (p95 interleaved / p95 none), inversion}."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rf_bench.prior import synthetic_photo
    from rf_core.prior.inversion import InversionConfig

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    dim = _embedding_dim(folder)
    rgb, mask = synthetic_photo(64)
    endless = build(InversionConfig, {**inversion, "steps": 10**9, "checkpoint_every": 0})
    blocking = build(InversionConfig, {**inversion, "steps": blocking_steps,
                                       "checkpoint_every": 0})
    actors: list = []
    pids: list[int] = []
    rows = []
    try:
        server = _ServerActor.options(
            scheduling_strategy=here, num_cpus=0, max_concurrency=1000, max_restarts=0,
        ).remote(model, trials, max_wait_ms, cpus, **(server_options or {}))
        clients = [_TrialActor.options(scheduling_strategy=here, num_cpus=0).remote(
            i, 1, dim, server=server) for i in range(trials)]
        actors += [server, *clients]
        pids = ray.get([a.pid.remote() for a in actors])
        ray.get([c.request.remote() for c in clients])  # loads done, one warm-up request each
        warm = build(InversionConfig, {**inversion, "steps": 2, "checkpoint_every": 0})
        ray.get(server.invert.remote(rgb, mask, warm))  # the inversion's first-call costs too
        for mode in INVERSION_MODES:
            ray.get(server.set_interleave.remote(mode != "blocking"))
            before = ray.get(server.stats.remote())
            running = None
            if mode != "none":
                running = server.bench_invert.remote(rgb, mask,
                                                     endless if mode == "interleaved"
                                                     else blocking)
                _wait_for_inversion(server, before["inversion_steps"], mode)
            t0 = time.perf_counter()
            runs = ray.get([c.run.remote(requests) for c in clients])
            wall = time.perf_counter() - t0
            if mode == "interleaved":
                ray.get(server.stop_inversion.remote())
            inv = ray.get(running) if running is not None else None
            after = ray.get(server.stats.remote())
            latencies = [x for r in runs for x in r["latencies"]]
            if not all(r["finite"] for r in runs):
                raise RuntimeError(f"inversion part, {mode}: a non-finite SDS gradient")
            rows.append({"mode": mode, "trials": trials, "requests": len(latencies),
                         **latency_percentiles(latencies), "wall_s": wall,
                         "requests_per_s": len(latencies) / wall,
                         "inversion_steps": inv["steps"] if inv else 0,
                         "inversion_steps_per_s": (inv["steps"] / wall
                                                   if inv and mode == "interleaved" else None),
                         "handovers": (after["inversion_handovers"]
                                       - before["inversion_handovers"]),
                         "forced_steps": (after["inversion_forced_steps"]
                                          - before["inversion_forced_steps"]),
                         "grace_ms": 1000 * after["inversion_grace_s"],
                         "batches": after["batches"] - before["batches"]})
    finally:
        _kill(actors, pids)
    p95 = {r["mode"]: r["p95_s"] for r in rows}
    p50 = {r["mode"]: r["p50_s"] for r in rows}
    return {"rows": rows,
            "ratios": {"p95_interleaved/p95_none": p95["interleaved"] / p95["none"],
                       "p50_interleaved/p50_none": p50["interleaved"] / p50["none"],
                       "p95_blocking/p95_none": p95["blocking"] / p95["none"]},
            "inversion": {**{k: v for k, v in inversion.items()},
                          "blocking_steps": blocking_steps, "photo_px": 64},
            "server_options": dict(server_options or {})}


def _wait_for_inversion(server, steps_before: int, mode: str, timeout: float = 120.0) -> None:
    """Until the inversion holds the model: its first step done (interleaved) or, holding the
    model from start to end, a short while after it was sent (blocking)."""
    if mode == "blocking":
        time.sleep(0.5)  # set-up (token, templates) before its first step; SDS then waits
        return
    deadline = time.monotonic() + timeout
    while ray.get(server.stats.remote())["inversion_steps"] <= steps_before:
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark's inversion did not start")
        time.sleep(0.01)
