"""The radiance field: a hash grid with small density and albedo MLPs, plus backgrounds.

Points live in the scene cube ``[-bound, bound]^3``. Density uses a truncated
exponential activation on ``mlp(x) + blob(x)``, where the blob is RealFusion's
(stable-dreamfusion's) Gaussian density initialisation
``blob_density * exp(-|x|^2 / (2 blob_radius^2))`` that starts optimisation
from a soft ball at the centre. Albedo is view-independent, as in RealFusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rf_core.config import bounded
from rf_core.scene.encoding import HashGridConfig, HashGridEncoding


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient is clamped, as Instant-NGP does, to keep early steps stable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: int) -> nn.Sequential:
    """``n_hidden`` ReLU layers of width ``hidden``; no bias on the output layer's input."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden), nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


@dataclass
class FieldConfig:
    """The NeRF field: hash grid + density MLP + albedo MLP."""

    grid: HashGridConfig = field(default_factory=HashGridConfig)
    """Multi-resolution hash-grid encoding (tiny-cuda-nn's schema)."""
    bound: float = bounded(1.0, lo=0, lo_open=True)
    """Half-size of the scene cube; the grid covers [-bound, bound]^3."""
    density_hidden: int = bounded(64, lo=1)
    """Width of the density MLP."""
    density_layers: int = bounded(1, lo=0)
    """Hidden layers in the density MLP."""
    geo_feat_dim: int = bounded(15, lo=1)
    """Features passed from the density MLP to the albedo MLP."""
    albedo_hidden: int = bounded(64, lo=1)
    """Width of the albedo MLP."""
    albedo_layers: int = bounded(1, lo=0)
    """Hidden layers in the albedo MLP."""
    blob_density: float = 4.85
    """Peak pre-activation (log) density of the Gaussian blob initialisation (0 disables it).
    The authors' 5 at their scale: their input view frames 1/1.165 of what ours frames, so
    densities (per unit length) are 1.165x lower here: 5 + ln(1/1.165) = 4.85."""
    blob_radius: float = bounded(0.233, lo=0, lo_open=True)
    """Standard deviation of the Gaussian blob, in scene units (the authors' 0.2 x 1.165)."""
    normal_eps: float = bounded(0.01, lo=0, lo_open=True)
    """Finite-difference step for normals, in scene units."""
    normal_difference: str = "forward"
    """Finite differences for normals: 'forward' (3 density probes per normal, reusing the
    density the render already took at the sample) or 'central' (6 probes, the authors')."""

    def __post_init__(self):
        if self.bound <= 0:
            raise ValueError(f"bound must be positive, got {self.bound}")
        if self.blob_radius <= 0:
            raise ValueError(f"blob_radius must be positive, got {self.blob_radius}")
        if self.normal_eps <= 0:
            raise ValueError(f"normal_eps must be positive, got {self.normal_eps}")
        if self.normal_difference not in ("central", "forward"):
            raise ValueError(f"normal_difference must be 'central' or 'forward', got "
                             f"{self.normal_difference!r}")


