"""The random views of a training step: cameras, shading, light and background drawn on the
host, then rendered through the field for score distillation and the regularisers.

Drawing (:func:`sample_views`) comes before rendering (:func:`render_views`) so that a step can
plan every render's samples first and read all their counts in one host sync.

Backgrounds (``ReconstructorConfig.background``):

* ``random-solid``: one uniform random colour per view (DreamFusion's augmentation; the field
  cannot explain the object with background colour). The input view is fitted over white.
* ``learned``: the authors' background MLP on the view direction (stable-dreamfusion's
  ``bg_radius > 0``), behind every training render, input view included, whose image loss is
  then masked by the photo's alpha (theirs: MSE(pred · α, gt · α)). Priors that composite a
  solid colour (the oracle, the learned novel-view model) get each view's mean background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rf_core.host_sync import to_device
from rf_core.scene.cameras import generate_rays, sample_orbit

BACKGROUNDS = ("random-solid", "learned")


def pick_shading(cfg, step: int, gen: torch.Generator) -> str:
    """albedo during ``albedo_steps``, then lambertian / textureless / albedo at random."""
    if step < cfg.albedo_steps:
        return "albedo"
    u = torch.rand(1, generator=gen).tolist()[0]  # a host value: no device sync
    if u < cfg.lambertian_p:
        return "lambertian"
    if u < cfg.lambertian_p + cfg.textureless_p:
        return "textureless"
    return "albedo"


def sample_views(cfg, step: int, gen: torch.Generator, dev_gen: torch.Generator, renderer,
                 device: torch.device) -> dict:
    """The step's ``cfg.sds_batch`` random views before rendering (``cfg``: a
    ReconstructorConfig): cameras, angles, shading, solid background [B, 3], light [B, 3],
    and each view's rays [side*side, 3] on the device with their :class:`RayPlan`."""
    n, side = cfg.sds_batch, cfg.sds_size
    cams, angles = sample_orbit(cfg.camera.random, n, side, side, generator=gen)
    shading = pick_shading(cfg, step, gen)
    bg = to_device(torch.rand(n, 3, generator=gen), device)
    eye = cams.c2w[:, :3, 3]
    light = F.normalize(eye + 0.5 * eye.norm(dim=-1, keepdim=True)
                        * torch.randn(n, 3, generator=gen), dim=-1).to(device)
    rays_o, rays_d = generate_rays(cams)
    forward = cams.c2w[:, :3, 2][:, None, None].expand_as(rays_d)
    rays = [tuple(to_device(r[i].reshape(-1, 3), device) for r in (rays_o, rays_d, forward))
            for i in range(n)]
    plans = [renderer.plan(o, d, generator=dev_gen) for o, d, _ in rays]
    return {"cameras": cams, "angles": angles, "shading": shading, "background": bg,
            "light": light, "rays": rays, "plans": plans}


def render_views(setup: dict, side: int, renderer, field, shares, background=None
                 ) -> tuple[dict, dict, str]:
    """Render :func:`sample_views`' views at ``side`` px: (views, angles, shading).

    ``background``: a module d [N, 3] -> colour [N, 3] (the learned background), or None for
    the setup's solid colours. ``shares``: a :class:`~rf_core.scene.sample_shares.SampleShares`,
    which watches each render's counts. views: ``rgb`` [B,3,H,W] over the background,
    ``opacity`` [B,1,H,W], ``normal`` [B,3,H,W], ``samples`` (PackedSamples per view),
    ``cameras``, ``background`` [B,3] (the solid colour, or the learned one's mean).
    """
    n = len(setup["rays"])
    outs, backs = [], []
    for i, ((o, d, fwd), plan) in enumerate(zip(setup["rays"], setup["plans"])):
        out = renderer(o, d, field, normal_fn=field.normals, shading=setup["shading"],
                       light_dir=setup["light"][i], want_normals=True, forward_axis=fwd,
                       normals_share=shares.normals, plan=plan,
                       segment_shares=shares.march["views"])
        shares.watch("views", out)
        outs.append(out)
        backs.append(background(d) if background is not None
                     else setup["background"][i].expand(d.shape[0], 3))
    rgb = torch.stack([o.rgb for o in outs]).view(n, side, side, 3)
    opacity = torch.stack([o.opacity for o in outs]).view(n, side, side, 1)
    back = torch.stack(backs).view(n, side, side, 3)
    rgb = rgb + (1 - opacity) * back
    solid = setup["background"] if background is None else back.detach().mean((1, 2))
    views = {
        "cameras": setup["cameras"],
        "background": solid,
        "rgb": rgb.permute(0, 3, 1, 2),
        "opacity": opacity.permute(0, 3, 1, 2),
        "normal": torch.stack([o.normal for o in outs]).view(n, side, side, 3)
        .permute(0, 3, 1, 2),
        "samples": [o.packed for o in outs],
    }
    return views, setup["angles"], setup["shading"]
