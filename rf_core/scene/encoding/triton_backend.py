"""The fused Triton hash grid: one forward and one backward kernel for all levels.

Same function as :mod:`rf_core.scene.encoding.torch_backend` and tiny-cuda-nn, on the same flat
table (:mod:`rf_core.scene.encoding.layout`): per level ``pos = fma(x, scale, 0.5)`` in float32
(tcnn's ``fmaf``), the dense levels' ``(x + y*res + z*res^2) % size`` and the hashed levels'
coherent prime hash in uint32, trilinear weights ``(w_x * w_y) * w_z``, float32 accumulation.

The launch grid is ``(point blocks, active levels)``: each program encodes one block of
points at one level, so masked coarse-to-fine levels are never launched. The forward gathers
the 8 corners' features; the backward recomputes the indices (only the points are saved,
12 bytes each, where the torch path keeps 64 bytes per point and level) and atomically adds
``weight * grad`` into a float32 table gradient.

Importing this module imports ``triton``; :mod:`rf_core.scene.encoding.backends` imports it only
when the Triton backend is chosen. Under ``TRITON_INTERPRET=1`` the same kernels run on the
CPU through Triton's interpreter (slow; the tests use it). The kernel is decorated lazily,
once per mode, and calls only Triton builtins, so the variable may be set after ``triton``
was imported.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import nn
from torch.autograd.function import once_differentiable

from rf_core.scene.encoding.interpreter import triton_interpreting
from rf_core.scene.encoding.layout import PRIMES, GridLayout

BLOCK_POINTS = 128
"""Points per program on GPUs (4 warps: one point per thread, F features in registers)."""
INTERPRETER_BLOCK_POINTS = 1024
"""Points per program under the interpreter, whose cost is per operation, not per element."""


def _hashgrid_kernel(x_ptr, table_ptr, feat_ptr, scale_ptr, level_ptr, n_points, n_dense,
                     row_stride, F: tl.constexpr, F_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     BACKWARD: tl.constexpr):
    """One block of points at one level (``program_id(1)``).

    Forward (``BACKWARD=False``): ``table_ptr`` is the table [n_entries, F], ``feat_ptr`` the
    output [N, row_stride], written in columns ``[level*F, (level+1)*F)``.
    Backward: ``table_ptr`` is the float32 table gradient, ``feat_ptr`` the output gradient.
    ``level_ptr`` holds int64 ``(mult_y, mult_z, size, offset)`` per level.
    """
    level = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n_points
    cols = tl.arange(0, F_PAD)
    mask = valid[:, None] & (cols[None, :] < F)
    scale = tl.load(scale_ptr + level)
    mult_y = tl.load(level_ptr + 4 * level).to(tl.uint32)
    mult_z = tl.load(level_ptr + 4 * level + 1).to(tl.uint32)
    size = tl.load(level_ptr + 4 * level + 2).to(tl.uint32)
    offset = tl.load(level_ptr + 4 * level + 3)
    hashed = level >= n_dense

    # Per axis: cell, in-cell weight, and the index terms of the low and high vertex (the x
    # multiplier is 1 for both dense and hashed levels). uint32 products wrap as in tcnn.
    x = tl.load(x_ptr + rows * 3, mask=valid, other=0.0)
    pos = tl.fma(tl.minimum(tl.maximum(x, 0.0), 1.0), scale, 0.5)
    cell = tl.floor(pos)
    fx = pos - cell
    tx0 = cell.to(tl.uint32)
    tx1 = tx0 + 1
    y = tl.load(x_ptr + rows * 3 + 1, mask=valid, other=0.0)
    pos = tl.fma(tl.minimum(tl.maximum(y, 0.0), 1.0), scale, 0.5)
    cell = tl.floor(pos)
    fy = pos - cell
    ty0 = cell.to(tl.uint32) * mult_y
    ty1 = ty0 + mult_y
    z = tl.load(x_ptr + rows * 3 + 2, mask=valid, other=0.0)
    pos = tl.fma(tl.minimum(tl.maximum(z, 0.0), 1.0), scale, 0.5)
    cell = tl.floor(pos)
    fz = pos - cell
    tz0 = cell.to(tl.uint32) * mult_z
    tz1 = tz0 + mult_z

    col = rows[:, None] * row_stride + level * F + cols[None, :]
    if BACKWARD:
        grad = tl.load(feat_ptr + col, mask=mask, other=0.0).to(tl.float32)
    else:
        # tl.full, a builtin, not tl.zeros, a @jit helper: Triton decorates its helpers when it
        # is imported, so they are interpretable only if TRITON_INTERPRET was set before that.
        acc = tl.full([BLOCK, F_PAD], 0.0, tl.float32)
    for corner in tl.static_range(8):  # tcnn's order: bit 0 = x, bit 1 = y, bit 2 = z
        if corner & 1:
            tx = tx1
            wx = fx
        else:
            tx = tx0
            wx = 1.0 - fx
        if corner & 2:
            ty = ty1
            wy = fy
        else:
            ty = ty0
            wy = 1.0 - fy
        if corner & 4:
            tz = tz1
            wz = fz
        else:
            tz = tz0
            wz = 1.0 - fz
        weight = (wx * wy) * wz
        # Hashed levels have a power-of-two size; dense sums stay below 2 * size (the vertex
        # at x == res wraps into the next row, as tcnn's "% size" does).
        dense = tx + ty + tz
        dense = tl.where(dense >= size, dense - size, dense)
        index = tl.where(hashed, (tx ^ ty ^ tz) & (size - 1), dense)
        ptr = table_ptr + ((index.to(tl.int64) + offset) * F)[:, None] + cols[None, :]
        if BACKWARD:
            tl.atomic_add(ptr, weight[:, None] * grad, mask=mask, sem="relaxed")
        else:
            acc += weight[:, None] * tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if not BACKWARD:
        tl.store(feat_ptr + col, acc, mask=mask)


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel; Triton reads TRITON_INTERPRET when it decorates, so one per mode."""
    del interpret  # the cache key: triton.jit reads the same setting from the environment
    return triton.jit(_hashgrid_kernel)


