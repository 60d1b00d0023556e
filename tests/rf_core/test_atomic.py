"""rf_core.files.atomic: files and folders appear whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from rf_core.files.atomic import (
    atomic_dir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_writes_replace_the_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1} and path.read_text().endswith("\n")
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert _hidden(tmp_path) == []


def test_the_writer_sees_a_temporary_with_the_same_suffix(tmp_path):
    seen = []
    atomic_write(tmp_path / "clip.mp4", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"v")))
    assert seen[0].suffix == ".mp4" and seen[0].parent == tmp_path
    assert seen[0].name.startswith(".") and not seen[0].exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and _hidden(tmp_path) == []


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "ckpt").exists()
    assert (tmp_path / "ckpt" / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "other") as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("crash")
    assert not (tmp_path / "other").exists() and _hidden(tmp_path) == []
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "ckpt"):
        raise AssertionError("atomic_dir must refuse an existing folder before its body")
    assert os.listdir(tmp_path / "ckpt") == ["a.txt"]
