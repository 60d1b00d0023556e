"""Precision names, in one place: what ``auto``, ``fp32``/``no``, ``fp16`` and ``bf16`` mean.

Configs hold a canonical name (``auto``, ``fp32``, ``fp16``, ``bf16``). ``no`` (and YAML's
``false``, which is what a bare ``no`` parses to), ``none``, ``float32`` mean ``fp32``;
``half``/``float16`` and ``bfloat16`` are accepted too. ``auto`` is fp16 on CUDA and fp32
elsewhere: bf16 matmuls are slow on CPUs without AMX, and fp16 is what CUDA tensor cores and
the authors' ``--O`` runs use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)
_ALIASES = {"no": "fp32", "none": "fp32", "float32": "fp32", "false": "fp32", "off": "fp32",
            "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def parse_precision(value: Any, key: str = "precision") -> str:
    """A precision as written (a name or YAML ``false``) -> its canonical name."""
    from rf_core.config import ConfigError

    if value is False or value is None:
        return "fp32"
    if isinstance(value, str):
        name = value.strip().lower()
        name = _ALIASES.get(name, name)
        if name in PRECISIONS:
            return name
    raise ConfigError(f"{key}: unknown precision {value!r}; use auto, fp32 (or no), fp16 or bf16")


def precision_field(default: str = "auto") -> Any:
    """A dataclass field holding a precision name; ``rf_core.config.build`` parses it."""
    return dataclasses.field(default=default, metadata={"parse": parse_precision})


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype a precision name means on ``device`` (``auto``: fp16 on CUDA, else fp32)."""
    name = parse_precision(name)
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def autocast_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``name`` on ``device``, or None for plain fp32."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype
