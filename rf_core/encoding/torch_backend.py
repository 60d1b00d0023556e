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

import torch
from torch import nn
from torch.nn import functional as F

from rf_core.encoding.layout import PRIMES, GridLayout

CHUNK_POINTS = 1 << 15
"""Points per chunk: keeps the per-chunk temporaries (~16 MB at L=16) cache- and malloc-friendly."""


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
        self.register_buffer("low_high", torch.arange(2).view(1, 1, 2, 1), persistent=False)
        # A hashed level always holds 2^log2_hashmap_size entries, so "% size" is a mask.
        self.register_buffer("mask", (sizes - 1).view(L, 1, 1, 1), persistent=False)
        self.register_buffer("size", sizes.to(index_dtype).view(L, 1, 1, 1), persistent=False)
        self.register_buffer("offset", torch.tensor(layout.offsets[:-1], dtype=index_dtype)
                             .view(L, 1, 1, 1), persistent=False)
        self.n_dense = layout.n_dense

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x: [N, 3] in [0, 1] (clamped), params: [n_params] -> [N, L*F] float32."""
        return _HashGridFunction.apply(x, params, self)


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, grid: TorchHashGrid) -> torch.Tensor:
        layout = grid.layout
        L, Fdim, N = layout.n_levels, layout.n_features, x.shape[0]
        if x.device.type == "cpu" and params.dtype != torch.float32:
            raise ValueError(f"the torch hash grid keeps its table in float32 on the CPU, "
                             f"got {params.dtype}; call .float() on the encoding")
        table = params.detach().view(layout.n_entries, Fdim)
        # Saved per chunk as contiguous [L, n, 8] blocks laid end to end (chunk-major), so
        # a chunk's rows are one slice, not L strided pieces.
        index = torch.empty(L * N * 8, dtype=grid.offset.dtype, device=x.device)
        weight = torch.empty(L * N * 8, dtype=table.dtype, device=x.device)
        out = torch.empty(N, L, Fdim, dtype=table.dtype, device=x.device)
        x = x.detach().clamp(0.0, 1.0)
        for start, stop in _chunks(N, grid.chunk_points):
            n = stop - start
            idx = index[L * start * 8:L * stop * 8].view(L * n, 8)
            w = weight[L * start * 8:L * stop * 8].view(L * n, 8)
            _corners(x[start:stop], grid, idx.view(L, n, 8), w.view(L, n, 8))
            feat = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")  # [L*n, F]
            out[start:stop] = feat.view(L, n, Fdim).transpose(0, 1)
        ctx.save_for_backward(index, weight)
        ctx.grid = grid
        return out.view(N, L * Fdim).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        index, weight = ctx.saved_tensors
        grid = ctx.grid
        layout = grid.layout
        L, Fdim = layout.n_levels, layout.n_features
        N = grad_out.shape[0]
        grad_out = grad_out.view(N, L, Fdim).to(weight.dtype)
        device = index.device
        complex_path = device.type == "cpu" and Fdim == 2 and weight.dtype == torch.float32
        if complex_path:
            # CPU index_add_ on 2-D tensors adds row by row (very slow); a complex64 view turns
            # the F=2 rows into scalars for the fast 1-D kernel, adding both halves exactly.
            grad = torch.zeros(layout.n_entries, dtype=torch.complex64, device=device)
        else:
            grad = torch.zeros(layout.n_entries, Fdim, dtype=weight.dtype, device=device)
        for start, stop in _chunks(N, grid.chunk_points):
            n = stop - start
            idx = index[L * start * 8:L * stop * 8]
            w = weight[L * start * 8:L * stop * 8].view(L, n, 8)
            g = grad_out[start:stop].transpose(0, 1)  # [L, n, F]
            src = torch.empty(L, n, 8, Fdim, dtype=w.dtype, device=device)
            for f in range(Fdim):  # F strided multiplies beat one tiny-inner-dim broadcast
                torch.mul(w, g[..., f:f + 1], out=src[..., f])
            if complex_path:
                grad.index_add_(0, idx, torch.view_as_complex(src).view(-1))
            elif device.type == "cpu":
                flat = (idx.long().unsqueeze(1) * Fdim + torch.arange(Fdim)).view(-1)
                grad.view(-1).index_add_(0, flat, src.view(-1))
            else:
                grad.index_add_(0, idx, src.view(-1, Fdim))
        if complex_path:
            grad = torch.view_as_real(grad)
        return None, grad.view(-1), None


def _chunks(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


@torch.no_grad()
def _corners(x: torch.Tensor, grid: TorchHashGrid, index: torch.Tensor,
             weight: torch.Tensor) -> None:
    """Fill corner indices ``index [L, n, 8]`` and trilinear weights ``weight [L, n, 8]``.

    Works corner-major (``[L, 8, n]``, long contiguous vector ops) and transposes once at
    the end. Corner ``c`` takes the high vertex along axis ``d`` when bit ``d`` is set.

    Args:
        x: [n, 3] float32 points in [0, 1].
    """
    L, n = index.shape[0], x.shape[0]
    nd = grid.n_dense
    pos = (x.double().t().unsqueeze(0) * grid.scale + 0.5).float()  # [L, 3, n], tcnn's fmaf
    cell = pos.floor()
    frac = pos - cell  # [L, 3, n]
    # Index terms of the low and high vertex along each axis: [L, 3, 2, n].
    terms = (cell.long().unsqueeze(2) + grid.low_high) * grid.mult
    if nd < L:
        terms[nd:] &= grid.mask[nd:]  # exact: xor and "% 2^k" commute
    terms = terms.to(index.dtype)
    corner = torch.empty(L, 2, 4, n, dtype=index.dtype, device=x.device)  # [L, z, (y, x), n]
    if nd:
        t = terms[:nd]
        xy = (t[:, 1, :, None] + t[:, 0, None, :]).view(nd, 1, 4, n)
        dense = torch.add(t[:, 2, :, None], xy, out=corner[:nd])
        # The vertex at x == res wraps (tcnn's "% size"); sums stay below 2 * size.
        dense -= grid.size[:nd] * (dense >= grid.size[:nd])
    if nd < L:
        t = terms[nd:]
        xy = (t[:, 1, :, None] ^ t[:, 0, None, :]).view(L - nd, 1, 4, n)
        torch.bitwise_xor(t[:, 2, :, None], xy, out=corner[nd:])
    corner += grid.offset
    index.copy_(corner.view(L, 8, n).transpose(1, 2))
    # Trilinear weights, multiplied in tcnn's x, y, z order (wx * wy is commutative).
    wd = torch.stack((1.0 - frac, frac), dim=2)  # [L, 3, 2, n]
    wxy = (wd[:, 1, :, None] * wd[:, 0, None, :]).view(L, 1, 4, n)
    weight.copy_((wd[:, 2, :, None] * wxy).view(L, 8, n).transpose(1, 2))
