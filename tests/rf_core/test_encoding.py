"""Hash-grid encoding: the fast torch path against the naive reference, tcnn's layout, masking."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

from rf_core.scene.encoding import (
    HashGridConfig,
    HashGridEncoding,
    available_backends,
    resolve_backend,
)
from rf_core.scene.encoding.backends import tcnn_available
from rf_core.scene.encoding.layout import grid_layout, hash_coords, local_index
from rf_core.scene.encoding.reference import hashgrid_reference
from rf_core.scene.encoding.torch_backend import TorchHashGrid

CONFIGS = {
    # resolutions 4, 6, 9: every level fits densely in 2^16 entries
    "dense": HashGridConfig(n_levels=3, base_resolution=4, per_level_scale=1.5,
                            log2_hashmap_size=16),
    # 8^3 > 2^6: every level is hashed
    "hashed": HashGridConfig(n_levels=3, base_resolution=8, per_level_scale=1.5,
                             log2_hashmap_size=6),
    # resolutions 4 .. 97: dense coarse levels, hashed fine ones
    "mixed": HashGridConfig(n_levels=6, base_resolution=4, per_level_scale=1.9,
                            log2_hashmap_size=10),
}
PRESET_GRIDS = {
    # rf_core/presets/*.yaml's field.grid over HashGridConfig's defaults
    "tiny_preset": HashGridConfig(n_levels=8, log2_hashmap_size=15, per_level_scale=1.6),
    "realfusion_preset": HashGridConfig(n_levels=16, base_resolution=16, per_level_scale=1.368),
}
N_POINTS = 128
"""Few enough that float32 gradient sums over points stay well inside atol 1e-6."""


def _random_params(layout, generator) -> torch.Tensor:
    # O(1) features so that atol 1e-6 really tests the arithmetic.
    return (torch.rand(layout.n_params, generator=generator) * 2 - 1).requires_grad_()


def _values_and_grads(fn, x, params, upstream):
    out = fn(x, params)
    (grad,) = torch.autograd.grad(out, params, upstream)
    return out, grad


@pytest.mark.parametrize("n_features", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_matches_reference(name, n_features):
    cfg = replace(CONFIGS[name], n_features_per_level=n_features)
    layout = grid_layout(cfg)
    if name == "dense":
        assert not any(layout.hashed)
    elif name == "hashed":
        assert all(layout.hashed)
    else:
        assert 0 < layout.n_dense < cfg.n_levels
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N_POINTS, 3, generator=gen)
    x[:8] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.0, 1.0, 1.0],
                          [0.5, 0.5, 0.5], [1.0, 1.0, 0.0], [0.25, 1.0, 0.75], [1e-7, 1.0, 1.0]])
    params = _random_params(layout, gen)
    upstream = torch.rand(N_POINTS, layout.n_levels * n_features, generator=gen) * 2 - 1
    # Several uneven chunks, so the chunk-major bookkeeping is exercised too.
    fast = TorchHashGrid(layout, chunk_points=50)
    out, grad = _values_and_grads(fast, x, params, upstream)
    ref_out, ref_grad = _values_and_grads(lambda x, p: hashgrid_reference(x, p, layout),
                                          x, params, upstream)
    assert out.dtype == torch.float32 and out.shape == (N_POINTS, layout.n_levels * n_features)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)
    assert grad.abs().sum() > 0
    with torch.no_grad():  # the inference path keeps indices and weights per chunk only
        torch.testing.assert_close(fast(x, params), out, atol=0, rtol=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_backward_with_other_thread_counts(threads):
    # The CPU scatter splits levels into one group per thread; the result must not change.
    layout = grid_layout(CONFIGS["mixed"])
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(N_POINTS, 3, generator=gen)
    params = _random_params(layout, gen)
    upstream = torch.rand(N_POINTS, layout.n_levels * 2, generator=gen) * 2 - 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, grad = _values_and_grads(TorchHashGrid(layout, chunk_points=50), x, params, upstream)
    finally:
        torch.set_num_threads(before)
    _, ref_grad = _values_and_grads(lambda x, p: hashgrid_reference(x, p, layout),
                                    x, params, upstream)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_default_grid_matches_reference_on_many_points():
    # tcnn's default-sized grid (resolutions 16 .. 4096, 2^19-entry hashed levels).
    enc = HashGridEncoding(HashGridConfig())
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        enc.params.uniform_(-1, 1, generator=gen)
        x = torch.rand(20000, 3, generator=gen)
        torch.testing.assert_close(enc(x), hashgrid_reference(x, enc.params, enc.layout),
                                   atol=1e-6, rtol=0)


def test_dense_indexing_by_hand():
    # base_resolution 5 -> scale 4, resolution 5, 125 entries rounded up to 128.
    cfg = HashGridConfig(n_levels=1, n_features_per_level=2, base_resolution=5)
    enc = HashGridEncoding(cfg)
    assert enc.level_resolutions == [5]
    assert enc.layout.level_sizes == (128,) and enc.params.numel() == 256
    table = torch.arange(256, dtype=torch.float32).view(128, 2)
    with torch.no_grad():
        enc.params.copy_(table.view(-1))
    # pos = 4x + 0.5: x = 0.125, 0.375, 0.625 sit exactly on vertex (1, 2, 3) = 1 + 2*5 + 3*25.
    vertex = enc(torch.tensor([[0.125, 0.375, 0.625]]))
    torch.testing.assert_close(vertex, table[86:87], atol=0, rtol=0)
    # Halfway between vertices (1, 2, 3) and (2, 2, 3) along x.
    mid = enc(torch.tensor([[0.25, 0.375, 0.625]]))
    torch.testing.assert_close(mid, (table[86:87] + table[87:88]) / 2, atol=1e-6, rtol=0)
    # x = 1: pos 4.5 reaches vertex x = 5 = resolution, which tcnn does not clamp: it indexes
    # 5 + 10 + 75 = 90, i.e. the next row ("wraps"), exactly like tcnn's dense grid.
    edge = enc(torch.tensor([[1.0, 0.375, 0.625]]))
    torch.testing.assert_close(edge, (table[89:90] + table[90:91]) / 2, atol=1e-6, rtol=0)


def test_layout_matches_tcnn_rules():
    layout = grid_layout(HashGridConfig())
    assert layout.resolutions[0] == 16 and layout.resolutions[-1] == 4096
    for res, size, hashed in zip(layout.resolutions, layout.level_sizes, layout.hashed):
        assert size % 8 == 0
        assert size == min(-(-res**3 // 8) * 8, 2**19)
        assert hashed == (res**3 > size)
    assert layout.offsets[-1] == sum(layout.level_sizes)
    assert layout.n_params == layout.n_entries * 2


def test_hash_matches_uint32_arithmetic_and_stays_in_range():
    gen = torch.Generator().manual_seed(1)
    coords = torch.randint(0, 2**32, (1000, 3), generator=gen, dtype=torch.int64)
    coords[:3] = torch.tensor([[0, 0, 0], [2**32 - 1] * 3, [1, 2**31, 12345]])
    h = hash_coords(coords)
    for c, value in zip(coords.tolist(), h.tolist()):
        expected = (c[0] * 1 ^ c[1] * 2654435761 ^ c[2] * 805459861) & 0xFFFFFFFF
        assert value == expected
    layout = grid_layout(CONFIGS["mixed"])
    for level in range(layout.n_levels):
        res = layout.resolutions[level]
        cells = torch.randint(0, res + 1, (5000, 3), generator=gen)  # up to the x == res vertex
        index = local_index(cells, layout, level)
        assert index.min() >= 0 and index.max() < layout.level_sizes[level]


def test_level_masking():
    cfg = CONFIGS["mixed"]
    enc = HashGridEncoding(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        enc.params.uniform_(-1, 1, generator=gen)
    x = torch.rand(300, 3, generator=gen)
    k, F = 2, cfg.n_features_per_level
    upstream = torch.rand(300, enc.out_dim, generator=gen)
    upstream_kept = upstream.clone()
    upstream_kept[:, k * F:] = 0
    full = enc(x)
    (expected_grad,) = torch.autograd.grad(full, enc.params, upstream_kept)

    enc.set_active_levels(k)
    assert enc.active_levels == k
    masked = enc(x)
    (grad,) = torch.autograd.grad(masked, enc.params, upstream)
    assert torch.equal(masked[:, k * F:], torch.zeros_like(masked[:, k * F:]))
    torch.testing.assert_close(masked[:, :k * F], full[:, :k * F], atol=0, rtol=0)
    first_masked = enc.layout.offsets[k] * F  # masked levels' rows in the flat table
    assert torch.equal(grad[first_masked:], torch.zeros_like(grad[first_masked:]))
    assert grad[:first_masked].abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)

    enc.set_active_levels(cfg.n_levels)
    torch.testing.assert_close(enc(x), full, atol=0, rtol=0)
    for bad in (0, cfg.n_levels + 1, 1.5):
        with pytest.raises(ValueError, match="active levels"):
            enc.set_active_levels(bad)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("name", ["mixed", "tiny_preset", "realfusion_preset"])
def test_masked_levels_are_skipped_and_match_mask_multiply(name, narrow):
    # The torch path computes only the k active levels; the result must be the old one:
    # every level computed, the masked ones multiplied by zero (values and gradients).
    cfg = PRESET_GRIDS.get(name) or CONFIGS[name]
    layout = grid_layout(cfg)
    L, F = layout.n_levels, layout.n_features
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(N_POINTS, 3, generator=gen)
    params = _random_params(layout, gen)
    upstream = torch.rand(N_POINTS, L * F, generator=gen) * 2 - 1
    grid = TorchHashGrid(layout, chunk_points=50, narrow=narrow)
    for k in sorted({1, L // 2, L - 1}):
        mask = (torch.arange(L) < k).float().repeat_interleave(F)

        def mask_multiply(x, p, mask=mask):  # the old way: every level, then zeros
            return grid(x, p) * mask

        out, grad = _values_and_grads(lambda x, p, k=k: grid(x, p, k), x, params, upstream)
        ref_out, ref_grad = _values_and_grads(mask_multiply, x, params, upstream)
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=0, rtol=0)
        assert torch.equal(out[:, k * F:], torch.zeros_like(out[:, k * F:]))
        first_masked = layout.offsets[k] * F
        assert torch.equal(grad[first_masked:], torch.zeros_like(grad[first_masked:]))
        assert grad[:first_masked].abs().sum() > 0
        if name == "mixed":  # and the naive definition agrees (too slow on 2^19 tables)
            ref_out, ref_grad = _values_and_grads(
                lambda x, p, mask=mask: hashgrid_reference(x, p, layout) * mask,
                x, params, upstream)
            torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
            torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="active_levels"):
        grid(x, params, L + 1)


@pytest.mark.parametrize("name", ["dense", "hashed", "mixed", "default", "realfusion_preset"])
def test_narrow_index_math_is_bit_identical(name):
    # The GPU path's int32 / float32-buffer index math computes the CPU path's exact bits.
    cfg = PRESET_GRIDS.get(name) or CONFIGS.get(name) or HashGridConfig()
    layout = grid_layout(cfg)
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(3000, 3, generator=gen)
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [1e-7, 1.0, 1.0]])
    params = _random_params(layout, gen)
    upstream = torch.rand(3000, layout.n_levels * layout.n_features, generator=gen)
    wide = TorchHashGrid(layout, narrow=False)
    narrow = TorchHashGrid(layout, narrow=True)
    assert narrow.narrow_exact
    out_w, grad_w = _values_and_grads(wide, x, params, upstream)
    out_n, grad_n = _values_and_grads(narrow, x, params, upstream)
    assert torch.equal(out_w, out_n) and torch.equal(grad_w, grad_n)


def test_work_counters_count_points_and_active_levels():
    cfg = CONFIGS["mixed"]
    enc = HashGridEncoding(cfg)
    assert enc.points_evaluated == 0 and enc.level_evaluations == 0
    enc(torch.rand(10, 3))
    enc.set_active_levels(2)
    with torch.no_grad():
        enc(torch.rand(4, 5, 3))
    assert enc.points_evaluated == 30
    assert enc.level_evaluations == 10 * cfg.n_levels + 20 * 2
    enc.reset_counters()
    assert enc.points_evaluated == 0 and enc.level_evaluations == 0


def test_explicit_triton_errors(monkeypatch):
    from rf_core.scene.encoding import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backends.triton_import_error() is None:
        # Installed: the CPU needs the interpreter.
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", "cpu")
    monkeypatch.setattr(backends, "triton_import_error",
                        lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available .*pip install "
                                           r"triton"):
        resolve_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="pip install triton"):
        HashGridEncoding(HashGridConfig(backend="triton"))
    assert "triton" not in available_backends("cpu")


def test_auto_on_cuda_prefers_tcnn_then_triton_then_torch(monkeypatch):
    # The choice alone, without a GPU: the availability checks are stubbed.
    from rf_core.scene.encoding import backends

    monkeypatch.setattr(backends, "tcnn_available", lambda: True)
    assert resolve_backend("auto", "cuda") == "tcnn"
    monkeypatch.setattr(backends, "tcnn_available", lambda: False)
    monkeypatch.setattr(backends, "tcnn_import_error", lambda: "ImportError: no tinycudann")
    monkeypatch.setattr(backends, "triton_unusable_reason", lambda device: None)
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(backends, "triton_unusable_reason", lambda device: "no compiler")
    monkeypatch.setattr(backends, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="no fused backend.*no compiler"):
        assert resolve_backend("auto", "cuda") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert resolve_backend("auto", "cuda") == "torch"


def test_inputs_are_clamped():
    enc = HashGridEncoding(CONFIGS["mixed"])
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.rand(200, 3) * 3 - 1  # [-1, 2]
    torch.testing.assert_close(enc(x), enc(x.clamp(0, 1)), atol=0, rtol=0)


def test_encoding_module_surface():
    enc = HashGridEncoding(CONFIGS["mixed"])
    assert enc.backend == "torch"
    assert enc.out_dim == 12
    assert list(enc.state_dict()) == ["params"]
    assert enc.params.dtype == torch.float32 and enc.params.abs().max() <= 1e-4
    assert enc(torch.rand(0, 3)).shape == (0, 12)
    assert enc(torch.rand(4, 5, 3)).shape == (4, 5, 12)
    with pytest.raises(ValueError, match="float32"):
        enc._torch(torch.rand(4, 3), enc.params.detach().double())


@pytest.mark.parametrize("kwargs, match", [
    ({"n_levels": 0}, "n_levels must be a positive integer"),
    ({"n_features_per_level": 2.0}, "n_features_per_level must be a positive integer"),
    ({"log2_hashmap_size": -3}, "log2_hashmap_size"),
    ({"log2_hashmap_size": 31}, "log2_hashmap_size must be <= 30"),
    ({"base_resolution": 0}, "base_resolution"),
    ({"per_level_scale": 0.9}, "per_level_scale must be >= 1"),
    ({"backend": "cuda"}, "backend must be one of auto, torch, triton, tcnn"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HashGridConfig(**kwargs)


def test_to_tcnn():
    assert HashGridConfig().to_tcnn() == {
        "otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2,
        "log2_hashmap_size": 19, "base_resolution": 16, "per_level_scale": 1.447269237440378,
    }


def test_backend_resolution_on_cpu():
    assert "torch" in available_backends()
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError):
        resolve_backend("fast", "cpu")


@pytest.mark.skipif(tcnn_available(), reason="tiny-cuda-nn is installed here")
def test_explicit_tcnn_without_tcnn_gives_install_hint():
    hint = (r"pip install --no-build-isolation "
            r"git\+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch")
    with pytest.raises(RuntimeError, match=hint):
        resolve_backend("tcnn")
    with pytest.raises(RuntimeError, match=hint):
        HashGridEncoding(HashGridConfig(backend="tcnn"), device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_backend_on_cuda_matches_reference(name):
    layout = grid_layout(CONFIGS[name])
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2000, 3, generator=gen).cuda()
    params = _random_params(layout, gen).detach().cuda().requires_grad_()
    upstream = (torch.rand(2000, layout.n_levels * 2, generator=gen) * 2 - 1).cuda()
    fast = TorchHashGrid(layout).cuda()
    out, grad = _values_and_grads(fast, x, params, upstream)
    ref_out, ref_grad = _values_and_grads(lambda x, p: hashgrid_reference(x, p, layout),
                                          x, params, upstream)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not tcnn_available(), reason="needs CUDA and tiny-cuda-nn (tinycudann)")
@pytest.mark.parametrize("name", list(CONFIGS) + ["default"])
def test_tcnn_matches_torch(name):
    cfg = CONFIGS.get(name, HashGridConfig())
    tcnn = HashGridEncoding(replace(cfg, backend="tcnn"), device="cuda")
    ours = HashGridEncoding(replace(cfg, backend="torch"), device="cuda")
    assert tcnn.backend == "tcnn" and ours.backend == "torch"
    gen = torch.Generator().manual_seed(4)
    # fp16-representable parameters, so only tcnn's half-precision arithmetic differs.
    values = (torch.rand(tcnn.params.numel(), generator=gen) * 2 - 1).half().float().cuda()
    with torch.no_grad():
        tcnn.params.copy_(values)
        ours.params.copy_(values)
    x = torch.rand(4096, 3, generator=gen).cuda()
    upstream = (torch.rand(4096, tcnn.out_dim, generator=gen) * 2 - 1).cuda()
    out_t, grad_t = _values_and_grads(lambda x, p: tcnn(x), x, tcnn.params, upstream)
    out_o, grad_o = _values_and_grads(lambda x, p: ours(x), x, ours.params, upstream)
    assert out_t.dtype == torch.float32
    # tcnn interpolates and accumulates gradients in fp16: compare at half precision (a layout
    # mismatch would show as O(1) differences).
    assert (out_t - out_o).abs().max() < 1e-2
    assert (grad_t - grad_o).norm() <= 3e-2 * grad_o.norm()


def test_bench_runs_reduced(tmp_path, capsys):
    from rf_bench.hashgrid import run_hashgrid_bench

    out = tmp_path / "bench.json"
    report = run_hashgrid_bench(str(out), sizes=(300,), repeats=1, cfg=CONFIGS["mixed"],
                                reference_repeats=1)
    assert "reference" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["config"]["n_levels"] == 6 and saved["threads"] == torch.get_num_threads()
    cpu = {r["backend"]: r for r in saved["results"] if r["device"] == "cpu"}
    assert set(cpu) >= {"torch", "reference"}
    assert all(r["forward_points_per_s"] > 0 and r["forward_backward_points_per_s"] > 0
               for r in cpu.values())
    torch_vs_ref = [a for a in report["accuracy"] if a["device"] == "cpu"][0]
    assert torch_vs_ref["max_abs_value_diff"] < 1e-5
    skipped = {s["backend"]: s["reason"] for s in saved["skipped"] if s["device"] == "cpu"}
    assert "CUDA" in skipped["tcnn"]
    if "triton" not in cpu:  # without TRITON_INTERPRET=1, the CPU skips Triton and says why
        assert "TRITON_INTERPRET=1" in skipped["triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["mixed", "realfusion_preset", "default"])
def test_narrow_corners_on_cuda_equal_the_cpu_bits(name):
    # The CUDA path's mixed-precision addcmul and int32 index math give the CPU's exact
    # corner indices and weights (tcnn's fmaf positions), with no float64 buffer.
    from rf_core.scene.encoding.torch_backend import _corners, _Workspace

    layout = grid_layout({**CONFIGS, **PRESET_GRIDS, "default": HashGridConfig()}[name])
    L, n = layout.n_levels, 20000
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(9))
    results = []
    for device in ("cpu", "cuda"):
        grid = TorchHashGrid(layout).to(device)
        index = torch.empty(L, n, 8, dtype=grid.offset.dtype, device=device)
        weight = torch.empty(L, n, 8, device=device)
        _corners(x.to(device), grid, index, weight, _Workspace(torch.device(device)))
        results.append((index.cpu(), weight.cpu()))
    (i_cpu, w_cpu), (i_gpu, w_gpu) = results
    assert torch.equal(i_cpu, i_gpu) and torch.equal(w_cpu, w_gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["mixed", "tiny_preset", "realfusion_preset", "default"])
def test_triton_on_cuda_matches_torch(name):
    from rf_core.scene.encoding.backends import triton_unusable_reason

    reason = triton_unusable_reason("cuda")
    assert reason is None, f"Triton does not run on this GPU: {reason}"
    from rf_core.scene.encoding.triton_backend import TritonHashGrid

    layout = grid_layout({**CONFIGS, **PRESET_GRIDS, "default": HashGridConfig()}[name])
    gen = torch.Generator().manual_seed(10)
    n = 1 << 16
    x = torch.rand(n, 3, generator=gen).cuda()
    params = _random_params(layout, gen).detach().cuda().requires_grad_()
    upstream = (torch.rand(n, layout.n_levels * layout.n_features, generator=gen) * 2 - 1).cuda()
    ours, fused = TorchHashGrid(layout).cuda(), TritonHashGrid(layout).cuda()
    for k in (None, max(1, layout.n_levels // 2)):
        out, grad = _values_and_grads(lambda x, p, k=k: fused(x, p, k), x, params, upstream)
        ref, ref_grad = _values_and_grads(lambda x, p, k=k: ours(x, p, k), x, params, upstream)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        # Atomic float32 adds in any order: compare at float32 summation accuracy.
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-5)
    assert resolve_backend("triton", "cuda") == "triton"
    if not tcnn_available():
        assert resolve_backend("auto", "cuda") == "triton"
