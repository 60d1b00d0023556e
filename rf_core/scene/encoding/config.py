"""Hash-grid configuration, in tiny-cuda-nn's schema so one YAML block drives every backend."""

from __future__ import annotations

from dataclasses import dataclass

from rf_core.config import bounded

BACKENDS = ("auto", "torch", "triton", "tcnn")


@dataclass
class HashGridConfig:
    """Multi-resolution hash-grid encoding (Instant-NGP, Mueller et al. 2022).

    Field names and defaults follow tiny-cuda-nn's ``HashGrid`` encoding config; the
    defaults give 16 levels from resolution 16 to 4096 with at most 2^19 entries per level.
    """

    n_levels: int = bounded(16, lo=1)
    """Number of grid levels, coarse to fine."""
    n_features_per_level: int = bounded(2, lo=1)
    """Features stored per grid vertex; output width is ``n_levels * n_features_per_level``."""
    log2_hashmap_size: int = bounded(19, lo=4, hi=30)
    """log2 of the most entries a level may hold; finer levels are hashed into that many."""
    base_resolution: int = bounded(16, lo=1)
    """Grid vertices per axis of the coarsest level."""
    per_level_scale: float = bounded(1.447269237440378, lo=1)
    """Resolution growth factor between levels; the default 2^(8/15) = (4096/16)^(1/15) makes
    level 15 about 16 * 256 = 4096 vertices across."""
    backend: str = "auto"
    """'auto' (on CUDA: tcnn when installed, else triton when it runs, else torch; torch on
    the CPU), 'torch', 'triton' (fused kernels; pip install triton) or 'tcnn'."""
    init_scale: float = bounded(1e-4, lo=0)
    """Parameters start uniform in [-init_scale, init_scale], as tiny-cuda-nn does."""
    skip_masked_levels: bool = True
    """Coarse-to-fine: levels masked by the schedule are not computed (torch, triton). False:
    every level is computed and the masked ones multiplied by zero (the same values and
    gradients, at the full cost: the behaviour before skipping, kept for benchmarks)."""

    def __post_init__(self) -> None:
        for name in ("n_levels", "n_features_per_level", "log2_hashmap_size", "base_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.log2_hashmap_size > 30:
            # Level offsets and indices are uint32 in tcnn; 2^30 entries is already 8 GiB.
            raise ValueError(f"log2_hashmap_size must be <= 30, got {self.log2_hashmap_size}")
        if not self.per_level_scale >= 1.0:
            raise ValueError(f"per_level_scale must be >= 1 (finer levels grow), "
                             f"got {self.per_level_scale}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.init_scale >= 0.0:
            raise ValueError(f"init_scale must be >= 0, got {self.init_scale}")

    def to_tcnn(self) -> dict:
        """tiny-cuda-nn ``encoding_config`` for ``tinycudann.Encoding(3, cfg.to_tcnn())``."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }
