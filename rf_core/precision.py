"""Precision and device names, in one place: what ``auto``, ``fp32``/``no``, ``fp16`` and
``bf16`` mean, and which device strings a config may hold.

Configs hold a canonical name (``auto``, ``fp32``, ``fp16``, ``bf16``). ``no`` (and YAML's
``false``, which is what a bare ``no`` parses to), ``none``, ``float32`` mean ``fp32``;
``half``/``float16`` and ``bfloat16`` are accepted too. ``auto`` is fp16 on CUDA and fp32
elsewhere: bf16 matmuls are slow on CPUs without AMX, and fp16 is what CUDA tensor cores and
the authors' ``--O`` runs use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

_log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)
_ALIASES = {"no": "fp32", "none": "fp32", "float32": "fp32", "false": "fp32", "off": "fp32",
            "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def parse_precision(value: Any, key: str = "precision") -> str:
    """A precision as written (a name or YAML ``false``) -> its canonical name."""
    from rf_core.config import ConfigError

    if value is False or value is None:
        return "fp32"
    if isinstance(value, str):
        name = value.strip().lower()
        name = _ALIASES.get(name, name)
        if name in PRECISIONS:
            return name
    raise ConfigError(f"{key}: unknown precision {value!r}; use auto, fp32 (or no), fp16 or bf16")


def precision_field(default: str = "auto") -> Any:
    """A dataclass field holding a precision name; ``rf_core.config.build`` parses it."""
    return dataclasses.field(default=default, metadata={"parse": parse_precision})


DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(value: Any, key: str = "device") -> str:
    """A device as written (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) -> its name.

    Only the spelling is checked here: a config may be built on a machine without the GPU its
    trials run on. :func:`resolve_device` checks that the device exists.
    """
    from rf_core.config import ConfigError

    if isinstance(value, str):
        name = value.strip().lower()
        if name == "auto":
            return name
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            device = None
        if device is not None and device.type in DEVICE_TYPES:
            return name
    raise ConfigError(f"{key}: unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")


def device_field(default: str = "auto") -> Any:
    """A dataclass field holding a device name; ``rf_core.config.build`` parses it."""
    return dataclasses.field(default=default, metadata={"parse": parse_device})


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The device ``name`` means here (``auto``: CUDA when available); a device this machine
    lacks is a ``ConfigError`` naming ``key``, raised before any work starts."""
    from rf_core.config import ConfigError

    name = parse_device(name, key)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        note_unusable_gpu()
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available here; use {key}=cpu "
                              "or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name} but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s); use a smaller index or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name} but MPS is not available here; use {key}=cpu or auto")
    return device


# ---------------------------------------------------------------------------- unusable GPUs
CUDA12_INSTALL = ("make install TORCH_SPEC=torch==2.13.0+cu126 "
                  "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126")
"""A CUDA 12 build of the default torch (the Makefile passes TORCH_SPEC to pip as one
requirement, so the index travels in pip's own environment variable)."""
GPU_NOTED_ENV = "RF_GPU_NOTED"
"""Set once the unusable-GPU line was said: later resolutions in this process and in the
processes it starts (Ray workers inherit the environment) stay quiet; `rf` clears it after
each command."""


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU, whatever torch thinks: the kernel driver's
    ``/proc/driver/nvidia`` or ``nvidia-smi`` on the PATH."""
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def unusable_gpu_message() -> str | None:
    """One line when an NVIDIA GPU is present but torch cannot use it, with the fix; None
    when torch sees CUDA or there is no NVIDIA GPU."""
    if torch.cuda.is_available() or not nvidia_gpu_present():
        return None
    build = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})"
                                            if torch.version.cuda else " (a CPU-only build)")
    return (f"rf: warning: an NVIDIA GPU is present but {build} cannot use it, so device=auto "
            "runs on the CPU; the default torch 2.13 is a CUDA 13 build that needs NVIDIA "
            f"driver >= 580 (see nvidia-smi): update the driver, or install a CUDA 12 build: "
            f"{CUDA12_INSTALL}")


def note_unusable_gpu() -> None:
    """Log :func:`unusable_gpu_message` once (see ``GPU_NOTED_ENV``); nothing when the GPU
    is usable or absent."""
    if os.environ.get(GPU_NOTED_ENV) == "1":
        return
    message = unusable_gpu_message()
    if message is not None:
        os.environ[GPU_NOTED_ENV] = "1"
        _log.warning(message)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype a precision name means on ``device`` (``auto``: fp16 on CUDA, else fp32)."""
    name = parse_precision(name)
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def autocast_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``name`` on ``device``, or None for plain fp32."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX).

    Without it (AVX2-only CPUs such as many AMD EPYCs) PyTorch emulates bf16 and a full-size
    UNet step under bf16 autocast is tens of times slower than in fp32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, p)() for p in probes if hasattr(torch.cpu, p))
    except RuntimeError:  # an unusual build: fall back to the kernel's flags
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
