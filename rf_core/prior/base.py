"""The ``Prior`` protocol: what a reconstruction (and the Ray prior server) may ask of a prior.

    grad = prior.sds_grad(images, conditioning, SDSConfig(), step=step, generator=gen)
    prior.register_embedding("<e>", vector)
    result = prior.invert(rgb, mask, InversionConfig(), checkpoint="e.ckpt")
    grads = prior.sds_grad_batch([SDSRequest(images, conditioning, cfg, step, gen), ...])

A prior knows nothing of optimizers or logging. ``sds_grad_batch`` is the
batched entry point a server calls with several callers' requests at once: reply i is exactly
what ``sds_grad`` gives request i alone, and each request's generator advances exactly as it
would alone. A prior with nothing to gain from batching answers it with :func:`sds_grad_each`.

Implementations: ``StableDiffusionPrior`` (``prior.py``), ``OraclePrior`` (``oracle.py``),
``NullPrior`` (``null.py``) and ``rf_distributed.prior_server.PriorClient``. ``make_prior``
(``registry.py``) builds one from a ``ModelConfig``.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch

from rf_core.errors import UserError
from rf_core.prior.conditioning import Conditioning
from rf_core.prior.inversion import InversionConfig, InversionResult
from rf_core.prior.sds import SDSConfig


@dataclass
class SDSRequest:
    """One caller's ``sds_grad`` call, as data: picklable, so it can travel to a server.

    Pickling replaces ``generator`` by its state (CPU generators only) and unpickling makes a
    new generator from it; the receiver advances that copy and sends its state back.
    """

    images: torch.Tensor
    """[B,3,H,W] float32 in [0,1]."""
    conditioning: Conditioning
    """B prompts (and, for priors that read them, the views' cameras and backgrounds)."""
    cfg: SDSConfig | None = None
    """The caller's SDS settings (None: ``SDSConfig()``)."""
    step: int = 0
    """The training step (scheduled settings are evaluated there)."""
    generator: torch.Generator | None = None
    """The caller's generator (advanced in place); None: the global RNG."""
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    """Learned tokens the prompts use, {token: [D]}: a server registers them (with
    ``register_embedding``) before the batch; ``sds_grad_batch`` itself does not read them."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        gen = state.pop("generator")
        if gen is not None and gen.device.type != "cpu":
            raise ValueError("a request that travels needs a CPU generator (its state travels)")
        state["generator_state"] = None if gen is None else gen.get_state()
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        gen_state = state.pop("generator_state")
        gen = None
        if gen_state is not None:
            gen = torch.Generator()
            gen.set_state(gen_state)
        self.__dict__.update(state, generator=gen)


@runtime_checkable
class Prior(Protocol):
    """A score-distillation prior. See the module docstring."""

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning,
                 cfg: SDSConfig | None = None, *, step: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """dL_SDS/d(images): [B,3,H,W] float32 on the images' device, for images [B,3,H,W] in
        [0,1]. Apply it with ``sds_loss(images, grad)``. ``generator`` advances."""
        ...

    def sds_grad_batch(self, requests: list[SDSRequest]) -> list[torch.Tensor]:
        """Gradient i is exactly ``sds_grad`` of request i alone (same generator draws)."""
        ...

    def register_embedding(self, token: str, vector: torch.Tensor) -> None:
        """Use ``vector`` [D] for ``token`` in later prompts."""
        ...

    def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig | None = None,
               checkpoint: str | os.PathLike | None = None) -> InversionResult:
        """Learn ``cfg.token`` from one photo (rgb [3,H,W], mask [1,H,W] in [0,1]) and register
        it. With ``checkpoint``, resumable there (a compatible checkpoint is resumed). A
        progress bar shows unless the caller wraps the call in ``rf_core.progress.quiet()``."""
        ...


def check_sds_inputs(images: torch.Tensor, conditioning: Conditioning | None = None) -> None:
    """A ValueError unless images is [B,3,H,W] (with one conditioning per image)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
    if conditioning is not None and len(conditioning) != images.shape[0]:
        raise ValueError(f"{len(conditioning)} conditionings for {images.shape[0]} images")


def sds_grad_each(prior: Prior, requests: list[SDSRequest]) -> list[torch.Tensor]:
    """``sds_grad_batch`` for priors that gain nothing from batching: one call per request."""
    return [prior.sds_grad(r.images, r.conditioning, r.cfg, step=r.step, generator=r.generator)
            for r in requests]


class NoInversionError(UserError, ValueError):
    """Textual inversion was asked of a prior without a text model."""


class FrozenDiffusionModel(abc.ABC):
    """What a prior over loaded diffusion components reads from them alike: ``device``,
    ``dtype``, ``resolution`` and the scheduler's ``num_train_timesteps``."""

    @property
    @abc.abstractmethod
    def components(self):
        """The loaded components: anything with ``device``, ``dtype``, ``resolution`` and
        ``scheduler``."""

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    @property
    def resolution(self) -> int:
        return self.components.resolution

    @property
    def num_train_timesteps(self) -> int:
        return int(self.components.scheduler.config.num_train_timesteps)


class TextFreePrior:
    """What every prior without a text model answers alike: a learned token is recorded in
    ``embeddings`` (and never used), textual inversion is a one-line ``NoInversionError``
    (``no_inversion`` says why and what to do), and batched SDS runs one request at a time.
    Subclasses call ``super().__init__()``."""

    no_inversion: ClassVar[str] = "textual inversion needs a text-to-image prior"

    def __init__(self) -> None:
        self.embeddings: dict[str, torch.Tensor] = {}
        """Tokens registered by a job (recorded, never used)."""

    def register_embedding(self, token: str, vector: torch.Tensor) -> None:
        """Record a learned token; this prior reads no text, so it changes nothing."""
        self.embeddings[token] = vector.detach().float().cpu().clone()

    def invert(self, rgb: torch.Tensor, mask: torch.Tensor, cfg: InversionConfig | None = None,
               checkpoint: str | os.PathLike | None = None) -> InversionResult:
        raise NoInversionError(self.no_inversion)

    def sds_grad_batch(self, requests: list[SDSRequest]) -> list[torch.Tensor]:
        return sds_grad_each(self, requests)


__all__ = ["FrozenDiffusionModel", "NoInversionError", "Prior", "SDSRequest", "TextFreePrior",
           "check_sds_inputs", "sds_grad_each"]
