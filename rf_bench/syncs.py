"""Counting host syncs and peak tensor memory of a block of code, on any device.

A host sync is a point where the host waits for the device: reading a value
(``aten._local_scalar_dense`` behind ``.item()``, ``float(t)``, ``bool(t)``), a data-dependent
shape (``aten.nonzero``), or a device-to-host copy. :class:`SyncCounter` sees the first two
kinds through a ``TorchDispatchMode`` (it works on the CPU, where nothing truly waits, so
the count there is what a GPU run would wait for); device-to-host copies only exist on an
accelerator, so they are counted there from ``aten._to_copy``/``aten.copy_`` with a CPU
destination; the deliberate reads that go through :func:`rf_core.host_sync.to_host` (which
``tolist()`` would hide from the mode on the CPU) are counted by its listener.

Host-side values (the CPU generators' draws) are not syncs on a GPU: on an accelerator run,
ops on CPU tensors are not counted.

:func:`peak_memory` gives the peak bytes allocated while a block runs, above what was
allocated when it began: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's
peak resident memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above its
resident memory at the start, or, where that is unavailable, the torch profiler's allocation
events (``profile_memory=True``) summed in time order.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rf_core import host_sync

_aten = torch.ops.aten
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.item.default,
                 _aten.is_nonzero.default}
_DATA_SHAPES = {_aten.nonzero.default, _aten.masked_select.default,
                _aten.unique_consecutive.default, _aten._unique2.default}
_COPIES = {_aten._to_copy.default, _aten.copy_.default}


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter(device) as c: ...`` then ``c.total`` and ``c.by_kind``.

    ``trace``: also count by the project source line that caused each sync (``c.by_site``).

    ``device``: the run's compute device. On an accelerator only ops touching its tensors
    count; on the CPU every op counts (the CPU is the device).
    """

    def __init__(self, device: torch.device | str, trace: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.by_kind: Counter[str] = Counter()
        self.by_site: Counter[str] = Counter()
        self.trace = trace
        self._remove = None

    def _count(self, kind: str) -> None:
        self.by_kind[kind] += 1
        if self.trace:
            self.by_site[f"{kind} at {_project_frame()}"] += 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _on_device(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and (
            self.device.type == "cpu" or tensor.device.type == self.device.type)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in _SCALAR_READS and self._on_device(first):
            self._count("scalar_read")
        elif func in _DATA_SHAPES and self._on_device(first):
            self._count(func.__name__.split(".")[0])
        elif func in _COPIES and self.device.type != "cpu":
            src = args[1] if func is _aten.copy_.default else first
            dst_cpu = (first.device.type == "cpu" if func is _aten.copy_.default
                       else torch.device(kwargs.get("device") or src.device).type == "cpu")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                self._count("device_to_host")
        return func(*args, **kwargs)

    def _on_read(self, tensor: torch.Tensor) -> None:
        if self.device.type == "cpu" or tensor.device.type != "cpu":
            self._count("to_host")

    def __enter__(self):
        self._remove = host_sync.add_listener(self._on_read)
        return super().__enter__()

    def __exit__(self, *exc):
        self._remove()
        return super().__exit__(*exc)


def _project_frame() -> str:
    """``file:line (function)`` of the innermost caller in the project's own code."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        package = next((p for p in ("rf_core", "rf_distributed") if f"/{p}/" in name), None)
        if package and not name.endswith("host_sync.py"):
            where = f"{package}/{name.rsplit(f'/{package}/', 1)[-1]}"
            return f"{where}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


@contextlib.contextmanager
def peak_memory(device: torch.device | str):
    """Yield a dict whose ``"bytes"`` is, on exit, the peak allocation above the start, and
    ``"method"`` how it was measured."""
    device = torch.device(device)
    out: dict = {"bytes": None, "method": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(bytes=torch.cuda.max_memory_allocated(device) - base,
                   method="torch.cuda.max_memory_allocated")
        return
    if _reset_peak_rss():
        base = _rss_kb("VmRSS")
        yield out
        out.update(bytes=max(0, _rss_kb("VmHWM") - base) * 1024,
                   method="peak resident memory above the start (Linux VmHWM, reset per step)")
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    out.update(bytes=peak, method="torch.profiler allocation events (CPU)")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``5`` into clear_refs); False where unsupported.

    Cheaper and more robust than the profiler on steps with many gigabytes of activations
    (the profiler's event list grows with every allocation)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _rss_kb("VmHWM")
    except OSError:
        return False
    return True
