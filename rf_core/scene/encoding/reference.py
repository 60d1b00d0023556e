"""A deliberately naive hash-grid encoding: the readable definition the fast paths must match.

One loop over levels, one over the 8 cell corners, a plain gather and ordinary autograd.
Slow on purpose; tests and ``rf bench hashgrid`` compare the backends against it.
"""

from __future__ import annotations

import torch

from rf_core.scene.encoding.layout import CORNERS, GridLayout, local_index, pos_fract


def hashgrid_reference(x: torch.Tensor, params: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Trilinearly interpolated multi-level grid features.

    Args:
        x: [N, 3] float32 points in [0, 1] (not clamped here).
        params: [layout.n_params] flat table, in the layout of :mod:`rf_core.scene.encoding.layout`.
        layout: the grid's per-level constants.
    Returns:
        [N, n_levels * n_features] float32; level ``l`` fills columns ``[l*F, (l+1)*F)``.
    """
    table = params.view(layout.n_entries, layout.n_features).float()
    outputs = []
    for level in range(layout.n_levels):
        cell, frac = pos_fract(x, layout.scales[level])  # [N, 3] each
        feature = torch.zeros(x.shape[0], layout.n_features, device=x.device)
        for corner in CORNERS:
            offset = torch.tensor(corner, device=x.device)
            # tcnn multiplies the per-axis weights in x, y, z order.
            weight = torch.ones_like(frac[:, 0])
            for dim in range(3):
                weight = weight * (frac[:, dim] if corner[dim] else 1 - frac[:, dim])
            index = layout.offsets[level] + local_index(cell + offset, layout, level)
            feature = feature + weight[:, None] * table[index]
        outputs.append(feature)
    return torch.cat(outputs, dim=1)
