"""rf_core.files.run_folder: rf deletes only what it wrote, outputs appear at once, one writer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rf_core.errors import InUseError, OutputError
from rf_core.files.run_folder import (
    MARKER,
    FolderLock,
    check_output_path,
    check_removable,
    claim_files,
    foreign_files,
    lock_path,
    remove_folder,
    replace_folder,
    staged_folder,
    write_marker,
)


def _ours(folder, kind="reconstruct", files=("a.txt", "sub/b.txt")):
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text(f)
    write_marker(folder, kind)
    return folder


def test_marker_lists_every_file_rf_wrote(tmp_path):
    run = _ours(tmp_path / "run")
    marker = json.loads((run / MARKER).read_text())
    assert marker["kind"] == "reconstruct" and marker["files"] == ["a.txt", "sub/b.txt"]
    assert foreign_files(run) == []
    (run / "keep.txt").write_text("mine")
    assert foreign_files(run) == ["keep.txt"]
    claim_files(run, ["keep.txt"])
    assert foreign_files(run) == []


def test_folders_without_marker_or_with_added_files_are_never_removed(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "duck.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="not written by rf"):
        remove_folder(user)
    assert (user / "duck.png").exists()

    run = _ours(tmp_path / "run")
    (run / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"files rf did not write \(sub/notes.txt\)"):
        remove_folder(run)
    assert (run / "sub" / "notes.txt").read_text() == "mine"

    gt = _ours(tmp_path / "gt", kind="gt")
    with pytest.raises(OutputError, match="rf gt folder, not a reconstruct"):
        check_removable(gt, kinds=("reconstruct",))

    empty = tmp_path / "empty"
    empty.mkdir()
    remove_folder(empty)  # nothing to lose
    assert not empty.exists()
    remove_folder(_ours(tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


def test_replace_folder_swaps_in_and_refuses_foreign_targets(tmp_path):
    old = _ours(tmp_path / "out", files=("old.txt",))
    new = _ours(tmp_path / "new", files=("new.txt",))
    replace_folder(new, old)
    assert sorted(p.name for p in old.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (old / "keep.txt").write_text("mine")
    again = _ours(tmp_path / "again", files=("x.txt",))
    with pytest.raises(OutputError, match="keep.txt"):
        replace_folder(again, old)
    assert (old / "keep.txt").exists() and (again / "x.txt").exists()


def test_staged_folder_leaves_the_old_folder_untouched_on_failure(tmp_path):
    out = _ours(tmp_path / "run", files=("mesh.glb", "orbit.mp4"))
    before = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RuntimeError), staged_folder(out, "reconstruct", copy_from=out) as stage:
        (stage / "orbit.mp4").unlink()
        (stage / "orbit.mp4").write_text("new video")
        raise RuntimeError("mesh extraction failed")
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    with staged_folder(out, "reconstruct", copy_from=out) as stage:
        (stage / "orbit.mp4").unlink()  # a hard link: unlink before writing, never write into
        (stage / "orbit.mp4").write_text("new video")
    assert (out / "orbit.mp4").read_text() == "new video"
    assert foreign_files(out) == []


def test_check_output_path(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "duck.png").write_bytes(b"x")
    for out in (photos, photos / "results", tmp_path):
        with pytest.raises(OutputError, match="overlaps the input"):
            check_output_path(out, [photos])
    with pytest.raises(OutputError, match="overlaps the input"):
        check_output_path(tmp_path, [photos / "duck.png"])
    check_output_path(tmp_path / "run", [photos / "duck.png", None, "pybullet_data:duck.obj"])

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "run")
    with pytest.raises(OutputError, match="exists and is a file"):
        check_output_path(tmp_path / "file")
    monkeypatch.setattr(os, "access", lambda *a: False)  # root ignores mode bits: simulate
    with pytest.raises(OutputError, match="not writable"):
        check_output_path(tmp_path / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_path_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(ro / "run")
    finally:
        ro.chmod(0o755)


def test_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path):
    out = tmp_path / "run"
    with FolderLock(out, "rf reconstruct"):
        with pytest.raises(InUseError) as err:
            FolderLock(out, "rf export").acquire()
        message = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "rf reconstruct" in message and "\n" not in message
    assert not lock_path(out).exists()
    with FolderLock(out) as again:  # released: free again
        assert json.loads(again.path.read_text())["pid"] == os.getpid()


_HOLD = """
import sys, time
from rf_core.files.run_folder import FolderLock
FolderLock(sys.argv[1], "rf reconstruct").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(InUseError, match=f"pid {proc.pid}"):
            FolderLock(out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(out).exists()  # left behind by the dead process
    t0 = time.perf_counter()
    with FolderLock(out, "rf reconstruct") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert time.perf_counter() - t0 < 1.0
