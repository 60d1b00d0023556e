"""Volume rendering in pure PyTorch: ray/box clipping, stratified samples, an occupancy
grid that skips empty space, compositing, and shading.

The renderer takes callables, not a model class (nerfacc's style): ``density_fn(x)``
and ``field_fn(x) -> (density, albedo)``, plus optional ``normal_fn`` and
``background_fn``. Samples are laid out densely as [N_rays, S]; only samples in
occupied cells are sent to the field, the rest get zero density.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rf_core.config import bounded, check_ranges
from rf_core.scene.ray_march import RayPlan, march, plan_rays

SHADING_MODES = ("albedo", "lambertian", "textureless")


# ---------------------------------------------------------------------------- pure functions


def ray_aabb(rays_o: torch.Tensor, rays_d: torch.Tensor, bound: float | torch.Tensor,
             near: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry/exit distances of rays [N, 3] through the cube [-bound, bound]^3, or through the
    box ``bound`` = [[x0, y0, z0], [x1, y1, z1]] when it is a [2, 3] tensor.

    Returns t_near [N], t_far [N] (t_near >= ``near``) and hit [N] (bool).
    """
    if isinstance(bound, torch.Tensor):
        lo, hi = bound[0], bound[1]
    else:
        lo, hi = -bound, bound
    inv = 1.0 / torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0 = (lo - rays_o) * inv
    t1 = (hi - rays_o) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=near)
    t_far = torch.maximum(t0, t1).amin(-1)
    hit = t_far > t_near
    return t_near, torch.where(hit, t_far, t_near), hit


