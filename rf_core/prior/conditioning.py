"""Text conditioning: prompt templates with the learned token and view-dependent suffixes.

The prompt of each rendered view names the side it sees (DreamFusion's view-dependent prompting,
kept by RealFusion): "..., front view" in a band of azimuths starting at the input camera's,
"back view" in the opposite band, "side view" between, "overhead view" from high above and
"bottom view" from below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rf_core.config import bounded

VIEWS = ("front", "side", "back", "overhead", "bottom")
REGIMES = ("one-sided", "symmetric", "authors")


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
    front_range: list[float] = bounded([-60.0, 0.0], lo=-180, hi=180)
    """Azimuth band [low, high], in degrees relative to the input view (counter-clockwise seen
    from above), that counts as the front; the band 180° opposite is the back, the rest side.
    The authors' one-sided bands (stable-dreamfusion's ``angle_front=60``: phi in [0, 60)):
    their camera frame is mirrored against ours (image right is their -x), so their band turns
    towards the photo's left, which is our [-60, 0]."""
    regime: str = "one-sided"
    """Which band names a view: ``one-sided`` (``front_range`` as written, on every step),
    ``symmetric`` (a front band of the same width centred on the input view), or ``authors``
    (one-sided, but 9 steps in 10 prompt "front view" whatever the camera: the effect of
    stable-dreamfusion's ``replace_synthetic_camera_every`` test, trainer.py:367, 424)."""
    overhead_elevation: float = bounded(60.0, lo=0, hi=90, lo_open=True)
    """Views above this elevation (degrees) are "overhead"; below minus this, "bottom" (the
    authors' ``angle_overhead=30`` from the pole)."""

    def __post_init__(self) -> None:
        if "{token}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} must contain {{token}}")
        lo, hi = (float(v) for v in self.front_range) if len(self.front_range) == 2 else (0, -1)
        if not (-180 <= lo < hi <= 180 and hi - lo < 180):
            raise ValueError(f"front_range must be [low, high] degrees within [-180, 180], "
                             f"narrower than 180; got {self.front_range}")
        if self.regime not in REGIMES:
            raise ValueError(f"prompt regime must be one of {', '.join(REGIMES)}, got "
                             f"{self.regime!r}")
        if not 0 < self.overhead_elevation <= 90:
            raise ValueError("overhead_elevation must be in (0, 90] degrees")


@dataclass
class Conditioning:
    """Per-image conditioning for one ``sds_grad`` call: plain strings and tensors, so it can
    travel to a prior in another process. The learned token's vector is registered on the prior.

    Text priors (Stable Diffusion) read the prompts. Priors that need each view's geometry
    (image-conditioned ones such as Zero-1-to-3, or the ground-truth oracle) read the camera
    and the background the view was composited over; the reconstructor always fills them.
    """

    prompts: list[str]
    negative_prompts: list[str]
    c2w: torch.Tensor | None = None
    """[B,4,4] camera-to-world of each view (rf_core.scene.cameras convention), or None."""
    K: torch.Tensor | None = None
    """[B,3,3] intrinsics of each view, for images of ``image_size``; or None."""
    image_size: tuple[int, int] | None = None
    """(height, width) in pixels that ``K`` refers to."""
    background: torch.Tensor | None = None
    """[B,3] solid background colour in [0,1] each view was composited over, or None."""
    reference: torch.Tensor | None = None
    """[B,4,h,w] the input photo (RGB over white, then its mask) in [0,1], for priors that
    condition on it (``needs_reference``); or None."""
    reference_c2w: torch.Tensor | None = None
    """[B,4,4] camera-to-world of the input photo."""
    reference_K: torch.Tensor | None = None
    """[B,3,3] intrinsics of the input photo, for images of ``reference_size``."""
    reference_size: tuple[int, int] | None = None
    """(height, width) in pixels that ``reference_K`` refers to."""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.negative_prompts):
            raise ValueError("Conditioning needs one negative prompt per prompt")
        n = len(self.prompts)
        for name, shape in (("c2w", (n, 4, 4)), ("K", (n, 3, 3)), ("background", (n, 3)),
                            ("reference_c2w", (n, 4, 4)), ("reference_K", (n, 3, 3))):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"Conditioning.{name} must have shape {list(shape)}, "
                                 f"got {list(value.shape)}")
        if (self.c2w is None) != (self.K is None) or (self.K is None) != (self.image_size is None):
            raise ValueError("Conditioning needs c2w, K and image_size together (or none)")
        ref = (self.reference, self.reference_c2w, self.reference_K, self.reference_size)
        if any(v is None for v in ref) and any(v is not None for v in ref):
            raise ValueError("Conditioning needs reference, reference_c2w, reference_K and "
                             "reference_size together (or none)")
        if self.reference is not None and (self.reference.dim() != 4
                                           or tuple(self.reference.shape[:2]) != (n, 4)):
            raise ValueError(f"Conditioning.reference must have shape [{n}, 4, h, w], got "
                             f"{list(self.reference.shape)}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_cameras(self) -> bool:
        return self.c2w is not None

    def select(self, index: list[int]) -> Conditioning:
        """The conditioning of requests ``index`` (in that order)."""
        def pick(t):
            return None if t is None else t[index]

        return Conditioning([self.prompts[i] for i in index],
                            [self.negative_prompts[i] for i in index],
                            pick(self.c2w), pick(self.K), self.image_size, pick(self.background),
                            pick(self.reference), pick(self.reference_c2w),
                            pick(self.reference_K), self.reference_size)

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        """Requests of several conditionings side by side (a batching server's merge)."""
        def cat(name):
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"cannot merge conditionings with and without {name}")
            return torch.cat(values)
        def one(name):
            values = {getattr(p, name) for p in parts}
            if len(values) > 1:
                raise ValueError(f"cannot merge conditionings of {name} {sorted(values)}")
            return values.pop() if values else None

        return Conditioning([q for p in parts for q in p.prompts],
                            [q for p in parts for q in p.negative_prompts],
                            cat("c2w"), cat("K"), one("image_size"), cat("background"),
                            cat("reference"), cat("reference_c2w"), cat("reference_K"),
                            one("reference_size"))