class RadianceField(nn.Module):
    """density(x) and forward(x) -> (density, albedo) over world points x: [N, 3]."""

    def __init__(self, cfg: FieldConfig | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FieldConfig()
        self.encoding = HashGridEncoding(cfg.grid, n_input_dims=3, device=device)
        self.density_net = mlp(self.encoding.out_dim, cfg.density_hidden, cfg.density_layers,
                               1 + cfg.geo_feat_dim).to(device)
        self.albedo_net = mlp(cfg.geo_feat_dim, cfg.albedo_hidden, cfg.albedo_layers, 3).to(device)
        self.reset_counters()

    # -- work counters (plain ints: counting never waits for the device) -------------------
    def reset_counters(self) -> None:
        """Zero :attr:`points_forward`, :attr:`points_normal_probes` and the encoding's own
        counters (``points_evaluated``, ``level_evaluations``: points x levels computed)."""
        self.points_forward = 0
        """Points sent through the hash grid by ``density``/``forward`` since the reset."""
        self.points_normal_probes = 0
        """Points sent through the hash grid to take normals (6 probes per normal)."""
        self.encoding.reset_counters()

    # -- coarse-to-fine -------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return self.cfg.grid.n_levels

    def set_active_levels(self, k: int) -> None:
        """Use only the ``k`` coarsest hash-grid levels (coarse-to-fine schedules)."""
        self.encoding.set_active_levels(k)

    # -- queries --------------------------------------------------------------------------
    def blob(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian density initialisation at world points x: [N, 3] -> [N]."""
        if self.cfg.blob_density == 0:
            return torch.zeros_like(x[..., 0])
        d2 = (x * x).sum(-1)
        return self.cfg.blob_density * torch.exp(-d2 / (2 * self.cfg.blob_radius ** 2))

    def _features(self, x: torch.Tensor, probes: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.numel() // 3
        if probes:
            self.points_normal_probes += n
        else:
            self.points_forward += n
        unit = (x / self.cfg.bound + 1) * 0.5
        h = self.density_net(self.encoding(unit))
        sigma = trunc_exp(h[..., 0] + self.blob(x))
        return sigma, h[..., 1:]

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Volume density at world points x: [N, 3] -> [N] (non-negative)."""
        return self._features(x)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, 3] -> density [N], albedo [N, 3] in [0, 1]."""
        sigma, geo = self._features(x)
        albedo = torch.sigmoid(self.albedo_net(geo))
        return sigma, albedo

    def normals(self, x: torch.Tensor, density: torch.Tensor | None = None) -> torch.Tensor:
        """Outward unit normals -grad(density)/|grad| by finite differences: x [N, 3] ->
        [N, 3]. ``density`` [N]: the density already taken at x, which forward differences
        reuse (without it they probe x as well); central differences ignore it."""
        eps = self.cfg.normal_eps
        offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps  # [3, 3]
        if self.cfg.normal_difference == "forward":
            probes = x[:, None] + offsets  # [N, 3, 3]
            if density is None:
                probes = torch.cat([x[:, None], probes], dim=1)  # [N, 4, 3]
            d = self._features(probes.reshape(-1, 3), probes=True)[0].view(x.shape[0], -1)
            d = d.float()  # differences of nearly equal values: never in half precision
            here = d[:, 0] if density is None else density.float()
            grad = (d[:, -3:] - here[:, None]) / eps
        else:
            probes = torch.cat([x[:, None] + offsets, x[:, None] - offsets], dim=1)  # [N, 6, 3]
            d = self._features(probes.reshape(-1, 3), probes=True)[0].view(-1, 2, 3).float()
            grad = (d[:, 0] - d[:, 1]) / (2 * eps)
        return -torch.nn.functional.normalize(grad, dim=-1, eps=1e-12)


# ---------------------------------------------------------------------------- backgrounds


@dataclass
class BackgroundConfig:
    """What rays that leave the scene see."""

    kind: str = "mlp"
    """'mlp' (learned colour per view direction, as RealFusion), 'color' (fixed) or 'random'
    (a random colour per call, which stops the field from painting the background)."""
    color: list[float] = bounded([1.0, 1.0, 1.0], lo=0, hi=1)
    """RGB in [0, 1] for kind='color'."""
    hidden: int = bounded(32, lo=1)
    """Width of the background MLP."""
    n_frequencies: int = bounded(4, lo=0)
    """Sin/cos frequencies of the direction encoding."""

    def __post_init__(self):
        if self.kind not in ("mlp", "color", "random"):
            raise ValueError(f"background kind must be 'mlp', 'color' or 'random', "
                             f"got {self.kind!r}")
        if len(self.color) != 3 or not all(0 <= c <= 1 for c in self.color):
            raise ValueError(f"background color must be three numbers in [0, 1], got {self.color}")


class Background(nn.Module):
    """Colour of the background along unit ray directions d: [N, 3] -> [N, 3]."""

    def __init__(self, cfg: BackgroundConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BackgroundConfig()
        self.register_buffer("color", torch.tensor(cfg.color, dtype=torch.float32))
        if cfg.kind == "mlp":
            in_dim = 3 + 6 * cfg.n_frequencies
            self.net = mlp(in_dim, cfg.hidden, 2, 3)

    def encode(self, d: torch.Tensor) -> torch.Tensor:
        freqs = 2.0 ** torch.arange(self.cfg.n_frequencies, device=d.device) * math.pi
        x = d[..., None] * freqs  # [N, 3, F]
        return torch.cat([d, torch.sin(x).flatten(1), torch.cos(x).flatten(1)], dim=-1)

    def forward(self, d: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cfg.kind == "mlp":
            return torch.sigmoid(self.net(self.encode(d)))
        if self.cfg.kind == "random":
            c = torch.rand(3, generator=generator, device=d.device)
            return c.expand(d.shape[0], 3)
        return self.color.expand(d.shape[0], 3)
