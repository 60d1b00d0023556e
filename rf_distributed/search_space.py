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
from typing import Any

from rf_core.config import ConfigError, preset_names, to_dict
from rf_core.jobs.job_config import ReconstructJobConfig, load_job_config

__all__ = [
    "SearchSpaceError",
    "SCHEDULER_KEYS",
    "TIME_ATTR",
    "finite_number",
    "parse_distribution",
    "representatives",
    "to_tune_mutations",
    "to_tune_space",
    "trial_overrides",
    "tune_key",
    "validate_space",
]

_ARGS = {"uniform": "[low, high]", "loguniform": "[low, high]", "quniform": "[low, high, q]",
         "randint": "[low, high] (high excluded)", "choice": "[v1, v2, ...]",
         "grid": "[v1, v2, ...]"}
_NUM_ARGS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}
_SCHEDULE_ENTRIES = ("start_step", "start_value", "end_value", "end_step", "mode")
SCHEDULER_KEYS = {
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


def finite_number(v: Any) -> bool:
    """A real number that is not inf or nan (which Ray and the schedulers choke on later)."""
    return _number(v) and math.isfinite(v)


def parse_distribution(where: str, key: str, spec: Any, allow_grid: bool = True
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
    if not all(finite_number(a) for a in args):
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


def representatives(name: str, args: list) -> list:
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
    if preset is not None and preset not in preset_names():
        raise SearchSpaceError(f"preset: unknown preset {preset!r}; choose one of "
                               f"{', '.join(preset_names())}")
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
        name, args = parse_distribution(where, key, spec, allow_grid=where == "space")
        if index is not None:
            _check_entry(where, key, path, index, base, preset, base_overrides)
        parsed[key] = (name, index, args)
        drawn[key] = _draws(name, args, rng)
        values = [*representatives(name, args), *drawn[key]]
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
        sample = {k: representatives(n, a)[pick] for k, (n, _, a) in parsed.items()}
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
        name, args = parse_distribution("space", key, spec)
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
        name, args = parse_distribution("scheduler.hyperparam_mutations", key, spec,
                                         allow_grid=False)
        if name == "choice":
            out[tune_key(key)] = list(args)
        else:
            out.update(to_tune_space({key: spec}))
    return out


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