def view_directions(azimuth: torch.Tensor, elevation: torch.Tensor, *, front_azimuth: float = 0.0,
                    cfg: PromptConfig | None = None) -> list[str]:
    """Name the side each camera sees. azimuth, elevation: [B] degrees -> B names from VIEWS."""
    cfg = cfg or PromptConfig()
    lo, hi = (float(v) for v in cfg.front_range)
    if cfg.regime == "symmetric":
        lo, hi = -(hi - lo) / 2, (hi - lo) / 2
    rel = azimuth.detach().float().cpu() - front_azimuth
    names = []
    for a, e in zip(rel.tolist(), elevation.detach().float().cpu().tolist(), strict=True):
        if e > cfg.overhead_elevation:
            names.append("overhead")
        elif e < -cfg.overhead_elevation:
            names.append("bottom")
        elif (a - lo) % 360.0 <= hi - lo:
            names.append("front")
        elif (a - lo - 180.0) % 360.0 <= hi - lo:
            names.append("back")
        else:
            names.append("side")
    return names


def make_conditioning(cfg: PromptConfig, *, batch: int | None = None,
                      azimuth: torch.Tensor | None = None, elevation: torch.Tensor | None = None,
                      front_azimuth: float = 0.0, cameras=None,
                      background: torch.Tensor | None = None,
                      reference: tuple | None = None, step: int | None = None
                      ) -> Conditioning:
    """Prompts for ``batch`` images, or for cameras at ``azimuth``/``elevation`` [B] degrees.

    ``cameras`` (rf_core.scene.cameras.Cameras) and ``background`` [B,3] travel with the prompts for
    priors that need each view's geometry; ``reference`` = (rgba [4,h,w], camera: a Cameras of
    one view) for priors that condition on the input photo, repeated for every view.
    ``step``: the training step, which the ``authors`` regime reads."""
    base = cfg.template.format(token=cfg.token)
    if azimuth is not None and cfg.view_dependent:
        if elevation is None:
            raise ValueError("view-dependent prompts need both azimuth and elevation")
        names = view_directions(azimuth, elevation, front_azimuth=front_azimuth, cfg=cfg)
        if cfg.regime == "authors" and step is not None and step % 10 != 0:
            names = ["front"] * len(names)
        prompts = [f"{base}, {v} view" for v in names]
    else:
        n = batch if batch is not None else (len(azimuth) if azimuth is not None else 1)
        prompts = [base] * n
    geometry = {}
    if cameras is not None:
        geometry = {"c2w": cameras.c2w.detach().float().cpu(),
                    "K": cameras.K.detach().float().cpu(),
                    "image_size": (int(cameras.height), int(cameras.width))}
    if background is not None:
        geometry["background"] = background.detach().float().cpu()
    if reference is not None:
        rgba, cam, n = reference[0], reference[1], len(prompts)
        geometry.update(reference=rgba.detach().float().cpu()[None].expand(n, -1, -1, -1),
                        reference_c2w=cam.c2w.detach().float().cpu()[:1].expand(n, -1, -1),
                        reference_K=cam.K.detach().float().cpu()[:1].expand(n, -1, -1),
                        reference_size=(int(cam.height), int(cam.width)))
    return Conditioning(prompts, [cfg.negative] * len(prompts), **geometry)
