"""The pure-PyTorch hash grid: all levels at once, one fused gather, one scatter-add backward.

Forward, per chunk of points and for all ``L`` levels together (index math under no_grad):

1. cells and in-cell weights ``[L, 3, n]`` (points innermost, so every op is a long vector op),
2. per-axis index terms for the two corners along each axis ``[L, n]`` (dense levels add
   ``x + y*res + z*res^2``; hashed levels xor the prime products, masked to the table size),
3. corner indices ``[L, n, 8]`` into the flat table and trilinear weights ``[L, n, 8]``,
4. ``embedding_bag(mode="sum", per_sample_weights=...)``: gather + weighted sum in one kernel,
   without materialising the ``[L, n, 8, F]`` corner features.

Rows are level-major (``[L, N, 8]`` rather than ``[N, L, 8]``) so consecutive lookups hit the
same level's table, which is what tcnn does with one CUDA block row per level.

Backward is one ``index_add_`` of ``weight * grad_out`` per chunk into a table-shaped gradient.
Only the corner indices and weights are saved. The gradient with respect to the input points
is not computed (``None``): the field takes normals by finite differences.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.nn import functional as F

from rf_core.encoding.layout import PRIMES, GridLayout

CHUNK_POINTS = 1 << 15
"""Points per chunk on the CPU: temporaries of a few MB (at L=16) stay in cache, while few
enough ops run that OpenMP start-up costs little, even on a busy machine."""


class TorchHashGrid(nn.Module):
    """Callable ``(x [N, 3], params [n_params]) -> [N, L*F]`` holding per-level constants.

    The constants are non-persistent buffers: they follow ``.to(device)`` but stay out of
    checkpoints (they are a function of the config).
    """

    def __init__(self, layout: GridLayout, chunk_points: int = CHUNK_POINTS):
        super().__init__()
        self.layout = layout
        self.chunk_points = chunk_points
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
        self.register_buffer("mult", torch.where(hashed, hash_mult, dense_mult).view(L, 3, 1, 1),
                             persistent=False)
        # (cell + b) * mult for the low (b=0) and high (b=1) vertex = cell * mult + b * mult.
        self.register_buffer("mult_low_high", self.mult * torch.arange(2).view(1, 1, 2, 1),
                             persistent=False)
        self.register_buffer("one_half", torch.tensor(0.5, dtype=torch.float64), persistent=False)
        self.register_buffer("one", torch.tensor(1.0), persistent=False)
        # A hashed level always holds 2^log2_hashmap_size entries, so "% size" is a mask.
        self.register_buffer("mask", (sizes - 1).view(L, 1, 1, 1), persistent=False)
        self.register_buffer("size", sizes.to(index_dtype).view(L, 1, 1, 1), persistent=False)
        self.register_buffer("offset", torch.tensor(layout.offsets[:-1], dtype=index_dtype)
                             .view(L, 1, 1, 1), persistent=False)
        self.n_dense = layout.n_dense

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x: [N, 3] in [0, 1] (clamped), params: [n_params] -> [N, L*F] float32."""
        return _HashGridFunction.apply(x, params, self)


