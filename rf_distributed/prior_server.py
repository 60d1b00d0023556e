"""One diffusion prior per GPU (or CPU), shared by every reconstruction on it.

``PriorServer`` is a Ray actor holding one prior, built by ``rf_core.prior.make_prior`` from a
``ModelConfig`` (any registered type). Concurrent ``sds_grad`` requests from many trials are
merged (dynamic batching: up to ``max_batch`` images, waiting at most ``max_wait_ms`` for
company) and handed to the prior's batched entry point ``sds_grad_batch``; the server knows
nothing of Stable Diffusion. Each request keeps its own images, prompts, learned-token vectors,
SDS settings, step and random generator; each caller gets back exactly its own gradient and its
generator's new state, so a remote reconstruction is reproducible and resumable exactly like a
local one.

On the CPU a batch is not one call: its requests are computed one each by ``threads``
single-threaded workers at once. Batching buys a CPU no arithmetic efficiency, and one call
over several OpenMP threads stalls whenever another process takes one of its cores (2-5x
slower on a busy machine); one request per worker also bounds the activations in memory. On
a GPU the batch is one call: that is where batching pays.

``PriorClient`` implements the ``rf_core.prior.Prior`` protocol (``sds_grad``,
``sds_grad_batch``, ``register_embedding``, ``invert``), so
``rf_core.fitting.reconstruct.Reconstructor`` cannot tell it from a local prior. Requests carry the
learned vectors they use, so a restarted server (``max_restarts``) needs no re-registration; the
client retries a call that hit a dying server.

An inversion never stalls the trials' SDS: it runs on its own thread and hands the model over
between its optimizer steps (``invert_interleave``, the default). The model is taken in turns
under one lock, SDS first. A step is not interruptible, so the inversion starts one only when
no SDS request is expected soon: none waits and none was computed for a grace window
(``invert_grace_ms``; by default twice the 90th percentile of the measured gap between a
batch's end and the next request, within [``max_wait_ms``, 0.25 s]); without it 31 of 34
steps started between a trial's reply and its next request. Under unbroken SDS load the
inversion still takes one step every ``invert_yield_batches`` batches (default 32: out of the
p95 latency). A request therefore waits at most for one inversion step, and rarely. The
inversion's result is bit-identical to an uninterrupted run (``rf bench prior-sharing --part
inversion``). ``invert_interleave=False`` keeps the model for the whole inversion.

GPU placement does not depend on Ray's version (Ray 2.50 hides every GPU from a
``num_gpus=0`` actor, later versions show it all of them): the server is told which physical
GPU to use (its caller's, or ``cuda:N``'s N) and sets ``CUDA_VISIBLE_DEVICES`` to it itself
before CUDA starts, so ``cuda`` in the server is exactly that GPU. It reserves ``num_gpus``
(default 0: trials that took whole GPUs leave no share free, and a server waiting for one
would never start); pass e.g. ``num_gpus=0.01`` to have Ray count it where there is room.

Remote inversion with a checkpoint: the server may run on another node, so the checkpoint
lives on the caller's side. The client runs the inversion in pieces that end at each
``checkpoint_every`` step: it sends the current checkpoint folder packed as bytes
(``rf_core.files.checkpoint.pack_checkpoint``), the server resumes from them in a temporary
folder and returns the new bytes, and the client puts them in place at its own path
(``unpack_checkpoint``: verified, atomically, the previous one kept). A resumed run is
bit-identical to an uninterrupted one, so the pieces give exactly the local result, and an
interrupted remote inversion resumes from the caller's folder.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from rf_core.config import build, to_dict
from rf_core.errors import UserError
from rf_core.files.checkpoint import pack_checkpoint, unpack_checkpoint
from rf_core.prior.base import SDSRequest
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.inversion import (
    InversionConfig,
    InversionResult,
    checkpoint_step,
    invert,
    prepare_checkpoint,
    start_over_advice,
)
from rf_core.prior.joint import JointPrior
from rf_core.prior.loading import ModelConfig
from rf_core.prior.prior import StableDiffusionPrior
from rf_core.prior.registry import make_prior
from rf_core.prior.sds import SDSConfig
from rf_core.progress import progress, quiet
from rf_distributed.inversion_turns import InversionTurns
from rf_distributed.server_placement import server_gpu, server_name, use_gpu

NAMESPACE = "realfusion"
@dataclass
class SDSReply:
    grad: torch.Tensor
    """[B,3,H,W] float32, on the CPU."""
    generator_state: torch.Tensor | None
    """The request's generator state after the call (None: it had none)."""


