"""No command deletes or changes a file it did not write, and outputs appear whole.

Each case is one that lost a user's data before: `--overwrite` on a folder rf did not write,
`--out` overlapping the inputs, a failed `rf export`, two writers on one run folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rf_cli.main import main
from rf_core.files.run_folder import MARKER, FolderLock
from rf_core.fitting.engine import StopAfter
from tests.rf_core.test_reconstruct_job import SMALL as JOB_SMALL

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "duck.png"
# test_reconstruct_job's tiny run, shorter, logging every step and checkpointing every other.
SMALL = [*JOB_SMALL, "recon.steps=4", "recon.renderer.num_samples=16", "export.mesh_resolution=16",
         "checkpoint_every=2", "log_every=1"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 (rf's own lock files aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def one_error_line(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if not line.startswith("rf: note:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("rf: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RF_QUIET", "1")  # progress bars write to stderr


@pytest.fixture
def user_folder(tmp_path):
    """A folder of the user's: a photo and notes."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "duck.png").write_bytes(EXAMPLE.read_bytes())
    (folder / "keep.txt").write_text("my notes")
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished tiny run (shared; tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("run")
    out = root / "run"
    code = main(["reconstruct", str(EXAMPLE), "--preset", "tiny", "--invert", "--out", str(out),
                 *SMALL])
    assert code == 0
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_reconstruct_overwrite_never_deletes_a_users_folder(tmp_path, user_folder, capsys):
    before = snapshot(user_folder)
    code, _, err = run(["reconstruct", EXAMPLE, "--preset", "tiny", "--invert", "--out",
                        user_folder, "--overwrite", *SMALL], capsys)
    one_error_line(code, err, str(user_folder), "not written by rf")
    assert snapshot(user_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial folder either


def test_reconstruct_out_overlapping_the_input_is_refused(tmp_path, user_folder, capsys):
    before = snapshot(user_folder)
    code, _, err = run(["reconstruct", user_folder / "duck.png", "--preset", "tiny",
                        "--invert", "--out", user_folder, "--overwrite", *SMALL], capsys)
    one_error_line(code, err, "overlaps the input")
    assert snapshot(user_folder) == before


def test_overwrite_of_a_finished_run_with_a_users_file_is_refused(tmp_path, finished_run,
                                                                   capsys):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    (run_dir / "keep.txt").write_text("my notes on this run")
    before = snapshot(run_dir)
    code, _, err = run(["reconstruct", EXAMPLE, "--preset", "tiny", "--invert", "--out",
                        run_dir, "--overwrite", *SMALL], capsys)
    one_error_line(code, err, "keep.txt", "move them out")
    assert snapshot(run_dir) == before
    code, _, err = run(["export", run_dir], capsys)  # export replaces the folder: refused too
    one_error_line(code, err, "keep.txt")
    assert snapshot(run_dir) == before


def test_overwrite_replaces_a_finished_run_rf_wrote(tmp_path, finished_run, capsys):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    code, _, err = run(["reconstruct", EXAMPLE, "--preset", "tiny", "--invert", "--out",
                        run_dir, "--overwrite", *SMALL, "recon.seed=1"], capsys)
    assert code == 0, err
    assert "seed: 1" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / MARKER).read_text())["kind"] == "reconstruct"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_render_gt_overwrite_never_deletes_a_users_folder(user_folder, capsys):
    before = snapshot(user_folder)
    code, _, err = run(["render-gt", "pybullet_data:duck.obj", "--out", user_folder,
                        "--views", "2", "--size", "16", "--overwrite"], capsys)
    one_error_line(code, err, "not written by rf")
    assert snapshot(user_folder) == before


def test_failed_export_leaves_the_run_exactly_as_it_was(tmp_path, finished_run, capsys,
                                                        monkeypatch):
    import rf_core.jobs.export_job as job

    run_dir = _copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir)

    def broken_mesh(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "write_mesh", broken_mesh)  # after the new video is written
    code, _, err = run(["export", run_dir, "video.frames=3"], capsys)
    one_error_line(code, err, "No space left on device")
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stage left behind

    monkeypatch.undo()
    code, _, err = run(["export", run_dir, "video.frames=3"], capsys)
    assert code == 0, err
    after = snapshot(run_dir)
    assert after["orbit.gif"] != before["orbit.gif"] and after.keys() == before.keys()
    assert snapshot(finished_run)["orbit.gif"] == before["orbit.gif"]  # hard links untouched


def test_a_second_writer_is_refused_at_once(tmp_path, finished_run, capsys):
    out = tmp_path / "run"
    with FolderLock(out, "rf reconstruct"):
        code, _, err = run(["reconstruct", EXAMPLE, "--preset", "tiny", "--invert", "--out",
                            out, *SMALL], capsys)
        one_error_line(code, err, "in use by pid", "rf reconstruct")
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
    run_dir = _copy_run(finished_run, tmp_path / "done")
    before = snapshot(run_dir)
    with FolderLock(run_dir, "rf reconstruct"):
        code, _, err = run(["export", run_dir], capsys)
        one_error_line(code, err, "in use by pid")
    assert snapshot(run_dir) == before


def test_resumed_history_holds_each_step_once(tmp_path):
    from rf_core.jobs.job_config import load_job_config
    from rf_core.jobs.reconstruct_job import reconstruct
    from rf_core.progress import quiet

    cfg = load_job_config("tiny", [], SMALL + ["recon.steps=6"])
    out = tmp_path / "run"
    with quiet():
        assert not reconstruct(EXAMPLE, None, out, cfg, learn_embedding=True,
                               callbacks=[StopAfter(4)])["finished"]
    partial = tmp_path / ".run.partial"
    history = partial / "history.jsonl"
    # A kill between checkpoints: the history ran ahead of the checkpoint (step 4).
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    history.write_text(history.read_text() + json.dumps({**rows[-1], "step": 4}) + "\n"
                       + '{"step": 5, "loss/tot')  # and its last line was cut mid-write
    with quiet():
        result = reconstruct(EXAMPLE, None, out, cfg, learn_embedding=True)
    assert result["finished"] and result["resumed_from"] == 4
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text()
             .splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]  # 0-based; steps 4 and 5 from the resumed run


def test_dataset_out_equal_to_its_input_is_refused(tmp_path, capsys):
    data = tmp_path / "photos"
    (data / "duck").mkdir(parents=True)
    (data / "duck" / "image.png").write_bytes(EXAMPLE.read_bytes())
    (data / "notes.txt").write_text("mine")
    before = snapshot(data)
    for out in (data, data / "results"):
        code, _, err = run(["dataset", data, "--out", out, "--preset", "tiny"], capsys)
        one_error_line(code, err, "overlaps the input")
    assert snapshot(data) == before


def test_dataset_out_that_is_a_users_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "photos"
    (data / "duck").mkdir(parents=True)
    (data / "duck" / "image.png").write_bytes(EXAMPLE.read_bytes())
    out = tmp_path / "results"
    (out / "duck").mkdir(parents=True)  # the user's folder, named like an object
    (out / "duck" / "keep.txt").write_text("mine")
    code, _, err = run(["dataset", data, "--out", out, "--preset", "tiny"], capsys)
    one_error_line(code, err, "not an rf dataset folder")
    assert (out / "duck" / "keep.txt").read_text() == "mine"
