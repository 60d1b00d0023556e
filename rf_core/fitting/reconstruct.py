"""``Reconstructor``: RealFusion's optimisation of one object from one photo.

Each step renders
  - the input view (a random subset of its pixels) for the image and mask losses, and
  - ``sds_batch`` random orbit views (``rf_core.scene.random_views``) for score distillation
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

from rf_core.config import (
    Schedule,
    ScheduleSpec,
    bounded,
    build_schedules,
    check_ranges,
    schedule_field,
)
from rf_core.errors import UserError
from rf_core.fitting.losses import LossWeights, check_terms, loss_terms, weight_names
from rf_core.fitting.reconstruct_state import check_state
from rf_core.host_sync import to_device, to_host
from rf_core.precision import autocast_dtype, parse_precision, precision_field
from rf_core.prior.conditioning import PromptConfig, make_conditioning
from rf_core.prior.sds import SDSConfig
from rf_core.scene.cameras import Cameras, CameraSetup, generate_rays, orbit_cameras
from rf_core.scene.field import Background, BackgroundConfig, FieldConfig, RadianceField
from rf_core.scene.random_views import BACKGROUNDS, render_views, sample_views
from rf_core.scene.ray_march import read_counts
from rf_core.scene.render import OccupancyConfig, RendererConfig, VolumeRenderer, render_image
from rf_core.scene.sample_shares import SampleShares


class NonFiniteLossError(UserError, RuntimeError):
    """The loss was NaN or infinite for too many steps in a row; training cannot recover."""


@dataclass
class ReconstructorConfig:
    """One object's optimisation."""

    seed: int = 0
    """Seeds the field initialisation and every random choice."""
    steps: int = bounded(5000, lo=1)
    """Optimisation steps."""
    lr: ScheduleSpec = schedule_field(1e-2, "Adam learning rate of the hash grid", lo=0,
                                      lo_open=True)
    mlp_lr_ratio: float = bounded(0.1, lo=0, lo_open=True)
    """The MLPs' learning rate as a fraction of the grid's (the authors: grid 1e-2, MLPs 1e-3)."""
    input_size: int = bounded(128, lo=8)
    """Side at which the input photo is fitted."""
    input_rays: int = bounded(4096, lo=0)
    """Input-view pixels rendered per step (0: the whole image)."""
    sds_size: int = bounded(64, lo=8)
    """Side of the random views rendered for SDS (upsampled to the model's resolution)."""
    sds_batch: int = bounded(1, lo=1)
    """Random views per step."""
    albedo_steps: int = bounded(500, lo=0)
    """Steps that render albedo only, before random shading starts."""
    lambertian_p: float = bounded(0.6, lo=0, hi=1)
    """After the albedo phase: probability of lambertian shading (DreamFusion)."""
    textureless_p: float = bounded(0.2, lo=0, hi=1)
    """After the albedo phase: probability of textureless shading (rest: albedo)."""
    levels: ScheduleSpec = schedule_field([0, 8, 16, 2000], "active hash-grid levels "
                                          "(coarse to fine)", lo=1)
    normal_blur_sigma: float = bounded(1.7, lo=0, lo_open=True)
    """Gaussian blur (pixels) whose output the 2D normal-smoothness loss pulls normals towards
    (the authors: torchvision's 9-tap kernel, whose default sigma is 1.7)."""
    mixed_precision: str = precision_field("auto")
    """``fp32`` (or ``no``), ``fp16``, ``bf16`` autocast; ``auto`` = fp16 on CUDA, fp32 on
    the CPU. fp16 uses a gradient scaler."""
    max_nonfinite_steps: int = bounded(20, lo=1)
    """A step whose loss is NaN/inf is skipped (and counted); this many in a row abort."""
    background: str = "random-solid"
    """Behind the training renders: ``random-solid`` (a random colour per random view, white
    behind the input view) or ``learned`` (the authors' background MLP behind every render,
    with their masked image loss); see ``rf_core.scene.random_views``."""
    sds_multiplier: float = bounded(1.0, lo=0)
    """Multiplies the ``weights.sds`` schedule (sweeps the SDS strength with the schedule's
    shape fixed; the authors' effective strength is uncertain by a few times)."""
    grad_norm_every: int = bounded(0, lo=0)
    """Every this many steps (the step completing each multiple, so it lands in history.jsonl),
    measure each weighted loss term's gradient norm on the field's parameters
    (``gradnorm/<term>`` in the step's metrics; one extra backward per term). 0: never."""
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    renderer: RendererConfig = dataclasses.field(default_factory=lambda: RendererConfig(
        num_samples=128, occupancy=OccupancyConfig(update_every=16, warmup_steps=64)))
    camera: CameraSetup = dataclasses.field(default_factory=CameraSetup)
    sds: SDSConfig = dataclasses.field(default_factory=SDSConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        check_ranges(self)
        if not (0 <= self.lambertian_p and 0 <= self.textureless_p
                and self.lambertian_p + self.textureless_p <= 1):
            raise ValueError("lambertian_p and textureless_p must be >= 0 and sum to <= 1")
        self.mixed_precision = parse_precision(self.mixed_precision, "mixed_precision")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got "
                             f"{self.background!r}")
        Schedule.parse(self.lr, "lr")
        Schedule.parse(self.levels, "levels")


