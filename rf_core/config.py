"""Typed configs: dataclasses built from YAML presets plus dotted overrides.

Every component keeps a ``XConfig`` dataclass next to its class. ``load_config``
merges presets (``rf_core/presets/*.yaml``), YAML files in order, then ``a.b.c=value``
overrides, and builds the dataclass tree, rejecting unknown keys and values of the wrong
type with one line that names the key and says what was expected. ``save_config`` writes
the resolved tree as plain YAML that ``load_config`` reads back.

This is the only module that imports ``yaml``: others read and write YAML text with
``parse_yaml`` and ``dump_yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from rf_core.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message says which key and how to fix it."""


def _finite(value: float, key: str) -> float:
    """``value`` if finite; inf and nan in a config only ever fail later, with a traceback."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    return value


def _reject_nonfinite_text(value: Any, key: str) -> None:
    """``inf``/``nan`` written without YAML's leading dot arrive as strings; say what they mean."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return
        _finite(number, key)


# ---------------------------------------------------------------------------- ranges


class Range(typing.NamedTuple):
    """Allowed interval of a numeric field (``None``: unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``<= 1`` or ``in (0, 1]``."""
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{self.lo:g}, "
                    f"{self.hi:g}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"

    def check(self, value: Any, key: str) -> None:
        """Raise ``ConfigError`` naming ``key`` if the number ``value`` lies outside."""
        if not self.contains(value):
            raise ConfigError(f"{key}: must be {self.describe()}, got {value!r}")


