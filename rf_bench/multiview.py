"""Multi-view fit: the engine's proof against ground truth no one here wrote.

Renders a textured mesh with pybullet (``rf_core.ground_truth.gt_render``), fits our field to the
training views with our renderer, and reports held-out PSNR, SSIM, mask IoU and depth
error. ``rf bench multiview MESH.obj --json OUT.json``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rf_bench.common import cpu_name, write_json
from rf_core.config import save_config, to_dict
from rf_core.evaluation.metric_registry import FIT_SECONDS
from rf_core.ground_truth.metrics import depth_error, mask_iou, psnr, ssim
from rf_core.progress import progress
from rf_core.scene.cameras import Cameras, generate_rays, sphere_views
from rf_core.scene.encoding import HashGridConfig
from rf_core.scene.field import Background, BackgroundConfig, FieldConfig, RadianceField
from rf_core.scene.render import OccupancyConfig, RendererConfig, VolumeRenderer, render_image

__all__ = ["MultiviewConfig", "evaluate_views", "format_result", "run_multiview"]


def _bench_field() -> FieldConfig:
    # A CPU-sized grid: 128px views need no 2048^3 finest level, and a 2^17 table stays in cache.
    grid = HashGridConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=17,
                          base_resolution=16, per_level_scale=(512 / 16) ** (1 / 15))
    return FieldConfig(grid=grid, density_hidden=64, albedo_hidden=64, blob_density=0.0)


@dataclass
class MultiviewConfig:
    """Settings of ``rf bench multiview``."""

    size: int = 128
    """Image width and height of every view, in pixels."""
    train_views: int = 32
    """Training views, spread evenly over the viewing sphere."""
    test_views: int = 8
    """Held-out views, interleaved with the training views."""
    minutes: float = 10.0
    """Wall-clock budget of the whole benchmark (GT rendering, fitting, evaluation); fitting
    stops at ``steps`` or when the budget runs out, whichever is first."""
    steps: int = 1500
    """Maximum optimisation steps."""
    batch_rays: int = 4096
    """Rays per step, drawn uniformly from all training pixels."""
    lr: list[float] = dataclasses.field(default_factory=lambda: [1e-2, 1e-3])
    """Adam learning rate [start, end], decayed geometrically over training progress
    (the larger of steps done / ``steps`` and time spent / time budget, so a slow machine
    still ends on the small rate)."""
    mask_weight: float = 0.1
    """Weight of the opacity-vs-mask MSE term."""
    camera_radius: float = 3.0
    """Distance of the ground-truth cameras from the object's centre."""
    fov: float = 40.0
    """Vertical field of view of the ground-truth cameras, degrees."""
    up_axis: str = "y"
    """Up axis of the mesh file ('y' for most OBJ files, 'z')."""
    seed: int = 0
    """Seed of every random draw (views are deterministic, rays and jitter follow it)."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    field: FieldConfig = dataclasses.field(default_factory=_bench_field)
    """The radiance field."""
    renderer: RendererConfig = dataclasses.field(
        default_factory=lambda: RendererConfig(num_samples=160, occupancy=OccupancyConfig()))
    """Sampling and empty-space skipping."""

    def __post_init__(self):
        for name in ("size", "train_views", "test_views", "steps", "batch_rays"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if len(self.lr) != 2 or min(self.lr) <= 0:
            raise ValueError(f"lr must be [start, end] with positive values, got {self.lr}")
        if self.up_axis not in ("y", "z"):
            raise ValueError(f"up_axis must be 'y' or 'z', got {self.up_axis!r}")


def _to_tensors(rendered: dict) -> dict[str, torch.Tensor]:
    return {
        "rgb": torch.from_numpy(rendered["rgb"]).float() / 255.0,
        "mask": torch.from_numpy(rendered["mask"]).float(),
        "depth": torch.from_numpy(rendered["depth"]).float(),
    }


def evaluate_views(renderer: VolumeRenderer, fld: RadianceField, bg: Background, cams: Cameras,
                   gt: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Mean PSNR, SSIM, mask IoU and depth error of the field over ``cams`` against ``gt``,
    and the rendered rgb images ([H, W, 3] each, clamped to [0, 1])."""
    renderer.eval()
    rows, images = [], []
    for i in range(len(cams)):
        out = render_image(renderer, fld, cams, i, background_fn=bg)
        images.append(out["rgb"].clamp(0, 1))
        rows.append({
            "psnr": psnr(out["rgb"].clamp(0, 1), gt["rgb"][i]),
            "ssim": ssim(out["rgb"].clamp(0, 1), gt["rgb"][i]),
            "mask_iou": mask_iou(out["opacity"], gt["mask"][i]),
            "depth_error": depth_error(out["depth"], gt["depth"][i], out["opacity"],
                                       gt["mask"][i]),
        })
    renderer.train()
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}, images


