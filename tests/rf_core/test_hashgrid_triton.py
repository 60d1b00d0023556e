"""The Triton hash grid against the torch path, on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` is set for this module only (Triton reads it when a kernel is
decorated, and the backend decorates one kernel per mode), after ``triton`` was imported.
Triton is in the ``dev`` extra on Linux, so these tests run in CI; they are skipped only
where Triton has no wheels.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from rf_core.scene.encoding import (
    HashGridConfig,
    HashGridEncoding,
    available_backends,
    resolve_backend,
)
from rf_core.scene.encoding.layout import grid_layout
from rf_core.scene.encoding.reference import hashgrid_reference
from rf_core.scene.encoding.torch_backend import TorchHashGrid
from tests.rf_core.test_encoding import CONFIGS as SMALL_CONFIGS

if sys.platform != "linux":  # Triton ships Linux wheels only; on Linux a missing one fails
    pytest.skip("Triton is installed (dev extra) on Linux only", allow_module_level=True)

# Imported before TRITON_INTERPRET is set, on purpose: the backend must not depend on the
# order (its kernel is decorated lazily per mode and calls only Triton builtins).
import triton  # noqa: E402, F401

CONFIGS = {
    **SMALL_CONFIGS,  # all dense, all hashed, both (resolutions 4 .. 97)
    # the grids the presets and benchmarks build (rf_core/presets/*.yaml over the defaults)
    "tiny_preset": HashGridConfig(n_levels=8, log2_hashmap_size=15, per_level_scale=1.6),
    "realfusion_preset": HashGridConfig(n_levels=16, base_resolution=16, per_level_scale=1.368),
    "default": HashGridConfig(),
    "multiview_bench": HashGridConfig(n_levels=16, log2_hashmap_size=17),
}
N_POINTS = 192
"""Few points: the interpreter's cost is per operation, and 192 stay one program per level."""
EDGES = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.0, 1.0, 1.0],
                      [0.5, 0.5, 0.5], [1.0, 1.0, 0.0], [0.25, 1.0, 0.75], [1e-7, 1.0, 1.0]])


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _inputs(layout, seed: int, n: int = N_POINTS):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=gen)
    x[:8] = EDGES
    x[8:12] = torch.tensor([[-0.5, 0.3, 2.0], [1.5, -1.0, 0.5], [0.3, 0.7, 1.0001],
                            [-1e-3, 0.999, 0.5]])  # outside the cube: clamped
    params = (torch.rand(layout.n_params, generator=gen) * 2 - 1).requires_grad_()
    upstream = torch.rand(n, layout.n_levels * layout.n_features, generator=gen) * 2 - 1
    return x, params, upstream


def _values_and_grads(fn, x, params, upstream):
    out = fn(x, params)
    (grad,) = torch.autograd.grad(out, params, upstream)
    return out, grad


def _triton_grid(layout):
    from rf_core.scene.encoding.triton_backend import TritonHashGrid

    return TritonHashGrid(layout)


@pytest.mark.parametrize("name, n_features", [
    ("dense", 1), ("dense", 2), ("hashed", 2), ("hashed", 4), ("mixed", 1), ("mixed", 2),
    ("mixed", 3), ("mixed", 4), ("tiny_preset", 2), ("realfusion_preset", 2), ("default", 2),
    ("multiview_bench", 2)])
def test_triton_matches_torch_path(name, n_features):
    cfg = replace(CONFIGS[name], n_features_per_level=n_features)
    layout = grid_layout(cfg)
    x, params, upstream = _inputs(layout, seed=n_features)
    out, grad = _values_and_grads(_triton_grid(layout), x, params, upstream)
    ref_out, ref_grad = _values_and_grads(TorchHashGrid(layout), x, params, upstream)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    # Same cells and weights (fma in float32 as tcnn); sums differ only in rounding order.
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=0)
    assert grad.abs().sum() > 0
    if layout.n_params <= 2**16:  # and the naive definition (too slow on 2^19 tables)
        naive = hashgrid_reference(x.clamp(0, 1), params, layout)
        torch.testing.assert_close(out, naive, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["mixed", "realfusion_preset"])
def test_triton_skips_masked_levels(name):
    layout = grid_layout(CONFIGS[name])
    L, F = layout.n_levels, layout.n_features
    x, params, upstream = _inputs(layout, seed=11)
    triton_grid, torch_grid = _triton_grid(layout), TorchHashGrid(layout)
    for k in (1, L // 2):
        mask = (torch.arange(L) < k).float().repeat_interleave(F)
        out, grad = _values_and_grads(lambda x, p, k=k: triton_grid(x, p, k), x, params,
                                      upstream)
        # The old way: all levels, the masked ones multiplied by zero.
        ref_out, ref_grad = _values_and_grads(lambda x, p, m=mask: torch_grid(x, p) * m, x,
                                              params, upstream)
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=0)
        assert torch.equal(out[:, k * F:], torch.zeros_like(out[:, k * F:]))
        first_masked = layout.offsets[k] * F
        assert torch.equal(grad[first_masked:], torch.zeros_like(grad[first_masked:]))
        assert grad[:first_masked].abs().sum() > 0


def test_encoding_with_triton_backend_under_interpreter():
    cfg = replace(CONFIGS["mixed"], backend="triton")
    assert "triton" in available_backends("cpu")
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("auto", "cpu") == "torch"  # the interpreter is for tests, not auto
    enc = HashGridEncoding(cfg)
    ref = HashGridEncoding(replace(cfg, backend="torch"))
    assert enc.backend == "triton" and list(enc.state_dict()) == ["params"]
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        enc.params.uniform_(-1, 1, generator=gen)
        ref.params.copy_(enc.params)
    x = torch.rand(2, 50, 3, generator=gen)
    enc.set_active_levels(4)
    ref.set_active_levels(4)
    out = enc(x)
    assert out.shape == (2, 50, enc.out_dim)
    torch.testing.assert_close(out, ref(x), atol=1e-6, rtol=0)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(enc.params.grad, ref.params.grad, atol=2e-6, rtol=0)
    assert enc.points_evaluated == 100 and enc.level_evaluations == 400
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc(x).dtype == torch.float32
    assert enc(torch.rand(0, 3)).shape == (0, enc.out_dim)


def test_bench_reports_interpreted_triton_parity(tmp_path):
    from rf_bench.hashgrid import run_hashgrid_bench

    report = run_hashgrid_bench(str(tmp_path / "bench.json"), sizes=(200,), repeats=1,
                                cfg=CONFIGS["mixed"], reference_repeats=1, active_levels=3)
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["triton"]["interpreted"] and rows["triton@3"]["interpreted"]
    assert "interpreted" not in rows["torch"]
    parity = {(a["backend"], a["against"]): a for a in report["accuracy"]}
    assert parity[("triton", "torch")]["max_abs_value_diff"] < 1e-5
    assert parity[("triton", "torch")]["max_abs_grad_diff"] < 1e-5
    assert parity[("triton", "reference")]["max_abs_value_diff"] < 1e-5
    assert [s["backend"] for s in report["skipped"]] == ["tcnn"]
