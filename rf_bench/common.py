"""What every benchmark shares: device names, synchronised median timing, atomic JSON, the
formatting of optional numbers."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rf_core.files.atomic import atomic_write_json

__all__ = ["LOG_TAIL_CHARS", "REPO_ROOT", "cpu_name", "device_name", "fmt", "median_time",
           "megabytes", "one_line_error", "package_version", "part_device", "sync", "write_json"]

LOG_TAIL_CHARS = 3000
"""Characters of a child process's output kept in a report."""
REPO_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding ``rf_bench`` (the repository, in a source checkout)."""


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def package_version(package: str) -> str | None:
    """The installed version of ``package``; None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int,
                warmup: int = 1) -> tuple[float, object]:
    """``warmup`` untimed calls, then the median of ``repeats`` timed calls:
    (seconds, the last call's result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, data)


def fmt(value: float | None, spec: str = ".3g") -> str:
    """``value`` formatted with ``spec``, or ``-`` when it was not measured (None)."""
    return "-" if value is None else format(value, spec)


def megabytes(nbytes: int | None) -> float | None:
    """Bytes as MB (2^20), one decimal; None stays None."""
    return None if nbytes is None else round(nbytes / 2**20, 1)


def one_line_error(err: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters, for a report's status."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def part_device(smoke: bool) -> torch.device:
    """The device of a gpu-check part: the CPU in its tiny smoke configuration, else CUDA."""
    return torch.device("cpu" if smoke else "cuda")
