"""``Reconstructor``: RealFusion's optimisation of one object from one photo.

Each step renders
  - the input view (a random subset of its pixels) for the image and mask losses, and
  - ``sds_batch`` random orbit views, over random solid backgrounds, for score distillation
    from the prior and for the regularisers (opacity entropy, Ref-NeRF orientation, 2D normal
    smoothness, optional opacity sparsity).
Every weight is a ``Schedule``. The first ``albedo_steps`` render albedo only; afterwards a view
is shaded albedo, lambertian or textureless at random under a light near its camera
(DreamFusion). Hash-grid levels unlock coarse to fine. The prior is injected: any object with
``sds_grad(images, conditioning, cfg, step=, generator=)`` (local or a Ray client).

All randomness comes from the reconstructor's own generators, which are part of its state:
a run resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rf_core.cameras import Cameras, OrbitConfig, generate_rays, orbit_cameras, sample_orbit
from rf_core.config import Schedule, ScheduleSpec, schedule_field
from rf_core.field import FieldConfig, RadianceField
from rf_core.prior.conditioning import PromptConfig, make_conditioning
from rf_core.prior.sds import SDSConfig, sds_loss
from rf_core.render import OccupancyConfig, RendererConfig, VolumeRenderer, render_image

_AMP = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training cannot continue from this state."""


@dataclass
class LossWeights:
    """Weight of each loss term (a number or a schedule over steps)."""

    rgb: ScheduleSpec = schedule_field(1000.0, "input-view image MSE")
    mask: ScheduleSpec = schedule_field(500.0, "input-view mask MSE (opacity vs mask)")
    sds: ScheduleSpec = schedule_field(1.0, "score distillation on random views")
    entropy: ScheduleSpec = schedule_field(1.0, "opacity entropy of random views: pushes each "
                                           "pixel to fully empty or fully solid")
    orientation: ScheduleSpec = schedule_field(1e-2, "Ref-NeRF orientation: no visible normals "
                                               "facing away from the camera")
    normal_smooth: ScheduleSpec = schedule_field(0.5, "2D smoothness of rendered normal maps "
                                                 "(RealFusion)")
    opacity: ScheduleSpec = schedule_field(0.0, "mean opacity of random views (sparsity)")

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            Schedule.parse(getattr(self, name), f"weights.{name}")


@dataclass
class CameraSetup:
    """The input view's camera and the range of random views."""

    input_radius: float = 3.0
    """Distance of the input camera from the origin."""
    input_elevation: float = 0.0
    """Input camera elevation (degrees); RealFusion assumes a roughly level photo."""
    input_azimuth: float = 0.0
    """Input camera azimuth (degrees); the front of the object faces this direction."""
    input_fov: float = 40.0
    """Input camera vertical field of view (degrees)."""
    random: OrbitConfig = dataclasses.field(default_factory=lambda: OrbitConfig(
        radius_range=[2.6, 3.4], elevation_range=[-10.0, 60.0], azimuth_range=[-180.0, 180.0],
        fov_range=[35.0, 45.0]))
    """Random views for SDS."""


