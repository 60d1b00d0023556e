"""Diffusion priors: the ``Prior`` protocol, its registry, Stable Diffusion (loading, SDS,
conditioning, textual inversion), Zero-1-to-3 (``zero123``), the ground-truth oracle and the null
prior.

    prior = make_prior(ModelConfig(name="tiny"))          # or type="oracle" / "none"
    prior.register_embedding(*load_embedding("learned_embeds.safetensors"))
    cond = make_conditioning(PromptConfig(), azimuth=az, elevation=el)
    grad = prior.sds_grad(images, cond, SDSConfig(), step=step, generator=gen)
    loss = lambda_sds * sds_loss(images, grad)
    result = prior.invert(rgb, mask, InversionConfig(), checkpoint="e.ckpt")
"""

from rf_core.prior.augment import AugmentConfig, augment_views
from rf_core.prior.base import Prior, SDSRequest, sds_grad_each
from rf_core.prior.conditioning import (
    Conditioning,
    PromptConfig,
    make_conditioning,
    view_directions,
)
from rf_core.prior.embeddings import EmbeddingError, load_embedding, save_embedding
from rf_core.prior.inversion import InversionConfig, InversionResult, invert
from rf_core.prior.loading import (
    ModelConfig,
    ModelNotFoundError,
    SDComponents,
    describe,
    load_components,
)
from rf_core.prior.null import NullPrior
from rf_core.prior.prior import SDSOutput, StableDiffusionPrior
from rf_core.prior.random_models import (
    RANDOM_MODELS,
    build_random_pipeline,
    is_random_model,
    random_model_path,
)
from rf_core.prior.registry import make_prior, prior_types, register_prior, unregister_prior
from rf_core.prior.sds import SDSConfig, sds_loss
from rf_core.prior.tiny import TINY_MODELS, build_tiny_pipeline, tiny_model_path
from rf_core.prior.zero123 import Zero123Prior, zero123_camera
from rf_core.prior.zero123_loading import UnsafeWeightsError, load_zero123
from rf_core.prior.zero123_random import ZERO123_MODELS, zero123_random_path

__all__ = [
    "RANDOM_MODELS", "TINY_MODELS", "AugmentConfig", "Conditioning", "EmbeddingError",
    "InversionConfig", "InversionResult", "ModelConfig", "ModelNotFoundError", "NullPrior",
    "Prior", "PromptConfig", "SDComponents", "SDSConfig", "SDSOutput", "SDSRequest",
    "StableDiffusionPrior", "augment_views", "build_random_pipeline", "build_tiny_pipeline",
    "describe", "invert", "is_random_model", "load_components", "load_embedding",
    "make_conditioning", "make_prior", "prior_types", "random_model_path", "register_prior",
    "save_embedding", "sds_grad_each", "sds_loss", "tiny_model_path", "unregister_prior",
    "view_directions",
    "ZERO123_MODELS", "UnsafeWeightsError", "Zero123Prior", "load_zero123", "zero123_camera",
    "zero123_random_path",
]
