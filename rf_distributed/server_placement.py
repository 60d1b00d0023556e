"""Where a prior server runs and what it is called: its physical GPU (whatever Ray's version
shows a ``num_gpus=0`` actor) and its actor name per node, GPU and model."""

from __future__ import annotations

import hashlib
import json
import os

import ray
import torch

from rf_core.config import to_dict
from rf_core.prior.loading import ModelConfig

__all__ = ["server_gpu", "server_name", "use_gpu"]


def use_gpu(gpu: str | None) -> str | None:
    """Make physical GPU ``gpu`` the only one this process sees (CUDA has not started yet);
    returns it. None leaves the visible devices as Ray set them."""
    if gpu is None:
        return None
    if torch.cuda.is_initialized():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible != gpu:
            raise RuntimeError(f"prior server: CUDA started in this process before it could be "
                               f"put on GPU {gpu} (CUDA_VISIBLE_DEVICES={visible!r}); start "
                               "the server in a fresh Ray worker")
        return gpu
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def server_gpu(model_device: str, caller_gpu_ids: list) -> tuple[str | None, str]:
    """Which physical GPU a server started by this caller uses, and its model's device then.

    model_device: the model config's ``device``; caller_gpu_ids: the caller's
    ``ray.get_gpu_ids()``. ``auto`` follows the caller onto its GPU (``cuda`` there, which
    falls back to the CPU where torch cannot use it); ``cuda:N`` is the node's GPU N (``cuda``:
    the caller's, else 0); the CPU stays the CPU.
    """
    if model_device == "auto":
        return (str(caller_gpu_ids[0]), "auto") if caller_gpu_ids else (None, "auto")
    if model_device.startswith("cuda"):
        index = model_device.partition(":")[2]
        gpu = index or (str(caller_gpu_ids[0]) if caller_gpu_ids else "0")
        return gpu, "cuda:0"
    return None, model_device


def server_name(node_id: str | None = None, gpu: int | str | None = None,
                model: ModelConfig | dict | None = None) -> str:
    """The actor name per node, GPU and model: ``rf-prior/<node>/<gpu or cpu>/<type>-<hash>``
    (two models on one node get two servers, never each other's)."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    name = f"rf-prior/{node_id}/{'cpu' if gpu is None else gpu}"
    if model is None:
        return name
    model = to_dict(model) if isinstance(model, ModelConfig) else dict(model)
    key = json.dumps({k: v for k, v in model.items() if k != "device"}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{name}/{model.get('type', 'stable-diffusion')}-{digest}"
