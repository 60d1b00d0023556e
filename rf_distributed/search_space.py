"""Sweep files: one photo, fixed overrides and a search space over dotted config paths.

A sweep file (``tune_configs/*.yaml``, format in ``tune_configs/README.md``) becomes a
``SweepSpec`` in ``load_sweep``, which checks everything a trial would trip over later: every
path in ``space`` is built into a ``ReconstructJobConfig`` at the lowest, middle and highest value
its distribution can give and at a few seeded random draws (quantised as Tune does), so a typo,
a value of the wrong type (``uniform`` on an integer field) or out of range fails before Ray
starts.

``path[i]`` addresses entry ``i`` of a schedule ``[start_step, start_value, end_value, end_step]``
(threestudio's convention, ``rf_core.config.Schedule``); the schedule itself comes from the preset
or the fixed ``overrides``, and each trial gets the whole list back with its entries replaced.

Tune keys: Ray Tune samples a flat dict whose keys contain dots fine, but MLflow (which logs the
trial config as params) rejects ``[`` and ``]``. So ``path[i]`` becomes ``path.i`` in Tune's
``param_space``; no config field name starts with a digit, so ``trial_overrides`` decodes it
unambiguously (OmegaConf writes list indices the same way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rf_core.config import ConfigError, build, read_yaml, to_dict
from rf_core.reconstruct_job import ReconstructJobConfig, load_job_config, presets

__all__ = [
    "METRICS",
    "SearchSpaceError",
    "SweepSpec",
    "load_sweep",
    "make_scheduler",
    "to_tune_mutations",
    "to_tune_space",
    "trial_overrides",
    "tune_key",
    "validate_space",
]

METRICS = ("input_psnr", "input_mask_iou", "heldout_psnr", "heldout_ssim", "heldout_mask_iou",
           "chamfer_l1", "fscore")
"""Metrics a trial reports and ``objective`` may weight (held-out and mesh ones need ``gt``)."""
_GT_METRICS = frozenset(METRICS) - {"input_psnr", "input_mask_iou"}

_ARGS = {"uniform": "[low, high]", "loguniform": "[low, high]", "quniform": "[low, high, q]",
         "randint": "[low, high] (high excluded)", "choice": "[v1, v2, ...]",
         "grid": "[v1, v2, ...]"}
_NUM_ARGS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}
_SCHEDULE_ENTRIES = ("start_step", "start_value", "end_value", "end_step", "mode")
_SCHEDULER_KEYS = {
    "fifo": (),
    "asha": ("grace_period", "reduction_factor", "max_t"),
    "pbt": ("perturbation_interval", "hyperparam_mutations", "quantile_fraction",
            "resample_probability"),
}
TIME_ATTR = "step"
"""Result key the ASHA and PBT schedulers count in: optimisation steps, reported by the trial."""

# "a.b.c", "a.b.c[2]" or the Tune form "a.b.c.2"; every name part starts with a letter or "_".
_KEY = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\[(\d+)\]|\.(\d+))?")


class SearchSpaceError(ConfigError):
    """A sweep file is wrong; the one-line message names the key and says how to fix it.

    A ``ConfigError`` (so a ``ValueError``): callers that report config mistakes catch both.
    """


# ---------------------------------------------------------------------------- the spec


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
    """The reported key Tune optimises: ``objective`` or one of ``METRICS``."""
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
            name, args = _parse_distribution("space", "recon.steps", self.space["recon.steps"])
            return max(int(v) for v in _representatives(name, args))
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
            if key not in METRICS:
                raise SearchSpaceError(f"objective: unknown metric {key!r}; choose from "
                                       f"{', '.join(METRICS)}")
            if not _finite_number(weight):
                raise SearchSpaceError(f"objective.{key}: weight must be a finite number, "
                                       f"got {weight!r}")
            if key in _GT_METRICS and self.gt is None:
                raise SearchSpaceError(f"objective: {key} needs ground truth; set gt: to a "
                                       "`rf render-gt` folder or use input_psnr/input_mask_iou")
        self.objective = {k: float(v) for k, v in self.objective.items()}
        if self.metric != "objective" and self.metric not in METRICS:
            raise SearchSpaceError(f"metric: unknown metric {self.metric!r}; use 'objective' or "
                                   f"one of {', '.join(METRICS)}")
        if self.metric in _GT_METRICS and self.gt is None:
            raise SearchSpaceError(f"metric: {self.metric} needs ground truth; set gt: to a "
                                   "`rf render-gt` folder")

    def _check_resources(self) -> None:
        unknown = sorted(set(self.resources) - {"cpu", "gpu"})
        if unknown:
            raise SearchSpaceError(f"resources: unknown key {unknown[0]!r}; use cpu and gpu")
        res = {"cpu": 1, "gpu": 0.0, **self.resources}
        for key, value in res.items():
            if not _finite_number(value) or value < 0:
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
        if kind not in _SCHEDULER_KEYS:
            raise SearchSpaceError(f"scheduler: unknown type {kind!r}; use {{type: fifo}}, "
                                   "{type: asha, ...} or {type: pbt, ...}")
        unknown = sorted(set(s) - {"type", *_SCHEDULER_KEYS[kind]})
        if unknown:
            raise SearchSpaceError(f"scheduler: unknown key {unknown[0]!r} for {kind}; valid: "
                                   f"{', '.join(_SCHEDULER_KEYS[kind]) or 'none'}")
        if kind == "asha":
            s.setdefault("grace_period", self.report_every)
            s.setdefault("reduction_factor", 4)
            s.setdefault("max_t", self.max_steps())
            _positive_int(s, "grace_period")
            _positive_int(s, "max_t")
            rf = s["reduction_factor"]
            if not _finite_number(rf) or rf <= 1:
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
                if not _finite_number(v) or not 0 <= v <= hi:
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


# ---------------------------------------------------------------------------- distributions


def _parse_key(key: Any, where: str) -> tuple[str, int | None]:
    """``"a.b[2]"`` or ``"a.b.2"`` -> ``("a.b", 2)``; ``"a.b"`` -> ``("a.b", None)``."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise SearchSpaceError(f"{where} key {key!r} is not a dotted config path; write e.g. "
                               "recon.weights.entropy or recon.lr[2]")
    index = m.group(2) or m.group(3)
    return m.group(1), None if index is None else int(index)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_number(v: Any) -> bool:
    """A real number that is not inf or nan (which Ray and the schedulers choke on later)."""
    return _number(v) and math.isfinite(v)


