"""``Zero123Prior``: Zero-1-to-3 (Liu et al., ICCV 2023) as an image-conditioned SDS prior.

Zero-1-to-3 is Stable Diffusion fine-tuned to draw an object from a new camera given a photo of
it and the relative camera. Its score on a rendered view says how that view should change to
look like the object seen from there; SDS (DreamFusion) distils it into the field. For each
rendered view x with camera (elevation e, azimuth a, radius r) and the photo's (e0, a0, r0):

    z   = s E(x)                 s = the VAE's scaling factor (0.18215); E samples the posterior
    c   = E(photo).mode()        unscaled, as Zero-1-to-3 was trained: its 8-channel UNet input
                                 is [z_t ; c]
    cam = [(90 - e) - (90 - e0), sin(a - a0), cos(a - a0), r - r0]      (polar in radians)
          Stable Zero123: the last entry is the photo's polar angle, 90 - e0 (radians)
    ctx = cc_projection([CLIP(photo) ; cam])                 [1, 768]: the cross-attention context
    eps_hat = eps(z_t, t | 0, 0) + g (eps(z_t, t | c, ctx) - eps(z_t, t | 0, 0))
    dL/dz   = w(t) (eps_hat - eps)

The unconditional branch zeroes both the photo latent and the context (Zero-1-to-3's
classifier-free guidance). The gradient is pushed back through the encoder to the image, as for
Stable Diffusion (``StableDiffusionPrior``); the same ``SDSConfig`` sets guidance, timesteps,
weighting and clipping (threestudio uses guidance 3 for Zero-1-to-3, 5 for Stable Zero123).
Angles follow ``rf_core.scene.cameras``: elevation above the xy-plane, azimuth counter-clockwise
around +z (z up), which is Zero-1-to-3's (Objaverse, Blender) convention; radii are in our world
units.

Needs from the conditioning: each view's camera and the reference (the photo over white with its
camera), which the reconstructor fills because ``needs_reference`` is true. It reads no text: no
textual inversion; learned tokens are recorded and ignored. The photo's CLIP embedding and latent
are computed once per photo and cached.

Randomness: as ``StableDiffusionPrior``, each image draws from its own generator its timestep,
its posterior sample, then its noise, so a request gets the same gradient alone or batched.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rf_core.prior.base import (
    FrozenDiffusionModel,
    SDSRequest,
    TextFreePrior,
    check_sds_inputs,
)
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.learned import MissingReferenceError
from rf_core.prior.loading import ModelConfig
from rf_core.prior.prior import SDSOutput
from rf_core.prior.sds import (
    SDSConfig,
    add_noise,
    draw_timesteps,
    epsilon_from_output,
    guidance_scales,
    guide,
    latent_grad,
    per_image_generators,
    randn_from,
    sds_weights,
    step_timesteps,
)
from rf_core.prior.zero123_loading import Zero123Components, describe_zero123, load_zero123

CAMERAS = ("zero123", "stable-zero123")
"""How the camera vector's last entry is made: Δradius (Zero-1-to-3, zero123-xl) or the photo's
polar angle (Stable Zero123)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_NO_INVERSION = ("textual inversion does not apply to the Zero-1-to-3 prior (it reads the "
                 "photo, not text); run without --invert")

Generators = torch.Generator | Sequence[torch.Generator | None] | None


def zero123_camera(conditioning: Conditioning, camera: str = "zero123") -> torch.Tensor:
    """Zero-1-to-3's camera vector of each view relative to the photo: [B,4] float32
    (Δpolar rad, sin Δazimuth, cos Δazimuth, Δradius or, for ``stable-zero123``, the photo's
    polar angle in radians)."""
    from rf_core.prior.novel_view.geometry import angles_from_cameras

    c = conditioning
    if not c.has_cameras or c.reference is None:
        raise MissingReferenceError(
            "the Zero-1-to-3 prior needs each view's camera and the input photo with its camera "
            "in the conditioning (make_conditioning(..., cameras=, reference=))")
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {', '.join(CAMERAS)}, got {camera!r}")
    # sizes travel as (height, width); the geometry takes (width, height) as Cameras do
    view = angles_from_cameras(c.c2w, c.K, c.image_size[::-1])
    ref = angles_from_cameras(c.reference_c2w, c.reference_K, c.reference_size[::-1])
    d_polar = torch.deg2rad(ref["elevation"] - view["elevation"])  # polar = 90° - elevation
    d_az = torch.deg2rad(view["azimuth"] - ref["azimuth"])
    last = (view["radius"] - ref["radius"] if camera == "zero123"
            else torch.deg2rad(90.0 - ref["elevation"]))
    return torch.stack([d_polar, torch.sin(d_az), torch.cos(d_az), last], dim=-1).float()


