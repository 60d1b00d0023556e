"""The pure-PyTorch hash grid: all levels at once, one fused gather, scatter-add backward.

Forward, per chunk of ``n`` points and for all ``L`` levels together (index math no_grad):

1. positions, cells and per-axis weights ``[L, 3, n]`` (points innermost: long vector ops),
2. index terms of the low and high vertex along each axis ``[L, 3, 2, n]`` (dense levels
   sum ``x + y*res + z*res^2``; hashed levels xor the prime products, masked to the table),
3. corner indices into the flat table and trilinear weights, ``[L, n, 8]`` each,
4. ``embedding_bag(mode="sum", per_sample_weights=...)``: gather and weighted sum in one
   kernel, never materialising the ``[L, n, 8, F]`` corner features.

Rows are level-major (``[L, n, 8]`` rather than ``[n, L, 8]``): consecutive lookups hit one
level's table, as tcnn's kernels do with one block row per level (~1.5x faster gathers).

Only the ``k`` active (coarsest) levels are computed when coarse-to-fine masking is on: the
masked levels' output columns are zeros and their table rows get exactly zero gradient, with no
index, gather or scatter work spent on them.

Backward scatter-adds ``weight * grad_out`` into a table-shaped gradient with ``index_add_``;
only the corner indices (int32) and weights are saved, ``64 * L`` bytes per point. The
gradient with respect to the input points is not computed (``None``): the field takes
normals by finite differences.

On the CPU, work runs in chunks with scratch buffers reused across chunks (a fresh large
tensor costs page faults that outweigh the arithmetic on it), and the serial CPU
``index_add_`` runs one thread per group of levels (the groups own disjoint table rows).

On GPUs the index math is *narrow*: positions are one mixed-precision ``addcmul`` that reads
float32 points and writes float32 positions (CUDA evaluates it in float64 registers, so it
still equals tcnn's ``fmaf`` without any float64 tensor in memory), and cells and hash
products are int32 (exact: only the low ``log2(size)`` bits of a product are kept, and the
layout is checked to fit). The CPU keeps its float64/int64 buffers, which are faster there.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from rf_core.scene.encoding.layout import PRIMES, GridLayout

CPU_CHUNK_POINTS = 1 << 15
"""Points per chunk on the CPU. Large enough to amortise per-op overhead (and OpenMP start-up,
which is costly on a busy machine); its scratch (~4 KB per point at L=16, ~140 MB) is
allocated once per call and reused by every chunk."""
GPU_CHUNK_POINTS = 1 << 16
"""Points per chunk on GPUs: few launches per op, scratch bounded to ~270 MB (at L=16)."""


class TorchHashGrid(nn.Module):
    """Callable ``(x [N, 3], params [n_params]) -> [N, L*F]`` holding per-level constants.

    The constants are non-persistent buffers: they follow ``.to(device)`` but stay out of
    checkpoints (they are a function of the config).
    """

    def __init__(self, layout: GridLayout, chunk_points: int | None = None,
                 narrow: bool | None = None):
        super().__init__()
        self.layout = layout
        self.chunk_points = chunk_points
        """Points per chunk; None picks CPU_CHUNK_POINTS or GPU_CHUNK_POINTS by device."""
        self.narrow = narrow
        """int32 index math and no float64 buffers (see the module doc); None: on non-CPU
        devices. Both ways compute the same bits."""
        L = layout.n_levels
        # int32 indices halve the memory traffic of the [L, N, 8] index tensor; legal while
        # the table has fewer than 2^31 entries.
        index_dtype = torch.int32 if layout.n_entries < 2**31 else torch.int64
        sizes = torch.tensor(layout.level_sizes, dtype=torch.int64)
        res = torch.tensor(layout.resolutions, dtype=torch.int64)
        # float64 scales: a float32 product is exact in float64, emulating tcnn's fmaf.
        self.register_buffer("scale", torch.tensor(layout.scales, dtype=torch.float64)
                             .view(L, 1, 1), persistent=False)
        # Per-axis multipliers: dense levels use (1, res, res^2); hashed ones tcnn's primes.
        dense_mult = torch.stack([torch.ones_like(res), res, res * res], dim=1)
        hash_mult = torch.tensor(PRIMES, dtype=torch.int64).expand(L, 3)
        hashed = torch.tensor(layout.hashed).view(L, 1)
        mult = torch.where(hashed, hash_mult, dense_mult).view(L, 3, 1)
        # Hashed levels keep log2(size) bits; dense indices are below 2^30, so all-ones.
        mask = torch.where(hashed, sizes.view(L, 1) - 1, torch.tensor(2**31 - 1)).view(L, 1, 1)
        self.register_buffer("mult", mult, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("mask_idx", mask.to(index_dtype), persistent=False)
        # The high vertex's term is the low one plus this (mod the level size).
        self.register_buffer("step", (mult & mask).to(index_dtype), persistent=False)
        # The narrow path multiplies the low cell by the pre-masked multiplier in int32: the
        # kept low bits are the same, and the product must not pass 2^31. The low cell is at
        # most floor(scale + 0.5) per axis.
        cell_max = torch.tensor([math.floor(s + 0.5) for s in layout.scales]).view(L, 1, 1)
        self.narrow_exact = bool((cell_max * (mult & mask) < 2**31).all())
        self.register_buffer("mult32", (mult & mask).to(torch.int32), persistent=False)
        self.register_buffer("mask32", mask.to(torch.int32), persistent=False)
        self.register_buffer("one_half", torch.tensor(0.5, dtype=torch.float64), persistent=False)
        self.register_buffer("one", torch.tensor(1.0), persistent=False)
        self.register_buffer("size", sizes.to(index_dtype).view(L, 1, 1, 1), persistent=False)
        self.register_buffer("offset", torch.tensor(layout.offsets[:-1], dtype=index_dtype)
                             .view(L, 1, 1, 1), persistent=False)
        self.n_dense = layout.n_dense
        # Resolutions never shrink, so the dense levels come first; the kernels rely on it.
        assert layout.hashed == tuple(level >= self.n_dense for level in range(L))

    def forward(self, x: torch.Tensor, params: torch.Tensor,
                active_levels: int | None = None) -> torch.Tensor:
        """x: [N, 3] in [0, 1] (clamped), params: [n_params] -> [N, L*F] float32.

        Only the ``active_levels`` coarsest levels (default: all) are computed; the columns
        of the others are zeros and their table rows get zero gradient.
        """
        L = self.layout.n_levels
        k = L if active_levels is None else active_levels
        if not 1 <= k <= L:
            raise ValueError(f"active_levels must be in [1, {L}], got {k}")
        # Without a parameter gradient to come, indices and weights live only per chunk.
        keep = torch.is_grad_enabled() and params.requires_grad
        return _HashGridFunction.apply(x, params, self, keep, k)


class _Workspace:
    """Named flat scratch buffers, reused across chunks.

    On the CPU a fresh multi-megabyte tensor costs page faults on first touch, more than the
    arithmetic on it; allocating each temporary once per call and writing with ``out=`` pays
    that once per call instead of once per chunk and op.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)


