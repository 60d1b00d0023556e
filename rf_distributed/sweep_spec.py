"""Sweep files: a photo or a set of objects, fixed overrides, a search space, an objective and a
scheduler.

A sweep file (``tune_configs/*.yaml``, format in ``tune_configs/README.md``) becomes a
``SweepSpec`` in ``load_sweep``, which checks everything a trial would trip over later (the
space itself is checked by ``rf_distributed.search_space.validate_space``) before Ray starts:
an ``objects:`` source with no usable object, a ground-truth metric in the objective while some
object has no ground truth, a CLIP objective without local CLIP weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rf_core.config import ConfigError, build, read_yaml
from rf_core.evaluation.evaluate import CLIP_MODEL
from rf_core.evaluation.heldout import ClipWeightsError, InterimPlan, locate_clip
from rf_core.evaluation.metric_registry import (
    default_objective,
    mesh_metrics,
    needs_clip,
    needs_gt,
    objective_metrics,
)
from rf_core.input.dataset_listing import DatasetError, DatasetObject, object_name, read_dataset
from rf_core.jobs.evaluate_run import object_overrides
from rf_core.jobs.job_config import ReconstructJobConfig, load_job_config
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

__all__ = ["SHARED_PREFIXES", "SweepSpec", "load_sweep", "make_scheduler"]

SHARED_PREFIXES = ("input.", "inversion.", "model.", "embedding")
"""Config paths every trial of a sweep shares (the photos, their learned tokens and the prior
are prepared once by the driver), so a space may not sweep them."""


@dataclass
class SweepSpec:
    """One sweep: which photo or objects, which fixed config, which space, how Tune runs it.

    Built by ``load_sweep``; constructing it directly validates the same way. Relative paths
    resolve against the current working directory and are stored absolute (Tune runs trials in
    their own folders).
    """

    name: str
    """Experiment name (letters, digits, ``_ . -``): the Tune and MLflow experiment."""
    space: dict[str, dict]
    """Dotted config path (``recon.lr[1]`` for a schedule entry) -> one distribution."""
    image: str | None = None
    """One photo: RGBA, or RGB with ``mask``. Give this or ``objects``."""
    objects: str | None = None
    """A set of objects, anything ``rf dataset`` reads: a folder (of ``rf render-gt`` folders,
    RealFusion-style folders or images) or a .csv/.jsonl manifest; or ``pybullet:N``, N example
    objects with ground truth rendered on first use into ``outputs/example_dataset``. Every
    trial reconstructs every object; metrics are reported per object (``heldout_psnr/duck``),
    as the mean (``heldout_psnr``) and the worst object (``heldout_psnr/worst``)."""
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
    interim: dict = field(default_factory=dict)
    """How reports before the last evaluate held-out views
    (``rf_core.evaluation.heldout.InterimPlan``): ``views`` (a fixed subset, default 4), ``size``
    (pixels, default 64), ``mesh_resolution`` (a coarse mesh, only when the objective weights a
    mesh metric). The last report evaluates every view at full size and the exported mesh."""
    clip_model: str = CLIP_MODEL
    """CLIP weights for ``clip_input_similarity``: a local folder or a hub id already in the
    local Hugging Face cache (nothing is downloaded)."""
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0.0})
    """Per trial: ``cpu`` (> 0) and ``gpu`` (fractions below 1 share a GPU)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[\w.-]+", self.name):
            raise SearchSpaceError(f"name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if (self.image is None) == (self.objects is None):
            raise SearchSpaceError("give either image: (one photo) or objects: (a folder or "
                                   ".csv/.jsonl manifest of objects), not both or neither")
        if self.image is not None:
            self.image = _existing(self.image, "image", "a photo (RGBA, or RGB with mask:)")
            if self.mask is not None:
                self.mask = _existing(self.mask, "mask", "a mask image (white = object)")
            self._check_gt()
        else:
            for key in ("mask", "gt"):
                if getattr(self, key) is not None:
                    raise SearchSpaceError(f"{key}: belongs to image:; with objects: give each "
                                           f"object's {key} in the folder or manifest")
        self._objects = self._read_objects()
        self._object_overrides = {o.name: _object_overrides(o) for o in self._objects}
        try:
            self.interim_plan = InterimPlan(**self.interim)
        except (TypeError, ValueError) as e:
            raise SearchSpaceError(f"interim: {e}; keys: views, size, mesh_resolution") from None
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
        shared = [k for k in self.space if isinstance(k, str) and k.startswith(SHARED_PREFIXES)]
        if shared:
            raise SearchSpaceError(f"space: {shared[0]} is shared by every trial (the driver "
                                   "prepares photos, learned tokens and the prior once); fix it "
                                   "in overrides: instead")
        validate_space(self.space, self.preset, self.overrides)
        self._check_scheduler()

    # ------------------------------------------------------------------ use
    @property
    def per_object(self) -> bool:
        """Whether trials report per-object metrics (a sweep over ``objects:``)."""
        return self.objects is not None

    def sweep_objects(self) -> list[DatasetObject]:
        """The objects every trial reconstructs (one for an ``image:`` sweep)."""
        return list(self._objects)

    def object_overrides(self, obj: DatasetObject) -> list[str]:
        """Overrides one object adds after the trial's: its GT view's camera (so held-out
        views can be compared), its textual-inversion initializer word. Read from the files
        once, at load, so trials on other nodes need none of them."""
        return list(self._object_overrides[obj.name])

    def base_config(self) -> ReconstructJobConfig:
        """The preset with the fixed overrides: what every trial starts from."""
        return load_job_config(self.preset, [], self.overrides)

    def job_overrides(self, sampled: dict) -> list[str]:
        """All overrides of one trial (fixed, then sampled), for ``load_job_config``."""
        return list(self.overrides) + trial_overrides(sampled, self.base_config())

    def job_config(self, sampled: dict, obj: DatasetObject | None = None
                   ) -> ReconstructJobConfig:
        """The resolved config of the trial whose Tune config is ``sampled`` (for ``obj``:
        with that object's overrides last)."""
        extra = self.object_overrides(obj) if obj is not None else []
        return load_job_config(self.preset, [], self.job_overrides(sampled) + extra)

    def trial_steps(self, sampled: dict) -> int:
        """The step count of the trial whose Tune config is ``sampled``: a trial that reached
        it finished, one that did not was stopped by the scheduler."""
        return self.job_config(sampled).recon.steps

    def needs_mesh_every_report(self) -> bool:
        """Whether interim reports must extract a coarse mesh (the objective weights one)."""
        keys = {*self.objective, self.metric.split("/")[0]}
        return bool(keys & set(mesh_metrics()))

    def needs_clip(self) -> bool:
        """Whether reports compute CLIP similarity to the input photo."""
        return any(needs_clip(k) for k in {*self.objective, self.metric.split("/")[0]})

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

    def _read_objects(self) -> list[DatasetObject]:
        if self.image is not None:
            return [DatasetObject(object_name(Path(self.image).stem), Path(self.image),
                                  Path(self.mask) if self.mask else None,
                                  Path(self.gt) if self.gt else None, self.input_view)]
        if not isinstance(self.objects, str):
            raise SearchSpaceError(f"objects: expected a folder or manifest path, got "
                                   f"{self.objects!r}")
        source = _example_objects(self.objects) or Path(self.objects).expanduser().resolve()
        try:
            objects, bad = read_dataset(source)
        except DatasetError as e:
            raise SearchSpaceError(f"objects: {e}") from None
        if bad:  # a sweep's object set is its benchmark: never drop one silently
            raise SearchSpaceError(
                f"objects: {len(bad)} of {len(bad) + len(objects)} entries of {self.objects} "
                f"cannot be used ({bad[0].where}: {bad[0].error}); fix or remove them")
        self.objects = str(source)
        for obj in objects:
            if obj.gt is not None:
                frames = json.loads((Path(obj.gt) / "cameras.json").read_text()).get("frames", [])
                if obj.input_view >= len(frames):
                    raise SearchSpaceError(f"objects: {obj.name}: input_view {obj.input_view} is "
                                           f"out of range: {obj.gt} has {len(frames)} views")
        return objects

    def _check_objective(self) -> None:
        no_gt = [o.name for o in self._objects if o.gt is None]
        if self.objective is None:
            self.objective = {default_objective(ground_truth=not no_gt): 1.0}
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
        self.objective = {k: float(v) for k, v in self.objective.items()}
        base = self.metric.removesuffix("/worst")
        if self.metric != "objective" and base not in objective_metrics():
            raise SearchSpaceError(f"metric: unknown metric {self.metric!r}; use 'objective' or "
                                   f"one of {', '.join(objective_metrics())} (optionally with "
                                   "/worst: the worst object)")
        for where, key in [*(("objective", k) for k in self.objective), ("metric", base)]:
            self._check_computable(where, key, no_gt)

    def _check_computable(self, where: str, key: str, no_gt: list[str]) -> None:
        """A weighted metric must be computable at every report: never a silent zero."""
        if needs_gt(key) and no_gt:
            fix = ("set gt: to a `rf render-gt` folder" if self.image else
                   "give every object a gt folder (render-gt folders or a manifest gt column)")
            *others, last = [m for m in objective_metrics() if not needs_gt(m)]
            raise SearchSpaceError(f"{where}: {key} needs ground truth, which "
                                   f"{', '.join(no_gt[:3])}{' ...' if len(no_gt) > 3 else ''} "
                                   f"lack; {fix}, or use {', '.join(others)} or {last}")
        if needs_clip(key):
            try:
                locate_clip(self.clip_model)
            except ClipWeightsError as e:
                raise SearchSpaceError(f"{where}: {key} needs CLIP weights: {e}") from None

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


def _object_overrides(obj: DatasetObject) -> list[str]:
    return object_overrides(obj.gt, obj.input_view, obj.initializer)


EXAMPLE_OBJECTS = Path("outputs/example_dataset")
"""Where ``objects: pybullet:N`` renders its objects (from the working directory)."""


def _example_objects(source: str) -> Path | None:
    """``pybullet:N``: the first N objects of ``rf_core.ground_truth.example_objects`` (duck, soccer
    ball, torus, ...) with ground truth, rendered once into :data:`EXAMPLE_OBJECTS` (128 px, 9
    views; a few seconds) and reused after; their manifest. None for any other source."""
    match = re.fullmatch(r"pybullet:(\d+)", source.strip())
    if match is None:
        return None
    from rf_core.ground_truth.example_objects import MESHES, make_objects

    count = int(match.group(1))
    if not 1 <= count <= len(MESHES):
        raise SearchSpaceError(f"objects: {source}: choose 1 to {len(MESHES)} example objects")
    return make_objects(EXAMPLE_OBJECTS.resolve(), count, size=128, views=9)


def _positive_int(d: dict, key: str) -> None:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SearchSpaceError(f"scheduler.{key} must be an integer >= 1 (steps), got {v!r}")


def load_sweep(path: str | Path, gpus_per_trial: float | None = None) -> SweepSpec:
    """Read and validate a sweep file; every mistake is a one-line ``SearchSpaceError``.
    ``gpus_per_trial`` (``rf sweep --gpus-per-trial``) replaces ``resources.gpu`` before the
    checks, so it is held to the same rules."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise SearchSpaceError(str(e)) from None
    if gpus_per_trial is not None and isinstance(data, dict):
        resources = data.get("resources")
        data["resources"] = {**(resources if isinstance(resources, dict) else {}),
                             "gpu": gpus_per_trial}
    missing = [k for k in ("name", "space") if k not in data]
    if "image" not in data and "objects" not in data:
        missing.append("image")
    if missing:
        raise SearchSpaceError(f"{path}: missing key '{missing[0]}' (needed: name, space, and "
                               "image or objects)")
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