def drop_nonfinite(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the SDS gradient of every view that has a non-finite entry (a diverged UNet's
    other entries are suspect too). grad: [B,3,H,W] -> (grad, bad [B] bool), no host sync."""
    bad = ~torch.isfinite(grad).flatten(1).all(1)
    return torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(grad), grad), bad


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
        self.schedules = build_schedules(cfg)
        """Every schedule of ``cfg`` by dotted name (``lr``, ``weights.sds``, ...), built once."""
        self.background = None if cfg.background != "learned" else Background(
            BackgroundConfig(kind="mlp", hidden=64, n_frequencies=6)).to(self.device)
        """The authors' background MLP (FreqEncoder degree 6, 39 -> 64 -> 3), when learned."""
        grid = list(self.field.encoding.parameters())
        grid_ids = {id(p) for p in grid}
        mlps = [p for p in self.field.parameters() if id(p) not in grid_ids]
        mlps += list(self.background.parameters()) if self.background is not None else []
        # The authors' groups: the hash grid at 10x the MLPs' rate (stable-dreamfusion).
        self.optimizer = torch.optim.Adam(
            [{"params": grid, "lr_scale": 1.0, "name": "grid"},
             {"params": mlps, "lr_scale": cfg.mlp_lr_ratio, "name": "mlp"}],
            lr=self._lr(0), betas=(0.9, 0.99), eps=1e-15,
            # fused: one kernel for all parameters, its step counts kept as tensors that are
            # never read on the host, and GradScaler hands it the overflow flag on the device
            # (the unfused Adam reads each step count, and the scaler its flag, every step)
            fused=True)
        self.amp_dtype = autocast_dtype(cfg.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.nonfinite_steps = 0
        """Steps skipped so far because their loss was not finite."""
        self.scaler_skipped_steps = 0
        """fp16 steps the GradScaler skipped so far (a gradient overflowed its scale)."""
        self.sds_nonfinite_total = 0
        """SDS views so far whose gradient had non-finite entries (dropped, not trained on)."""
        self._nonfinite_run = 0
        self.shares = SampleShares()
        """How much of the normals and of the later march segments each step takes without
        asking the device, from the previous step's counts (``rf_core.scene.sample_shares``)."""
        size = cfg.input_size
        self.target_rgb = F.interpolate(rgb[None].float(), size=(size, size), mode="area")[0] \
            .permute(1, 2, 0).reshape(-1, 3).to(self.device)
        self.target_mask = F.interpolate(mask[None].float(), size=(size, size), mode="area")[0] \
            .reshape(-1).to(self.device)
        self.reference_rgba = torch.cat([
            F.interpolate(rgb[None].float(), size=(size, size), mode="area")[0],
            F.interpolate(mask[None].float(), size=(size, size), mode="area")[0]]).cpu()
        """[4, S, S] the photo and its mask, for priors that condition on them."""
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
        return self.schedules["lr"](step)

    def _weights(self, step: int) -> dict[str, float]:
        weights = {name: self.schedules[f"weights.{name}"](step) for name in weight_names()}
        weights["sds"] *= self.cfg.sds_multiplier
        return weights

    def _levels(self, step: int) -> int:
        k = round(self.schedules["levels"](step))
        return max(1, min(self.field.n_levels, k))

    # ------------------------------------------------------------------ rendering
    def _normals(self, x: torch.Tensor, density: torch.Tensor | None = None) -> torch.Tensor:
        return self.field.normals(x, density)

    def render(self, cams: Cameras, index: int = 0, shading: str = "albedo",
               background: tuple[float, float, float] = (1.0, 1.0, 1.0),
               normals: bool = True) -> dict:
        """Render a whole view without gradients: rgb [H,W,3] over ``background``, opacity,
        depth (z) and, with ``normals``, normal [H,W,3] (world). Normals cost ~6x the rest
        of an albedo render (a field gradient per sample): evaluation leaves them out."""
        bg = torch.tensor(background, device=self.device)
        light = None
        if shading != "albedo":
            light = F.normalize(cams.c2w[index, :3, 3].to(self.device), dim=0)
        with torch.no_grad():
            out = render_image(self.renderer, self.field, cams.to(self.device), index,
                               background_fn=lambda d: bg.expand(d.shape[0], 3),
                               normal_fn=self._normals, shading=shading, light_dir=light,
                               want_normals=normals or shading != "albedo")
        return out

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        """One optimisation step; returns its losses and diagnostics."""
        cfg, step = self.cfg, self.step_count
        self.field.set_active_levels(self._levels(step))
        occ = cfg.renderer.occupancy
        seed = step == 0 and occ.init_from_field
        if occ.enabled and (seed or step >= occ.warmup_steps and step % occ.update_every == 0):
            self.renderer.update_occupancy(self.field.density, generator=self.dev_gen,
                                           remember=not seed)
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        weights = self._weights(step)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            # Input view: image and mask reconstruction.
            n_pix = self.target_rgb.shape[0]
            if cfg.input_rays and cfg.input_rays < n_pix:
                idx = torch.randint(0, n_pix, (cfg.input_rays,), generator=self.gen)
                idx = to_device(idx, self.device)
            else:
                idx = torch.arange(n_pix, device=self.device)
            white = torch.ones(3, device=self.device)
            rays = (self.input_rays_o[idx], self.input_rays_d[idx])
            plan = self.renderer.plan(*rays, generator=self.dev_gen)
            setup = sample_views(cfg, step, self.gen, self.dev_gen, self.renderer,
                                 self.device)
            # How many samples each render takes: the step's one host sync before its metrics.
            read_counts([plan, *setup["plans"]])
            out = self.renderer(*rays, self.field, background_fn=self.background or (
                lambda d: white.expand(d.shape[0], 3)), plan=plan,
                segment_shares=self.shares.march["input"])
            self.shares.watch("input", out)
            # Random views: score distillation and regularisers.
            views, angles, shading = render_views(setup, cfg.sds_size, self.renderer,
                                                  self.field, self.shares, self.background)
            grad, sds_bad = None, None
            if weights["sds"] > 0:
                reference = ((self.reference_rgba, self.input_camera())
                             if getattr(self.prior, "needs_reference", False) else None)
                cond = make_conditioning(cfg.prompt, azimuth=angles["azimuth"],
                                         elevation=angles["elevation"],
                                         front_azimuth=cfg.camera.input_azimuth,
                                         cameras=views["cameras"],
                                         background=views["background"],
                                         reference=reference, step=step)
                grad = self.prior.sds_grad(views["rgb"].float().detach(), cond, cfg.sds,
                                           step=step, generator=self.gen)
                grad, sds_bad = drop_nonfinite(grad.to(self.device))
            terms = loss_terms(out.rgb, out.opacity, self.target_rgb[idx],
                               self.target_mask[idx], views, grad, cfg.normal_blur_sigma,
                               masked_rgb=self.background is not None)
        check_terms(terms, weights)
        loss = sum(weights[name] * value for name, value in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        if cfg.grad_norm_every and (step + 1) % cfg.grad_norm_every == 0:
            metrics.update(self._grad_norms(terms, weights))
        # Backward before knowing whether the loss is finite, so that the step reads the
        # device once (below) instead of once to decide and again for its metrics.
        self.scaler.scale(loss).backward()
        n_views = cfg.sds_batch
        values, counts = self._read_step(terms, loss, sds_bad, self.shares.device_values())
        values.update(self.shares.update(counts))
        sds_nonfinite = int(values.pop("sds/nonfinite"))
        self.sds_nonfinite_total += sds_nonfinite
        grads_finite = bool(values.pop("grads_finite"))
        scale = values.pop("amp/scale")
        finite = math.isfinite(values["loss/total"]) and not (grad is not None
                                                              and sds_nonfinite == n_views)
        if not finite:
            # Skip the update (stable-dreamfusion's nan_to_num only guards the SDS part; a
            # step whose every SDS view is non-finite is skipped too). Schedules and random
            # streams still advance, so a resumed run stays exact.
            bad = [k.removeprefix("loss/") for k, v in values.items()
                   if k.startswith("loss/") and not math.isfinite(v)]
            bad = ", ".join(bad or (["sds"] if grad is not None else [])) or "their weighted sum"
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            self._nonfinite_run += 1
            if self._nonfinite_run >= cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss was not finite for {self._nonfinite_run} steps in a row, up to step "
                    f"{step} (terms: {bad}); lower lr or "
                    "weights.sds, or resume from an earlier checkpoint")
        else:
            self._nonfinite_run = 0
            # fp16: the scaler skips the update when a scaled gradient overflowed (and halves
            # its scale); grads_finite is that same test, read with the metrics.
            self.scaler_skipped_steps += int(self.scaler.is_enabled() and not grads_finite)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step_count += 1
        metrics.update(values)
        mse = values["loss/rgb"]
        metrics.update({"lr": lr, "step": step,
                        "nonfinite_steps": float(self.nonfinite_steps),
                        "sds/nonfinite": float(sds_nonfinite),
                        "sds/nonfinite_total": float(self.sds_nonfinite_total),
                        "amp/scale": scale,
                        "amp/skipped_steps": float(self.scaler_skipped_steps),
                        "levels": float(self.field.encoding.active_levels),
                        "input_psnr_sampled": -10 * math.log10(max(mse, 1e-10))
                        if math.isfinite(mse) else float("nan"),
                        "shading": ["albedo", "lambertian", "textureless"].index(shading)})
        return metrics

    def _read_step(self, terms: dict[str, torch.Tensor], loss: torch.Tensor,
                   sds_bad: torch.Tensor | None, extra: list[torch.Tensor] = ()
                   ) -> tuple[dict[str, float], list[float]]:
        """Every value the step reports, read from the device in one transfer (one sync).

        Returns ``loss/<term>``, ``loss/total``, ``sds/nonfinite`` (SDS views whose gradient
        had non-finite entries), ``amp/scale`` (the loss scale this step used; 1 without a
        scaler) and ``grads_finite`` (1 when every parameter gradient is finite; checked only
        under a scaler, whose skip it mirrors); and ``extra`` (device scalars), read.
        """
        names = [f"loss/{k}" for k in terms] + ["loss/total"]
        parts = [v.detach().float().reshape(()) for v in terms.values()]
        parts.append(loss.detach().float().reshape(()))
        zero = torch.zeros((), device=self.device)
        parts.append(sds_bad.sum().float() if sds_bad is not None else zero)
        enabled = self.scaler.is_enabled()
        scale = getattr(self.scaler, "_scale", None) if enabled else None
        parts.append(scale.reshape(()).float() if scale is not None else zero + 1.0)
        if enabled:
            grads = [p.grad for p in self.field.parameters() if p.grad is not None]
            ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else \
                zero == 0
            parts.append(ok.float())
        else:
            parts.append(zero + 1.0)
        parts.extend(w.float().reshape(()) for w in extra)
        values = to_host(torch.stack([p.to(self.device) for p in parts]))
        out = dict(zip(names, values))
        out["sds/nonfinite"], out["amp/scale"], out["grads_finite"] = \
            values[len(names):len(names) + 3]
        return out, values[len(names) + 3:]

    def _grad_norms(self, terms: dict[str, torch.Tensor], weights: dict[str, float]
                    ) -> dict[str, float]:
        """L2 norm of each weighted term's gradient on the field's parameters (unscaled)."""
        params = [p for p in self.field.parameters() if p.requires_grad]
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        out = {}
        for name, value in terms.items():
            if weights[name] == 0 or not value.requires_grad:
                out[f"gradnorm/{name}"] = 0.0
                continue
            grads = torch.autograd.grad(value * (weights[name] * scale), params,
                                        retain_graph=True, allow_unused=True)
            sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
            out[f"gradnorm/{name}"] = math.sqrt(sq) / scale
        return out

    @property
    def skipped_steps(self) -> int:
        """Steps whose update did not happen: a non-finite loss, or an fp16 overflow."""
        return self.nonfinite_steps + self.scaler_skipped_steps

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
            "nonfinite": torch.tensor([self.nonfinite_steps, self._nonfinite_run,
                                       self.scaler_skipped_steps, self.sds_nonfinite_total]),
            **self.shares.state(),
        }
        if self.background is not None:
            state["background"] = self.background.state_dict()
        if self.dev_gen is not self.gen:
            state["dev_gen"] = self.dev_gen.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`). A state that does not fit this
        model (a tensor missing, extra or of another shape) raises
        :class:`~rf_core.files.checkpoint.CheckpointError` naming it, before anything is changed."""
        check_state(self, state)
        self.step_count = int(state["step"])
        self.field.load_state_dict(state["field"])
        self.renderer.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        self.shares.load(state)
        if self.background is not None and "background" in state:
            self.background.load_state_dict(state["background"])
        if "nonfinite" in state:
            counts = [int(v) for v in state["nonfinite"]] + [0, 0]  # older: 2 counts
            (self.nonfinite_steps, self._nonfinite_run, self.scaler_skipped_steps,
             self.sds_nonfinite_total) = counts[:4]
        if "dev_gen" in state and self.dev_gen is not self.gen:
            self.dev_gen.set_state(state["dev_gen"])
        self.field.set_active_levels(self._levels(self.step_count))

    # ------------------------------------------------------------------ evaluation
    def input_view_metrics(self) -> dict[str, float]:
        """PSNR and mask IoU of the whole input view at ``input_size``."""
        from rf_core.ground_truth.metrics import mask_iou, psnr

        out = self.render(self.input_camera(), normals=False)
        size = self.cfg.input_size
        target = self.target_rgb.view(size, size, 3)
        mask = self.target_mask.view(size, size)
        return {"input_psnr": psnr(out["rgb"].cpu(), target.cpu()),
                "input_mask_iou": mask_iou(out["opacity"].cpu(), mask.cpu())}
