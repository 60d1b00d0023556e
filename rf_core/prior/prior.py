"""``StableDiffusionPrior``: a frozen Stable Diffusion that answers the ``Prior`` protocol.

It knows nothing of cameras, optimizers or logging. Inputs and outputs are plain tensors and
strings, so the same interface can be served from another process (``rf_distributed``).
``sds_grad`` is the protocol's call; ``sds`` is the same computation with its details (timesteps,
weights) and overrides (timesteps, noise, guidance) for tests and benchmarks.

Randomness: each request (image) may carry its own ``torch.Generator``; from it are drawn, in
this order, its timestep, its VAE posterior sample and its noise. One request therefore gets the
same gradient whether it is computed alone or batched with others. (Requests sharing one
generator draw in phases, all timesteps first, so such a batch is reproducible as a batch only.)
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rf_core.prior.base import FrozenDiffusionModel, SDSRequest
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.embeddings import add_token
from rf_core.prior.inversion import InversionConfig, InversionResult, invert
from rf_core.prior.loading import ModelConfig, SDComponents, describe, load_components
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

Generators = torch.Generator | Sequence[torch.Generator | None] | None


@dataclass
class SDSOutput:
    """Result of one SDS evaluation for B requests."""

    grad: torch.Tensor
    """[B,3,H,W] float32: dL/d(images), on the images' device."""
    timesteps: torch.Tensor
    """[B] int64 timesteps used."""
    weights: torch.Tensor
    """[B] w(t) used."""
    latent_grad_norm: torch.Tensor
    """[B] L2 norm of each latent gradient (after the NaN guard and clipping)."""
    nonfinite: torch.Tensor
    """[B] how many latent-gradient entries were NaN/inf and zeroed."""