def _parse_distribution(where: str, key: str, spec: Any, allow_grid: bool = True
                        ) -> tuple[str, list]:
    """Check one ``{name: [args]}`` entry; return ``(name, args)``."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SearchSpaceError(f"{where} '{key}': expected one distribution such as "
                               f"{{uniform: [0.0, 1.0]}}, got {spec!r}")
    ((name, args),) = spec.items()
    if name not in _ARGS:
        raise SearchSpaceError(f"{where} '{key}': unknown distribution {name!r}; use one of "
                               f"{', '.join(sorted(_ARGS))}")
    if name == "grid" and not allow_grid:
        raise SearchSpaceError(f"{where} '{key}': grid cannot be mutated; use choice")
    if not isinstance(args, list):
        raise SearchSpaceError(f"{where} '{key}': {name} takes a list {_ARGS[name]}, got {args!r}")
    if name in ("choice", "grid"):
        if not args:
            raise SearchSpaceError(f"{where} '{key}': {name} needs at least one value")
        return name, args
    n = _NUM_ARGS[name]
    if len(args) != n:
        raise SearchSpaceError(f"{where} '{key}': {name} takes {n} values {_ARGS[name]}, "
                               f"got {len(args)}")
    if not all(_number(a) for a in args):
        raise SearchSpaceError(f"{where} '{key}': {name} values must be numbers, got {args}")
    if not all(_finite_number(a) for a in args):
        raise SearchSpaceError(f"{where} '{key}': {name} values must be finite numbers, "
                               f"got {args}")
    lo, hi = args[0], args[1]
    if lo == hi:
        raise SearchSpaceError(f"{where} '{key}': {name} range [{lo}, {hi}] is empty; use "
                               f"low < high, or fix the value in overrides")
    if lo > hi:
        raise SearchSpaceError(f"{where} '{key}': {name} low {lo} is above high {hi}; "
                               f"write {_ARGS[name]}")
    if name == "loguniform" and lo <= 0:
        raise SearchSpaceError(f"{where} '{key}': loguniform needs low > 0, got {lo}; "
                               "use a small positive low such as 1e-4")
    if name == "randint" and not all(float(a).is_integer() for a in args):
        raise SearchSpaceError(f"{where} '{key}': randint bounds must be integers, got {args}")
    if name == "quniform" and args[2] <= 0:
        raise SearchSpaceError(f"{where} '{key}': quniform step q must be > 0, got {args[2]}")
    return name, args


def _quantize(v: float, q: float) -> float:
    return round(v / q) * q  # as ray.tune's quniform: round(value / q) * q


def _representatives(name: str, args: list) -> list:
    """Values a distribution can produce, lowest to highest: its ends and its middle."""
    if name in ("choice", "grid"):
        return list(args)
    lo, hi = args[0], args[1]
    if name == "uniform":
        return [float(lo), (lo + hi) / 2, float(hi)]
    if name == "loguniform":
        return [float(lo), math.sqrt(lo * hi), float(hi)]
    if name == "quniform":
        q = args[2]
        return [_quantize(lo, q), _quantize((lo + hi) / 2, q), _quantize(hi, q)]
    return [int(lo), int(hi) - 1]  # randint: high excluded, as numpy and Tune


_RANDOM_DRAWS = 6
"""Seeded random draws per distribution that ``validate_space`` builds, besides its ends."""


def _draws(name: str, args: list, rng: random.Random) -> list:
    """``_RANDOM_DRAWS`` values as Tune would sample them (``randint`` excludes its high end)."""
    if name in ("choice", "grid"):
        return [rng.choice(args) for _ in range(_RANDOM_DRAWS)]
    lo, hi = args[0], args[1]
    if name == "randint":
        return [rng.randrange(int(lo), int(hi)) for _ in range(_RANDOM_DRAWS)]
    if name == "loguniform":
        return [math.exp(rng.uniform(math.log(lo), math.log(hi))) for _ in range(_RANDOM_DRAWS)]
    values = [rng.uniform(lo, hi) for _ in range(_RANDOM_DRAWS)]
    return [_quantize(v, args[2]) for v in values] if name == "quniform" else values


def _field_type(path: str) -> Any:
    """The annotation of ``ReconstructJobConfig`` field ``path`` (``X | None`` -> X), or None."""
    tp: Any = ReconstructJobConfig
    for part in path.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # X | None
    return tp


def _lookup(tree: dict, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def validate_space(space: dict, preset: str | None, base_overrides: list[str] = (),
                   where: str = "space") -> None:
    """Check every path and distribution of ``space`` against ``preset`` + ``base_overrides``.

    Each path is built into a full config at its distribution's low, middle and high values and
    at seeded random draws (the same draws of all paths also together), so unknown paths and
    values of the wrong type or range fail here, naming the path.
    """
    if preset is not None and preset not in presets():
        raise SearchSpaceError(f"preset: unknown preset {preset!r}; choose one of "
                               f"{', '.join(presets())}")
    try:
        base = to_dict(load_job_config(preset, [], base_overrides))
    except ConfigError as e:
        raise SearchSpaceError(f"overrides: {e}") from None
    if not isinstance(space, dict):
        raise SearchSpaceError(f"{where} must map dotted paths to distributions, got {space!r}")
    parsed: dict[str, tuple[str, int | None, list]] = {}
    drawn: dict[str, list] = {}
    seen: dict[tuple[str, int | None], str] = {}
    rng = random.Random(0)  # the same checks on every start
    for key, spec in space.items():
        path, index = _parse_key(key, where)
        if (path, index) in seen:
            raise SearchSpaceError(f"{where} '{key}': the same entry as '{seen[path, index]}'; "
                                   "keep one")
        clash = [k for (p, i), k in seen.items() if p == path and (i is None or index is None)]
        if clash:
            raise SearchSpaceError(f"{where} '{key}': '{clash[0]}' already sweeps '{path}' "
                                   "(whole value vs. entry); keep one")
        seen[path, index] = key
        name, args = _parse_distribution(where, key, spec, allow_grid=where == "space")
        if index is not None:
            _check_entry(where, key, path, index, base, preset, base_overrides)
        parsed[key] = (name, index, args)
        drawn[key] = _draws(name, args, rng)
        values = [*_representatives(name, args), *drawn[key]]
        if index is None and _field_type(path) is int:
            odd = next((v for v in values if _number(v) and not float(v).is_integer()), None)
            if odd is not None:
                raise SearchSpaceError(
                    f"{where} '{key}': {name} draws non-integers (e.g. {odd:.4g}) but {path} "
                    "expects an integer; use randint, or quniform with a whole-number q")
        for value in values:
            try:
                load_job_config(preset, [], [*base_overrides, *trial_overrides({key: value}, base)])
            except ConfigError as e:
                at = "" if str(e).startswith("unknown") else f" (at {name} value {value!r})"
                raise SearchSpaceError(f"{where} '{key}': {e}{at}") from None
    for end, pick in (("lowest", 0), ("highest", -1)):
        sample = {k: _representatives(n, a)[pick] for k, (n, _, a) in parsed.items()}
        try:
            load_job_config(preset, [], [*base_overrides, *trial_overrides(sample, base)])
        except ConfigError as e:
            raise SearchSpaceError(f"{where}: the {end} values of all paths together give an "
                                   f"invalid config: {e}") from None
    for i in range(_RANDOM_DRAWS if len(parsed) > 1 else 0):
        sample = {k: d[i] for k, d in drawn.items()}
        try:
            load_job_config(preset, [], [*base_overrides, *trial_overrides(sample, base)])
        except ConfigError as e:
            shown = ", ".join(f"{k}={v:.4g}" if _number(v) else f"{k}={v!r}"
                              for k, v in sample.items())
            raise SearchSpaceError(f"{where}: values drawn together ({shown}) give an invalid "
                                   f"config: {e}") from None


def _check_entry(where: str, key: str, path: str, index: int, base: dict, preset: str | None,
                 base_overrides: list[str]) -> None:
    """``path[index]`` needs a list at ``path`` in the base config, long enough."""
    try:
        value = _lookup(base, path)
    except KeyError:
        try:  # the builder's message lists the valid keys
            load_job_config(preset, [], [*base_overrides, f"{path}=0"])
        except ConfigError as e:
            raise SearchSpaceError(f"{where} '{key}': {e}") from None
        raise SearchSpaceError(f"{where} '{key}': unknown config path '{path}'") from None
    if not isinstance(value, list):
        example = f"[0, {value}, {value}, 1000]" if _number(value) else "[0, 0.1, 1.0, 1000]"
        raise SearchSpaceError(f"{where} '{key}': '{path}' is {value!r}, not a schedule list; set "
                               f"it in overrides first, e.g. {path}={example}")
    if index >= len(value):
        names = ", ".join(_SCHEDULE_ENTRIES[: len(value)]) if len(value) in (4, 5) else ""
        raise SearchSpaceError(f"{where} '{key}': index {index} is out of range for {path} = "
                               f"{value} (0..{len(value) - 1}{': ' + names if names else ''})")


# ---------------------------------------------------------------------------- Tune


def tune_key(key: str) -> str:
    """The Tune/MLflow-safe name of a space key: ``a.b[2]`` -> ``a.b.2``."""
    path, index = _parse_key(key, "space")
    return path if index is None else f"{path}.{index}"


def to_tune_space(space: dict) -> dict:
    """``{tune_key(path): ray.tune domain}`` for ``Tuner(param_space=...)``.

    ``grid`` becomes ``tune.grid_search`` (every value in every sample); ``randint`` excludes
    its high end, as ``tune.randint``.
    """
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform,
              "quniform": tune.quniform, "randint": tune.randint}
    out = {}
    for key, spec in space.items():
        name, args = _parse_distribution("space", key, spec)
        if name == "choice":
            out[tune_key(key)] = tune.choice(args)
        elif name == "grid":
            out[tune_key(key)] = tune.grid_search(args)
        elif name == "randint":
            out[tune_key(key)] = tune.randint(int(args[0]), int(args[1]))
        else:
            out[tune_key(key)] = makers[name](*args)
    return out


def to_tune_mutations(mutations: dict) -> dict:
    """PBT ``hyperparam_mutations``: domains for ranges, plain lists for ``choice``.

    PBT perturbs a domain's value by x0.8 / x1.2 but shifts a list's value to a neighbour, which
    is what a categorical needs (strings cannot be multiplied).
    """
    out = {}
    for key, spec in mutations.items():
        name, args = _parse_distribution("scheduler.hyperparam_mutations", key, spec,
                                         allow_grid=False)
        if name == "choice":
            out[tune_key(key)] = list(args)
        else:
            out.update(to_tune_space({key: spec}))
    return out


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


# ---------------------------------------------------------------------------- trials


_ENTRIES = object()  # placeholder for a path whose value is assembled from entries


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python numbers, recursively."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def trial_overrides(sampled: dict, base: ReconstructJobConfig | dict | None = None) -> list[str]:
    """A trial's Tune config -> ``["recon.weights.entropy=0.03", ...]`` for ``load_job_config``.

    Keys are space keys in either form (``a.b[2]`` or Tune's ``a.b.2``). Schedule entries are
    written back as the whole list of ``base`` (the preset with the fixed overrides) with the
    sampled entries replaced, several entries of one path in one override. Values are JSON,
    which the override parser reads back exactly (YAML flow syntax).
    """
    whole: dict[str, Any] = {}
    entries: dict[str, dict[int, Any]] = {}
    for key, value in sampled.items():
        path, index = _parse_key(key, "trial config")
        if index is None:
            if path in entries:
                raise SearchSpaceError(f"trial config sets both '{path}' and entries of it; "
                                       "keep one")
            whole[path] = _plain(value)
        else:
            entries.setdefault(path, {})[index] = _plain(value)
            whole.setdefault(path, _ENTRIES)  # keeps the order of first appearance
    out = []
    for path, value in whole.items():
        if path in entries:
            if value is not _ENTRIES:
                raise SearchSpaceError(f"trial config sets both '{path}' and entries of it; "
                                       "keep one")
            if base is None:
                raise SearchSpaceError(f"trial config '{path}' has schedule entries; pass "
                                       "base= (the preset with the fixed overrides)")
            tree = to_dict(base) if dataclasses.is_dataclass(base) else base
            try:
                value = list(_lookup(tree, path))
            except (KeyError, TypeError):
                raise SearchSpaceError(f"trial config '{path}': no schedule list at this path in "
                                       "the base config; set it in overrides") from None
            for index, v in sorted(entries[path].items()):
                if index >= len(value):
                    raise SearchSpaceError(f"trial config '{path}[{index}]': index out of range "
                                           f"for {value}")
                value[index] = v
        out.append(f"{path}={json.dumps(value)}")
    return out