def stratified_samples(t_near: torch.Tensor, t_far: torch.Tensor, n: int, perturb: bool,
                       generator: torch.Generator | None = None, min_step: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples per ray between t_near and t_far: [N] -> t [N, n], deltas [N, n].

    The strata are (t_far - t_near) / n long, or ``min_step`` where that is longer (a fixed
    step, as Instant-NGP marches): then a short ray needs fewer than ``n`` strata, the last
    one is cut at t_far, and the strata past t_far get delta 0 (and t = t_far), which the
    renderer never evaluates.
    """
    u = torch.arange(n, device=t_near.device, dtype=t_near.dtype)
    offset = (torch.rand(t_near.shape[0], n, device=t_near.device, generator=generator)
              if perturb else torch.full((1, n), 0.5, device=t_near.device))
    span = (t_far - t_near)[:, None]
    step = (span / n).clamp(min=min_step) if min_step > 0 else span / n
    start = step * u  # [N, n] distance of each stratum's start from t_near
    deltas = (span - start).clamp(min=0).minimum(step)
    t = t_near[:, None] + start.minimum(span) + offset * deltas
    return t, deltas.expand_as(t)


def render_weights(sigma: torch.Tensor, deltas: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compositing weights from densities [N, S] and step lengths [N, S].

    alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} (1 - alpha_j), w_i = T_i alpha_i.
    Returns weights [N, S] and the transmittance left after the last sample [N].
    """
    tau = sigma * deltas
    # Exclusive cumulative sum in log space: exact and stable, unlike cumprod of (1 - alpha).
    cum = torch.cumsum(tau, dim=-1)
    trans = torch.exp(-(cum - tau))
    alpha = 1.0 - torch.exp(-tau)
    return trans * alpha, torch.exp(-cum[..., -1])


def shade(albedo: torch.Tensor, normals: torch.Tensor | None, mode: str,
          light_dir: torch.Tensor | None, ambient: float) -> torch.Tensor:
    """Colour of samples under a mode. albedo, normals: [M, 3]; light_dir: [3] unit, towards
    the light. 'lambertian' = albedo * (ambient + (1 - ambient) max(0, n.l)); 'textureless'
    the same with a white albedo (DreamFusion's shading augmentations)."""
    if mode == "albedo":
        return albedo
    if mode not in SHADING_MODES:
        raise ValueError(f"shading must be one of {SHADING_MODES}, got {mode!r}")
    if normals is None or light_dir is None:
        raise ValueError(f"shading {mode!r} needs normals and a light direction")
    lam = ambient + (1 - ambient) * (normals @ light_dir).clamp(min=0)[:, None]
    base = albedo if mode == "lambertian" else torch.ones_like(albedo)
    return base * lam


# ---------------------------------------------------------------------------- occupancy grid


@dataclass
class OccupancyConfig:
    """Instant-NGP-style occupancy grid that lets the renderer skip empty space."""

    enabled: bool = True
    """Skip samples in empty cells (off: every sample is evaluated)."""
    resolution: int = bounded(64, lo=2)
    """Cells per side of the grid over the scene cube."""
    update_every: int = bounded(16, lo=1)
    """Training steps between refreshes."""
    warmup_steps: int = bounded(16, lo=0)
    """Steps before the first refresh; until then every cell counts as occupied."""
    decay: float = bounded(0.95, lo=0, hi=1, lo_open=True)
    """Each refresh keeps max(decay * old, new) density per cell."""
    alpha_threshold: float = bounded(0.01, lo=0, hi=1, hi_open=True)
    """A cell is occupied when a sample step through it would be at least this opaque
    (Instant-NGP's minimum optical thickness), or denser than the grid's mean density."""
    density_threshold: float | None = bounded(None, lo=0, lo_open=True)
    """If set, the authors' (torch-ngp's) rule instead: occupied when the cell's density is at
    least min(this, mean density), in scene units (their 10 is 8.6 at our scene scale, see
    docs/hyperparameters.md)."""
    init_from_field: bool = True
    """Refresh once before the first step, from the initial field (its density blob), so
    that the warm-up renders the blob rather than every sample in the cube (off: every cell
    counts as occupied until ``warmup_steps``; the warm-up then peaks at several GB)."""
    tight_bounds: bool = True
    """Stratify samples over the bounding box of occupied cells instead of the whole cube, so
    the step shrinks to the object's size (finer sampling of fine hash levels, same cost)."""

    def __post_init__(self):
        check_ranges(self)


class OccupancyGrid(nn.Module):
    """A [R, R, R] grid of running max densities over [-bound, bound]^3 and its bitfield."""

    def __init__(self, cfg: OccupancyConfig, bound: float, device=None):
        super().__init__()
        self.cfg, self.bound = cfg, bound
        r = cfg.resolution
        self.register_buffer("density", torch.full((r, r, r), float("inf"), device=device))
        self.register_buffer("occupied", torch.ones((r, r, r), dtype=torch.bool, device=device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long, device=device))
        # Bounding box of the occupied cells (derived from ``occupied``, so not saved).
        self.register_buffer("box", torch.tensor([[-bound] * 3, [bound] * 3], device=device),
                             persistent=False)

    def _update_box(self) -> None:
        """Bounding box of the occupied cells, computed on the device (no host sync); a
        degenerate box at the origin, which no ray hits, when no cell is occupied."""
        r = self.cfg.resolution
        idx = torch.arange(r, device=self.occupied.device)
        lo, hi = [], []
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            hit = self.occupied.any(dim=others)  # [r]
            lo.append(torch.where(hit, idx, r).amin())
            hi.append(torch.where(hit, idx, -1).amax() + 1)
        cell = 2 * self.bound / r
        box = torch.stack([torch.stack(lo), torch.stack(hi)]).float() * cell - self.bound
        self.box.copy_(torch.where(self.occupied.any(), box, torch.zeros_like(box)))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._update_box()

    def cell_index(self, x: torch.Tensor) -> torch.Tensor:
        """Flat cell index of world points x: [..., 3] -> [...] (clamped to the grid)."""
        r = self.cfg.resolution
        ijk = ((x / self.bound + 1) * 0.5 * r).long().clamp(0, r - 1)
        return (ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Whether world points x: [..., 3] lie in occupied cells -> bool [...]."""
        if not self.cfg.enabled:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return self.occupied.view(-1)[self.cell_index(x)]

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], step_size: float,
               generator: torch.Generator | None = None, chunk: int = 1 << 18,
               remember: bool = True) -> None:
        """Refresh from ``density_fn`` at one jittered point per cell.

        ``step_size`` is the renderer's sample spacing: a cell is occupied when
        1 - exp(-density * step_size) >= alpha_threshold. ``remember=False`` (the seed before
        the first step) sets the occupied cells but keeps no densities, so the first regular
        refresh starts afresh instead of decaying the initial field's densities for tens of
        refreshes (which would keep the empty space of the initial field occupied).
        """
        r, dev = self.cfg.resolution, self.density.device
        idx = torch.arange(r, device=dev)
        ijk = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1).view(-1, 3)
        jitter = torch.rand(ijk.shape, device=dev, generator=generator)
        x = ((ijk + jitter) / r * 2 - 1) * self.bound
        new = torch.cat([density_fn(c).float() for c in x.split(chunk)]).view(r, r, r)
        old = torch.where(torch.isinf(self.density), torch.zeros_like(new), self.density)
        self.density.copy_(torch.maximum(old * self.cfg.decay, new))
        # torch-ngp's rule: the threshold never exceeds the mean density, so a field that
        # starts (or becomes) faint everywhere keeps its denser half instead of vanishing;
        # a floor at a tenth of the nominal threshold still empties a field that has faded.
        # Kept on the device: a refresh never waits for it.
        mean = self.density.mean()
        if self.cfg.density_threshold is not None:
            sigma_thresh = mean.clamp(max=self.cfg.density_threshold)
        else:
            nominal = -math.log(1 - self.cfg.alpha_threshold) / step_size
            sigma_thresh = mean.clamp(max=nominal).clamp(min=0.1 * nominal)
        self.occupied.copy_(self.density >= sigma_thresh)
        if not remember:
            self.density.fill_(float("inf"))
        self._update_box()
        self.updates += 1

    @property
    def occupancy_ratio(self) -> float:
        return self.occupied.float().mean().item()


# ---------------------------------------------------------------------------- renderer


@dataclass
class RendererConfig:
    """How rays are sampled and composited."""

    num_samples: int = bounded(128, lo=1)
    """Stratified samples per ray across the scene cube (before empty-space skipping)."""
    near: float = bounded(0.05, lo=0)
    """Closest distance from the camera a sample may be."""
    min_step: float = bounded(0.0079, lo=0)
    """Shortest spacing of samples along a ray, in world units. Rays whose chord through the
    occupied box is shorter than ``num_samples * min_step`` take fewer samples, at this
    spacing. The default is the authors' fixed step (2 sqrt(3) / 512 = 0.00677 at their
    scale, x 1.165 at ours). 0: always ``num_samples`` per chord, however short."""
    perturb: bool = True
    """Jitter samples within their strata while training."""
    ambient: float = bounded(0.3, lo=0, hi=1)
    """Ambient light in the lambertian and textureless shading modes."""
    chunk: int = bounded(4096, lo=1)
    """Rays per chunk when rendering whole images without gradients."""
    early_stop_eps: float = bounded(1e-4, lo=0, hi=1, hi_open=True)
    """A ray stops once its transmittance falls below this (Instant-NGP, nerfacc): samples
    behind an opaque surface are never sent to the field. 0: every sample in an occupied
    cell is evaluated."""
    march_segments: int = bounded(2, lo=1)
    """With ``early_stop_eps``: samples are evaluated front to back in this many segments
    along the rays; a segment is skipped for rays already opaque. More segments skip more
    samples (in training, each later segment evaluates a share of its active samples that
    the previous step measured: no host sync; see ``rf_core.scene.ray_march``)."""
    normals_min_weight: float = bounded(1e-3, lo=0, hi=1, hi_open=True)
    """Normals (3 or 6 extra density probes each) only at samples whose compositing weight is
    above this; the rest shade and composite as if their normal were zero (their colour,
    normal and orientation-penalty contributions are each at most this weight). 0: normals
    at every evaluated sample."""
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)
    """Empty-space skipping."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class PackedSamples:
    """The M samples the field evaluated, packed over N rays (nerfacc's layout), for losses
    on individual samples (``rf_core.fitting.losses.orientation``)."""

    ray_indices: torch.Tensor
    """[M] the ray (0..N-1) of each sample."""
    weights: torch.Tensor
    """[M] compositing weights w_i = T_i alpha_i (in the autograd graph)."""
    dirs: torch.Tensor
    """[M, 3] unit direction of each sample's ray (the view direction)."""
    normals: torch.Tensor | None = None
    """[M, 3] field normals (world), when the render computed them; else None."""


@dataclass
class RenderOutput:
    """Per-ray results: rgb [N, 3] (over the background), opacity [N], depth [N] (expected
    z-depth along ``forward_axis`` when given, else ray distance, of the visible surface:
    normalised by opacity, ~0 where empty), normal [N, 3] (world,
    composited; zeros unless requested), samples [] (field evaluations this call)."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor
    samples: int
    packed: PackedSamples | None = None
    """The evaluated samples themselves (weights, normals, view directions)."""
    normals_wanted: torch.Tensor | None = None
    """[] (on the device) samples whose weight exceeded ``normals_min_weight``, when the render
    thresholded its normals: what ``normals_share`` should cover next time."""
    segments_wanted: torch.Tensor | None = None
    """[k] (on the device) per march segment, the samples a complete march evaluates: with
    ``segment_counts``, what ``segment_shares`` should cover next time."""
    segment_counts: list[int] | None = None
    """[k] active samples per march segment (host)."""
    dropped: torch.Tensor | None = None
    """[] (on the device) samples of rays still alive that ``segment_shares`` left out."""


class VolumeRenderer(nn.Module):
    """Renders rays through a field inside the scene cube, skipping empty cells."""

    def __init__(self, cfg: RendererConfig, bound: float, device=None):
        super().__init__()
        self.cfg, self.bound = cfg, bound
        self.occupancy = OccupancyGrid(cfg.occupancy, bound, device=device)

    @property
    def step_size(self) -> float:
        """Sample spacing along the longest chord of the cube."""
        return 2 * math.sqrt(3) * self.bound / self.cfg.num_samples

    def update_occupancy(self, density_fn, generator=None, remember: bool = True) -> None:
        self.occupancy.update(density_fn, self.step_size, generator=generator,
                              remember=remember)

    def plan(self, rays_o: torch.Tensor, rays_d: torch.Tensor, perturb: bool | None = None,
             generator: torch.Generator | None = None) -> RayPlan:
        """Where rays_o, rays_d [N, 3] take their samples, and how many per march segment
        are active (counted on the device; :func:`rf_core.scene.ray_march.read_counts` reads the
        counts of several plans in one sync)."""
        perturb = self.training and self.cfg.perturb if perturb is None else perturb
        occ = self.occupancy.cfg
        box = self.occupancy.box if occ.enabled and occ.tight_bounds else self.bound
        t_near, t_far, hit = ray_aabb(rays_o, rays_d, box, self.cfg.near)
        t, deltas = stratified_samples(t_near, t_far, self.cfg.num_samples, perturb, generator,
                                       self.cfg.min_step)
        x = rays_o[:, None] + rays_d[:, None] * t[..., None]  # [N, S, 3]
        active = self.occupancy.query(x) & hit[:, None]
        if self.cfg.min_step > 0:
            active = active & (deltas > 0)
        segments = self.cfg.march_segments if self.cfg.early_stop_eps > 0 else 1
        return plan_rays(t, deltas, x, active, segments)

    def forward(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        field_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        background_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        normal_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        shading: str = "albedo",
        light_dir: torch.Tensor | None = None,
        want_normals: bool = False,
        forward_axis: torch.Tensor | None = None,
        perturb: bool | None = None,
        generator: torch.Generator | None = None,
        normals_share: float | None = None,
        plan: RayPlan | None = None,
        segment_shares: Sequence[float] | None = None,
    ) -> RenderOutput:
        """Render rays_o, rays_d: [N, 3] (unit directions).

        field_fn(x [M, 3]) -> (density [M], albedo [M, 3]); background_fn(d [N, 3]) -> [N, 3];
        normal_fn(x [M, 3], density [M]) -> [M, 3] needed for non-albedo shading or
        ``want_normals`` (density: the field's answer at x, which forward differences reuse);
        forward_axis [N, 3] turns ray distances into z-depth. ``normals_share``: with
        ``normals_min_weight``, take normals at that share of the evaluated samples, the
        heaviest, instead of finding those above the threshold (which waits for the device):
        see ``_normal_samples``. ``plan``: these rays' :meth:`plan` (else made here, with
        ``perturb`` and ``generator``; reading its counts is then this call's host sync).
        ``segment_shares``: the share of each later march segment to evaluate
        (:func:`rf_core.scene.ray_march.march`).
        """
        n, s = rays_o.shape[0], self.cfg.num_samples
        plan = plan if plan is not None else self.plan(rays_o, rays_d, perturb, generator)
        eps = self.cfg.early_stop_eps
        marched = march(plan, field_fn, eps, segment_shares)
        x, t, flat, sigma_a, albedo_a = plan.x, plan.t, marched.flat, marched.sigma, \
            marched.albedo
        weights = marched.weights
        ray_of = flat // s
        w_a = weights.view(-1)[flat]  # [M]

        normals_a, keep, normals_wanted = None, None, None
        if (want_normals or shading != "albedo") and normal_fn is not None:
            if self.cfg.normals_min_weight > 0:
                # Normals cost 3-6 density probes each: take them only where they show.
                keep, normals_wanted = self._normal_samples(w_a.detach(), normals_share)
                kept = normal_fn(x.view(-1, 3)[flat[keep]], sigma_a[keep]).float() \
                    if keep.numel() else \
                    torch.zeros(0, 3, device=x.device)
                normals_a = torch.zeros(flat.shape[0], 3, device=x.device, dtype=kept.dtype)
                normals_a = normals_a.index_put((keep,), kept)
            else:
                normals_a = normal_fn(x.view(-1, 3)[flat], sigma_a).float()
        color_a = shade(albedo_a, normals_a, shading, light_dir, self.cfg.ambient)

        def gather(values_a: torch.Tensor, rows: torch.Tensor = ray_of,
                   w: torch.Tensor = w_a) -> torch.Tensor:
            out = torch.zeros(n, values_a.shape[-1], device=x.device, dtype=values_a.dtype)
            return out.index_add(0, rows, w[:, None] * values_a)

        opacity = weights.sum(-1)
        rgb = gather(color_a)
        depth = (weights * t).sum(-1) / opacity.clamp(min=1e-6)
        if forward_axis is not None:
            depth = depth * (rays_d * forward_axis).sum(-1)
        if normals_a is None:
            normal = torch.zeros_like(rgb)
            packed = PackedSamples(ray_of, w_a, rays_d[ray_of], None)
        elif keep is None:
            normal = gather(normals_a)
            packed = PackedSamples(ray_of, w_a, rays_d[ray_of], normals_a)
        else:
            normal = gather(kept, ray_of[keep], w_a[keep])
            packed = PackedSamples(ray_of[keep], w_a[keep], rays_d[ray_of[keep]], kept)
        if background_fn is not None:
            rgb = rgb + (1 - opacity)[:, None] * background_fn(rays_d)
        return RenderOutput(rgb, opacity, depth, normal, int(flat.numel()), packed,
                            normals_wanted, marched.wanted, plan.counts, marched.dropped)

    def _normal_samples(self, w: torch.Tensor, share: float | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the M samples (weights w: [M]) get normals: indices [K], and the number
        whose weight exceeds ``normals_min_weight`` (a device scalar).

        ``share`` None: exactly those (``nonzero``: a host sync). A share in (0, 1]: the
        ceil(share * M) heaviest (``topk`` of a size the host knows: no sync); if more are
        above the threshold, the faintest lose their normal (a pixel moves by its weight)."""
        eligible = w > self.cfg.normals_min_weight
        wanted = eligible.sum()
        if share is None:
            return eligible.nonzero().squeeze(-1), wanted
        k = min(w.numel(), math.ceil(share * w.numel()))
        return torch.topk(torch.where(eligible, w, -1.0), k, sorted=False).indices, wanted


@torch.no_grad()
def render_image(renderer: VolumeRenderer, field_fn, cams, index: int = 0,
                 background_fn=None, normal_fn=None, shading: str = "albedo",
                 light_dir=None, want_normals: bool = False) -> dict[str, torch.Tensor]:
    """Render camera ``index`` of ``cams`` (rf_core.scene.cameras.Cameras) in chunks, no gradients.

    Returns {"rgb": [H, W, 3], "opacity": [H, W], "depth": [H, W] z-depth, "normal": [H, W, 3]}.
    """
    from rf_core.scene.cameras import generate_rays

    cam = cams[index]
    rays_o, rays_d = generate_rays(cam)
    rays_o, rays_d = rays_o.view(-1, 3), rays_d.view(-1, 3)
    forward = cam.c2w[0, :3, 2].expand_as(rays_d)
    parts = []
    for sl in torch.split(torch.arange(rays_o.shape[0], device=rays_o.device), renderer.cfg.chunk):
        parts.append(renderer(rays_o[sl], rays_d[sl], field_fn, background_fn, normal_fn,
                              shading, light_dir, want_normals, forward[sl], perturb=False))
    h, w = cams.height, cams.width
    return {
        "rgb": torch.cat([p.rgb for p in parts]).view(h, w, 3),
        "opacity": torch.cat([p.opacity for p in parts]).view(h, w),
        "depth": torch.cat([p.depth for p in parts]).view(h, w),
        "normal": torch.cat([p.normal for p in parts]).view(h, w, 3),
    }