def _chunks(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


def _chunk_size(grid: TorchHashGrid, device: torch.device) -> int:
    if grid.chunk_points is not None:
        return grid.chunk_points
    return CPU_CHUNK_POINTS if device.type == "cpu" else GPU_CHUNK_POINTS


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, grid: TorchHashGrid,
                keep: bool, active: int) -> torch.Tensor:
        layout = grid.layout
        # L: the levels computed (the active ones); the output still has all n_levels.
        L, Fdim, N = active, layout.n_features, x.shape[0]
        device = x.device
        if device.type == "cpu" and params.dtype != torch.float32:
            raise ValueError(f"the torch hash grid keeps its table in float32 on the CPU, "
                             f"got {params.dtype}; call .float() on the encoding")
        table = params.detach().view(layout.n_entries, Fdim)
        out = torch.empty(N, layout.n_levels, Fdim, dtype=table.dtype, device=device)
        if L < layout.n_levels:
            out[:, L:] = 0
        x = x.detach().float().clamp(0.0, 1.0)
        ws = _Workspace(device)
        chunk = _chunk_size(grid, device)
        if keep:
            # Saved as one contiguous [L, n, 8] block per chunk, laid end to end (chunk-major),
            # so a chunk's rows are one slice rather than L strided pieces.
            index = torch.empty(L * N * 8, dtype=grid.offset.dtype, device=device)
            weight = torch.empty(L * N * 8, dtype=table.dtype, device=device)
        # Autocast must not recast the table: the weights and indices are exact as they are.
        with torch.autocast(device.type, enabled=False):
            for start, stop in _chunks(N, chunk):
                n = stop - start
                if keep:
                    idx = index[L * start * 8:L * stop * 8].view(L, n, 8)
                    w = weight[L * start * 8:L * stop * 8].view(L, n, 8)
                else:
                    idx = ws("index", (L, n, 8), grid.offset.dtype)
                    w = ws("weight", (L, n, 8), table.dtype)
                _corners(x[start:stop], grid, idx, w, ws)
                feat = F.embedding_bag(idx.view(L * n, 8), table,
                                       per_sample_weights=w.view(L * n, 8), mode="sum")
                out[start:stop, :L] = feat.view(L, n, Fdim).transpose(0, 1)  # from [L * n, F]
        if keep:
            ctx.save_for_backward(index, weight)
        ctx.grid = grid
        ctx.active = L
        return out.view(N, layout.n_levels * Fdim).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        index, weight = ctx.saved_tensors
        grid = ctx.grid
        L, Fdim = ctx.active, grid.layout.n_features
        N = grad_out.shape[0]
        # Masked levels' columns are dropped: their table rows keep exactly zero gradient.
        grad_out = grad_out.reshape(N, grid.layout.n_levels, Fdim)[:, :L].to(weight.dtype)
        chunk = _chunk_size(grid, index.device)
        if index.device.type == "cpu":
            grad = _scatter_cpu(index, weight, grad_out, grid.layout, chunk)
            return None, grad.view(-1), None, None, None
        # GPUs: one atomic scatter-add per chunk (a single one up to GPU_CHUNK_POINTS points).
        grad = torch.zeros(grid.layout.n_entries, Fdim, dtype=weight.dtype, device=index.device)
        for start, stop in _chunks(N, chunk):
            rows = slice(L * start * 8, L * stop * 8)
            w = weight[rows].view(L, stop - start, 8, 1)
            src = w * grad_out[start:stop].transpose(0, 1).unsqueeze(2)  # [L, n, 8, F]
            grad.index_add_(0, index[rows], src.view(-1, Fdim))
        return None, grad.view(-1), None, None, None