class Zero123Prior(FrozenDiffusionModel, TextFreePrior):
    """Frozen Zero-1-to-3 for score distillation. ``model``: loaded ``Zero123Components`` or a
    ``ModelConfig`` to load; ``camera``: ``zero123`` or ``stable-zero123`` (see ``CAMERAS``)."""

    no_inversion = _NO_INVERSION
    needs_inversion = False
    needs_reference = True

    def __init__(self, model: Zero123Components | ModelConfig | None = None,
                 camera: str = "zero123", reference_cache_size: int = 8):
        super().__init__()
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {', '.join(CAMERAS)}, got {camera!r}")
        self.z = model if isinstance(model, Zero123Components) else load_zero123(model)
        self.camera = camera
        self.alphas_cumprod = self.z.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._refs: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._refs_size = reference_cache_size
        self._lock = threading.Lock()  # the cache, when a CPU server runs one request a thread

    @property
    def components(self) -> Zero123Components:
        return self.z

    # ------------------------------------------------------------------ interface
    def describe(self) -> dict:
        return {**describe_zero123(self.z), "camera": self.camera}

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning,
                 cfg: SDSConfig | None = None, *, step: int = 0,
                 generator: Generators = None) -> torch.Tensor:
        """dL_SDS/d(images): [B,3,H,W] float32. Apply it with ``sds_loss(images, grad)``."""
        return self.sds(images, conditioning, cfg, step=step, generator=generator).grad

    # ------------------------------------------------------------------ the photo
    @torch.no_grad()
    def encode_reference(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The photo's CLIP image embedding [B,D] and unscaled VAE latent (posterior mode)
        [B,4,h,w], in the model's dtype, for reference [B,4,H,W] (RGB over white, mask) in
        [0,1]. Cached per distinct photo."""
        digests = [hashlib.sha1(r.detach().float().cpu().contiguous().numpy().tobytes())
                   .hexdigest() for r in reference]
        with self._lock:
            missing = list(dict.fromkeys(d for d in digests if d not in self._refs))
            if missing:
                rows = torch.stack([reference[digests.index(d)] for d in missing])
                embs, lats = self._encode_photos(rows[:, :3].to(self.device, torch.float32))
                for d, e, la in zip(missing, embs, lats):
                    self._refs[d] = (e, la)
            for d in digests:
                self._refs.move_to_end(d)
            out = [self._refs[d] for d in digests]
            while len(self._refs) > max(self._refs_size, len(set(digests))):
                self._refs.popitem(last=False)
        return torch.stack([e for e, _ in out]), torch.stack([la for _, la in out])

    def _encode_photos(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, s = self.resolution, self.z.clip_size
        x = F.interpolate(rgb, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        latents = self.z.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist.mode()
        c = F.interpolate(rgb, size=(s, s), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=c.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=c.device).view(1, 3, 1, 1)
        emb = self.z.image_encoder(pixel_values=((c - mean) / std).to(self.dtype)).image_embeds
        return emb, latents

    @torch.no_grad()
    def context(self, conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention context [B,1,D'], photo latent [B,4,h,w]) of each view."""
        camera = zero123_camera(conditioning, self.camera).to(self.device)
        emb, latents = self.encode_reference(conditioning.reference)
        ctx = self.z.cc_projection(torch.cat([emb, camera.to(emb.dtype)], dim=-1))
        return ctx[:, None], latents

    # ------------------------------------------------------------------ SDS
    def draw_timesteps(self, cfg: SDSConfig, step: int,
                       generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """One timestep per image, the first draw of each image's generator. -> [B] int64."""
        return draw_timesteps(cfg, step, generators, self.num_train_timesteps)

    def predict_eps(self, noisy: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                    photo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Guided noise estimate, both branches in one UNet call; the unconditional one has the
        photo latent and the context zeroed. noisy, photo: [B,4,h,w]; ctx: [B,1,D']."""
        with torch.no_grad():
            z = torch.cat([noisy, noisy]).to(self.dtype)
            x_in = torch.cat([z, torch.cat([torch.zeros_like(photo), photo])], dim=1)
            out = self.z.unet(x_in, torch.cat([t, t]),
                              encoder_hidden_states=torch.cat([torch.zeros_like(ctx), ctx])
                              ).sample
        a = self.alphas_cumprod[t]
        eps = epsilon_from_output(out.float(), z.float(), torch.cat([a, a]),
                                  self.z.prediction_type)
        eps_u, eps_c = eps.chunk(2)
        return guide(eps_u, eps_c, scale)

    def sds(self, images: torch.Tensor, conditioning: Conditioning, cfg: SDSConfig | None = None,
            *, step: int = 0, generator: Generators = None, timesteps: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, guidance_scale: float | torch.Tensor | None = None
            ) -> SDSOutput:
        """Score distillation gradient for each image, with details. images: [B,3,H,W] in [0,1]
        (resized to the model's 256 px); the overrides as ``StableDiffusionPrior.sds``."""
        cfg = cfg or SDSConfig()
        check_sds_inputs(images, conditioning)
        batch = images.shape[0]
        gens = per_image_generators(generator, batch)
        with torch.autocast(self.device.type, enabled=False):
            t = step_timesteps(timesteps, cfg, step, gens, self.num_train_timesteps,
                               self.device)
            ctx, photo = self.context(conditioning)
            r, f = self.resolution, self.z.vae_scale_factor
            x = images.detach().to(self.device, torch.float32).requires_grad_(True)
            shape = (1, self.z.vae.config.latent_channels, r // f, r // f)
            with torch.enable_grad():
                x_in = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
                x_in = (x_in * 2 - 1).to(self.dtype)
                post_eps = torch.cat([randn_from(shape, g, self.device) for g in gens])
                posterior = self.z.vae.encode(x_in).latent_dist
                latents = (posterior.mean + posterior.std * post_eps.to(x_in.dtype)) \
                    * self.z.vae.config.scaling_factor
            if noise is None:
                noise = torch.cat([randn_from(shape, g, self.device) for g in gens])
            noise = noise.to(self.device, torch.float32)
            a = self.alphas_cumprod[t]
            noisy = add_noise(latents.detach().float(), noise, a)
            scale = guidance_scales(guidance_scale, cfg, step, batch, self.device)
            eps_hat = self.predict_eps(noisy, t, ctx, photo, scale)
            w = sds_weights(cfg.weighting, a)
            g_lat, bad = latent_grad(eps_hat, noise, w, cfg.grad_clip)
            (g_img,) = torch.autograd.grad(latents, x, g_lat.to(latents.dtype))
        # a view whose latent gradient was not finite comes back NaN: the caller drops it
        g_img = torch.where(bad.view(-1, 1, 1, 1) > 0, float("nan"), g_img.float())
        return SDSOutput(grad=g_img.to(images.device), timesteps=t, weights=w,
                         latent_grad_norm=g_lat.flatten(1).norm(dim=1), nonfinite=bad)

    def sds_grad_batch(self, requests: list[SDSRequest]) -> list[torch.Tensor]:
        """Several callers' requests in as few UNet calls as possible; gradient i is exactly
        ``sds_grad`` of request i alone (timesteps drawn first from each request's generator)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        cfgs = [r.cfg or SDSConfig() for r in requests]
        for i, (r, c) in enumerate(zip(requests, cfgs)):
            cond = r.conditioning
            groups[(tuple(r.images.shape[-2:]), c.weighting, c.grad_clip, cond.image_size,
                    cond.reference_size, cond.background is None)].append(i)
        grads: list[torch.Tensor | None] = [None] * len(requests)
        for members in groups.values():
            gens, timesteps, scales = [], [], []
            for i in members:
                n = len(requests[i].images)
                gens += [requests[i].generator] * n
                timesteps.append(self.draw_timesteps(cfgs[i], requests[i].step,
                                                     [requests[i].generator] * n))
                scales += [cfgs[i].at(requests[i].step)[0]] * n
            images = torch.cat([requests[i].images.to(self.device) for i in members])
            cond = Conditioning.concat([requests[i].conditioning for i in members])
            out = self.sds(images, cond, cfgs[members[0]], generator=gens,
                           timesteps=torch.cat(timesteps), guidance_scale=torch.tensor(scales))
            for i, part in zip(members, out.grad.split([len(requests[i].images)
                                                        for i in members])):
                grads[i] = part.to(requests[i].images.device)
        return grads


__all__ = ["CAMERAS", "Zero123Prior", "zero123_camera"]
