"""Grid math shared by every backend, reproducing tiny-cuda-nn's ``HashGrid`` bit for bit.

Source: tiny-cuda-nn ``include/tiny-cuda-nn/encodings/grid.h`` and ``common_device.h``
(``grid_scale``, ``grid_resolution``, ``pos_fract``, ``grid_index``, ``coherent_prime_hash``).

Per level ``l`` (float32 arithmetic, as in tcnn):

- ``scale = exp2(l * log2(per_level_scale)) * base_resolution - 1``
- ``resolution = ceil(scale) + 1`` vertices per axis
- ``pos = fma(x, scale, 0.5)``; the grid cell is ``floor(pos)``, the weight ``pos - floor(pos)``
  (the 0.5 offset staggers the levels, Instant-NGP appendix A)
- the level stores ``min(next_multiple(resolution^3, 8), 2^log2_hashmap_size)`` entries;
  a vertex's slot is ``(x + y*res + z*res^2) % size`` when ``resolution^3 <= size``
  (dense; the modulo wraps the vertex at ``x == resolution``), otherwise
  ``(x * 1 ^ y * 2654435761 ^ z * 805459861) % size`` in uint32 arithmetic.

All levels live in one flat table of ``n_entries * n_features`` values: level ``l`` starts at
entry ``offsets[l]`` and entry ``e`` holds features ``[e*F, (e+1)*F)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rf_core.scene.encoding.config import HashGridConfig

PRIMES = (1, 2654435761, 805459861)
"""tcnn's coherent prime hash: 1 on x keeps neighbours along x in one cache line."""

UINT32_MASK = 0xFFFFFFFF

CORNERS = tuple((c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8))
"""Cell corner ``c`` = (bit 0, bit 1, bit 2) offsets along (x, y, z), tcnn's order."""


@dataclass(frozen=True)
class GridLayout:
    """Per-level constants of one hash grid; build with :func:`grid_layout`."""

    n_levels: int
    n_features: int
    scales: tuple[float, ...]
    """Per-level float32 ``scale`` (stored as Python floats; exactly representable)."""
    resolutions: tuple[int, ...]
    """Grid vertices per axis of each level."""
    level_sizes: tuple[int, ...]
    """Table entries of each level (a multiple of 8)."""
    offsets: tuple[int, ...]
    """First entry of each level, plus the total at the end (length ``n_levels + 1``)."""
    hashed: tuple[bool, ...]
    """Whether each level is hashed; resolutions grow, so the dense levels are a prefix."""

    @property
    def n_entries(self) -> int:
        return self.offsets[-1]

    @property
    def n_params(self) -> int:
        """Length of the flat parameter vector (``n_entries * n_features``)."""
        return self.n_entries * self.n_features

    @property
    def n_dense(self) -> int:
        """Number of leading dense (unhashed) levels."""
        return sum(not h for h in self.hashed)


def level_scale(level: int, per_level_scale: float, base_resolution: int) -> float:
    """tcnn's ``grid_scale`` in float32: ``exp2f(level * log2f(s)) * base - 1``.

    torch's float32 exp2 is correctly rounded, like the host libm tcnn sizes its levels
    with; CUDA's device ``exp2f`` (within 2 ulp) can differ in the last bit of ``scale``.
    """
    f32 = torch.float32
    log2_scale = torch.log2(torch.tensor(per_level_scale, dtype=f32))
    value = torch.exp2(torch.tensor(float(level), dtype=f32) * log2_scale)
    return float(value * torch.tensor(float(base_resolution), dtype=f32) - 1.0)


def _next_multiple(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def grid_layout(cfg: HashGridConfig, n_input_dims: int = 3) -> GridLayout:
    """Resolutions, sizes, offsets and hashing of every level, as tcnn's constructor."""
    if n_input_dims != 3:
        raise ValueError(f"only 3-D hash grids are supported, got n_input_dims={n_input_dims}")
    scales, resolutions, sizes, offsets, hashed = [], [], [], [0], []
    max_size = 1 << cfg.log2_hashmap_size
    for level in range(cfg.n_levels):
        scale = level_scale(level, cfg.per_level_scale, cfg.base_resolution)
        res = int(math.ceil(scale)) + 1
        dense = res ** n_input_dims
        # tcnn rounds the dense size up to 8 (aligned accesses), then caps it at the table size.
        size = min(_next_multiple(dense, 8), max_size)
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        offsets.append(offsets[-1] + size)
        hashed.append(size < dense)
    return GridLayout(cfg.n_levels, cfg.n_features_per_level, tuple(scales), tuple(resolutions),
                      tuple(sizes), tuple(offsets), tuple(hashed))


def pos_fract(x: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell and in-cell position of inputs, emulating tcnn's ``fmaf(scale, x, 0.5f)``.

    Args:
        x: float32 inputs in [0, 1], any shape.
        scale: the level's float32 scale (a float or a tensor broadcastable against ``x``).
    Returns:
        ``(cell [...] int64, frac [...] float32 in [0, 1))``.
    """
    # A float32 product is exact in float64, so one float64 add and one rounding to float32
    # reproduce the fused multiply-add (up to double rounding, which needs an exact tie).
    pos = (x.double() * scale + 0.5).float()
    cell = pos.floor()
    return cell.long(), pos - cell


def hash_coords(coords: torch.Tensor) -> torch.Tensor:
    """tcnn's coherent prime hash in uint32 arithmetic: [..., 3] int64 -> [...] in [0, 2^32)."""
    c = coords & UINT32_MASK
    # Products may wrap int64; the low 32 bits, all that uint32 keeps, are still right.
    h = (c[..., 0] * PRIMES[0]) & UINT32_MASK
    h = h ^ ((c[..., 1] * PRIMES[1]) & UINT32_MASK)
    return h ^ ((c[..., 2] * PRIMES[2]) & UINT32_MASK)


def local_index(coords: torch.Tensor, layout: GridLayout, level: int) -> torch.Tensor:
    """Slot of grid vertices within their level: [..., 3] int64 -> [...] int64 in [0, size)."""
    size = layout.level_sizes[level]
    if layout.hashed[level]:
        return hash_coords(coords) % size
    res = layout.resolutions[level]
    dense = coords[..., 0] + coords[..., 1] * res + coords[..., 2] * (res * res)
    return dense % size