class TritonHashGrid(nn.Module):
    """Callable ``(x [N, 3], params [n_params], active_levels) -> [N, L*F] float32``.

    Per-level constants are non-persistent buffers (they follow ``.to(device)``, stay out of
    checkpoints). Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
    """

    def __init__(self, layout: GridLayout):
        super().__init__()
        self.layout = layout
        self.n_dense = layout.n_dense
        assert layout.hashed == tuple(level >= self.n_dense for level in range(layout.n_levels))
        assert all(size & (size - 1) == 0 for size, h in zip(layout.level_sizes, layout.hashed)
                   if h), "hashed levels have a power-of-two size"
        info = [(PRIMES[1], PRIMES[2]) if hashed else (res, res * res)
                for res, hashed in zip(layout.resolutions, layout.hashed)]
        info = [(my, mz, size, offset) for (my, mz), size, offset
                in zip(info, layout.level_sizes, layout.offsets[:-1])]
        self.register_buffer("scale", torch.tensor(layout.scales, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("level_info", torch.tensor(info, dtype=torch.int64),
                             persistent=False)

    @staticmethod
    def runs_on(device: torch.device) -> bool:
        """Whether inputs on ``device`` go through the kernels (else the torch path)."""
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())

    def forward(self, x: torch.Tensor, params: torch.Tensor,
                active_levels: int | None = None) -> torch.Tensor:
        """x: [N, 3] in [0, 1] (clamped), params: [n_params] -> [N, L*F] float32.

        Only the ``active_levels`` coarsest levels (default: all) are launched; the others'
        columns are zeros and their table rows get zero gradient.
        """
        L = self.layout.n_levels
        k = L if active_levels is None else active_levels
        if not 1 <= k <= L:
            raise ValueError(f"active_levels must be in [1, {L}], got {k}")
        return _TritonHashGridFunction.apply(x, params, self, k)


def _launch(grid: TritonHashGrid, x: torch.Tensor, table: torch.Tensor, feat: torch.Tensor,
            active: int, backward: bool) -> None:
    n = x.shape[0]
    if n == 0:
        return
    layout = grid.layout
    interpret = triton_interpreting()
    if interpret:
        block = min(INTERPRETER_BLOCK_POINTS, max(16, triton.next_power_of_2(n)))
    else:
        block = BLOCK_POINTS
    scale, info = grid.scale.to(x.device), grid.level_info.to(x.device)
    F = layout.n_features
    _kernel(interpret)[(triton.cdiv(n, block), active)](
        x, table, feat, scale, info, n, grid.n_dense, layout.n_levels * F,
        F=F, F_PAD=triton.next_power_of_2(F), BLOCK=block, BACKWARD=backward, num_warps=4)


class _TritonHashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, grid: TritonHashGrid,
                active: int) -> torch.Tensor:
        layout = grid.layout
        L, Fdim = layout.n_levels, layout.n_features
        x = x.detach().float().contiguous()
        table = params.detach().contiguous()
        out = torch.empty(x.shape[0], L * Fdim, dtype=torch.float32, device=x.device)
        if active < L:
            out[:, active * Fdim:] = 0
        _launch(grid, x, table, out, active, backward=False)
        ctx.save_for_backward(x)
        ctx.grid, ctx.active, ctx.params_dtype = grid, active, params.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        grid = ctx.grid
        grad = torch.zeros(grid.layout.n_params, dtype=torch.float32, device=x.device)
        _launch(grid, x, grad, grad_out.float().contiguous(), ctx.active, backward=True)
        return None, grad.to(ctx.params_dtype), None, None
