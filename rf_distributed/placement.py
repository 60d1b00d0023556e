"""How many objects share one GPU in ``rf dataset``: from memory, not a constant.

One GPU holds its node's prior server (the diffusion model's weights and the working memory
of its SDS batches and inversions) and ``n`` object tasks, each a reconstruction with its own
field, optimizer and activations. ``n`` is the largest count that fits the GPU's free memory:

    n = floor((free * USABLE_FRACTION - prior) / object)

``object`` is :func:`object_memory_estimate`, a function of the preset's renderer and field
settings, or a measured figure (``rf bench step`` reports ``warmup_peak_mem_gb``; pass it as
``--object-memory-gb``). ``prior`` is the model's weights at its dtype plus
``PRIOR_WORK_GB``. ``free`` is measured on a GPU of the cluster (``torch.cuda.mem_get_info``
in a probe task), or on this machine's GPU.

The coefficients below were read off the code and the CPU measurements in issue 21, not off a
GPU: the gpu-check (``rf_bench.gpu_check``) prints the estimate beside the measured warm-up peak
of the realfusion preset, so they can be corrected from its first run.

Importing this module imports neither Ray nor MLflow (the gpu-check uses it on a bare GPU
machine); :func:`probe_gpu_memory` imports Ray when called.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from rf_core.errors import UserError

__all__ = ["BYTES_PER_POINT", "NORMAL_FRACTION", "NORMAL_PROBES", "PRIOR_WORK_GB",
           "USABLE_FRACTION", "GpuPlan", "MemoryEstimate", "PlacementError",
           "object_memory_estimate", "plan_objects_per_gpu", "prior_memory_gb", "probe_gpu_memory"]

GB = 2**30
BYTES_PER_POINT = 1024
"""Bytes the torch hash grid and the MLPs keep per field evaluation for the backward pass
(issue 21: about 1 KB per point)."""
NORMAL_PROBES = {"central": 6, "forward": 3}
"""Extra density evaluations per normal, by ``field.normal_difference`` (shaded steps)."""
NORMAL_FRACTION = 0.15
"""With ``renderer.normals_min_weight > 0``: the share of the estimate's samples (every one of
``num_samples`` per ray) that get normals. Measured 1.7-2.8% of the evaluated samples on a
trained duck (256 samples per ray); on the soft field of an early step, 76% of ~50 evaluated
samples per ray (weight 1e-3, the authors' minimum step): 15% of 256."""
STATE_COPIES = 4
"""Field parameters, their gradients and Adam's two moments: fp32 copies of every weight."""
PROCESS_OVERHEAD_GB = 0.6
"""Each object task is its own process: a CUDA context and the allocator's slack."""
PRIOR_WORK_GB = 6.0
"""The prior server's working memory beyond its weights: an SDS batch of up to 8 images and a
batch-4 inversion at 512 px, fp16 (VAE-encoder and UNet activations for the backward pass)."""
ZERO123_PARAMS = 1.25e9
"""Zero-1-to-3 (zero123-xl): the SD 1.x UNet with 8 input channels, the SD VAE, CLIP ViT-L/14's
image encoder and cc_projection (``rf_core.prior.zero123_random`` builds the same sizes)."""
USABLE_FRACTION = 0.95
"""Of the GPU's free memory; the rest absorbs fragmentation."""
KNOWN_PARAMS = {"tiny": 1.0e6, "tiny-v": 1.0e6, "sd15-random": 1.066e9,
                "sd21v-random": 1.29e9}
"""Parameters of the random-weight models (UNet + VAE + text encoder), for a model not built
yet; a model on disk is counted from its weight files."""
SD15_PARAMS = KNOWN_PARAMS["sd15-random"]


class PlacementError(UserError, ValueError):
    """The GPU cannot hold the prior and one object."""


@dataclass(frozen=True)
class MemoryEstimate:
    """One object's peak GPU memory, by part (GB)."""

    points_per_step: int
    """Field evaluations in a warm-up step (every sample active, normals included)."""
    activations_gb: float
    field_state_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return self.activations_gb + self.field_state_gb + self.overhead_gb

    def as_dict(self) -> dict:
        return {**asdict(self), "total_gb": self.total_gb}


def _shaded(recon) -> bool:
    """Whether some steps shade the field, so normals are computed (lambertian/textureless
    steps, orientation and normal-smoothness losses)."""
    if getattr(recon, "lambertian_p", 0) or getattr(recon, "textureless_p", 0):
        return True
    weights = getattr(recon, "weights", None)
    for name in ("orientation", "normal_smooth"):
        value = getattr(weights, name, 0)
        if value if not isinstance(value, (list, tuple)) else any(value[1:3]):
            return True
    return False


def object_memory_estimate(cfg) -> MemoryEstimate:
    """The peak GPU memory of one reconstruction of ``cfg`` (a ``ReconstructJobConfig``): its
    warm-up step, when every sample of every ray reaches the field (the occupancy grid has not
    pruned anything yet). Rays: the input view's ``input_rays`` plus ``sds_batch`` renders
    of ``sds_size``^2 pixels; ``num_samples`` samples each."""
    recon = cfg.recon
    rays = recon.input_rays + recon.sds_batch * recon.sds_size ** 2
    samples = rays * recon.renderer.num_samples
    # Every sample may reach the field in the worst case (an object that fills the occupied
    # box, or the unseeded warm-up); normals go to a bounded share of them when thresholded.
    normal_share = NORMAL_FRACTION if getattr(recon.renderer, "normals_min_weight", 0) else 1.0
    probes = NORMAL_PROBES[getattr(recon.field, "normal_difference", "central")]
    points = round(samples * (1 + (probes * normal_share if _shaded(recon) else 0)))
    grid = recon.field.grid
    table = grid.n_levels * 2 ** grid.log2_hashmap_size * grid.n_features_per_level
    return MemoryEstimate(points_per_step=points, activations_gb=points * BYTES_PER_POINT / GB,
                          field_state_gb=table * 4 * STATE_COPIES / GB,
                          overhead_gb=PROCESS_OVERHEAD_GB)


# ---------------------------------------------------------------------------- the prior
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def _safetensors_params(path: Path) -> int:
    """Elements in a .safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _model_params(name: str, single_file_config: str | None = None) -> float:
    from rf_core.prior.loading import locate_model

    if name in KNOWN_PARAMS:
        return KNOWN_PARAMS[name]
    path = Path(locate_model(name, single_file_config))
    files = [path] if path.is_file() else [
        f for sub in ("unet", "vae", "text_encoder") for f in sorted((path / sub).glob("*"))
        if f.suffix in (".safetensors", ".bin")]
    tensors = [f for f in files if f.suffix == ".safetensors"]
    if tensors:
        # a folder may hold fp32 and fp16 variants side by side: count one of each model
        seen: dict[str, int] = {}
        for f in tensors:
            seen.setdefault(str(f.parent), _safetensors_params(f))
        return float(sum(seen.values()))
    if files:  # pickled weights: assume fp32 storage
        return sum(f.stat().st_size for f in files) / 4.0
    return SD15_PARAMS


def prior_memory_gb(model_cfg, dtype_bytes: int = 2) -> float:
    """The prior server's GPU memory (GB): the model's weights at ``dtype_bytes`` per
    parameter (fp16 on CUDA) plus ``PRIOR_WORK_GB``."""
    kind = getattr(model_cfg, "type", "stable-diffusion")
    if kind in ("zero123", "stable-zero123"):
        return ZERO123_PARAMS * dtype_bytes / GB + PRIOR_WORK_GB
    if kind == "none":
        return 0.0
    if kind != "stable-diffusion":
        return 1.0  # the learned (1 M parameters) and oracle priors: a CUDA context
    params = _model_params(model_cfg.name, getattr(model_cfg, "single_file_config", None))
    return params * dtype_bytes / GB + PRIOR_WORK_GB


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class GpuPlan:
    objects_per_gpu: int
    gpu_share: float
    """The Ray GPU fraction per object task: 1 / objects_per_gpu, rounded down."""
    free_gb: float
    prior_gb: float
    object_gb: float
    object_source: str
    """"estimated" or "given"."""

    def describe(self) -> str:
        return (f"{self.objects_per_gpu} object(s) per GPU: {self.free_gb:.1f} GB free, the "
                f"prior {self.prior_gb:.1f} GB, one object {self.object_gb:.1f} GB "
                f"({self.object_source})")


def plan_objects_per_gpu(free_gb: float, prior_gb: float, object_gb: float,
                         object_source: str = "estimated", max_objects: int = 16) -> GpuPlan:
    """The most objects that fit beside the prior on a GPU with ``free_gb`` free; a
    :class:`PlacementError` naming the numbers when not even one fits."""
    if object_gb <= 0:
        raise PlacementError(f"--object-memory-gb must be > 0, got {object_gb:g}")
    usable = free_gb * USABLE_FRACTION - prior_gb
    n = min(max_objects, math.floor(usable / object_gb)) if usable > 0 else 0
    if n < 1:
        raise PlacementError(
            f"one GPU cannot hold the prior and one object: {free_gb:.1f} GB free x "
            f"{USABLE_FRACTION:g} usable - {prior_gb:.1f} GB prior = {usable:.1f} GB < "
            f"{object_gb:.1f} GB for one object ({object_source}); lower "
            "recon.renderer.num_samples or recon.input_rays, use a larger GPU, or pass the "
            "measured --object-memory-gb (`rf bench step` reports warmup_peak_mem_gb)")
    share = math.floor(1e4 / n) / 1e4  # Ray keeps 4 decimals: n shares must fit in 1.0
    return GpuPlan(n, share, free_gb, prior_gb, object_gb, object_source)


def _local_gpu_memory() -> tuple[float, float]:
    import torch

    free, total = torch.cuda.mem_get_info()
    return free / GB, total / GB


def probe_gpu_memory(timeout_s: float = 120.0) -> float | None:
    """Free memory (GB) of one GPU of the connected Ray cluster, measured by a small task that
    reserves a sliver of a GPU; None when the cluster has no GPU or no answer came in time."""
    import ray

    if not ray.cluster_resources().get("GPU", 0):
        return None
    task = ray.remote(num_gpus=0.001, num_cpus=0)(_local_gpu_memory)
    ref = task.remote()
    try:
        free, _ = ray.get(ref, timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        ray.cancel(ref, force=True)
        return None
    return free
