"""Sweep files: one photo, fixed overrides, a search space, an objective and a scheduler.

A sweep file (``tune_configs/*.yaml``, format in ``tune_configs/README.md``) becomes a
``SweepSpec`` in ``load_sweep``, which checks everything a trial would trip over later (the
space itself is checked by ``rf_distributed.search_space.validate_space``) before Ray starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rf_core.config import ConfigError, build, read_yaml
from rf_core.metric_registry import needs_gt, objective_metrics
from rf_core.reconstruct_job import ReconstructJobConfig, load_job_config
from rf_distributed.search_space import (
    SCHEDULER_KEYS,
    TIME_ATTR,
    SearchSpaceError,
    finite_number,
    parse_distribution,
    representatives,
    to_tune_mutations,
    trial_overrides,
    validate_space,
)

__all__ = ["SweepSpec", "load_sweep", "make_scheduler"]


@dataclass
class SweepSpec:
    """One sweep: which photo, which fixed config, which space, how Tune runs it.

    Built by ``load_sweep``; constructing it directly validates the same way. Relative paths
    resolve against the current working directory and are stored absolute (Tune runs trials in
    their own folders).
    """

    name: str
    """Experiment name (letters, digits, ``_ . -``): the Tune and MLflow experiment."""
    image: str
    """The photo: RGBA, or RGB with ``mask``."""
    space: dict[str, dict]
    """Dotted config path (``recon.lr[1]`` for a schedule entry) -> one distribution."""
    mask: str | None = None
    """Object mask (white = object) when the photo has no alpha."""
    gt: str | None = None
    """A ``rf render-gt`` folder the photo is view ``input_view`` of; enables held-out metrics."""
    input_view: int = 0
    """Which view of ``gt`` the photo is."""
    preset: str = "tiny"
    """Base preset (``rf_core/presets``)."""
    overrides: list[str] = field(default_factory=list)
    """Fixed ``dotted.key=value`` overrides applied to every trial, before the sampled ones."""
    metric: str = "objective"
    """The reported key Tune optimises: ``objective`` or one of ``objective_metrics()``."""
    mode: str = "max"
    """``max`` or ``min``."""
    objective: dict[str, float] | None = None
    """Weights of reported metrics summed into ``objective`` (negative for lower-is-better
    ones such as ``chamfer_l1``). Default: ``{heldout_psnr: 1}`` with ``gt``, else
    ``{input_psnr: 1}``."""
    num_samples: int = 1
    """Samples of the space (each ``grid`` multiplies the trial count)."""
    max_concurrent: int = 2
    """Trials running at once."""
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    """``{type: fifo}``, ``{type: asha, grace_period, reduction_factor, max_t}`` or
    ``{type: pbt, perturbation_interval, hyperparam_mutations}``; intervals in steps."""
    report_every: int = 25
    """Optimisation steps between ``tune.report`` calls."""
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0.0})
    """Per trial: ``cpu`` (> 0) and ``gpu`` (fractions below 1 share a GPU)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[\w.-]+", self.name):
            raise SearchSpaceError(f"name {self.name!r} must be letters, digits, '_', '.' or '-'")
        self.image = _existing(self.image, "image", "a photo (RGBA, or RGB with mask:)")
        if self.mask is not None:
            self.mask = _existing(self.mask, "mask", "a mask image (white = object)")
        self._check_gt()
        self._check_objective()
        if self.mode not in ("max", "min"):
            raise SearchSpaceError(f"mode must be 'max' or 'min', got {self.mode!r}")
        for key in ("num_samples", "max_concurrent", "report_every"):
            if getattr(self, key) < 1:
                raise SearchSpaceError(f"{key} must be >= 1, got {getattr(self, key)}")
        self._check_resources()
        if not self.space:
            raise SearchSpaceError("space is empty; add at least one dotted path, e.g. "
                                   "recon.weights.entropy: {loguniform: [1.0e-3, 1.0]}")
        validate_space(self.space, self.preset, self.overrides)
        self._check_scheduler()

    # ------------------------------------------------------------------ use
    def base_config(self) -> ReconstructJobConfig:
        """The preset with the fixed overrides: what every trial starts from."""
        return load_job_config(self.preset, [], self.overrides)

    def job_overrides(self, sampled: dict) -> list[str]:
        """All overrides of one trial (fixed, then sampled), for ``load_job_config``."""
        return list(self.overrides) + trial_overrides(sampled, self.base_config())

    def job_config(self, sampled: dict) -> ReconstructJobConfig:
        """The resolved config of the trial whose Tune config is ``sampled``."""
        return load_job_config(self.preset, [], self.job_overrides(sampled))

    def max_steps(self) -> int:
        """The most optimisation steps any trial can run (``recon.steps``, swept or fixed)."""
        if "recon.steps" in self.space:
            name, args = parse_distribution("space", "recon.steps", self.space["recon.steps"])
            return max(int(v) for v in representatives(name, args))
        return self.base_config().recon.steps

    # ------------------------------------------------------------------ checks
    def _check_gt(self) -> None:
        if self.input_view < 0:
            raise SearchSpaceError(f"input_view must be >= 0, got {self.input_view}")
        if self.gt is None:
            return
        root = Path(self.gt).expanduser().resolve()
        meta = root / "cameras.json"
        if not meta.is_file():
            raise SearchSpaceError(f"gt: {self.gt} is not a ground-truth folder (no cameras.json)"
                                   "; create it with `rf render-gt MESH.obj --out DIR`")
        self.gt = str(root)
        frames = json.loads(meta.read_text()).get("frames", [])
        if self.input_view >= len(frames):
            raise SearchSpaceError(f"input_view {self.input_view} is out of range: {self.gt} has "
                                   f"{len(frames)} views")

    def _check_objective(self) -> None:
        if self.objective is None:
            self.objective = {"heldout_psnr" if self.gt else "input_psnr": 1.0}
        if not self.objective:
            raise SearchSpaceError("objective is empty; weight at least one metric, e.g. "
                                   "{input_psnr: 1.0}")
        for key, weight in self.objective.items():
            if key not in objective_metrics():
                raise SearchSpaceError(f"objective: unknown metric {key!r}; choose from "
                                       f"{', '.join(objective_metrics())}")
            if not finite_number(weight):
                raise SearchSpaceError(f"objective.{key}: weight must be a finite number, "
                                       f"got {weight!r}")
            if needs_gt(key) and self.gt is None:
                raise SearchSpaceError(f"objective: {key} needs ground truth; set gt: to a "
                                       "`rf render-gt` folder or use input_psnr/input_mask_iou")
        self.objective = {k: float(v) for k, v in self.objective.items()}
        if self.metric != "objective" and self.metric not in objective_metrics():
            raise SearchSpaceError(f"metric: unknown metric {self.metric!r}; use 'objective' or "
                                   f"one of {', '.join(objective_metrics())}")
        if needs_gt(self.metric) and self.gt is None:
            raise SearchSpaceError(f"metric: {self.metric} needs ground truth; set gt: to a "
                                   "`rf render-gt` folder")

    def _check_resources(self) -> None:
        unknown = sorted(set(self.resources) - {"cpu", "gpu"})
        if unknown:
            raise SearchSpaceError(f"resources: unknown key {unknown[0]!r}; use cpu and gpu")
        res = {"cpu": 1, "gpu": 0.0, **self.resources}
        for key, value in res.items():
            if not finite_number(value) or value < 0:
                raise SearchSpaceError(f"resources.{key} must be a finite number >= 0, "
                                       f"got {value!r}")
        if res["cpu"] <= 0:
            raise SearchSpaceError(f"resources.cpu must be > 0, got {res['cpu']}")
        if res["gpu"] > 1 and not float(res["gpu"]).is_integer():
            raise SearchSpaceError(f"resources.gpu {res['gpu']}: Ray shares a GPU only in "
                                   "fractions below 1; use e.g. 0.5 or a whole number")
        self.resources = res

    def _check_scheduler(self) -> None:
        s = self.scheduler = dict(self.scheduler) if isinstance(self.scheduler, dict) else {}
        kind = s.get("type")
        if kind not in SCHEDULER_KEYS:
            raise SearchSpaceError(f"scheduler: unknown type {kind!r}; use {{type: fifo}}, "
                                   "{type: asha, ...} or {type: pbt, ...}")
        unknown = sorted(set(s) - {"type", *SCHEDULER_KEYS[kind]})
        if unknown:
            raise SearchSpaceError(f"scheduler: unknown key {unknown[0]!r} for {kind}; valid: "
                                   f"{', '.join(SCHEDULER_KEYS[kind]) or 'none'}")
        if kind == "asha":
            s.setdefault("grace_period", self.report_every)
            s.setdefault("reduction_factor", 4)
            s.setdefault("max_t", self.max_steps())
            _positive_int(s, "grace_period")
            _positive_int(s, "max_t")
            rf = s["reduction_factor"]
            if not finite_number(rf) or rf <= 1:
                raise SearchSpaceError(f"scheduler.reduction_factor must be a finite number > 1, "
                                       f"got {rf!r}")
            if s["grace_period"] >= s["max_t"]:
                raise SearchSpaceError(f"scheduler.grace_period {s['grace_period']} must be below "
                                       f"max_t {s['max_t']} (steps); lower it")
        elif kind == "pbt":
            if "perturbation_interval" not in s:
                raise SearchSpaceError("scheduler: pbt needs perturbation_interval (steps), "
                                       "e.g. 50")
            _positive_int(s, "perturbation_interval")
            for key, hi in (("quantile_fraction", 0.5), ("resample_probability", 1.0)):
                v = s.get(key, 0.25)
                if not finite_number(v) or not 0 <= v <= hi:
                    raise SearchSpaceError(f"scheduler.{key} must lie in [0, {hi}], got {v!r}")
            if "hyperparam_mutations" not in s:
                s["hyperparam_mutations"] = {k: v for k, v in self.space.items()
                                             if "grid" not in v}
            muts = s["hyperparam_mutations"]
            if not isinstance(muts, dict) or not muts:
                raise SearchSpaceError("scheduler.hyperparam_mutations: give at least one path, "
                                       "e.g. {recon.weights.entropy: {loguniform: [1e-3, 1]}}")
            validate_space(muts, self.preset, self.overrides,
                           where="scheduler.hyperparam_mutations")


