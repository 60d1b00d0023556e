"""One diffusion prior per GPU (or CPU), shared by every reconstruction on it.

``PriorServer`` is a Ray actor holding one ``StableDiffusionPrior``. Concurrent ``sds_grad``
requests from many trials are merged into one UNet call (dynamic batching: up to ``max_batch``
images, waiting at most ``max_wait_ms`` for company). Each request keeps its own images,
prompts, learned-token vectors, SDS settings, step and random generator; each caller gets back
exactly its own gradient and its generator's new state, so a remote reconstruction is
reproducible and resumable exactly like a local one.

On the CPU a batch is not one call: its requests are computed one each by ``threads``
single-threaded workers at once. Batching buys a CPU no arithmetic efficiency (an SDS image
costs the same CPU time alone or in a batch of 4), and one call spread over several OpenMP
threads stalls at every op whenever another process takes one of its cores: on a busy machine
it ran 2-5x slower than the same work on independent single-threaded workers. One request per
worker also keeps only ``threads`` images' activations in memory, not the whole batch's. On a
GPU the batch is one call: that is where batching pays.

``PriorClient`` offers the local prior's interface (``sds_grad``, ``register_embedding``,
``load_embedding``, ``invert``), so ``rf_core.reconstruct.Reconstructor`` cannot tell them
apart. Requests carry the learned vectors they use, so a restarted server (``max_restarts``)
needs no re-registration; the client retries a call that hit a dying server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import ray
import torch

from rf_core.config import build, to_dict
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.embeddings import load_embedding
from rf_core.prior.inversion import InversionConfig, InversionResult, invert
from rf_core.prior.loading import ModelConfig
from rf_core.prior.prior import StableDiffusionPrior
from rf_core.prior.sds import SDSConfig

NAMESPACE = "realfusion"


@dataclass
class SDSRequest:
    """One caller's SDS work: plain tensors, strings and numbers (cheap to ship)."""

    images: torch.Tensor
    """[B,3,H,W] float32 in [0,1], on the CPU."""
    prompts: list[str]
    negative_prompts: list[str]
    cfg: dict
    """The caller's ``SDSConfig`` as a dict."""
    step: int = 0
    generator_state: torch.Tensor | None = None
    """The caller's CPU generator state; None: the server's global RNG."""
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    """Learned tokens used by the prompts: {token: [D]}."""
    geometry: dict = field(default_factory=dict)
    """The views' ``c2w``, ``K``, ``image_size`` and ``background`` (``Conditioning``'s
    fields), for priors that need them; empty when the caller sent none."""

    def conditioning(self) -> Conditioning:
        return Conditioning(self.prompts, self.negative_prompts, **self.geometry)


@dataclass
class SDSReply:
    grad: torch.Tensor
    """[B,3,H,W] float32."""
    generator_state: torch.Tensor | None


class PriorServerImpl:
    """The actor body (``PriorServer`` is its Ray actor class)."""

    def __init__(self, model: dict, max_batch: int = 8, max_wait_ms: float = 5.0,
                 threads: int | None = None):
        """threads: CPU cores for model work (None: torch's current count, which is 1 in a
        Ray actor reserving no CPU, as Ray sets OMP_NUM_THREADS=1 there)."""
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.threads = threads or torch.get_num_threads()
        self.prior = StableDiffusionPrior(build(ModelConfig, model, "model"))
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._pending: list[tuple[SDSRequest, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        # One thread runs all model work: the event loop stays free to queue new requests.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        # CPU only: single-threaded workers, one request each (see the module docstring).
        self._workers = (concurrent.futures.ThreadPoolExecutor(max_workers=self.threads)
                            if self.prior.device.type == "cpu" and self.threads > 1 else None)
        self._stats = {"requests": 0, "images": 0, "batches": 0, "max_batch_images": 0,
                       "compute_s": 0.0, "started": time.time()}
        self._digests: dict[str, str] = {}

    # ------------------------------------------------------------------ public methods
    async def sds_grad(self, request: SDSRequest) -> SDSReply:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: dict) -> dict:
        """Textual inversion on the server's model; returns {token, vector, losses}."""
        def run() -> InversionResult:
            torch.set_num_threads(self.threads)  # CPU workers may have set it to 1
            return invert(self.prior, rgb, mask, build(InversionConfig, cfg, "inversion"),
                          show_progress=False)

        result = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        return {"token": result.token, "vector": result.vector, "losses": result.losses}

    def stats(self) -> dict:
        return dict(self._stats)

    def describe(self) -> dict:
        from rf_core.prior.loading import describe

        return describe(self.prior.sd)

    def ping(self) -> bool:
        return True

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

    def _images_pending(self) -> int:
        return sum(len(r.images) for r, _ in self._pending)

    def _compute(self, requests: list[SDSRequest]) -> list[SDSReply]:
        """Run a batch (on the model thread): register the learned tokens it uses, then compute
        it in one piece (GPU) or one request per single-threaded worker (CPU)."""
        started = time.perf_counter()
        # CPU workers set the process-wide torch count to 1; this thread uses all cores.
        torch.set_num_threads(self.threads)
        prior = self.prior
        gens, cfgs = [], []
        for r in requests:
            for token, vector in r.embeddings.items():
                digest = hashlib.sha1(vector.float().numpy().tobytes()).hexdigest()
                if self._digests.get(token) != digest:
                    prior.register_embedding(token, vector)
                    self._digests[token] = digest
            gen = None
            if r.generator_state is not None:
                gen = torch.Generator()
                gen.set_state(r.generator_state)
            gens.append(gen)
            cfgs.append(build(SDSConfig, r.cfg, "sds"))
        grads: list[torch.Tensor | None] = [None] * len(requests)
        # A lone CPU request goes to a single-threaded worker too: the gradient depends on the
        # thread count in its last bits, and must not depend on who else was waiting (else a
        # resumed reconstruction would not repeat an uninterrupted one).
        if self._workers is None:
            self._sds(requests, gens, cfgs, list(range(len(requests))), grads)
        else:
            # Fill the text cache here: the workers then only read it (its LRU eviction is not
            # safe from several threads).
            for r in requests:
                prior.encode_text(r.prompts + r.negative_prompts)
            futures = [self._workers.submit(self._sds_one_thread, requests, gens, cfgs, [i],
                                            grads) for i in range(len(requests))]
            for f in futures:
                f.result()
        self._stats["requests"] += len(requests)
        self._stats["images"] += sum(len(r.images) for r in requests)
        self._stats["batches"] += 1
        self._stats["max_batch_images"] = max(self._stats["max_batch_images"],
                                              sum(len(r.images) for r in requests))
        self._stats["compute_s"] += time.perf_counter() - started
        return [SDSReply(g, gen.get_state() if gen is not None else None)
                for g, gen in zip(grads, gens)]

    def _sds_one_thread(self, *args) -> None:
        torch.set_num_threads(1)
        self._sds(*args)

    def _sds(self, requests: list[SDSRequest], gens: list[torch.Generator | None],
             cfgs: list[SDSConfig], indices: list[int], grads: list) -> None:
        """Gradients of ``requests[i]`` for i in ``indices``, into ``grads[i]``: requests sharing
        image size, weighting and clipping go through one ``prior.sds`` call with per-image
        timesteps, guidance and generators."""
        prior = self.prior
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in indices:
            r, c = requests[i], cfgs[i]
            groups[(tuple(r.images.shape[-2:]), c.weighting, c.grad_clip,
                    tuple(sorted(r.geometry)), r.geometry.get("image_size"))].append(i)
        for members in groups.values():
            per_image_gens, timesteps, scales = [], [], []
            for i in members:
                n = len(requests[i].images)
                g = [gens[i]] * n
                per_image_gens += g
                timesteps.append(prior.draw_timesteps(cfgs[i], requests[i].step, g))
                scales += [cfgs[i].at(requests[i].step)[0]] * n
            images = torch.cat([requests[i].images for i in members])
            cond = Conditioning.concat([requests[i].conditioning() for i in members])
            out = prior.sds(images, cond, cfgs[members[0]], generator=per_image_gens,
                            timesteps=torch.cat(timesteps), guidance_scale=torch.tensor(scales))
            for i, part in zip(members, out.grad.split([len(requests[i].images)
                                                        for i in members])):
                grads[i] = part.cpu()


PriorServer = ray.remote(PriorServerImpl)


def server_name(node_id: str | None = None, gpu: int | str | None = None) -> str:
    """The per-node, per-GPU actor name: ``rf-prior/<node>/<gpu or cpu>``."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return f"rf-prior/{node_id}/{'cpu' if gpu is None else gpu}"


def start_prior_server(model: ModelConfig | dict, *, name: str | None = None,
                       max_batch: int = 8, max_wait_ms: float = 5.0, num_gpus: float = 0.0,
                       num_cpus: float = 0.0, max_restarts: int = -1,
                       threads: int | None = None):
    """Get the named server on this node/GPU, or start it pinned to this node.

    Returns the actor handle. The actor restarts when it dies (``max_restarts``); calls in
    flight are retried by Ray and by ``PriorClient``. ``threads``: CPU cores the server
    computes on. None: on a GPU, Ray's default for an actor; on the CPU, as many as the node's
    cores up to ``max_batch``, so concurrent requests from the node's reconstructions are
    computed side by side rather than one after another (they wait for the server meanwhile).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    model = to_dict(model) if isinstance(model, ModelConfig) else dict(model)
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = ray.get_gpu_ids()
    name = name or server_name(node_id, gpu_ids[0] if gpu_ids else None)
    if gpu_ids and model.get("device", "auto") == "auto":
        # The server holds no GPU resource of its own, so Ray leaves it every GPU: put it on
        # the physical GPU of the trial that asked for it.
        model["device"] = f"cuda:{gpu_ids[0]}"
    if threads is None and not gpu_ids and model.get("device", "auto") in ("auto", "cpu"):
        threads = max(1, min(os.cpu_count() or 1, max_batch))
    return PriorServer.options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=max_restarts, max_task_retries=-1, max_concurrency=1000,
        num_gpus=num_gpus, num_cpus=num_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(model, max_batch, max_wait_ms, threads)


class PriorClient:
    """The local prior's interface, served by a ``PriorServer`` actor."""

    def __init__(self, server, retries: int = 5, backoff_s: float = 0.5):
        self.server = server
        self.retries, self.backoff = retries, backoff_s
        self._vectors: dict[str, torch.Tensor] = {}
        self._alias: dict[str, str] = {}

    # ------------------------------------------------------------------ embeddings
    def register_embedding(self, token: str, vector: torch.Tensor) -> None:
        """Use ``vector`` for ``token`` in this client's prompts. On the shared server the token
        is renamed after its vector, so trials using the same token name never collide."""
        vector = vector.detach().float().cpu()
        digest = hashlib.sha1(vector.numpy().tobytes()).hexdigest()[:12]
        alias = f"<{token.strip('<>')}~{digest}>"
        self._alias[token] = alias
        self._vectors[alias] = vector

    def load_embedding(self, path) -> str:
        token, vector = load_embedding(path)
        self.register_embedding(token, vector)
        return token

    # ------------------------------------------------------------------ calls
    def _call(self, method: str, *args):
        for attempt in range(self.retries + 1):
            try:
                return ray.get(getattr(self.server, method).remote(*args))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff * (2 ** attempt))
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
        geometry = {k: getattr(conditioning, k)
                    for k in ("c2w", "K", "image_size", "background")
                    if getattr(conditioning, k) is not None}
        request = SDSRequest(images=images.detach().float().cpu(), prompts=prompts,
                             negative_prompts=negatives, cfg=to_dict(cfg or SDSConfig()),
                             step=step, embeddings=used, geometry=geometry,
                             generator_state=generator.get_state() if generator else None)
        reply: SDSReply = self._call("sds_grad", request)
        if generator is not None:
            generator.set_state(reply.generator_state)
        return reply.grad.to(images.device)

    def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig | None = None
               ) -> InversionResult:
        """Textual inversion on the server; the learned token is registered on this client."""
        out = self._call("invert", rgb.cpu(), mask.cpu(), to_dict(cfg or InversionConfig()))
        self.register_embedding(out["token"], out["vector"])
        return InversionResult(out["token"], out["vector"], out["losses"])

    def stats(self) -> dict:
        return self._call("stats")
