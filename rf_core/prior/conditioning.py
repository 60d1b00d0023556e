"""Text conditioning: prompt templates with the learned token and view-dependent suffixes.

The prompt of each rendered view names the side it sees (DreamFusion's view-dependent prompting,
kept by RealFusion): "..., front view" near the input camera's azimuth, "back view" opposite,
"side view" between, "overhead view" from high above and "bottom view" from below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VIEWS = ("front", "side", "back", "overhead", "bottom")


@dataclass
class PromptConfig:
    """How prompts are written."""

    template: str = "A high-resolution DSLR image of a {token}"
    """Prompt template; ``{token}`` becomes the learned token (RealFusion's prompt)."""
    token: str = "<e>"
    """The learned placeholder token (textual inversion)."""
    negative: str = ""
    """Negative prompt, used as the unconditional branch of classifier-free guidance."""
    view_dependent: bool = True
    """Append ", <side> view" from each camera's azimuth and elevation."""
    front_span: float = 60.0
    """Degrees of azimuth, centred on the input view, that count as the front (back likewise)."""
    overhead_elevation: float = 60.0
    """Views above this elevation (degrees) are "overhead"; below minus this, "bottom"."""

    def __post_init__(self) -> None:
        if "{token}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} must contain {{token}}")
        if not 0 < self.front_span < 180:
            raise ValueError(f"front_span must be in (0, 180) degrees, got {self.front_span}")
        if not 0 < self.overhead_elevation <= 90:
            raise ValueError("overhead_elevation must be in (0, 90] degrees")


@dataclass
class Conditioning:
    """Per-image text conditioning for one ``sds_grad`` call: plain strings, so it can travel
    to a prior in another process. The learned token's vector is registered on the prior."""

    prompts: list[str]
    negative_prompts: list[str]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.negative_prompts):
            raise ValueError("Conditioning needs one negative prompt per prompt")

    def __len__(self) -> int:
        return len(self.prompts)


def view_directions(azimuth: torch.Tensor, elevation: torch.Tensor, *, front_azimuth: float = 0.0,
                    cfg: PromptConfig | None = None) -> list[str]:
    """Name the side each camera sees. azimuth, elevation: [B] degrees -> B names from VIEWS."""
    cfg = cfg or PromptConfig()
    rel = torch.remainder(azimuth.detach().float().cpu() - front_azimuth + 180.0, 360.0) - 180.0
    half = cfg.front_span / 2
    names = []
    for a, e in zip(rel.abs().tolist(), elevation.detach().float().cpu().tolist(), strict=True):
        if e > cfg.overhead_elevation:
            names.append("overhead")
        elif e < -cfg.overhead_elevation:
            names.append("bottom")
        elif a <= half:
            names.append("front")
        elif a >= 180 - half:
            names.append("back")
        else:
            names.append("side")
    return names


def make_conditioning(cfg: PromptConfig, *, batch: int | None = None,
                      azimuth: torch.Tensor | None = None, elevation: torch.Tensor | None = None,
                      front_azimuth: float = 0.0) -> Conditioning:
    """Prompts for ``batch`` images, or for cameras at ``azimuth``/``elevation`` [B] degrees."""
    base = cfg.template.format(token=cfg.token)
    if azimuth is not None and cfg.view_dependent:
        if elevation is None:
            raise ValueError("view-dependent prompts need both azimuth and elevation")
        prompts = [f"{base}, {v} view" for v in
                   view_directions(azimuth, elevation, front_azimuth=front_azimuth, cfg=cfg)]
    else:
        n = batch if batch is not None else (len(azimuth) if azimuth is not None else 1)
        prompts = [base] * n
    return Conditioning(prompts, [cfg.negative] * len(prompts))
