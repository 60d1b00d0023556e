"""Names and values MLflow accepts: metric/param keys, param text, numeric metrics of a report."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KEY_LIMIT",
    "PARAM_VALUE_LIMIT",
    "TUNE_KEYS",
    "flatten_config",
    "numeric_metrics",
    "result_step",
    "sanitize_name",
    "short_labels",
    "short_value",
    "trial_run_name",
    "value_text",
]

PARAM_VALUE_LIMIT = 6000
"""mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in mlflow 3.x; longer values are an error
unless MLFLOW_TRUNCATE_LONG_VALUES is set, so :func:`flatten_config` cuts them first."""
KEY_LIMIT = 250
"""mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH: the longest metric, param or tag key (and
the longest run name we make)."""
TUNE_KEYS = frozenset(
    "done trial_id experiment_tag date timestamp hostname node_ip pid config time_this_iter_s "
    "time_total_s time_since_restore timesteps_since_restore iterations_since_restore "
    "training_iteration timesteps_total episodes_total checkpoint_dir_name should_checkpoint "
    "step".split()
)
"""Keys Tune adds to every report (ray.tune.result.AUTO_RESULT_KEYS and friends): bookkeeping,
not measurements. ``step`` is the x axis of the others."""


def sanitize_name(name: str) -> str:
    """A metric/param key MLflow accepts: ASCII alphanumerics and ``_ - . space /`` (others
    become ``_``), no empty, ``.`` or ``..`` path parts (MLflow treats names as paths)."""
    cleaned = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))
    parts = ["_" if p.strip() in (".", "..") else p for p in cleaned.split("/") if p]
    return ("/".join(parts) or "_")[:KEY_LIMIT]


def value_text(value: Any) -> str:
    """One config value as param text: strings as they are, ``None``/bools in their YAML/JSON
    spelling (``null``, ``true``), lists as JSON, Tune search spaces as
    ``Float(0.0001, 0.1) LogUniform``."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=value_text)
    if hasattr(value, "domain_str"):  # a Tune search space
        sampler = str(value.get_sampler()) if hasattr(value, "get_sampler") else ""
        return f"{type(value).__name__}{value.domain_str}" + (
            f" {sampler}" if " object at " not in sampler else ""
        )
    return str(value)


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "text"}`` for MLflow params.

    Lists are their JSON text (``[0, 0.1, 1, 1000]``, also valid YAML), ``None``/bools are
    ``null``/``true``/``false``, and every value is cut to :data:`PARAM_VALUE_LIMIT`
    characters (ending in ``...`` when cut).
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name))
            continue
        text = "{}" if isinstance(value, Mapping) else value_text(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        out[sanitize_name(name)] = text
    return out


def numeric_metrics(d: Mapping[str, Any], prefix: str = "",
                    skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Numbers of a nested dict under dotted, sanitized keys; bools and text are left out, and
    so are the top-level keys in ``skip`` (e.g. :data:`TUNE_KEYS`)."""
    out: dict[str, float] = {}
    for key, value in d.items():
        if not prefix and key in skip:
            continue
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[sanitize_name(name)] = float(value)
    return out


def result_step(result: Mapping[str, Any] | None) -> int:
    """The step of a Tune report: its ``step``, else ``training_iteration``, else 0."""
    result = result or {}
    step = result.get("step", result.get("training_iteration", 0))
    return int(step) if isinstance(step, numbers.Real) and math.isfinite(step) else 0


def short_labels(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix naming each key uniquely, for run names:
    ``recon.weights.entropy`` -> ``entropy``; an index keeps its list's name
    (``recon.lr.1`` -> ``lr[1]``)."""

    def label(key: str, depth: int) -> str:
        parts = key.split(".")
        while depth < len(parts) and parts[-depth].isdigit():
            depth += 1  # an index alone says nothing
        tail = parts[-depth:]
        text = tail[0]
        for part in tail[1:]:
            text += f"[{part}]" if part.isdigit() else f".{part}"
        return text

    depth = dict.fromkeys(keys, 1)
    while True:
        labels = {k: label(k, depth[k]) for k in keys}
        clashes = {k for k in keys if list(labels.values()).count(labels[k]) > 1}
        grow = {k for k in clashes if depth[k] < len(k.split("."))}
        if not grow:
            return labels
        for k in grow:
            depth[k] += 1


def short_value(value: Any) -> str:
    """A sampled value for a run name: 4 significant digits, a float keeps its point
    (``1.0``, ``0.01235``, ``3e-05``); other values as :func:`value_text`."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        text = f"{float(value):.4g}"
        return text if any(c in text for c in ".einf") else text + ".0"
    return value_text(value)


def trial_run_name(config: Mapping[str, Any], fallback: str) -> str:
    """A trial's run name from its sampled values: ``entropy=1.0 normal_smooth=0.1``
    (``fallback`` when nothing is sampled)."""
    flat = flatten_config(config) if config else {}
    if not flat:
        return fallback[:KEY_LIMIT]
    values = _flat_values(config)
    labels = short_labels(list(flat))
    return " ".join(f"{labels[k]}={short_value(values.get(k, flat[k]))}"
                    for k in flat)[:KEY_LIMIT]


def _flat_values(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flat_values(value, name))
        else:
            out[sanitize_name(name)] = value
    return out
