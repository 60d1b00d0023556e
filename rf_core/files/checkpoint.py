"""Self-describing, verified checkpoints.

A checkpoint is a folder of four files:

- ``config.yaml``: the resolved config the state belongs to;
- ``state.safetensors``: every tensor of the state, under dotted keys;
- ``state.json``: everything else, with ``{"__tensor__": key}`` placeholders;
- ``manifest.json``: the format version, the step (when the state has one), each tensor's
  dtype, shape and sha256, and the sha256 of ``state.json`` and ``config.yaml``.

Any nested state (module and optimizer state dicts, generator states, counters) is split into
its tensors and a JSON skeleton. Nothing is pickled, so loading never runs code.

:func:`save_checkpoint` builds the folder beside ``folder`` and renames it into place, so a
crash leaves the previous checkpoint or the new one, never half of one. The checkpoint it
replaces is kept as ``.<name>.prev`` beside it (one, the latest replaced); older ones go.

:func:`load_checkpoint` checks the folder against its manifest before using it. Anything
wrong (a missing file, a truncated or corrupt ``state.safetensors``, a changed byte, a tensor
missing, extra or of another shape, a garbled ``state.json``) raises :class:`CheckpointError`
with one line naming the folder, the file or tensor, and what to do. When the kept earlier
checkpoint is sound, the message gives its step and the two commands that put it in place;
a caller that prefers to resume from it without asking passes ``fallback=True`` (a warning
says so). Folders written before manifests existed still load, without the hash checks.

A checkpoint travels between processes as bytes (:func:`pack_checkpoint`, an uncompressed tar
of the four files) and is put in place again, verified, by :func:`unpack_checkpoint`.
:func:`check_training_state` is the check every resumable loop makes before it loads a state:
its optimizer state fits the optimizer's parameters and its random generator states fit.

Fault points (``rf_core.files.fault_points``), under the name the caller gives
(``checkpoint`` for reconstructions): ``NAME.tensors_written`` (state.safetensors is in the
hidden folder), ``NAME.written`` (every file is, before the renames) and
``NAME.between_renames`` (the old folder moved to ``.prev``, the new one not yet in place).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rf_core.errors import UserError
from rf_core.files.fault_points import fault_point

FORMAT_VERSION = 1
"""Version of the manifest written by :func:`save_checkpoint`."""
MANIFEST = "manifest.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CONFIG = "config.yaml"

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DICT = "__dict__"
_START_OVER = "rerun with --overwrite to start over"


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used; ``str(err)`` is one line saying what is wrong and what to do."""


