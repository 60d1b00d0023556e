"""Priors by name: ``make_prior(cfg)`` builds the prior ``cfg.type`` names.

    prior = make_prior(ModelConfig(name="tiny"))                       # stable-diffusion
    prior = make_prior(ModelConfig(type="oracle", name="pybullet_data:duck.obj"), radius=0.8)
    prior = make_prior(ModelConfig(type="none"))

Adding a prior is one file (a class with the ``Prior`` protocol's methods) and one
``register_prior("name", factory)`` call, here or in the module that defines it. A factory takes
the ``ModelConfig`` and the keyword arguments given to ``make_prior`` (things a config file
cannot hold, such as the oracle's ``world_transform``).
"""

from __future__ import annotations

from collections.abc import Callable

from rf_core.config import ConfigError
from rf_core.prior.base import Prior
from rf_core.prior.loading import ModelConfig

PriorFactory = Callable[..., Prior]
"""``factory(cfg: ModelConfig, **kwargs) -> Prior``."""

_FACTORIES: dict[str, PriorFactory] = {}
_READS_TEXT: dict[str, bool] = {}
_CHECKS: dict[str, Callable[[ModelConfig], None]] = {}


def register_prior(name: str, factory: PriorFactory, *, reads_text: bool = True,
                   check: Callable[[ModelConfig], None] | None = None) -> None:
    """Make ``model.type: name`` build ``factory(cfg, **kwargs)``. Re-registering replaces.

    ``reads_text``: the prior reads prompts with a learned token, so a reconstruction needs
    textual inversion (or an embedding file) first; False skips it everywhere. ``check(cfg)``:
    a cheap test that the prior's files are on this machine (raises a one-line ``UserError``),
    run by sweeps and dataset runs before Ray starts."""
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"a prior type is one word, got {name!r}")
    _FACTORIES[name] = factory
    _READS_TEXT[name] = reads_text
    _CHECKS[name] = check or (lambda cfg: None)


def unregister_prior(name: str) -> None:
    """Forget ``model.type: name`` (a no-op when it was never registered)."""
    for table in (_FACTORIES, _READS_TEXT, _CHECKS):
        table.pop(name, None)


def check_available(cfg: ModelConfig) -> None:
    """Fail now, in one line, when the prior ``cfg`` names is not on this machine."""
    needs_inversion(cfg)  # an unknown type: ConfigError naming the choices
    _CHECKS[cfg.type](cfg)


def needs_inversion(cfg: ModelConfig) -> bool:
    """Whether the prior ``cfg.type`` names reads a learned token (known before it is built).
    Unknown types are a ``ConfigError`` naming the choices."""
    if cfg.type not in _FACTORIES:
        raise ConfigError(f"model.type: unknown prior {cfg.type!r}; choose one of "
                          f"{', '.join(prior_types())}")
    return _READS_TEXT[cfg.type]


def prior_types() -> list[str]:
    """The registered prior types, sorted."""
    return sorted(_FACTORIES)


def make_prior(cfg: ModelConfig | None = None, **kwargs) -> Prior:
    """The prior ``cfg.type`` names, built from ``cfg`` (and ``kwargs`` for its factory).
    An unknown type is a ``ConfigError`` naming the choices."""
    cfg = cfg or ModelConfig()
    factory = _FACTORIES.get(cfg.type)
    if factory is None:
        raise ConfigError(f"model.type: unknown prior {cfg.type!r}; choose one of "
                          f"{', '.join(prior_types())}")
    return factory(cfg, **kwargs)


def _stable_diffusion(cfg: ModelConfig, **kwargs) -> Prior:
    from rf_core.prior.prior import StableDiffusionPrior

    return StableDiffusionPrior(cfg, **kwargs)


def _oracle(cfg: ModelConfig, **kwargs) -> Prior:
    """``name`` is the mesh; ``up_axis``, ``radius``, ``scale``, ``world_transform``... are
    ``OraclePrior``'s keyword arguments."""
    from rf_core.prior.oracle import OraclePrior

    return OraclePrior(cfg.name, **kwargs)


def _none(cfg: ModelConfig) -> Prior:
    from rf_core.prior.null import NullPrior

    return NullPrior()


def _learned(cfg: ModelConfig, **kwargs) -> Prior:
    """``name``: ``builtin`` (the shipped weights) or a folder from ``rf prior train``."""
    from rf_core.prior.learned import LearnedViewPrior

    device = cfg.resolved_device()
    return LearnedViewPrior(cfg.name, device=device, **kwargs)


def _zero123(cfg: ModelConfig, camera: str = "zero123", **kwargs) -> Prior:
    """``name``: a Zero-1-to-3 folder (diffusers layout), a cached hub id or ``zero123-random``
    / ``zero123-tiny``; ``model.type: stable-zero123`` reads Stable Zero123's camera vector."""
    from rf_core.prior.zero123 import Zero123Prior

    return Zero123Prior(cfg, camera=camera, **kwargs)


def _stable_zero123(cfg: ModelConfig, **kwargs) -> Prior:
    return _zero123(cfg, camera="stable-zero123", **kwargs)


def _zero123_files(cfg: ModelConfig) -> None:
    from rf_core.prior.zero123_loading import locate_zero123
    from rf_core.prior.zero123_random import ZERO123_MODELS

    if cfg.name not in ZERO123_MODELS:  # a random-weight one is built on first use
        locate_zero123(cfg.name)


def _sd_files(cfg: ModelConfig) -> None:
    from rf_core.prior.loading import locate_model

    locate_model(cfg.name, cfg.single_file_config)


def _mesh_file(cfg: ModelConfig) -> None:
    from rf_core.ground_truth.gt_render import resolve_mesh_path

    resolve_mesh_path(cfg.name)


def _learned_files(cfg: ModelConfig) -> None:
    from rf_core.prior.learned import resolve_weights
    from rf_core.prior.novel_view.model import NovelViewModel

    NovelViewModel.from_pretrained(resolve_weights(cfg.name))  # 4.6 MB: cheap and complete


register_prior("stable-diffusion", _stable_diffusion, check=_sd_files)
register_prior("oracle", _oracle, reads_text=False, check=_mesh_file)
register_prior("none", _none, reads_text=False)
register_prior("learned", _learned, reads_text=False, check=_learned_files)
register_prior("zero123", _zero123, reads_text=False, check=_zero123_files)
register_prior("stable-zero123", _stable_zero123, reads_text=False, check=_zero123_files)

__all__ = ["PriorFactory", "check_available", "make_prior", "needs_inversion", "prior_types",
           "register_prior"]