_POOL: tuple[tuple[int, int], ThreadPoolExecutor] | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A lazily made pool, remade in forked children (whose copy has no live threads)."""
    global _POOL
    key = (os.getpid(), workers)
    if _POOL is None or _POOL[0] != key:
        _POOL = (key, ThreadPoolExecutor(workers, thread_name_prefix="rf-hashgrid"))
    return _POOL[1]


def _scatter_cpu(index: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor,
                 layout: GridLayout, chunk: int) -> torch.Tensor:
    """Table gradient ``sum weight * grad_out`` per entry: [n_entries, F].

    Args:
        index, weight: [L * N * 8] chunk-major, as saved by the forward.
        grad_out: [N, L, F], ``L`` the active (computed) levels.

    CPU ``index_add_`` is serial, so the levels are split into one contiguous group per
    thread: groups own disjoint table rows, so their adds run concurrently without races and
    the result does not depend on scheduling.
    """
    N, L, Fdim = grad_out.shape
    grad = torch.zeros(layout.n_entries, Fdim, dtype=weight.dtype)
    if Fdim == 2:
        # index_add_ on 2-D tensors adds row by row (very slow on the CPU); a complex64 view
        # turns each F=2 row into one scalar for the fast 1-D kernel, adding both halves exactly.
        target = torch.view_as_complex(grad)
    else:
        target = grad.view(-1)
    feature = torch.arange(Fdim)

    def scatter(lo: int, hi: int) -> None:
        ws = _Workspace(torch.device("cpu"))
        for start, stop in _chunks(N, chunk):
            n = stop - start
            rows = slice(8 * (L * start + lo * n), 8 * (L * start + hi * n))
            w = weight[rows].view(hi - lo, n, 8)
            g = grad_out[start:stop, lo:hi].transpose(0, 1)  # [hi - lo, n, F]
            src = ws("src", (hi - lo, n, 8, Fdim), w.dtype)
            for f in range(Fdim):  # F strided multiplies beat one tiny-inner-dim broadcast
                torch.mul(w, g[..., f:f + 1], out=src[..., f])
            if Fdim == 2:
                target.index_add_(0, index[rows], torch.view_as_complex(src).view(-1))
            elif Fdim == 1:
                target.index_add_(0, index[rows], src.view(-1))
            else:
                flat = index[rows].long().unsqueeze(1) * Fdim + feature
                target.index_add_(0, flat.view(-1), src.view(-1))

    groups = _level_groups(layout, max(1, min(torch.get_num_threads(), L)), L)
    if len(groups) == 1:
        scatter(0, L)
        return grad
    futures = [_thread_pool(len(groups) - 1).submit(scatter, lo, hi) for lo, hi in groups[1:]]
    scatter(*groups[0])
    for fut in futures:
        fut.result()
    return grad


@functools.lru_cache(maxsize=64)
def _level_groups(layout: GridLayout, n_groups: int, n_levels: int) -> list[tuple[int, int]]:
    """Contiguous ranges of the first ``n_levels`` levels of about equal scatter cost, one per
    thread.

    Measured on a 2-core Xeon: adds into a level whose table fits in cache cost ~0.4x those
    into a 4 MB hashed level, so cost = 0.4 + 0.6 * min(1, table bytes / 4 MB).
    """
    costs = [0.4 + 0.6 * min(1.0, size * layout.n_features * 4 / 2**22)
             for size in layout.level_sizes[:n_levels]]
    total, bounds, acc = sum(costs), [0], 0.0
    for level, cost in enumerate(costs):
        # Cut before this level if the target falls in its first half.
        if len(bounds) < n_groups and acc + cost / 2 >= total * len(bounds) / n_groups:
            bounds.append(level)
        acc += cost
    bounds = sorted(set(bounds + [n_levels]))
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def _corners(x: torch.Tensor, grid: TorchHashGrid, index: torch.Tensor, weight: torch.Tensor,
             ws: _Workspace) -> None:
    """Fill corner indices ``index [L, n, 8]`` and trilinear weights ``weight [L, n, 8]`` of
    the ``L`` coarsest levels (``L = index.shape[0]``, the active ones).

    Works corner-major (``[L, 8, n]``: long, contiguous vector ops) and transposes once at
    the end. Corner ``c`` takes the high vertex along axis ``d`` when bit ``d`` of ``c`` is set.

    Args:
        x: [n, 3] float32 points in [0, 1].
    """
    L, n = index.shape[0], x.shape[0]
    nd = min(grid.n_dense, L)
    f32, f64, i64, idt = torch.float32, torch.float64, torch.int64, index.dtype
    narrow = grid.narrow if grid.narrow is not None else x.device.type != "cpu"
    pos = ws("pos", (L, 3, n), f32)
    terms = ws("terms", (L, 3, 2, n), idt)
    if narrow:
        # One kernel, float32 in and out: the float64 common dtype lives in registers only
        # (CUDA casts inside the kernel), so the rounding is still tcnn's single fmaf rounding.
        torch.addcmul(grid.one_half, x.t().unsqueeze(0), grid.scale[:L], out=pos)
    else:
        # pos = fma(x, scale, 0.5) as tcnn: a float32 product is exact in float64, so one
        # float64 multiply-add and one rounding to float32 reproduce the fused result.
        xt = ws("x", (1, 3, n), f64)
        xt.copy_(x.t())
        pos64 = torch.addcmul(grid.one_half, xt, grid.scale[:L], out=ws("pos64", (L, 3, n), f64))
        pos.copy_(pos64)
    # pos >= 0.5, so truncation is floor and frac() is pos - floor(pos).
    wd = ws("wd", (L, 3, 2, n), f32)  # per-axis weights of the low / high vertex
    frac = torch.frac(pos, out=wd[:, :, 1])
    torch.sub(grid.one, frac, out=wd[:, :, 0])
    # Index terms of the low and high vertex along each axis: [L, 3, 2, n]. Hashed levels keep
    # only the low log2(size) bits of the product, all that tcnn's uint32 "% size" keeps
    # (exact: xor and "% 2^k" commute).
    if narrow and grid.narrow_exact and idt == torch.int32:
        # int32: the low bits of cell * (mult & mask) equal those of cell * mult, and the
        # layout was checked so that this product stays below 2^31.
        cell = ws("cell32", (L, 3, n), idt)
        cell.copy_(pos)
        torch.mul(cell, grid.mult32[:L], out=terms[:, :, 0]).bitwise_and_(grid.mask32[:L])
    else:
        # The product is taken in int64 (it can pass 32 bits).
        cell64 = ws("cell64", (L, 3, n), i64)
        cell64.copy_(pos)
        low64 = torch.mul(cell64, grid.mult[:L], out=ws("low64", (L, 3, n), i64))
        low64.bitwise_and_(grid.mask[:L])
        terms[:, :, 0].copy_(low64)
    # high = low + mult stays below 2^31: both terms are below the level size (<= 2^30).
    torch.add(terms[:, :, 0], grid.step[:L], out=terms[:, :, 1]).bitwise_and_(grid.mask_idx[:L])
    xy = ws("xy", (L, 2, 2, n), idt)  # [L, y, x, n]
    corner = ws("corner", (L, 2, 4, n), idt)  # [L, z, (y, x), n]
    if nd:
        t, c = terms[:nd], corner[:nd]
        torch.add(t[:, 1, :, None], t[:, 0, None, :], out=xy[:nd])
        torch.add(t[:, 2, :, None], xy[:nd].view(nd, 1, 4, n), out=c)
        # The vertex at x == res wraps (tcnn's "% size"); sums stay below 2 * size.
        wrap = torch.ge(c, grid.size[:nd], out=ws("wrap", (nd, 2, 4, n), idt))
        c.sub_(wrap.mul_(grid.size[:nd]))
    if nd < L:
        t = terms[nd:]
        torch.bitwise_xor(t[:, 1, :, None], t[:, 0, None, :], out=xy[nd:])
        torch.bitwise_xor(t[:, 2, :, None], xy[nd:].view(L - nd, 1, 4, n), out=corner[nd:])
    corner.add_(grid.offset[:L])
    index.copy_(corner.view(L, 8, n).transpose(1, 2))
    # Trilinear weights in tcnn's order (w_x * w_y) * w_z.
    wxy = torch.mul(wd[:, 1, :, None], wd[:, 0, None, :], out=ws("wxy", (L, 2, 2, n), f32))
    wc = torch.mul(wd[:, 2, :, None], wxy.view(L, 1, 4, n), out=ws("wc", (L, 2, 4, n), f32))
    weight.copy_(wc.view(L, 8, n).transpose(1, 2))