class _Broken(Exception):
    """What is wrong with one checkpoint folder, before the advice is added."""


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested ``state`` into (tensors by dotted key, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(obj, dict):
            return {_DICT: [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
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
                for k, v in skeleton[_DICT]}
    return skeleton


def previous_path(folder: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``.<name>.prev``."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.prev")


def save_checkpoint(folder: str | os.PathLike, state: Any, config_yaml: str,
                    name: str = "checkpoint") -> Path:
    """Write a checkpoint folder atomically, keeping the one it replaces as ``.<name>.prev``.
    ``name``: the prefix of its fault points (see the module docstring)."""
    folder = Path(folder)
    tmp = _fresh_tmp(folder)
    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(tmp / STATE_TENSORS))
    fault_point(f"{name}.tensors_written")
    skeleton_text = json.dumps(skeleton)
    (tmp / STATE_JSON).write_text(skeleton_text)
    (tmp / CONFIG).write_text(config_yaml)
    step = state.get("step") if isinstance(state, dict) else None
    manifest = {
        "format": "realfusion-ray checkpoint", "version": FORMAT_VERSION,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "tensors": {k: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": _digest(t)}
                    for k, t in tensors.items()},
        "files": {STATE_JSON: _sha256_bytes(skeleton_text.encode()),
                  CONFIG: _sha256_bytes(config_yaml.encode())},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return _publish(tmp, folder, name)


def _fresh_tmp(folder: Path) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, folder: Path, name: str) -> Path:
    """Put the complete folder ``tmp`` at ``folder``; the folder there becomes ``.prev``."""
    for file in tmp.iterdir():
        _fsync(file)  # on disk before the rename publishes them
    fault_point(f"{name}.written")
    prev = previous_path(folder)
    if folder.exists():
        _remove(prev)
        folder.rename(prev)
    fault_point(f"{name}.between_renames")
    tmp.rename(folder)
    return folder


def restore_previous(folder: str | os.PathLike) -> bool:
    """After a crash between :func:`save_checkpoint`'s two renames only ``.prev`` is there: put
    it back in place (it is the latest whole state). True when it did."""
    folder = Path(folder)
    prev = previous_path(folder)
    if folder.exists() or not prev.is_dir():
        return False
    prev.rename(folder)
    return True


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Remove a checkpoint, its kept previous one and any half-written one."""
    folder = Path(folder)
    for path in (folder, previous_path(folder), folder.with_name(f".{folder.name}.tmp")):
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pack_checkpoint(folder: str | os.PathLike, start_over: str = _START_OVER) -> bytes | None:
    """The checkpoint folder's files as bytes (None when there is no folder), to send to
    another process; :func:`unpack_checkpoint` puts them in place there. An unusable folder
    is a CheckpointError as :func:`load_checkpoint` raises it."""
    folder = Path(folder)
    if not folder.exists():
        return None
    load_checkpoint(folder, start_over=start_over)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in (STATE_TENSORS, STATE_JSON, CONFIG, MANIFEST):
            if (folder / file).is_file():
                data = (folder / file).read_bytes()
                info = tarfile.TarInfo(file)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _packed_files(data: bytes) -> dict[str, bytes]:
    """The files of :func:`pack_checkpoint`'s bytes (only a checkpoint's own names)."""
    files = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name in (STATE_TENSORS, STATE_JSON, CONFIG,
                                                       MANIFEST):
                    files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:
        raise CheckpointError(f"the checkpoint's bytes are not a packed checkpoint ({e})") \
            from None
    return files


def unpack_checkpoint(data: bytes, folder: str | os.PathLike, name: str = "checkpoint") -> Path:
    """Put :func:`pack_checkpoint`'s bytes in place at ``folder`` as :func:`save_checkpoint`
    does (atomically, the folder there kept as ``.prev``), once they load and verify;
    CheckpointError, one line, when they do not."""
    folder = Path(folder)
    files = _packed_files(data)
    tmp = _fresh_tmp(folder)
    for file, content in files.items():
        (tmp / file).write_bytes(content)
    try:
        _load(tmp)
    except _Broken as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"the checkpoint sent for {folder} is unusable: {err}") from None
    return _publish(tmp, folder, name)


def packed_step(data: bytes | None) -> int | None:
    """The step saved in :func:`pack_checkpoint`'s bytes (None: no bytes, or no step)."""
    if not data:
        return None
    try:
        step = json.loads(_packed_files(data).get(MANIFEST, b"{}")).get("step")
    except (CheckpointError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def load_checkpoint(folder: str | os.PathLike, fallback: bool = False,
                    start_over: str = _START_OVER) -> tuple[Any, str]:
    """Read (state, config YAML text) from a checkpoint folder, verified against its manifest.

    Raises :class:`CheckpointError` when the folder is unusable; its last words are
    ``start_over`` (how to start over). With ``fallback=True`` a sound earlier checkpoint
    (``.<name>.prev``, see :func:`previous_path`) is loaded instead, with a warning.
    """
    folder = Path(folder)
    try:
        return _load(folder)
    except _Broken as err:
        problem = str(err)
    prev = previous_path(folder)
    try:
        kept = _load(prev) if prev.is_dir() else None
    except _Broken:
        kept = None
    if kept is None:
        raise CheckpointError(f"checkpoint {folder} is unusable: {problem}; {start_over}")
    step = kept[0].get("step") if isinstance(kept[0], dict) else None
    earlier = f"an earlier checkpoint{f' from step {step}' if step is not None else ''}"
    if fallback:
        warnings.warn(f"checkpoint {folder} is unusable: {problem}; resuming from {earlier} "
                      f"kept at {prev}", RuntimeWarning, stacklevel=2)
        return kept
    raise CheckpointError(f"checkpoint {folder} is unusable: {problem}; {earlier} is kept at "
                          f"{prev}: to resume from it, run `rm -r {shlex.quote(str(folder))} && mv "
                          f"{shlex.quote(str(prev))} {shlex.quote(str(folder))}` and rerun, "
                          f"or {start_over}")


def check_training_state(state: dict, optimizer: torch.optim.Optimizer,
                         generators: Iterable[tuple[str, torch.Generator]],
                         bad: Callable[[str], Exception]) -> None:
    """Raise ``bad(problem)`` unless ``state["optimizer"]`` is a state dict of ``optimizer``
    (its parameter groups' sizes, every per-parameter tensor of its parameter's shape) and
    ``state[key]`` is a state of each ``(key, generator)``; checked before anything loads."""
    opt = state["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not isinstance(groups, list) or not isinstance(opt.get("state"), dict):
        raise bad("its 'optimizer' is not an optimizer state dict")
    ours = optimizer.param_groups
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in ours]:
        raise bad(f"its optimizer has parameter groups of sizes {sizes}, this model's are "
                  f"{[len(g['params']) for g in ours]}")
    params = [p for g in ours for p in g["params"]]
    for index, slots in opt["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise bad(f"its optimizer state names parameter {index!r}, this model has "
                      f"{len(params)}")
        for slot, value in (slots.items() if isinstance(slots, dict) else ()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and \
                    value.shape != params[index].shape:
                raise bad(f"tensor 'optimizer.state.{index}.{slot}' has shape "
                          f"{list(value.shape)}, this model expects "
                          f"{list(params[index].shape)}")
    for key, gen in generators:
        want, got = gen.get_state(), state[key]
        if not (isinstance(got, torch.Tensor) and got.dtype == want.dtype):
            raise bad(f"its {key!r} is not a random generator state")
        if got.shape != want.shape:
            raise bad(f"tensor {key!r} (a random generator state) has shape "
                      f"{list(got.shape)}, this model expects {list(want.shape)}")


# ---------------------------------------------------------------------------- verification


def _load(folder: Path) -> tuple[Any, str]:
    """Load and verify one folder; raise :class:`_Broken` with what is wrong."""
    if not folder.is_dir():
        raise _Broken("the folder is missing" if not folder.exists() else "it is not a folder")
    for name in (STATE_TENSORS, STATE_JSON, CONFIG):
        if not (folder / name).is_file():
            raise _Broken(f"{name} is missing")
    manifest = _read_manifest(folder) if (folder / MANIFEST).exists() else None
    try:
        skeleton_bytes = (folder / STATE_JSON).read_bytes()
        config_bytes = (folder / CONFIG).read_bytes()
    except OSError as e:
        raise _Broken(f"cannot read it ({e.strerror})") from None
    if manifest is not None:
        for name, data in ((STATE_JSON, skeleton_bytes), (CONFIG, config_bytes)):
            if _sha256_bytes(data) != manifest["files"].get(name):
                raise _Broken(f"{name} does not match its sha256 in {MANIFEST} (the file was "
                              "changed or is corrupt)")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Broken(f"{STATE_TENSORS} is truncated or corrupt ({reason})") from None
    if manifest is not None:
        _check_tensors(tensors, manifest["tensors"])
    try:
        skeleton = json.loads(skeleton_bytes.decode())
    except UnicodeDecodeError:
        raise _Broken(f"{STATE_JSON} is not text") from None
    except json.JSONDecodeError as e:
        raise _Broken(f"{STATE_JSON} is not valid JSON ({e.msg} at line {e.lineno} column "
                      f"{e.colno})") from None
    for key in _tensor_refs(skeleton):
        if key not in tensors:
            raise _Broken(f"tensor {key!r} named in {STATE_JSON} is missing from "
                          f"{STATE_TENSORS}")
    try:
        config_yaml = config_bytes.decode()
    except UnicodeDecodeError:
        raise _Broken(f"{CONFIG} is not text") from None
    try:
        state = unflatten_state(tensors, skeleton)
    except TypeError:  # e.g. a list where a dict key was
        raise _Broken(f"{STATE_JSON} is malformed (an unusable dict key)") from None
    return state, config_yaml


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Broken(f"{MANIFEST} is not valid JSON") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("tensors"), dict)
            and isinstance(manifest.get("files"), dict)):
        raise _Broken(f"{MANIFEST} lacks its 'tensors' or 'files' table")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _Broken(f"{MANIFEST} has format version {version!r}, newer than this rf reads "
                      f"({FORMAT_VERSION}); upgrade rf to load it")
    return manifest


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, dict]) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _Broken(f"tensor {missing[0]!r}{more} listed in {MANIFEST} is missing from "
                      f"{STATE_TENSORS}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise _Broken(f"{STATE_TENSORS} holds tensor {extra[0]!r}{more} that {MANIFEST} does "
                      "not list")
    for key, info in expected.items():
        t = tensors[key]
        if list(t.shape) != info.get("shape"):
            raise _Broken(f"tensor {key!r} in {STATE_TENSORS} has shape {list(t.shape)}, "
                          f"{MANIFEST} says {info.get('shape')}")
        if _dtype_name(t) != info.get("dtype"):
            raise _Broken(f"tensor {key!r} in {STATE_TENSORS} has dtype {_dtype_name(t)}, "
                          f"{MANIFEST} says {info.get('dtype')}")
        if _digest(t) != info.get("sha256"):
            raise _Broken(f"tensor {key!r} in {STATE_TENSORS} does not match its sha256 in "
                          f"{MANIFEST} (the file is corrupt)")


def _tensor_refs(skeleton: Any) -> list[str]:
    """The tensor keys a skeleton refers to; :class:`_Broken` when it is not one we wrote."""
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            if _TENSOR in node and isinstance(node[_TENSOR], str):
                refs.append(node[_TENSOR])
            elif _TUPLE in node and isinstance(node[_TUPLE], list):
                walk(node[_TUPLE])
            elif _DICT in node and isinstance(node[_DICT], list) and all(
                    isinstance(p, list) and len(p) == 2 for p in node[_DICT]):
                for pair in node[_DICT]:
                    walk(pair)
            else:
                raise _Broken(f"{STATE_JSON} is malformed (an object with keys "
                              f"{sorted(node)[:3]})")
        elif not (node is None or isinstance(node, (bool, int, float, str))):
            raise _Broken(f"{STATE_JSON} is malformed")

    walk(skeleton)
    return refs


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in C order (any dtype, bfloat16 and bool included)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
