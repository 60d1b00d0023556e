"""``HashGridEncoding``: one flat parameter table, any backend, coarse-to-fine level masking."""

from __future__ import annotations

import torch
from torch import nn

from rf_core.scene.encoding.backends import resolve_backend
from rf_core.scene.encoding.config import HashGridConfig
from rf_core.scene.encoding.layout import grid_layout
from rf_core.scene.encoding.torch_backend import TorchHashGrid


class HashGridEncoding(nn.Module):
    """Multi-resolution hash-grid features of points in the unit cube.

    ``params`` is a single flat float32 table in tiny-cuda-nn's layout whatever the backend,
    so weights move between backends (and checkpoints) unchanged. The backend is resolved
    once, for ``device``, by :func:`~rf_core.scene.encoding.backends.resolve_backend`; inputs on
    another device than the fused backend's (CUDA; for Triton also the CPU under
    ``TRITON_INTERPRET=1``) go through the torch path.

    Gradients flow to ``params`` only, not to the input points (normals use finite
    differences).

    Coarse-to-fine masking (:meth:`set_active_levels`) skips the masked levels' work in the
    torch and Triton backends; tiny-cuda-nn computes every level and the masked ones are
    multiplied by zero. ``points_evaluated`` and ``level_evaluations`` count the work (see
    :meth:`reset_counters`).
    """

    def __init__(self, cfg: HashGridConfig | None = None, n_input_dims: int = 3,
                 device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg = cfg or HashGridConfig()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.layout = layout = grid_layout(cfg, n_input_dims)
        self.n_input_dims = n_input_dims
        self.backend = resolve_backend(cfg.backend, device)
        self.params = nn.Parameter(
            torch.empty(layout.n_params, device=device).uniform_(-cfg.init_scale, cfg.init_scale))
        # Only tcnn, which computes every level, multiplies by this mask; it is not saved: the
        # coarse-to-fine schedule sets the active levels every step.
        self.register_buffer("level_mask", torch.ones(cfg.n_levels, 1, device=device),
                             persistent=False)
        self._active_levels = cfg.n_levels
        self._torch = TorchHashGrid(layout).to(device)
        self._tcnn = None
        self._triton = None
        if self.backend == "tcnn":
            from rf_core.scene.encoding.tcnn_backend import TcnnHashGrid

            self._tcnn = TcnnHashGrid(cfg, layout, n_input_dims)
        elif self.backend == "triton":
            from rf_core.scene.encoding.triton_backend import TritonHashGrid

            self._triton = TritonHashGrid(layout)
        self.points_evaluated = 0
        """Points encoded since :meth:`reset_counters` (a plain int: counting never syncs)."""
        self.level_evaluations = 0
        """Point-level lookups computed since :meth:`reset_counters`: points x computed levels
        (the active ones; all of them for tcnn, which cannot skip masked levels)."""

    @property
    def out_dim(self) -> int:
        """Feature width: ``n_levels * n_features_per_level``."""
        return self.cfg.n_levels * self.cfg.n_features_per_level

    @property
    def level_resolutions(self) -> list[int]:
        """Grid vertices per axis of each level, coarse to fine."""
        return list(self.layout.resolutions)

    @property
    def active_levels(self) -> int:
        """How many of the coarsest levels currently contribute."""
        return self._active_levels

    def reset_counters(self) -> None:
        """Zero ``points_evaluated`` and ``level_evaluations``."""
        self.points_evaluated = 0
        self.level_evaluations = 0

    def set_active_levels(self, k: int) -> None:
        """Use only the ``k`` coarsest levels (1 <= k <= n_levels); finer ones output 0, get
        zero gradient and (except with tcnn) are not computed at all."""
        n = self.cfg.n_levels
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"active levels must be an integer in [1, {n}], got {k!r}")
        self._active_levels = k
        self.level_mask.fill_(0.0)[:k] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 3] in [0, 1] (clamped) -> [..., n_levels * n_features_per_level] float32."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.n_input_dims).float().clamp(0.0, 1.0)
        n, k = x.shape[0], self._active_levels
        self.points_evaluated += n
        if not self.cfg.skip_masked_levels and k < self.cfg.n_levels:
            self.level_evaluations += n * self.cfg.n_levels
            feat = (self._torch(x, self.params, self.cfg.n_levels)
                    .view(-1, self.cfg.n_levels, self.cfg.n_features_per_level)
                    * self.level_mask).view(-1, self.out_dim)
        elif self._tcnn is not None and x.is_cuda:
            self.level_evaluations += n * self.cfg.n_levels
            feat = self._tcnn(x, self.params)
            if k < self.cfg.n_levels:  # tcnn has no level mask: zero the masked levels
                feat = (feat.view(-1, self.cfg.n_levels, self.cfg.n_features_per_level)
                        * self.level_mask).view(-1, self.out_dim)
        elif self._triton is not None and self._triton.runs_on(x.device):
            self.level_evaluations += n * k
            feat = self._triton(x, self.params, k)
        else:
            self.level_evaluations += n * k
            feat = self._torch(x, self.params, k)
        return feat.view(*lead, self.out_dim)

    def extra_repr(self) -> str:
        return (f"backend={self.backend!r}, levels={self.cfg.n_levels}, "
                f"features={self.cfg.n_features_per_level}, params={self.layout.n_params}")