class StableDiffusionPrior(FrozenDiffusionModel):
    """Frozen Stable Diffusion for score distillation. ``model``: a loaded ``SDComponents`` or a
    ``ModelConfig`` to load."""

    def __init__(self, model: SDComponents | ModelConfig | None = None,
                 text_cache_size: int = 512):
        self.sd = model if isinstance(model, SDComponents) else load_components(model)
        self.alphas_cumprod = self.sd.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        # Guards the cache (and the tokenizer, not thread-safe): a CPU server computes one
        # request per thread.
        self._text_lock = threading.Lock()
        self._tokens: dict[str, str] = {}  # learned token -> digest of its vector

    # ------------------------------------------------------------------ properties
    @property
    def components(self) -> SDComponents:
        return self.sd

    @property
    def embedding_dim(self) -> int:
        return int(self.sd.text_encoder.get_input_embeddings().weight.shape[1])

    # ------------------------------------------------------------------ text
    def register_embedding(self, token: str, vector: torch.Tensor) -> None:
        """Add (or replace) a learned token. vector: [D] for this model's text encoder."""
        add_token(self.sd.tokenizer, self.sd.text_encoder, token, vector)
        digest = hashlib.sha1(vector.detach().float().cpu().numpy().tobytes()).hexdigest()
        self._tokens[token] = digest

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings, cached per (prompt, learned-token vectors). -> [B,77,D].
        Thread-safe."""
        with self._text_lock:
            return self._encode_text(prompts)

    def _encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for prompt in prompts:
            key = (prompt, tuple(sorted((t, d) for t, d in self._tokens.items() if t in prompt)))
            if key not in self._text_cache:
                tok = self.sd.tokenizer([prompt], padding="max_length", truncation=True,
                                        max_length=self.sd.tokenizer.model_max_length,
                                        return_tensors="pt")
                with torch.no_grad():
                    emb = self.sd.text_encoder(tok.input_ids.to(self.device))[0]
                self._text_cache[key] = emb[0].to(self.dtype)
                if len(self._text_cache) > self._text_cache_size:
                    self._text_cache.popitem(last=False)
            self._text_cache.move_to_end(key)
            out.append(self._text_cache[key])
        return torch.stack(out)

    # ------------------------------------------------------------------ images
    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,3,R,R] in [-1,1] at the model's resolution and dtype."""
        r = self.resolution
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)
        return (images * 2.0 - 1.0).to(self.dtype)

    def encode_latents(self, x: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """VAE posterior sample (or mean when eps is None), scaled. x: [B,3,R,R] in [-1,1]."""
        posterior = self.sd.vae.encode(x).latent_dist
        z = posterior.mean if eps is None else posterior.mean + posterior.std * eps.to(x.dtype)
        return z * self.sd.vae.config.scaling_factor

    def predict_eps(self, noisy: torch.Tensor, t: torch.Tensor, text_cond: torch.Tensor,
                    text_uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Guided noise estimate, both CFG branches in one UNet call. noisy: [B,C,h,w]."""
        with torch.no_grad():
            out = self.sd.unet(torch.cat([noisy, noisy]).to(self.dtype), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([text_uncond, text_cond])).sample
        a = self.alphas_cumprod[t]
        noisy2 = torch.cat([noisy, noisy]).float()
        eps = epsilon_from_output(out.float(), noisy2, torch.cat([a, a]), self.sd.prediction_type)
        eps_u, eps_c = eps.chunk(2)
        return guide(eps_u, eps_c, scale)

    # ------------------------------------------------------------------ SDS
    def sds(self, images: torch.Tensor, conditioning: Conditioning, cfg: SDSConfig | None = None,
            *, step: int = 0, generator: Generators = None, timesteps: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, guidance_scale: float | torch.Tensor | None = None
            ) -> SDSOutput:
        """Score distillation gradient for each image, with details.

        images: [B,3,H,W] in [0,1] (any H, W; resized to the model resolution).
        conditioning: B prompts and B negative prompts.
        generator: one generator, one per image, or None (global RNG).
        timesteps [B], noise [B,C,h,w], guidance_scale (float or [B]): override the sampled or
        configured values (a batching server passes each request's own).
        """
        cfg = cfg or SDSConfig()
        batch = images.shape[0]
        if len(conditioning) != batch:
            raise ValueError(f"{len(conditioning)} prompts for {batch} images")
        gens = per_image_generators(generator, batch)
        with torch.autocast(self.device.type, enabled=False):
            t = step_timesteps(timesteps, cfg, step, gens, self.num_train_timesteps,
                               self.device)
            x = images.detach().to(self.device, torch.float32).requires_grad_(True)
            with torch.enable_grad():
                x_in = self.to_model_input(x)
                lat_shape = self.latent_shape(x_in)
                post_eps = torch.cat([randn_from(lat_shape, g, self.device) for g in gens])
                latents = self.encode_latents(x_in, post_eps)
            if noise is None:
                noise = torch.cat([randn_from(lat_shape, g, self.device) for g in gens])
            noise = noise.to(self.device, torch.float32)
            a = self.alphas_cumprod[t]
            noisy = add_noise(latents.detach().float(), noise, a)
            scale = guidance_scales(guidance_scale, cfg, step, batch, self.device)
            eps_hat = self.predict_eps(noisy, t, self.encode_text(conditioning.prompts),
                                       self.encode_text(conditioning.negative_prompts), scale)
            w = sds_weights(cfg.weighting, a)
            g_lat, bad = latent_grad(eps_hat, noise, w, cfg.grad_clip)
            (g_img,) = torch.autograd.grad(latents, x, g_lat.to(latents.dtype))
        # An image whose latent gradient was not finite (its entries were zeroed above)
        # returns NaN, so that the caller counts it and drops the whole view
        # (Reconstructor: ``sds/nonfinite``) instead of training on a silently patched one.
        g_img = torch.where(bad.view(-1, 1, 1, 1) > 0, float("nan"), g_img.float())
        # Left on the device: reading them would make every step wait for the UNet.
        return SDSOutput(grad=g_img.to(images.device), timesteps=t, weights=w,
                         latent_grad_norm=g_lat.flatten(1).norm(dim=1), nonfinite=bad)

    def draw_timesteps(self, cfg: SDSConfig, step: int,
                       generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """One timestep per image from ``cfg``'s range at ``step``, drawn from each image's
        generator (the first draw of a request). -> [B] int64 on the CPU."""
        return draw_timesteps(cfg, step, generators, self.num_train_timesteps)

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning,
                 cfg: SDSConfig | None = None, *, step: int = 0,
                 generator: Generators = None) -> torch.Tensor:
        """dL_SDS/d(images): [B,3,H,W] float32. Apply it with ``sds_loss(images, grad)``.
        generator: one, one per image, or None (global RNG)."""
        return self.sds(images, conditioning, cfg, step=step, generator=generator).grad

    def sds_grad_batch(self, requests: list[SDSRequest]) -> list[torch.Tensor]:
        """Several callers' requests in as few UNet calls as possible; gradient i is exactly
        ``sds_grad`` of request i alone. Requests sharing image size, weighting, clipping and
        conditioning fields go through one ``sds`` call with per-image timesteps (drawn first
        from each request's generator, as alone), guidance scales and generators."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        cfgs = [r.cfg or SDSConfig() for r in requests]
        for i, (r, c) in enumerate(zip(requests, cfgs)):
            cond = r.conditioning
            present = tuple(k for k in ("c2w", "K", "image_size", "background")
                            if getattr(cond, k) is not None)
            groups[(tuple(r.images.shape[-2:]), c.weighting, c.grad_clip, present,
                    cond.image_size)].append(i)
        grads: list[torch.Tensor | None] = [None] * len(requests)
        for members in groups.values():
            per_image_gens, timesteps, scales = [], [], []
            for i in members:
                n = len(requests[i].images)
                gens = [requests[i].generator] * n
                per_image_gens += gens
                timesteps.append(self.draw_timesteps(cfgs[i], requests[i].step, gens))
                scales += [cfgs[i].at(requests[i].step)[0]] * n
            images = torch.cat([requests[i].images.to(self.device) for i in members])
            cond = Conditioning.concat([requests[i].conditioning for i in members])
            out = self.sds(images, cond, cfgs[members[0]], generator=per_image_gens,
                           timesteps=torch.cat(timesteps), guidance_scale=torch.tensor(scales))
            for i, part in zip(members, out.grad.split([len(requests[i].images)
                                                        for i in members])):
                grads[i] = part.to(requests[i].images.device)
        return grads

    def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig | None = None,
               checkpoint: str | os.PathLike | None = None) -> InversionResult:
        """Textual inversion of ``cfg.token`` from one photo (rgb [3,H,W], mask [1,H,W]); the
        token stays registered. Resumable at ``checkpoint``. See ``rf_core.prior.inversion``."""
        return invert(self, rgb, mask, cfg, checkpoint=checkpoint)

    def describe(self) -> dict:
        """A JSON-able summary of the loaded model (``loading.describe``)."""
        return describe(self.sd)

    def latent_shape(self, x_in: torch.Tensor) -> tuple[int, ...]:
        f = self.sd.vae_scale_factor
        return (1, self.sd.vae.config.latent_channels, x_in.shape[-2] // f, x_in.shape[-1] // f)
