"""Moving values between the host and the compute device, in one counted place.

A training step should wait for the device at most once: when it reads its metrics. Every
intentional device-to-host read goes through :func:`to_host`, which tells its listeners (the
step benchmark's sync counter, ``rf_bench.syncs``), so reads that ``tolist()`` would hide from
a ``TorchDispatchMode`` on the CPU are counted too. Host-made tensors (from the CPU generators
that keep runs reproducible on any device) go to the device with :func:`to_device`: pinned and
non-blocking on CUDA, so the copy does not stall the host behind queued kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_listeners: list[Callable[[torch.Tensor], None]] = []


def add_listener(fn: Callable[[torch.Tensor], None]) -> Callable[[], None]:
    """Call ``fn(tensor)`` on every :func:`to_host` read; returns a function that removes it."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn) if fn in _listeners else None


def to_host(tensor: torch.Tensor) -> list | float | int | bool:
    """``tensor.tolist()``: a host sync when the tensor lives on an accelerator (counted)."""
    for fn in tuple(_listeners):
        fn(tensor)
    return tensor.detach().tolist()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host (pinned, non-blocking on CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