def run_multiview(mesh: str, cfg: MultiviewConfig, json_path: str | None = None,
                  out_dir: str | None = None) -> dict:
    """Render GT, fit, evaluate; returns (and optionally writes) the result dict."""
    from rf_core.ground_truth.gt_render import render_views, resolve_mesh_path

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mesh_path = resolve_mesh_path(mesh)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train_cams = sphere_views(cfg.train_views, cfg.camera_radius, cfg.fov, cfg.size, cfg.size)
    test_cams = sphere_views(cfg.test_views, cfg.camera_radius, cfg.fov, cfg.size, cfg.size,
                             offset=0.5)
    train = _to_tensors(render_views(mesh_path, train_cams, up_axis=cfg.up_axis))
    test = _to_tensors(render_views(mesh_path, test_cams, up_axis=cfg.up_axis))
    gt_seconds = time.perf_counter() - t0

    rays_o, rays_d = generate_rays(train_cams)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    target_rgb, target_mask = train["rgb"].reshape(-1, 3), train["mask"].reshape(-1)

    fld = RadianceField(cfg.field)
    bg = Background(BackgroundConfig(kind="color", color=[1.0, 1.0, 1.0]))
    renderer = VolumeRenderer(cfg.renderer, cfg.field.bound)
    optim = torch.optim.Adam(fld.parameters(), lr=cfg.lr[0], betas=(0.9, 0.99), eps=1e-15)
    occ = cfg.renderer.occupancy

    # Keep time for evaluation: about a second per 128x128 view on 2 CPU cores.
    eval_reserve = 2.0 * (cfg.test_views + 4) * (cfg.size / 128) ** 2
    budget = max(cfg.minutes * 60.0 - (time.perf_counter() - t0) - eval_reserve, 1.0)
    t_fit = time.perf_counter()
    step, loss_v, samples = 0, float("nan"), 0
    bar = progress(total=cfg.steps, desc="fit")
    while step < cfg.steps:
        done = max(step / cfg.steps, (time.perf_counter() - t_fit) / budget)
        if done >= 1.0:
            break
        if step >= occ.warmup_steps and step % occ.update_every == 0:
            renderer.update_occupancy(fld.density, generator=gen)
        for g in optim.param_groups:
            g["lr"] = cfg.lr[0] * (cfg.lr[1] / cfg.lr[0]) ** done
        idx = torch.randint(0, rays_o.shape[0], (cfg.batch_rays,), generator=gen)
        out = renderer(rays_o[idx], rays_d[idx], fld, bg, generator=gen)
        loss = torch.nn.functional.mse_loss(out.rgb, target_rgb[idx])
        if cfg.mask_weight:
            loss = loss + cfg.mask_weight * torch.nn.functional.mse_loss(out.opacity,
                                                                         target_mask[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        step += 1
        samples += out.samples
        loss_v = loss.item()
        bar.update(1)
        if step % 50 == 0:
            train_psnr = -10 * math.log10(max(loss_v, 1e-10))
            bar.set_postfix(loss=f"{loss_v:.5f}", psnr=f"{train_psnr:.1f}",
                            occ=f"{renderer.occupancy.occupancy_ratio:.3f}")
    bar.close()
    fit_seconds = time.perf_counter() - t_fit

    metrics, test_images = evaluate_views(renderer, fld, bg, test_cams, test)
    train_metrics, _ = evaluate_views(renderer, fld, bg, train_cams[: min(4, len(train_cams))],
                                   {k: v[:4] for k, v in train.items()})
    result = {
        "benchmark": "multiview",
        "mesh": str(mesh_path),
        "size": cfg.size,
        "train_views": cfg.train_views,
        "test_views": cfg.test_views,
        "steps": step,
        FIT_SECONDS: round(fit_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "gt_render_seconds": round(gt_seconds, 2),
        "steps_per_second": round(step / max(fit_seconds, 1e-9), 3),
        "samples_per_step": round(samples / max(step, 1), 1),
        "final_train_loss": loss_v,
        "test": metrics,
        "train_subset": train_metrics,
        "occupancy_ratio": renderer.occupancy.occupancy_ratio,
        "encoding_backend": fld.encoding.backend,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": cpu_name(),
        "config": to_dict(cfg),
    }
    if out_dir:
        _write_renders(Path(out_dir), test_images, test, cfg)
    if json_path:
        write_json(json_path, result)
    return result


def _write_renders(out: Path, images: list[torch.Tensor], gt, cfg) -> None:
    """Held-out renders (GT | prediction) and config.yaml, moved into ``out`` only when whole."""
    import imageio.v3 as iio

    from rf_core.files.run_folder import staged_folder

    with staged_folder(out, "bench-renders", kinds=("bench-renders",)) as tmp:
        save_config(cfg, tmp / "config.yaml")
        for i, pred in enumerate(images):
            row = torch.cat([gt["rgb"][i], pred], dim=1)
            iio.imwrite(tmp / f"test_{i:03d}.png", (row.numpy() * 255).round().astype(np.uint8))


def format_result(r: dict) -> str:
    t = r["test"]
    return (f"{Path(r['mesh']).name}: {r['steps']} steps in {r[FIT_SECONDS]:.0f}s "
            f"({r['steps_per_second']:.2f} steps/s) | held-out PSNR {t['psnr']:.2f} dB, "
            f"SSIM {t['ssim']:.4f}, mask IoU {t['mask_iou']:.4f}, "
            f"depth err {t['depth_error']:.4f}")
