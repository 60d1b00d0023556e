"""Output folders that never lose a user's file: markers, atomic replacement, locks.

The rules every command follows:

- A folder rf writes as a whole (a run, a partial run, ground-truth views, a dataset object)
  carries :data:`MARKER` (``.rf-run.json``), listing its kind and every file rf wrote into it.
- rf removes or replaces a folder only when it carries the marker *and* holds nothing else: a
  file the user added (``keep.txt``) makes the folder not ours to delete, and the command stops
  with one line saying so.
- An output never overlaps an input (``rf dataset DIR --out DIR`` is refused).
- Outputs appear at once: they are built in a hidden sibling and swapped in by one rename
  (Linux ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else two renames that put the
  old folder back on failure).
- A folder being written is locked through ``.NAME.lock`` beside it (``flock``: the kernel drops
  the lock of a dead process, so a crashed run never blocks the next one). A second writer is
  refused at once with the holder's PID, host and command.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rf_core.errors import InUseError, OutputError
from rf_core.files.atomic import atomic_write_json
from rf_core.files.fault_points import fault_point

MARKER = ".rf-run.json"


# ---------------------------------------------------------------------------- markers


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not p.is_dir() and p.name != MARKER)


def write_marker(folder: str | os.PathLike, kind: str, **extra) -> None:
    """Claim ``folder`` as rf's: record its kind and every file now in it."""
    folder = Path(folder)
    atomic_write_json(folder / MARKER, {"kind": kind, "version": 1, "files": _files(folder),
                                        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def claim_files(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add files rf just wrote into a marked ``folder`` to its marker (no-op when unmarked)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return
    marker["files"] = sorted(set(marker["files"]) | set(names))
    atomic_write_json(folder / MARKER, marker)


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of ``folder``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in ``folder`` that rf did not write (all of them when it carries no marker)."""
    folder = Path(folder)
    marker = read_marker(folder)
    known = set(marker["files"]) if marker else set()
    return [f for f in _files(folder) if f not in known]


def check_removable(folder: str | os.PathLike, kinds: Iterable[str] | None = None,
                    exact: bool = True) -> None:
    """Raise :class:`OutputError` unless rf may delete ``folder`` (ours, nothing added).

    ``exact=False`` skips the check for added files, for work folders rf keeps writing into
    (a partial run), whose marker only claims the folder.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise OutputError(f"{folder} is not a folder rf wrote; rf replaces only its own "
                          "folders: choose another output or remove it yourself")
    if not any(folder.iterdir()):
        return  # an empty folder holds nothing to lose
    marker = read_marker(folder)
    if marker is None:
        raise OutputError(f"{folder} was not written by rf (it has no {MARKER}); rf deletes "
                          "only its own folders: choose another output or remove it yourself")
    if kinds is not None and marker.get("kind") not in set(kinds):
        raise OutputError(f"{folder} holds an rf {marker.get('kind')} folder, not a "
                          f"{' or '.join(kinds)}; choose another output")
    extra = foreign_files(folder) if exact else []
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise OutputError(f"{folder} holds files rf did not write ({shown}); move them out "
                          "first, or choose another output")


def remove_folder(folder: str | os.PathLike, kinds: Iterable[str] | None = None,
                  exact: bool = True) -> None:
    """Delete ``folder`` if, and only if, :func:`check_removable` allows it."""
    folder = Path(folder)
    check_removable(folder, kinds, exact)
    if folder.exists():
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------- swapping in


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_folder(src: str | os.PathLike, dst: str | os.PathLike,
                   kinds: Iterable[str] | None = None) -> Path:
    """Put folder ``src`` at ``dst`` at once; an existing ``dst`` must be removable by rf."""
    fault_point("folder.before_swap")
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    check_removable(dst, kinds)
    if _exchange(src, dst):
        fault_point("folder.after_swap")
        shutil.rmtree(src)  # src now holds the old folder
        return dst
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / "x")
    try:
        os.replace(src, dst)
    except OSError:
        os.replace(old / "x", dst)
        raise
    fault_point("folder.after_swap")
    shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, kind: str, *, copy_from: str | os.PathLike | None
                  = None, kinds: Iterable[str] | None = None, **marker) -> Iterator[Path]:
    """Build a folder in a hidden sibling; on success mark it and swap it in for ``final``.

    ``copy_from`` starts the stage as a copy of that folder (hard links where possible, so a
    re-export of a large run costs nothing), for commands that update a finished folder. On
    an exception the stage is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.stage-", dir=final.parent))
    try:
        if copy_from is not None:
            os.rmdir(stage)
            shutil.copytree(copy_from, stage, copy_function=_link_or_copy, symlinks=True)
        yield stage
        write_marker(stage, kind, **marker)
        replace_folder(stage, final, kinds)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    fault_point("folder.linking")


# ---------------------------------------------------------------------------- checking paths


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      flag: str = "--out", folder: bool = True) -> Path:
    """Refuse an output that overlaps an input or cannot be written, before any work.

    ``inputs``: files or folders the command reads. An output equal to, inside, or holding
    one of them is refused (``--overwrite`` would delete them).
    """
    out = Path(out)
    resolved = out.resolve()
    for inp in inputs:
        if inp is None or ":" in str(inp) and not Path(inp).exists():  # e.g. pybullet_data:X
            continue
        src = Path(inp).resolve()
        if _within(src, resolved) or (src.is_dir() and _within(resolved, src)):
            raise OutputError(f"{flag} {out} overlaps the input {inp}; choose an output "
                              "outside your inputs")
    if out.exists():
        if folder and not out.is_dir():
            raise OutputError(f"{flag} {out} exists and is a file, not a folder; choose "
                              "another output")
        if not folder and out.is_dir():
            raise OutputError(f"{flag} {out} is a folder; give a file name")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {flag} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {flag} {out}: {parent} is not writable (permission "
                          "denied); choose another output")
    if out.exists() and not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot replace {flag} {out}: {resolved.parent} is not writable")
    return out


# ---------------------------------------------------------------------------- locks


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


class FolderLock:
    """Exclusive writer lock on an output (``with FolderLock(out, "rf reconstruct"):``).

    Held through ``flock`` on ``.NAME.lock`` beside the output, so the kernel releases it when
    its process dies: a crashed run's lock is simply taken over by the next one. The lock file
    holds the owner's PID, host and command, for the refusal message.
    """

    def __init__(self, target: str | os.PathLike, command: str = "rf"):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.command = command
        self._fd: int | None = None
        self._made: list[Path] = []
        """Folders the lock created for itself, deepest first: removed again if left empty."""

    def acquire(self) -> FolderLock:
        made, parent = [], self.path.parent.absolute()
        while not parent.exists() and parent != parent.parent:
            made.append(parent)
            parent = parent.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = made
        try:
            return self._take()
        except BaseException:
            self._remove_made()
            raise

    def _take(self) -> FolderLock:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise InUseError(f"{self.target} is in use by {holder}; wait for it to finish "
                                 "or stop it, or choose another output") from None
            except OSError:
                os.close(fd)
                raise
            try:  # the previous holder may have removed the file between open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                info = {"pid": os.getpid(), "host": socket.gethostname(),
                        "command": self.command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
                return self
            os.close(fd)
        raise InUseError(f"{self.target}: could not take its lock {self.path}; retry")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it, so no one locks a removed file
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        """A command that stopped before writing its output leaves no empty folders behind."""
        for folder in self._made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, since "
            f"{info.get('since')})")
