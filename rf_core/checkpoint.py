"""Self-describing checkpoints: ``config.yaml`` + ``state.safetensors`` + ``state.json``.

Any nested state (module and optimizer state dicts, generator states, counters) is split into
its tensors, stored in safetensors under dotted keys, and a JSON skeleton holding everything
else with ``{"__tensor__": key}`` placeholders. Nothing is pickled, so loading never runs code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested ``state`` into (tensors by dotted key, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(obj, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
                                 for i, (k, v) in enumerate(obj.items())]}
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]
            return {_TUPLE: items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key!r}")

    return tensors, walk(state, prefix or "state")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, v) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(unflatten_state(tensors, v) for v in skeleton[_TUPLE])
        return {unflatten_state(tensors, k): unflatten_state(tensors, v)
                for k, v in skeleton["__dict__"]}
    return skeleton


def save_checkpoint(folder: str | os.PathLike, state: Any, config_yaml: str) -> Path:
    """Write a checkpoint folder atomically: build it beside, then rename over ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    (tmp / "config.yaml").write_text(config_yaml)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | os.PathLike) -> tuple[Any, str]:
    """Read (state, config YAML text) from a checkpoint folder."""
    folder = Path(folder)
    for name in ("state.safetensors", "state.json", "config.yaml"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} is incomplete: {name} is missing")
    tensors = load_file(str(folder / "state.safetensors"))
    skeleton = json.loads((folder / "state.json").read_text())
    return unflatten_state(tensors, skeleton), (folder / "config.yaml").read_text()
