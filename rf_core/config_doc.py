"""Every config key with its value and its help, for `rf config show`.

The help of a field is its attribute docstring (the string literal right below it in the
dataclass, as this project writes them) or a schedule field's ``doc``; read from the source
with ``ast``, so the docs live in one place.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from typing import Any

from rf_core.config import field_range, load_config, to_dict

__all__ = ["ConfigKey", "config_keys", "format_config_keys"]


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of a config tree."""

    key: str
    """Dotted path, as overrides spell it (``recon.weights.entropy``)."""
    value: Any
    type: str
    help: str


@functools.cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, from the string literals below its fields."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_text(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _walk(cls: type, data: dict, prefix: str) -> list[ConfigKey]:
    hints = typing.get_type_hints(cls)
    docs = {}
    for base in reversed(cls.__mro__):  # a subclass's doc wins
        if dataclasses.is_dataclass(base):
            docs.update(_attribute_docs(base))
    out: list[ConfigKey] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(tp) and isinstance(data.get(f.name), dict):
            out += _walk(tp, data[f.name], key + ".")
            continue
        text = docs.get(f.name) or f.metadata.get("doc", "")
        rng = field_range(f)
        if rng is not None:
            text = f"{text} ({rng.describe()})".strip()
        if f.metadata.get("schedule"):
            text = (f"{text} A schedule: a number, or [start_step, v0, v1, end_step(, log)]."
                    ).strip()
        out.append(ConfigKey(key, data.get(f.name), _type_text(tp), text))
    return out


def config_keys(cls: type, preset: str | None = None) -> list[ConfigKey]:
    """Every leaf of config class ``cls`` with its value under ``preset`` (the dataclass
    defaults when None), in declaration order."""
    cfg = load_config(cls, presets=[preset] if preset else [])
    return _walk(cls, to_dict(cfg), "")


def format_config_keys(keys: list[ConfigKey], width: int = 100) -> str:
    """``key = value  (type)`` then the help indented below, one key after the other."""
    lines = []
    for k in keys:
        value = json.dumps(k.value) if not isinstance(k.value, str) else k.value
        lines.append(f"{k.key} = {value}  ({k.type})")
        if k.help:
            lines += textwrap.wrap(k.help, width, initial_indent="    ",
                                   subsequent_indent="    ")
    return "\n".join(lines)