class _Workspace:
    """Named flat scratch buffers, reused across chunks.

    On the CPU a fresh multi-megabyte tensor costs page faults on first touch, more than the
    arithmetic on it; allocating each temporary once per call and writing with ``out=`` keeps
    the per-chunk work in cache.
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


def _chunk_size(grid: TorchHashGrid, device: torch.device, n: int) -> int:
    # GPUs want one big launch per op; CPUs want the temporaries to stay in cache.
    return grid.chunk_points if device.type == "cpu" else max(n, 1)


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, grid: TorchHashGrid) -> torch.Tensor:
        layout = grid.layout
        L, Fdim, N = layout.n_levels, layout.n_features, x.shape[0]
        device = x.device
        if device.type == "cpu" and params.dtype != torch.float32:
            raise ValueError(f"the torch hash grid keeps its table in float32 on the CPU, "
                             f"got {params.dtype}; call .float() on the encoding")
        table = params.detach().view(layout.n_entries, Fdim)
        # Saved as one contiguous [L, n, 8] block per chunk, laid end to end (chunk-major),
        # so a chunk's rows are one slice rather than L strided pieces.
        index = torch.empty(L * N * 8, dtype=grid.offset.dtype, device=device)
        weight = torch.empty(L * N * 8, dtype=table.dtype, device=device)
        out = torch.empty(N, L, Fdim, dtype=table.dtype, device=device)
        x = x.detach().clamp(0.0, 1.0)
        ws = _Workspace(device)
        for start, stop in _chunks(N, _chunk_size(grid, device, N)):
            n = stop - start
            idx = index[L * start * 8:L * stop * 8].view(L, n, 8)
            w = weight[L * start * 8:L * stop * 8].view(L, n, 8)
            _corners(x[start:stop], grid, idx, w, ws)
            feat = F.embedding_bag(idx.view(L * n, 8), table, per_sample_weights=w.view(L * n, 8),
                                   mode="sum")  # [L * n, F]
            out[start:stop] = feat.view(L, n, Fdim).transpose(0, 1)
        ctx.save_for_backward(index, weight)
        ctx.grid = grid
        return out.view(N, L * Fdim).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        index, weight = ctx.saved_tensors
        layout = ctx.grid.layout
        L, Fdim = layout.n_levels, layout.n_features
        grad_out = grad_out.view(-1, L, Fdim).to(weight.dtype)
        if index.device.type == "cpu":
            grad = _scatter_cpu(index, weight, grad_out, layout, ctx.grid.chunk_points)
        else:
            # One chunk on GPUs: a single atomic scatter-add over all levels.
            src = weight.view(L, -1, 8, 1) * grad_out.transpose(0, 1).unsqueeze(2)
            grad = torch.zeros(layout.n_entries, Fdim, dtype=weight.dtype, device=index.device)
            grad.index_add_(0, index, src.view(-1, Fdim))
        return None, grad.view(-1), None


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_MAX_GROUPS = 64


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A lazily made pool, remade in forked children (whose copy has no live threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < workers:
        _POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="rf-hashgrid"))
    return _POOL[1]


def _scatter_cpu(index: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor,
                 layout: GridLayout, chunk: int) -> torch.Tensor:
    """Table gradient ``sum weight * grad_out`` per entry: [n_entries, F].

    Args:
        index, weight: [L * N * 8] chunk-major, as saved by the forward.
        grad_out: [N, L, F].

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

    n_groups = max(1, min(torch.get_num_threads(), L, _MAX_GROUPS))
    bounds = [L * k // n_groups for k in range(n_groups + 1)]
    groups = list(zip(bounds[:-1], bounds[1:]))
    if n_groups == 1:
        scatter(0, L)
        return grad
    futures = [_thread_pool(n_groups - 1).submit(scatter, lo, hi) for lo, hi in groups[1:]]
    scatter(*groups[0])
    for fut in futures:
        fut.result()
    return grad


@torch.no_grad()
def _corners(x: torch.Tensor, grid: TorchHashGrid, index: torch.Tensor, weight: torch.Tensor,
             ws: _Workspace) -> None:
    """Fill corner indices ``index [L, n, 8]`` and trilinear weights ``weight [L, n, 8]``.

    Works corner-major (``[L, 8, n]``: long, contiguous vector ops) and transposes once at
    the end. Corner ``c`` takes the high vertex along axis ``d`` when bit ``d`` of ``c`` is set.

    Args:
        x: [n, 3] float32 points in [0, 1].
    """
    L, n, nd = index.shape[0], x.shape[0], grid.n_dense
    f32, f64, i64, idt = torch.float32, torch.float64, torch.int64, index.dtype
    # pos = fma(x, scale, 0.5) as tcnn: a float32 product is exact in float64, so one
    # float64 multiply-add and one rounding to float32 reproduce the fused result.
    xt = ws("x", (1, 3, n), f64)
    xt.copy_(x.t())
    pos64 = torch.addcmul(grid.one_half, xt, grid.scale, out=ws("pos64", (L, 3, n), f64))
    pos = ws("pos", (L, 3, n), f32)
    pos.copy_(pos64)
    # pos >= 0.5, so truncation is floor and frac() is pos - floor(pos).
    wd = ws("wd", (L, 3, 2, n), f32)  # per-axis weights of the low / high vertex
    frac = torch.frac(pos, out=wd[:, :, 1])
    torch.sub(grid.one, frac, out=wd[:, :, 0])
    # Index terms of the low and high vertex along each axis: [L, 3, 2, n].
    cell64 = ws("cell64", (L, 3, 1, n), i64)
    cell64.copy_(pos.unsqueeze(2))
    terms64 = torch.addcmul(grid.mult_low_high, cell64, grid.mult,
                            out=ws("terms64", (L, 3, 2, n), i64))
    if nd < L:
        terms64[nd:].bitwise_and_(grid.mask[nd:])  # exact: xor and "% 2^k" commute
    terms = ws("terms", (L, 3, 2, n), idt)
    terms.copy_(terms64)
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
    corner.add_(grid.offset)
    index.copy_(corner.view(L, 8, n).transpose(1, 2))
    # Trilinear weights in tcnn's order (w_x * w_y) * w_z.
    wxy = torch.mul(wd[:, 1, :, None], wd[:, 0, None, :], out=ws("wxy", (L, 2, 2, n), f32))
    wc = torch.mul(wd[:, 2, :, None], wxy.view(L, 1, 4, n), out=ws("wc", (L, 2, 4, n), f32))
    weight.copy_(wc.view(L, 8, n).transpose(1, 2))