class PriorServerImpl:
    """The actor body (``PriorServer`` is its Ray actor class)."""

    def __init__(self, model: dict, max_batch: int = 8, max_wait_ms: float = 5.0,
                 threads: int | None = None, gpu: str | None = None,
                 invert_interleave: bool = True, invert_yield_batches: int = 32,
                 invert_grace_ms: float | None = None):
        """threads: CPU cores for model work (None: torch's current count, which is 1 in a
        Ray actor reserving no CPU, as Ray sets OMP_NUM_THREADS=1 there).
        gpu: the physical GPU (as ``nvidia-smi`` numbers it) this server computes on; it
        becomes the only one visible here, and the model's ``cuda`` device.
        invert_interleave: lend the model to waiting SDS batches between inversion steps.
        invert_yield_batches: while SDS requests keep coming, the inversion takes its next
        step after this many SDS batches (it never starves; SDS goes first).
        invert_grace_ms: after an SDS batch, the inversion waits this long for the next
        request before it takes a step (None: adaptive, see the module docstring)."""
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.threads = threads or torch.get_num_threads()
        self.gpu = use_gpu(gpu)
        self.prior = make_prior(build(ModelConfig, model, "model"))
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.invert_interleave = invert_interleave
        self._turns = InversionTurns(self.max_wait, invert_yield_batches,
                                     None if invert_grace_ms is None else invert_grace_ms / 1e3)
        self._pending: list[tuple[SDSRequest, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        # One thread runs SDS batches, another inversions: the event loop stays free to queue
        # new requests. They take the model in turns (``_model``; see the module docstring).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._invert_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._model = threading.Lock()
        self._turn = threading.Condition()  # guards ``_turns``
        self._last_step: torch.cuda.Event | None = None
        # CPU only: single-threaded workers, one request each (see the module docstring).
        device = torch.device(getattr(self.prior, "device", "cpu"))
        self._workers = (concurrent.futures.ThreadPoolExecutor(max_workers=self.threads)
                         if device.type == "cpu" and self.threads > 1 else None)
        # An inversion on the CPU is one thread too, for the reason above: measured on a busy
        # 2-core machine, 8 tiny-model steps took 0.9 s on one thread and 44 s on two.
        self._invert_threads = 1 if self._workers is not None else self.threads
        self._stats = {"requests": 0, "images": 0, "batches": 0, "max_batch_images": 0,
                       "compute_s": 0.0, "started": time.time(), "inversion_steps": 0,
                       "inversion_handovers": 0, "inversion_forced_steps": 0}
        self._digests: dict[str, str] = {}

    # ------------------------------------------------------------------ public methods
    async def sds_grad(self, request: SDSRequest) -> SDSReply:
        future = asyncio.get_running_loop().create_future()
        with self._turn:
            self._turns.arrived()
        self._pending.append((request, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig,
                     state: bytes | None = None, checkpointed: bool = False) -> dict:
        """Textual inversion on the server's prior; returns {token, vector, losses,
        resumed_from, state}. ``checkpointed``: resume from ``state`` (a packed checkpoint,
        None for a fresh start) and return the new checkpoint's bytes as ``state``."""
        def run() -> dict:
            with tempfile.TemporaryDirectory(prefix="rf-invert-") as tmp:
                ckpt = Path(tmp) / "inversion.ckpt" if checkpointed else None
                if ckpt is not None and state:
                    unpack_checkpoint(state, ckpt)
                if self.invert_interleave:
                    self._await_turn()
                with self._model:
                    torch.set_num_threads(self._invert_threads)
                    result = self._invert(rgb, mask, cfg, ckpt)
                new_state = pack_checkpoint(ckpt) if ckpt is not None else None
            return {"token": result.token, "vector": result.vector, "losses": result.losses,
                    "resumed_from": result.resumed_from, "state": new_state}

        return await asyncio.get_running_loop().run_in_executor(self._invert_executor, run)

    def _invert(self, rgb, mask, cfg, ckpt) -> InversionResult:
        """The inversion (holding ``_model``), lending the model out between steps when
        interleaving. Priors other than Stable Diffusion answer ``invert`` themselves. Quiet
        here, in the actor: the caller's client shows the bar."""
        with quiet():
            if not (self.invert_interleave and isinstance(self.prior, StableDiffusionPrior)):
                return self.prior.invert(rgb, mask, cfg, checkpoint=ckpt)
            self._last_step = None
            return invert(self.prior, rgb, mask, cfg, checkpoint=ckpt,
                          between_steps=self._between_inversion_steps)

    def _between_inversion_steps(self, done: int) -> None:
        """On the inversion thread, holding ``_model``: unless the inversion may take its next
        step now (``InversionTurns``), hand the model over until it may."""
        self._stats["inversion_steps"] += 1
        device = torch.device(getattr(self.prior, "device", "cpu"))
        if device.type == "cuda":  # queue at most one step ahead of the GPU
            step = torch.cuda.Event()
            step.record()
            if self._last_step is not None:
                self._last_step.synchronize()
            self._last_step = step
        with self._turn:
            since = self._turns.batches
            if self._turns.inversion_turn(since)[0] is not None:
                return
        self._stats["inversion_handovers"] += 1
        self._model.release()
        try:
            self._await_turn(since)
        finally:
            self._model.acquire()
            torch.set_num_threads(self._invert_threads)

    def _await_turn(self, since: int | None = None) -> None:
        """On the inversion thread, not holding ``_model``: block until the inversion may step
        (``since``: the batch count when it gave the model up; None: now)."""
        with self._turn:
            since = self._turns.batches if since is None else since
            while True:
                why, wait = self._turns.inversion_turn(since)
                if why is not None:
                    break
                self._turn.wait(wait)
        if why == "forced":
            self._stats["inversion_forced_steps"] += 1

    def stats(self) -> dict:
        """Counters since the start, and the inversion's current grace window in seconds."""
        with self._turn:
            return {**self._stats, "inversion_grace_s": self._turns.grace()}

    def describe(self) -> dict:
        """The prior's own summary when it has one (``describe()``), else its class name."""
        describe = getattr(self.prior, "describe", None)
        return describe() if callable(describe) else {"prior": type(self.prior).__name__}

    def ping(self) -> bool:
        return True

    def needs_reference(self) -> bool:  # whether the prior reads the input photo
        return bool(getattr(self.prior, "needs_reference", False))

    def placement(self) -> dict:
        """Where this server computes: {gpu (physical, or None), cuda_visible_devices, device,
        ray_gpu_ids (what Ray reserved for it)}."""
        return {"gpu": self.gpu, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": str(getattr(self.prior, "device", "cpu")),
                "ray_gpu_ids": ([str(g) for g in ray.get_gpu_ids()]
                                if ray.is_initialized() else [])}

    # ------------------------------------------------------------------ batching
    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            deadline = loop.time() + self.max_wait
            while self._images_pending() < self.max_batch and loop.time() < deadline:
                await asyncio.sleep(min(0.001, self.max_wait))
            batch, taken = [], 0
            while self._pending and (not batch or
                                     taken + len(self._pending[0][0].images) <= self.max_batch):
                item = self._pending.pop(0)
                batch.append(item)
                taken += len(item[0].images)
            try:
                replies = await loop.run_in_executor(self._executor, self._compute,
                                                     [r for r, _ in batch])
                for (_, fut), reply in zip(batch, replies):
                    fut.set_result(reply)
            except Exception as err:  # every caller of the failed batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
            finally:
                with self._turn:  # an inversion waiting for this batch may take its turn
                    self._turns.batch_done(len(batch))
                    self._turn.notify_all()

    def _images_pending(self) -> int:
        return sum(len(r.images) for r, _ in self._pending)

    def _compute(self, requests: list[SDSRequest]) -> list[SDSReply]:
        """Run a batch (on the model thread): register the learned tokens it uses, then compute
        it in one ``sds_grad_batch`` call (GPU) or one request per single-threaded worker
        (CPU). Each request's generator advances in place; its state goes back in the reply."""
        with self._model:  # an inversion holds it during its steps
            return self._compute_holding_model(requests)

    def _compute_holding_model(self, requests: list[SDSRequest]) -> list[SDSReply]:
        started = time.perf_counter()
        # CPU workers set the process-wide torch count to 1; this thread uses all cores.
        torch.set_num_threads(self.threads)
        for r in requests:
            for token, vector in r.embeddings.items():
                digest = hashlib.sha1(vector.float().numpy().tobytes()).hexdigest()
                if self._digests.get(token) != digest:
                    self.prior.register_embedding(token, vector)
                    self._digests[token] = digest
        # A lone CPU request goes to a single-threaded worker too: the gradient depends on the
        # thread count in its last bits, and must not depend on who else was waiting (else a
        # resumed reconstruction would not repeat an uninterrupted one).
        if self._workers is None:
            grads = self.prior.sds_grad_batch(requests)
        else:
            futures = [self._workers.submit(self._one_request, r) for r in requests]
            grads = [f.result() for f in futures]
        images = sum(len(r.images) for r in requests)
        self._stats["requests"] += len(requests)
        self._stats["images"] += images
        self._stats["batches"] += 1
        self._stats["max_batch_images"] = max(self._stats["max_batch_images"], images)
        self._stats["compute_s"] += time.perf_counter() - started
        return [SDSReply(g.cpu(), r.generator.get_state() if r.generator is not None else None)
                for g, r in zip(grads, requests)]

    def _one_request(self, request: SDSRequest) -> torch.Tensor:
        torch.set_num_threads(1)
        return self.prior.sds_grad_batch([request])[0]


PriorServer = ray.remote(PriorServerImpl)


def start_prior_server(model: ModelConfig | dict, *, name: str | None = None,
                       max_batch: int = 8, max_wait_ms: float = 5.0, num_gpus: float = 0.0,
                       num_cpus: float = 0.0, max_restarts: int = -1,
                       threads: int | None = None, invert_interleave: bool = True):
    """Get the named server on this node/GPU, or start it pinned to this node.

    Returns the actor handle. The actor restarts when it dies (``max_restarts``); calls in
    flight are retried by Ray and by ``PriorClient``. ``threads``: CPU cores the server
    computes on. None: on a GPU, Ray's default for an actor; on the CPU, as many as the node's
    cores up to ``max_batch``, so concurrent requests from the node's reconstructions are
    computed side by side rather than one after another (they wait for the server meanwhile).
    The server runs on the caller's GPU (``server_placement.server_gpu``), whatever
    ``num_gpus`` reserves.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    model = to_dict(model) if isinstance(model, ModelConfig) else dict(model)
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = ray.get_gpu_ids()
    name = name or server_name(node_id, gpu_ids[0] if gpu_ids else None, model)
    # The server puts itself on its caller's physical GPU (see the module docstring).
    gpu, model["device"] = server_gpu(str(model.get("device", "auto")), gpu_ids)
    if threads is None and gpu is None and model["device"] in ("auto", "cpu"):
        threads = max(1, min(os.cpu_count() or 1, max_batch))
    return PriorServer.options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=max_restarts, max_task_retries=-1, max_concurrency=1000,
        num_gpus=num_gpus, num_cpus=num_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(model, max_batch, max_wait_ms, threads, gpu, invert_interleave)


class PriorClient:
    """The ``rf_core.prior.Prior`` protocol, served by a ``PriorServer`` actor."""

    def __init__(self, server, retries: int = 5, backoff_s: float = 0.5):
        self.server = server
        self.retries, self.backoff = retries, backoff_s
        self._vectors: dict[str, torch.Tensor] = {}
        self._alias: dict[str, str] = {}

    @functools.cached_property
    def needs_reference(self) -> bool:
        """Whether the served prior reads the input photo (asked once)."""
        return bool(self._call("needs_reference"))

    # ------------------------------------------------------------------ embeddings
    def register_embedding(self, token: str, vector: torch.Tensor) -> None:
        """Use ``vector`` for ``token`` in this client's prompts. On the shared server the token
        is renamed after its vector, so trials using the same token name never collide."""
        vector = vector.detach().float().cpu()
        digest = hashlib.sha1(vector.numpy().tobytes()).hexdigest()[:12]
        alias = f"<{token.strip('<>')}~{digest}>"
        self._alias[token] = alias
        self._vectors[alias] = vector

    # ------------------------------------------------------------------ calls
    def _call(self, method: str, *args):
        for attempt in range(self.retries + 1):
            try:
                return ray.get(getattr(self.server, method).remote(*args))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff * (2 ** attempt))
            except ray.exceptions.RayTaskError as err:
                # The user's mistake (a corrupt checkpoint, a prior that cannot invert) reads
                # as it would locally: one line, its own class.
                if isinstance(err.cause, UserError):
                    raise err.cause from None
                raise
        raise AssertionError("unreachable")

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning,
                 cfg: SDSConfig | None = None, *, step: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """As ``StableDiffusionPrior.sds_grad``; a CPU ``generator`` advances exactly as a local
        call would advance it."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("a remote prior needs a CPU generator (its state travels)")
        prompts, negatives = list(conditioning.prompts), list(conditioning.negative_prompts)
        used = {}
        for token, alias in self._alias.items():
            if any(token in p for p in prompts + negatives):
                prompts = [p.replace(token, alias) for p in prompts]
                negatives = [p.replace(token, alias) for p in negatives]
                used[alias] = self._vectors[alias]
        cond = dataclasses.replace(conditioning, prompts=prompts, negative_prompts=negatives)
        request = SDSRequest(images=images.detach().float().cpu(), conditioning=cond,
                             cfg=cfg or SDSConfig(), step=step, generator=generator,
                             embeddings=used)
        reply: SDSReply = self._call("sds_grad", request)  # the request travels as a copy
        if generator is not None:
            generator.set_state(reply.generator_state)
        return reply.grad.to(images.device)

    def sds_grad_batch(self, requests: list[SDSRequest]) -> list[torch.Tensor]:
        """The requests sent at once (the server batches them); gradient i is exactly
        ``sds_grad`` of request i alone. Learned tokens are this client's registered ones."""
        if len(requests) <= 1:
            return [self.sds_grad(r.images, r.conditioning, r.cfg, step=r.step,
                                  generator=r.generator) for r in requests]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = [pool.submit(self.sds_grad, r.images, r.conditioning, r.cfg, step=r.step,
                                   generator=r.generator) for r in requests]
            return [f.result() for f in futures]

    def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig | None = None,
               checkpoint: str | os.PathLike | None = None) -> InversionResult:
        """Textual inversion on the server; the learned token is registered on this client.

        With ``checkpoint`` (a path on this machine), the run is resumable there exactly like a
        local one: it runs in pieces ending at each ``cfg.checkpoint_every`` step, and the
        checkpoint travels (see the module docstring). Its progress bar, in this process, is
        silent inside ``rf_core.progress.quiet()``."""
        cfg = cfg or InversionConfig()
        rgb, mask = rgb.detach().cpu(), mask.detach().cpu()
        if checkpoint is None:
            out = self._call("invert", rgb, mask, cfg, None, False)
        else:
            path = Path(checkpoint)
            prepare_checkpoint(path)
            state = pack_checkpoint(path, start_over=start_over_advice(path))
            start, every = checkpoint_step(state), cfg.checkpoint_every or cfg.steps
            targets = [*range((start // every + 1) * every, cfg.steps, every), cfg.steps]
            resumed = None
            bar = progress(cfg.steps, f"inverting {cfg.token}", initial=min(start, cfg.steps))
            try:
                for target in targets:
                    out = self._call("invert", rgb, mask, dataclasses.replace(cfg, steps=target),
                                     state, True)
                    resumed = out["resumed_from"] if resumed is None else resumed
                    if out["state"] is not None and out["state"] != state:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        unpack_checkpoint(out["state"], path, name="inversion.checkpoint")
                        state = out["state"]
                    bar.update(len(out["losses"]) - bar.n)
            finally:
                bar.close()
            out["resumed_from"] = resumed
        self.register_embedding(out["token"], out["vector"])
        return InversionResult(out["token"], out["vector"], out["losses"],
                               resumed_from=out["resumed_from"])

    def stats(self) -> dict:
        return self._call("stats")


def job_prior(cfg) -> PriorClient | JointPrior:
    """The prior of a job config (``ReconstructJobConfig``) through this node's servers: a
    client of ``cfg.model``'s server, or with a joint prior (``cfg.joint``) the main and the
    second model's clients, summed by :class:`~rf_core.prior.joint.JointPrior`. Each model
    has its own server (named by model, so both may share a GPU)."""
    prior = PriorClient(start_prior_server(cfg.model))
    if cfg.joint.enabled:
        prior = JointPrior(prior, PriorClient(start_prior_server(cfg.joint.model)), cfg.joint)
    return prior