def _existing(path: str, key: str, what: str) -> str:
    if not isinstance(path, str):
        raise SearchSpaceError(f"{key}: expected a file path, got {path!r}")
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise SearchSpaceError(f"{key}: {path} not found (relative paths start from the current "
                               f"directory, {Path.cwd()}); give {what}")
    return str(p)


def _positive_int(d: dict, key: str) -> None:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SearchSpaceError(f"scheduler.{key} must be an integer >= 1 (steps), got {v!r}")


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; every mistake is a one-line ``SearchSpaceError``."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise SearchSpaceError(str(e)) from None
    missing = [k for k in ("name", "image", "space") if k not in data]
    if missing:
        raise SearchSpaceError(f"{path}: missing key '{missing[0]}' (needed: name, image, space)")
    try:
        return build(SweepSpec, data)
    except ConfigError as e:
        raise SearchSpaceError(f"{path}: {e}") from None


def make_scheduler(spec: SweepSpec):
    """The Tune scheduler of ``spec``; metric and mode go to ``TuneConfig``, not here.

    ASHA and PBT count in optimisation steps: each ``tune.report`` must carry ``step``.
    PBT also needs the trainable to save and restore checkpoints.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s["type"] == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=s["max_t"], grace_period=s["grace_period"],
                             reduction_factor=s["reduction_factor"])
    if s["type"] == "pbt":
        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=s["perturbation_interval"],
            hyperparam_mutations=to_tune_mutations(s["hyperparam_mutations"]),
            quantile_fraction=s.get("quantile_fraction", 0.25),
            resample_probability=s.get("resample_probability", 0.25))
    return FIFOScheduler()
