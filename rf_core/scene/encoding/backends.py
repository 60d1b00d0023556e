"""Which hash-grid backend runs: decided here and nowhere else.

- ``torch`` (ours, every device) is always available.
- ``triton`` (ours, fused forward and backward kernels) needs the ``triton`` package, which
  ships with CUDA builds of PyTorch on Linux; it runs on CUDA devices, and on the CPU under
  Triton's interpreter (``TRITON_INTERPRET=1``: slow, for tests).
- ``tcnn`` (tiny-cuda-nn's fused CUDA kernels) needs a CUDA device and the ``tinycudann``
  package, built from source.

Optional packages are imported lazily, so that importing ``rf_core`` never fails for want of
them. ``auto`` on CUDA picks tcnn, else Triton (when it imports and a probe kernel runs and
matches the torch path), else torch with one warning.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from rf_core.scene.encoding.interpreter import triton_interpreting

TCNN_INSTALL_HINT = (
    "build tiny-cuda-nn's PyTorch bindings from source (nvcc, a C++ compiler, git submodules; "
    "see the README's hash-grid section): TCNN_CUDA_ARCHITECTURES=<e.g. 90> pip install "
    "--no-build-isolation git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
)
TRITON_INSTALL_HINT = "pip install triton (Linux; CUDA builds of torch already bring it)"


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


@functools.cache
def triton_import_error() -> str | None:
    """None if ``import triton`` works, else why not (cached)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as err:  # ImportError, or a broken install's RuntimeError / OSError
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def _triton_probe(device: str) -> str | None:
    """None if the Triton kernels compile, run on ``device`` and match the torch path on a
    small grid, else why not (cached per device: compiling takes a second or two)."""
    try:
        from rf_core.scene.encoding.config import HashGridConfig
        from rf_core.scene.encoding.layout import grid_layout
        from rf_core.scene.encoding.torch_backend import TorchHashGrid
        from rf_core.scene.encoding.triton_backend import TritonHashGrid

        layout = grid_layout(HashGridConfig(n_levels=3, base_resolution=4, per_level_scale=2.0,
                                            log2_hashmap_size=8))
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(100, 3, generator=gen).to(device)
        params = (torch.rand(layout.n_params, generator=gen) * 2 - 1).to(device)
        params.requires_grad_()
        up = torch.rand(100, layout.n_levels * layout.n_features, generator=gen).to(device)
        out = TritonHashGrid(layout)(x, params)
        (grad,) = torch.autograd.grad(out, params, up)
        ref = TorchHashGrid(layout).to(device)(x, params)
        (ref_grad,) = torch.autograd.grad(ref, params, up)
        err = max((out - ref).abs().max().item(), (grad - ref_grad).abs().max().item())
        if not err < 1e-4:
            return f"the probe kernel differs from the torch path by {err:.1e}"
    except Exception as err:  # compiler missing, driver too old, unsupported GPU...
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
    return None


def triton_unusable_reason(device: torch.device | str) -> str | None:
    """None when the Triton backend runs on ``device``, else a one-line reason."""
    device = torch.device(device)
    if triton_import_error() is not None:
        return triton_import_error()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _triton_probe(f"cuda:{index}")
    if device.type == "cpu" and triton_interpreting():
        return None
    return (f"Triton runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
            f"not on {device.type}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable in this process: always ``"torch"``, plus ``"triton"`` when it runs on
    ``device`` (default: CUDA when present, else the CPU), plus ``"tcnn"`` when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    found = ["torch"]
    if triton_unusable_reason(device) is None:
        found.append("triton")
    if tcnn_available():
        found.append("tcnn")
    return found


_warned_fallback = False


def resolve_backend(requested: str, device: torch.device | str | None = None) -> str:
    """The backend to build for ``requested`` ("auto" | "torch" | "triton" | "tcnn") on
    ``device``.

    "auto" picks tcnn on CUDA devices when it imports, else triton when it runs, else torch
    (warning once). An explicit "triton" or "tcnn" that cannot run raises RuntimeError with
    an install hint.
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
    if requested == "triton":
        if triton_import_error() is not None:
            raise RuntimeError(f"backend 'triton' is not available ({triton_import_error()}); "
                               f"{TRITON_INSTALL_HINT}")
        reason = triton_unusable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run on {device}: {reason}; "
                               "use backend 'torch' or 'auto'")
        return "triton"
    if requested != "auto":
        raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'tcnn', "
                         f"got {requested!r}")
    if device.type != "cuda":
        return "torch"
    if tcnn_available():
        return "tcnn"
    triton_reason = triton_unusable_reason(device)
    if triton_reason is None:
        return "triton"
    if not _warned_fallback:
        _warned_fallback = True
        hint = (TRITON_INSTALL_HINT if triton_import_error() is not None
                else "set hash-grid backend 'torch' to silence this")
        msg = (f"hash grid: no fused backend on {device} (tiny-cuda-nn: {tcnn_import_error()}; "
               f"Triton: {triton_reason}); using the slower torch backend; {hint}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return "torch"