@dataclass
class ReconstructorConfig:
    """One object's optimisation."""

    seed: int = 0
    """Seeds the field initialisation and every random choice."""
    steps: int = 5000
    """Optimisation steps."""
    lr: ScheduleSpec = schedule_field([0, 1e-2, 1e-3, 5000, "log"], "Adam learning rate")
    input_size: int = 128
    """Side at which the input photo is fitted."""
    input_rays: int = 4096
    """Input-view pixels rendered per step (0: the whole image)."""
    sds_size: int = 64
    """Side of the random views rendered for SDS (upsampled to the model's resolution)."""
    sds_batch: int = 1
    """Random views per step."""
    albedo_steps: int = 500
    """Steps that render albedo only, before random shading starts."""
    lambertian_p: float = 0.6
    """After the albedo phase: probability of lambertian shading (DreamFusion)."""
    textureless_p: float = 0.2
    """After the albedo phase: probability of textureless shading (rest: albedo)."""
    levels: ScheduleSpec = schedule_field([0, 8, 16, 2000], "active hash-grid levels "
                                          "(coarse to fine)")
    normal_blur_sigma: float = 1.5
    """Gaussian blur (pixels) whose output the 2D normal-smoothness loss pulls normals towards."""
    mixed_precision: str = "auto"
    """``no``, ``fp16``, ``bf16``; ``auto`` = fp16 on CUDA, none on the CPU."""
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    renderer: RendererConfig = dataclasses.field(default_factory=lambda: RendererConfig(
        num_samples=128, occupancy=OccupancyConfig(update_every=16, warmup_steps=64)))
    camera: CameraSetup = dataclasses.field(default_factory=CameraSetup)
    sds: SDSConfig = dataclasses.field(default_factory=SDSConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        for name in ("steps", "input_size", "sds_size", "sds_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.input_rays < 0:
            raise ValueError(f"input_rays must be >= 0, got {self.input_rays}")
        if not (0 <= self.lambertian_p and 0 <= self.textureless_p
                and self.lambertian_p + self.textureless_p <= 1):
            raise ValueError("lambertian_p and textureless_p must be >= 0 and sum to <= 1")
        if self.mixed_precision not in (*_AMP, "auto"):
            raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16; "
                             f"got {self.mixed_precision!r}")
        Schedule.parse(self.lr, "lr")
        Schedule.parse(self.levels, "levels")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean of -(p log p + (1-p) log(1-p)) over all entries, p clamped away from 0 and 1."""
    p = p.clamp(1e-5, 1 - 1e-5)
    return -(p * p.log() + (1 - p) * (1 - p).log()).mean()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding. images: [B,C,H,W]."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def normal_smoothness(normals: torch.Tensor, opacity: torch.Tensor, sigma: float) -> torch.Tensor:
    """RealFusion's 2D normal smoothness: rendered normals [B,3,H,W] pulled towards their
    blurred (detached) selves, weighted by opacity [B,1,H,W]."""
    target = gaussian_blur(normals, sigma).detach()
    return (opacity * (normals - target).pow(2)).sum(1).mean()


class Reconstructor:
    """Fits a radiance field to one photo under a diffusion prior.

    rgb: [3,S,S] in [0,1] (object over white); mask: [1,S,S] in [0,1]; prior: has ``sds_grad``.
    """

    def __init__(self, cfg: ReconstructorConfig, rgb: torch.Tensor, mask: torch.Tensor, prior,
                 device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.prior = prior
        self.step_count = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.dev_gen = (self.gen if self.device.type == "cpu"
                        else torch.Generator(self.device).manual_seed(cfg.seed + 1))
        fork = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with fork:
            torch.manual_seed(cfg.seed)
            self.field = RadianceField(cfg.field, device=self.device)
        self.renderer = VolumeRenderer(cfg.renderer, cfg.field.bound, device=self.device)
        self.optimizer = torch.optim.Adam(self.field.parameters(), lr=self._lr(0),
                                          betas=(0.9, 0.99), eps=1e-15)
        amp = cfg.mixed_precision
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "no"
        self.amp_dtype = _AMP[amp]
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        size = cfg.input_size
        self.target_rgb = F.interpolate(rgb[None].float(), size=(size, size), mode="area")[0] \
            .permute(1, 2, 0).reshape(-1, 3).to(self.device)
        self.target_mask = F.interpolate(mask[None].float(), size=(size, size), mode="area")[0] \
            .reshape(-1).to(self.device)
        cam = self.input_camera(size)
        rays_o, rays_d = generate_rays(cam)
        self.input_rays_o = rays_o.reshape(-1, 3).to(self.device)
        self.input_rays_d = rays_d.reshape(-1, 3).to(self.device)
        self.input_forward = cam.c2w[0, :3, 2].to(self.device)

    # ------------------------------------------------------------------ cameras
    def input_camera(self, size: int | None = None) -> Cameras:
        """The camera that took the photo, in this reconstruction's world."""
        c = self.cfg.camera
        size = size or self.cfg.input_size
        return orbit_cameras(c.input_radius, c.input_elevation, c.input_azimuth, c.input_fov,
                             size, size)

    # ------------------------------------------------------------------ schedules
    def _lr(self, step: int) -> float:
        return Schedule.parse(self.cfg.lr, "lr")(step)

    def _weight(self, name: str, step: int) -> float:
        return Schedule.parse(getattr(self.cfg.weights, name), name)(step)

    def _levels(self, step: int) -> int:
        k = round(Schedule.parse(self.cfg.levels, "levels")(step))
        return max(1, min(self.field.n_levels, k))

    # ------------------------------------------------------------------ rendering
    def _normals(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.normals(x)

    def render(self, cams: Cameras, index: int = 0, shading: str = "albedo",
               background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict:
        """Render a whole view without gradients: rgb [H,W,3] over ``background``, opacity,
        depth (z), normal [H,W,3] (world)."""
        bg = torch.tensor(background, device=self.device)
        light = None
        if shading != "albedo":
            light = F.normalize(cams.c2w[index, :3, 3].to(self.device), dim=0)
        with torch.no_grad():
            out = render_image(self.renderer, self.field, cams.to(self.device), index,
                               background_fn=lambda d: bg.expand(d.shape[0], 3),
                               normal_fn=self._normals, shading=shading, light_dir=light,
                               want_normals=True)
        return out

    def _pick_shading(self, step: int) -> str:
        if step < self.cfg.albedo_steps:
            return "albedo"
        u = float(torch.rand((), generator=self.gen))
        if u < self.cfg.lambertian_p:
            return "lambertian"
        if u < self.cfg.lambertian_p + self.cfg.textureless_p:
            return "textureless"
        return "albedo"

    def _random_views(self, step: int) -> tuple[dict[str, torch.Tensor], dict, str]:
        cfg = self.cfg
        n, side = cfg.sds_batch, cfg.sds_size
        cams, angles = sample_orbit(cfg.camera.random, n, side, side, generator=self.gen)
        shading = self._pick_shading(step)
        bg = torch.rand(n, 3, generator=self.gen).to(self.device)
        eye = cams.c2w[:, :3, 3]
        light = F.normalize(eye + 0.5 * eye.norm(dim=-1, keepdim=True)
                            * torch.randn(n, 3, generator=self.gen), dim=-1).to(self.device)
        rays_o, rays_d = generate_rays(cams)
        forward = cams.c2w[:, :3, 2][:, None, None].expand_as(rays_d)
        outs = []
        for i in range(n):
            out = self.renderer(rays_o[i].reshape(-1, 3).to(self.device),
                                rays_d[i].reshape(-1, 3).to(self.device), self.field,
                                normal_fn=self._normals, shading=shading, light_dir=light[i],
                                want_normals=True,
                                forward_axis=forward[i].reshape(-1, 3).to(self.device),
                                generator=self.dev_gen)
            outs.append(out)
        rgb = torch.stack([o.rgb for o in outs]).view(n, side, side, 3)
        opacity = torch.stack([o.opacity for o in outs]).view(n, side, side, 1)
        rgb = rgb + (1 - opacity) * bg[:, None, None, :]
        views = {
            "rgb": rgb.permute(0, 3, 1, 2),
            "opacity": opacity.permute(0, 3, 1, 2),
            "normal": torch.stack([o.normal for o in outs]).view(n, side, side, 3)
            .permute(0, 3, 1, 2),
            "orientation": torch.stack([o.orientation for o in outs]),
        }
        return views, angles, shading

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        """One optimisation step; returns its losses and diagnostics."""
        cfg, step = self.cfg, self.step_count
        self.field.set_active_levels(self._levels(step))
        occ = cfg.renderer.occupancy
        if occ.enabled and step >= occ.warmup_steps and step % occ.update_every == 0:
            self.renderer.update_occupancy(self.field.density, generator=self.dev_gen)
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        terms: dict[str, torch.Tensor] = {}
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            # Input view: image and mask reconstruction.
            n_pix = self.target_rgb.shape[0]
            if cfg.input_rays and cfg.input_rays < n_pix:
                idx = torch.randint(0, n_pix, (cfg.input_rays,), generator=self.gen)
                idx = idx.to(self.device)
            else:
                idx = torch.arange(n_pix, device=self.device)
            white = torch.ones(3, device=self.device)
            out = self.renderer(self.input_rays_o[idx], self.input_rays_d[idx], self.field,
                                background_fn=lambda d: white.expand(d.shape[0], 3),
                                generator=self.dev_gen)
            terms["rgb"] = F.mse_loss(out.rgb.float(), self.target_rgb[idx])
            terms["mask"] = F.mse_loss(out.opacity.float(), self.target_mask[idx])
            # Random views: score distillation and regularisers.
            views, angles, shading = self._random_views(step)
            images = views["rgb"].float()
            need_sds = self._weight("sds", step) > 0
            if need_sds:
                azimuth = angles["azimuth"]
                cond = make_conditioning(cfg.prompt, azimuth=azimuth, elevation=angles["elevation"],
                                         front_azimuth=cfg.camera.input_azimuth)
                grad = self.prior.sds_grad(images.detach(), cond, cfg.sds, step=step,
                                           generator=self.gen)
                terms["sds"] = sds_loss(images, grad.to(self.device)) / images.shape[0]
            opacity = views["opacity"].float()
            terms["entropy"] = binary_entropy(opacity)
            terms["orientation"] = views["orientation"].float().mean()
            terms["normal_smooth"] = normal_smoothness(views["normal"].float(), opacity,
                                                       cfg.normal_blur_sigma)
            terms["opacity"] = opacity.mean()
        loss = sum(self._weight(name, step) * value for name, value in terms.items())
        if not torch.isfinite(loss):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(f"loss became {float(loss.detach())} at step {step} (terms: "
                                     f"{', '.join(bad) or 'their weighted sum'}); lower lr or "
                                     "weights.sds, or resume from the last checkpoint")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_count += 1
        with torch.no_grad():
            mse = terms["rgb"].detach()
        metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        metrics.update({"loss/total": float(loss.detach()), "lr": lr, "step": step,
                        "levels": float(self.field.encoding.active_levels),
                        "input_psnr_sampled": float(-10 * torch.log10(mse.clamp_min(1e-10))),
                        "shading": ["albedo", "lambertian", "textureless"].index(shading)})
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer, occupancy, RNGs, step."""
        state = {
            "step": self.step_count,
            "field": self.field.state_dict(),
            "occupancy": self.renderer.occupancy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "gen": self.gen.get_state(),
        }
        if self.dev_gen is not self.gen:
            state["dev_gen"] = self.dev_gen.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.field.load_state_dict(state["field"])
        self.renderer.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        if "dev_gen" in state and self.dev_gen is not self.gen:
            self.dev_gen.set_state(state["dev_gen"])
        self.field.set_active_levels(self._levels(self.step_count))

    # ------------------------------------------------------------------ evaluation
    def input_view_metrics(self) -> dict[str, float]:
        """PSNR and mask IoU of the whole input view at ``input_size``."""
        from rf_core.metrics import mask_iou, psnr

        out = self.render(self.input_camera())
        size = self.cfg.input_size
        target = self.target_rgb.view(size, size, 3)
        mask = self.target_mask.view(size, size)
        return {"input_psnr": psnr(out["rgb"].cpu(), target.cpu()),
                "input_mask_iou": mask_iou(out["opacity"].cpu(), mask.cpu())}
