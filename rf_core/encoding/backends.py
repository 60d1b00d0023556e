"""Which hash-grid backend runs: decided here and nowhere else.

``torch`` (ours, every device) is always available. ``tcnn`` (tiny-cuda-nn's fused CUDA
kernels) needs a CUDA device and the ``tinycudann`` package, which is imported lazily so that
importing ``rf_core`` never fails for want of it.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

TCNN_INSTALL_HINT = (
    "install tiny-cuda-nn's PyTorch bindings (needs CUDA and a compiler): "
    "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
)


@functools.cache
def tcnn_import_error() -> str | None:
    """None if ``import tinycudann`` works, else why not (cached: the import is slow)."""
    try:
        importlib.import_module("tinycudann")
    except Exception as err:  # the bindings raise EnvironmentError, ImportError, OSError...
        return f"{type(err).__name__}: {err}"
    return None


def tcnn_available() -> bool:
    """True when CUDA is usable and ``tinycudann`` imports."""
    return torch.cuda.is_available() and tcnn_import_error() is None


def available_backends() -> list[str]:
    """Backends usable in this process: always ``"torch"``, plus ``"tcnn"`` when available."""
    return ["torch", "tcnn"] if tcnn_available() else ["torch"]


_warned_fallback = False


def resolve_backend(requested: str, device: torch.device | str | None = None) -> str:
    """The backend to build for ``requested`` ("auto" | "torch" | "tcnn") on ``device``.

    "auto" picks tcnn on CUDA devices when it imports, else torch (warning once when a CUDA
    run falls back). An explicit "tcnn" that cannot run raises RuntimeError with an install hint.
    """
    global _warned_fallback
    device = torch.device(device) if device is not None else torch.device("cpu")
    if requested == "torch":
        return "torch"
    if requested == "tcnn":
        if not tcnn_available():
            reason = tcnn_import_error() or "CUDA is not available"
            raise RuntimeError(f"backend 'tcnn' is not available ({reason}); {TCNN_INSTALL_HINT}")
        if device.type != "cuda":
            raise RuntimeError(f"backend 'tcnn' runs only on CUDA devices, got {device}; "
                               "use backend 'torch' or 'auto'")
        return "tcnn"
    if requested != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'tcnn', got {requested!r}")
    if device.type != "cuda":
        return "torch"
    if tcnn_available():
        return "tcnn"
    if not _warned_fallback:
        _warned_fallback = True
        msg = (f"hash grid: tiny-cuda-nn unavailable ({tcnn_import_error()}), using the slower "
               f"torch backend on CUDA; {TCNN_INSTALL_HINT}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return "torch"