def bounded(default: Any, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> Any:
    """A dataclass field whose value (each item, for a list) must lie in ``[lo, hi]``.

    ``lo_open``/``hi_open`` exclude that end. ``build`` checks it after coercion; read it back
    with ``field_range``.
    """
    meta = {"range": Range(lo, hi, lo_open, hi_open)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_range(f: dataclasses.Field) -> Range | None:
    """The declared ``Range`` of a dataclass field (``bounded`` or ``schedule_field``), or None."""
    return f.metadata.get("range")


def check_ranges(cfg: Any) -> None:
    """Raise ValueError unless every ``bounded`` field of the dataclass ``cfg`` (not its
    nested configs, which check their own) lies in its range: for ``__post_init__``, so that
    a config built in code is held to the ranges that :func:`build` checks."""
    for f in dataclasses.fields(cfg):
        bounds = field_range(f)
        if bounds is None or f.metadata.get("schedule"):
            continue
        for key, value in _range_values(getattr(cfg, f.name), f.name, False):
            if not bounds.contains(value):
                raise ValueError(f"{key}: must be {bounds.describe()}, got {value!r}")


def _range_values(value: Any, key: str, schedule: bool) -> list[tuple[str, Any]]:
    """The ``(key, number)`` pairs a range applies to: the value, list items, schedule values."""
    if value is None or isinstance(value, bool):
        return []
    if schedule:
        if isinstance(value, (list, tuple)):
            return [(f"{key}[{i}]", float(value[i])) for i in (1, 2)]  # parse() read them
        return [(key, float(value))]
    if isinstance(value, (list, tuple)):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value) if _is_number(v)]
    return [(key, value)] if _is_number(value) else []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A value that may change with the training step.

    Written as a number (constant) or ``[start_step, start_value, end_value, end_step]``;
    before ``start_step`` it holds ``start_value``, after ``end_step`` ``end_value``,
    and in between it moves linearly, or geometrically when ``mode="log"``
    (threestudio's ``C()`` convention, with an explicit mode).
    """

    start_step: int = 0
    start_value: float = 0.0
    end_value: float = 0.0
    end_step: int = 0
    mode: str = "linear"

    @staticmethod
    def parse(spec: Any, key: str = "schedule") -> Schedule:
        """Build from a number, a 4-list, a 5-list ending in "linear"/"log", or a Schedule."""
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, bool):
            raise ConfigError(f"{key}: expected a number or [start_step, start, end, end_step]"
                              f", got {spec!r}")
        _reject_nonfinite_text(spec, key)
        if isinstance(spec, (int, float)):
            value = _finite(float(spec), key)
            return Schedule(0, value, value, 0)
        if isinstance(spec, (list, tuple)) and len(spec) in (4, 5):
            mode = spec[4] if len(spec) == 5 else "linear"
            # Numbers only: float("1") would let a quoted '1' through, int(2.7) would drop .7.
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in spec[:4]) \
                    or not (math.isfinite(spec[0]) and math.isfinite(spec[3])):
                raise ConfigError(f"{key}: schedule entries must be numbers, got {list(spec)}")
            v0 = _finite(float(spec[1]), f"{key}[1]")
            v1 = _finite(float(spec[2]), f"{key}[2]")
            for i in (0, 3):
                if not float(spec[i]).is_integer():
                    raise ConfigError(f"{key}[{i}]: a schedule step must be a whole number, "
                                      f"got {spec[i]!r}")
            s0, s1 = int(spec[0]), int(spec[3])
            if mode not in ("linear", "log"):
                raise ConfigError(f"{key}: schedule mode must be 'linear' or 'log', got {mode!r}")
            if s1 < s0:
                raise ConfigError(f"{key}: end_step {s1} is before start_step {s0}")
            if mode == "log" and (v0 <= 0 or v1 <= 0):
                raise ConfigError(f"{key}: a log schedule needs positive values, got {v0}, {v1}")
            return Schedule(s0, v0, v1, s1, mode)
        raise ConfigError(f"{key}: expected a number or [start_step, start_value, end_value, "
                          f"end_step(, 'linear'|'log')], got {spec!r}")

    def __call__(self, step: int) -> float:
        if step <= self.start_step or self.end_step == self.start_step:
            return self.start_value if step <= self.start_step else self.end_value
        if step >= self.end_step:
            return self.end_value
        t = (step - self.start_step) / (self.end_step - self.start_step)
        if self.mode == "log":
            return math.exp((1 - t) * math.log(self.start_value) + t * math.log(self.end_value))
        return (1 - t) * self.start_value + t * self.end_value

    def to_spec(self) -> float | list:
        if self.start_value == self.end_value:
            return self.start_value
        spec = [self.start_step, self.start_value, self.end_value, self.end_step]
        return spec + ["log"] if self.mode == "log" else spec


ScheduleSpec = Union[float, list]
"""Type of a config field that holds a schedule in its written form."""


def schedule_field(default: float | list, doc: str = "", *, lo: float | None = None,
                   hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A dataclass field holding a schedule spec (a number or a 4/5-list).

    ``lo``/``hi`` (as in ``bounded``) bound its start and end values.
    """
    factory = (lambda: list(default)) if isinstance(default, list) else (lambda: default)
    meta: dict = {"schedule": True, "doc": doc}
    if lo is not None or hi is not None:
        meta["range"] = Range(lo, hi, lo_open, hi_open)
    return dataclasses.field(default_factory=factory, metadata=meta)


# ---------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _schedule_spec(value: Any, key: str) -> float | list:
    """A valid schedule spec as plain Python numbers, as written (ints stay ints, so that
    ``[0, 8, 16, 2000]`` writes back the same; whole-number float steps become ints)."""
    Schedule.parse(value, key)  # validate; the config keeps the written form
    if not isinstance(value, (list, tuple)):
        return float(value)
    def number(v: Any) -> int | float:  # numpy scalars (Tune's samples) become Python's
        return int(v) if isinstance(v, numbers.Integral) else float(v)

    return [int(value[0]), number(value[1]), number(value[2]), int(value[3]), *value[4:]]


def _coerce(value: Any, tp: Any, key: str, schedule: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``; return the value in canonical form."""
    if schedule:
        return _schedule_spec(value, key)
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # ``X | None``: X's own message says more
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        _reject_nonfinite_text(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _finite(float(value), key)
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type[T], data: dict | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, strictly.

    Unknown keys, wrong types and non-finite floats raise ``ConfigError`` naming the dotted
    key. Missing keys take the dataclass defaults. ``__post_init__`` validation errors
    (``ValueError``) are re-raised as ``ConfigError`` with the key prefix; then each given
    value is checked against its field's declared range (``bounded``, ``schedule_field``).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys under "
                          f"'{prefix or '<root>'}': {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        parse = fields[name].metadata.get("parse")
        if parse is not None:  # a field with its own parser (e.g. precision names)
            kwargs[name] = parse(value, key)
            continue
        kwargs[name] = _coerce(value, hints[name], key, fields[name].metadata.get("schedule"))
    try:
        cfg = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    # After __post_init__, whose own (older, tested) messages take precedence.
    for name, value in kwargs.items():
        bounds = field_range(fields[name])
        if bounds is not None:
            key = f"{prefix}.{name}" if prefix else name
            for item_key, item in _range_values(value, key, fields[name].metadata.get("schedule")):
                bounds.check(item, item_key)
    return cfg


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain dicts/lists/scalars (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


# ---------------------------------------------------------------------------- merging


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; configs are full of such numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "the YAML text") -> Any:
    """Parse YAML ``text`` into plain Python objects; ``1e-3`` is a float (YAML 1.1: a string).

    Invalid YAML raises ``ConfigError``: "<source> is not valid YAML at line N".
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{where}") from None


def dump_yaml(obj: Any) -> str:
    """``obj`` (plain data or a config dataclass tree) as block-style YAML, keys in order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, others replace)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": value}}}``, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except ConfigError:  # not YAML: the text itself
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path``; ``ConfigError`` if it is missing, invalid or not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


# ---------------------------------------------------------------------------- presets

PRESETS_PACKAGE = "rf_core.presets"
"""Where the named presets live: one ``<name>.yaml`` each."""


def preset_names() -> list[str]:
    """Names of the presets shipped in ``rf_core/presets`` (``tiny``, ``realfusion``, ...)."""
    return sorted(p.name[:-5] for p in resources.files(PRESETS_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """The mapping in preset ``name``; ``ConfigError`` listing the presets if there is none.

    A preset whose top level has ``extends: OTHER`` is OTHER's mapping with its own merged
    over it."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    if name in _seen:
        raise ConfigError(f"preset {name} extends itself (through {' -> '.join(_seen)})")
    text = (resources.files(PRESETS_PACKAGE) / f"{name}.yaml").read_text()
    data = parse_yaml(text, f"preset {name}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    return data if parent is None else deep_merge(read_preset(str(parent), (*_seen, name)),
                                                  data)


# ---------------------------------------------------------------------------- the door


def load_config(cls: type[T], *, presets: str | typing.Sequence[str] | None = (),
                files: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = (),
                base: dict | None = None) -> T:
    """Build ``cls`` from ``base``, then ``presets`` (names), YAML ``files`` and dotted
    ``overrides``, each merged over the previous in order.
    """
    if isinstance(presets, str):
        presets = [presets]
    data = dict(base or {})
    for name in presets or ():
        data = deep_merge(data, read_preset(name))
    for f in files:
        data = deep_merge(data, read_yaml(f))
    for o in overrides:
        data = deep_merge(data, parse_override(o))
    return build(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as plain YAML (readable back by ``load_config``)."""
    Path(path).write_text(dump_yaml(cfg))


def build_schedules(cfg: Any, prefix: str = "") -> dict[str, Schedule]:
    """Every schedule field of the dataclass tree ``cfg`` as a ``Schedule``, by dotted path
    (``lr``, ``weights.sds``, ``sds.t_min``): build them once, evaluate them every step."""
    out: dict[str, Schedule] = {}
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if f.metadata.get("schedule"):
            out[key] = Schedule.parse(value, key)
        elif dataclasses.is_dataclass(value):
            out.update(build_schedules(value, f"{key}."))
    return out
