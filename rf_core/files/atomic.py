"""Files and folders that appear whole: readers see the old version or the new one, never a part.

Every temp-then-rename write in rf goes through here:

    atomic_write_text(run / "metrics.json", text)
    atomic_write(out / "table.csv", lambda tmp: frame.to_csv(tmp))   # any writer that takes a path
    with atomic_dir(ckpt) as tmp:                                    # a folder built in one go
        save_file(tensors, tmp / "state.safetensors")

The temporary lies beside the target (same file system, so the rename is atomic) under a hidden,
unique name, and is removed if the write fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object],
                 mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` on a hidden temporary beside ``path``, then rename it to ``path``.

    ``tmp`` keeps ``path``'s suffix, so writers that pick a format from it (imageio, trimesh,
    matplotlib) behave as they would on ``path``.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name points at them
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj, **dumps) -> Path:
    """Write ``obj`` as indented JSON (plus a newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a new folder in a hidden sibling; on success it becomes ``path`` in one rename.

    ``path`` must not exist yet (replacing a folder rf wrote is ``run_folder.replace_folder``'s
    job, which first checks that nothing of the user's is inside). On failure the sibling is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
