"""``rf dataset`` on a real local Ray and a real MLflow store: every object ends with exactly one
finished result, bad objects fail alone, reruns skip finished work, a lost worker resumes from
its checkpoint, and a multi-node cluster survives losing a node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from rf_bench.dataset_cluster import QUICK_OVERRIDES
from rf_core.progress import quiet
from tests.small_run import EXPORT, RENDER

ROOT = Path(__file__).resolve().parents[2]
QUICK = [*QUICK_OVERRIDES, *RENDER, *EXPORT]
"""The benchmark's quick objects (24 steps, checkpoints every 6) at a small run's render
sizes: these tests check the orchestration, not the fit."""


@pytest.fixture
def quietly():
    """The test's ``run_dataset`` calls show no bar (and start no live board)."""
    with quiet():
        yield


@pytest.fixture(scope="module")
def gt_duck(tmp_path_factory):
    from rf_core.ground_truth.gt_render import render_gt

    return render_gt("pybullet_data:duck.obj", tmp_path_factory.mktemp("gt") / "duck", views=3,
                     size=48)


def _manifest(folder: Path, gt: Path) -> Path:
    (folder / "broken.png").write_text("not an image")
    rows = [{"name": "duck_gt", "image": str(gt / "rgb/000.png"),
             "mask": str(gt / "mask/000.png"), "gt": str(gt)},
            {"name": "duck_photo", "image": str(ROOT / "examples/duck.png")},
            {"name": "broken", "image": "broken.png"},
            {"name": "gone", "image": "missing.png"}]
    path = folder / "objects.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _object_runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`rf.kind` = 'object'")


def _finished(runs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in runs:
        if r.data.tags["rf.status"] == "finished":
            counts[r.data.tags["rf.object"]] = counts.get(r.data.tags["rf.object"], 0) + 1
    return counts


def test_dataset_end_to_end_exactly_once(ray_local, tmp_path, gt_duck, monkeypatch, quietly):
    from rf_distributed import dataset_run as dataset
    from rf_distributed.dataset_run import run_dataset

    # As if the driver did not share a filesystem with the workers: results come back as bytes
    # (the other tests move the workers' folders, the shared-storage path).
    monkeypatch.setattr(dataset, "_shared_run", lambda info: None)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    manifest = _manifest(tmp_path, gt_duck)
    out = tmp_path / "out"
    kw = dict(preset="tiny", overrides=QUICK, tracking_uri=uri, experiment="ds")
    summary = run_dataset(manifest, out, **kw)
    assert (summary["objects"], summary["finished"], summary["failed"]) == (4, 2, 2)
    rows = {r["object"]: r for r in summary["rows"]}
    assert "cannot read image" in rows["broken"]["error"]
    assert str(tmp_path / "broken.png") in rows["broken"]["error"]  # the user's path
    assert "not found" in rows["gone"]["error"]
    assert 0 < rows["duck_gt"]["heldout_psnr"] < 60 and 0 <= rows["duck_gt"]["fscore"] <= 1
    assert "heldout_psnr" not in rows["duck_photo"]  # no ground truth, no held-out numbers
    for name in ("duck_gt", "duck_photo"):
        folder = out / name
        assert {"orbit.mp4", "orbit.gif", "mesh.glb", "mesh.obj", "metrics.json", "config.yaml",
                "result.json", "checkpoint"} <= {p.name for p in folder.iterdir()}
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["steps"] == 24 and metrics["input_psnr"] == rows[name]["input_psnr"]
    assert (out / "duck_gt/evaluation.json").exists()
    assert sorted(p.stem for p in (out / "failed").iterdir()) == ["broken", "gone"]
    assert not (out / ".work" / "duck_gt").exists()  # work folders go once the result is in

    runs = _object_runs(uri, "ds")
    assert _finished(runs) == {"duck_gt": 1, "duck_photo": 1}
    client = mlflow.MlflowClient(uri)
    duck = next(r for r in runs if r.data.tags["rf.object"] == "duck_gt"
                and r.data.tags["rf.status"] == "finished")
    assert duck.data.metrics["heldout_psnr"] == pytest.approx(rows["duck_gt"]["heldout_psnr"])
    assert duck.data.params["config.recon.steps"] == "24"
    assert len(client.get_metric_history(duck.info.run_id, "loss/total")) >= 2  # a curve
    artifacts = {a.path for a in client.list_artifacts(duck.info.run_id)}
    assert {"orbit.gif", "mesh.glb", "metrics.json", "config.yaml"} <= artifacts
    failed = [r for r in runs if r.data.tags["rf.status"] == "failed"]
    assert sorted(r.data.tags["rf.object"] for r in failed) == ["broken", "gone"]
    assert all(r.info.status == "FAILED" and r.data.tags["rf.error"] for r in failed)

    # Rerun: finished objects are skipped (no new runs), failed ones are tried again.
    again = run_dataset(manifest, out, **kw)
    statuses = {r["object"]: r["status"] for r in again["rows"]}
    assert statuses["duck_gt"] == statuses["duck_photo"] == "finished (earlier)"
    runs = _object_runs(uri, "ds")
    assert _finished(runs) == {"duck_gt": 1, "duck_photo": 1}
    assert sum(r.data.tags["rf.status"] == "failed" for r in runs) == 4

    with pytest.raises(ValueError, match="other settings"):
        run_dataset(manifest, out, **{**kw, "overrides": [*QUICK, "recon.steps=30"]})


def test_lost_worker_resumes_from_checkpoint(ray_local, tmp_path):
    """A worker process dies after step 12's checkpoint; Ray re-runs the task, which resumes."""
    from rf_distributed.dataset_run import run_dataset
    from tests.fault_callbacks import KillWorkerOnceAt, ship_by_value

    ship_by_value()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "duck.png").write_bytes((ROOT / "examples/duck.png").read_bytes())
    # not in a quiet() block: with the objects' bar and the live progress board
    summary = run_dataset(tmp_path / "photos", tmp_path / "out", preset="tiny",
                          overrides=QUICK, tracking_uri=uri, experiment="crash",
                          callbacks=[KillWorkerOnceAt(12, str(tmp_path / "killed_once"))])
    assert summary["finished"] == 1
    metrics = json.loads((tmp_path / "out/duck/metrics.json").read_text())
    assert metrics["resumed_from"] == 12 and metrics["steps"] == 24
    # shared storage: the worker's folder was moved into place, not copied
    assert not (tmp_path / "out/.work/duck").exists()
    assert not (tmp_path / "out/duck/.rf_attempt").exists()
    assert _finished(_object_runs(uri, "crash")) == {"duck": 1}


def test_tracking_outage_keeps_results_and_a_rerun_records_them(ray_local, tmp_path,
                                                                 monkeypatch, quietly):
    from rf_distributed.dataset_run import run_dataset
    from rf_distributed.tracking import DatasetTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "duck.png").write_bytes((ROOT / "examples/duck.png").read_bytes())
    kw = dict(preset="tiny", overrides=[*QUICK, "recon.steps=6",
                                        "recon.lr=[0,0.02,0.002,6,log]"],
              tracking_uri=uri, experiment="outage")

    def down(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    with monkeypatch.context() as m:
        m.setattr(DatasetTracker, "log_finished", down)
        first = run_dataset(tmp_path / "photos", tmp_path / "out", **kw)
    assert first["finished"] == 1 and "not in MLflow" in first["rows"][0]["status"]
    assert (tmp_path / "out/duck/orbit.mp4").exists()
    assert not (tmp_path / "out/duck/result.json").exists()
    assert _finished(_object_runs(uri, "outage")) == {}
    second = run_dataset(tmp_path / "photos", tmp_path / "out", **kw)  # nothing is recomputed
    assert second["rows"][0]["status"] == "finished"
    assert (tmp_path / "out/duck/result.json").exists()
    assert _finished(_object_runs(uri, "outage")) == {"duck": 1}


def test_progress_board_and_reporter():
    from rf_distributed.dataset_task import ProgressBoard, Reporter, describe_running

    board = ProgressBoard()

    class Remote:  # what a Ray actor handle looks like to the reporter
        def __init__(self, fn):
            self.remote = fn

    handle = type("Handle", (), {"report": Remote(board.report)})()
    say = Reporter(handle, "duck", every_s=3600.0)
    say("inverting")
    assert board.snapshot()["duck"] == ("inverting", None, None)
    say("reconstructing", 1, 300)
    say("reconstructing", 2, 300)  # throttled: within every_s of the last report
    assert board.snapshot()["duck"] == ("reconstructing", 1, 300)
    say("reconstructing", 300, 300)  # the last step always goes through
    board.report("cat", "inverting")
    names = ["duck", "cat", "mug", "a", "b", "c"]
    assert describe_running(board.snapshot(), names) == \
        "duck 300/300, cat inverting, mug waiting, a waiting, +2 more"
    board.clear("duck")
    assert "duck" not in board.snapshot()


@pytest.mark.ray  # joins (tries to join) a Ray cluster in a fresh process
def test_bad_dataset_and_cluster_errors(tmp_path, capsys):
    from rf_cli.main import main

    # A missing or empty dataset is refused before Ray or MLflow is touched: in this process.
    code = main(["dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err.strip().splitlines()[-1]
    (tmp_path / "empty").mkdir()
    code = main(["dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert code == 2 and "is empty" in capsys.readouterr().err
    # An unreachable cluster or tracking server: a fresh process, never the session's Ray.
    env = {**os.environ, "RF_QUIET": "1"}
    cmd = [sys.executable, "-m", "rf_cli.main", "dataset"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "duck.png").write_bytes((ROOT / "examples/duck.png").read_bytes())
    r = subprocess.run(cmd + [str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--preset",
                              "tiny", "--address", "127.0.0.1:9", "--tracking-uri",
                              f"sqlite:///{tmp_path / 'm.db'}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written before the checks pass
    r = subprocess.run(cmd + [str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--preset",
                              "tiny", "--tracking-uri", "http://127.0.0.1:9"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "not reachable" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.ray  # starts a Ray cluster of its own (a head and two worker nodes)
def test_multinode_cluster_loses_a_node(tmp_path):
    """Two worker nodes on this machine; the node running an object with a checkpoint is
    killed; that object resumes on the other and every object is finished exactly once.

    The small run's render sizes keep each step to milliseconds; 48 steps with a checkpoint
    every 6 leave the killer (which looks every 0.2 s) a wide window between an object's
    first checkpoint and its end."""
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "rf_cli.main", "bench", "dataset", "--quick",
                        "--objects", "2", "--nodes", "2", "--schemes", "cluster", "--out",
                        str(out), "--json", str(tmp_path / "b.json"), *RENDER, *EXPORT,
                        "recon.steps=48", "recon.lr=[0,0.02,0.002,48,log]"],
                       capture_output=True, text=True, env={**os.environ, "RF_QUIET": "1"},
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    cluster = result["schemes"]["cluster"]
    assert cluster["finished"] == 2 and cluster["exactly_once"]
    assert cluster["mlflow_finished_runs"] == {"duck": 1, "soccerball": 1}
    killed = cluster["killed"]
    assert killed is not None, "no node was killed mid-run"
    # it may checkpoint once more between our look and the kill
    assert cluster["objects"][killed["object"]]["resumed_from"] >= killed["at_step"] > 0


def test_a_users_folder_named_like_an_object_is_never_replaced(ray_local, tmp_path, quietly):
    """An rf dataset folder into which the user put a folder of an object's name: that object
    fails with a clear line, the user's files stay, the other objects finish."""
    from rf_distributed.dataset_run import run_dataset

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes((ROOT / "examples/duck.png").read_bytes())
    kw = dict(preset="tiny", overrides=[*QUICK, "recon.steps=4"], tracking_uri=uri,
              experiment="mine")
    assert run_dataset(photos, tmp_path / "out", **kw)["finished"] == 1
    (photos / "duck.png").write_bytes((ROOT / "examples/duck.png").read_bytes())
    (tmp_path / "out" / "duck").mkdir()
    (tmp_path / "out" / "duck" / "keep.txt").write_text("mine")
    summary = run_dataset(photos, tmp_path / "out", **kw)
    rows = {r["object"]: r for r in summary["rows"]}
    assert rows["cat"]["status"].startswith("finished")
    assert rows["duck"]["status"] == "failed" and "not written by rf" in rows["duck"]["error"]
    assert (tmp_path / "out" / "duck" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "out" / "duck").iterdir()) == ["keep.txt"]


def test_unusable_photos_fail_in_one_line_and_other_files_are_listed(ray_local, tmp_path,
                                                                     capfd, quietly):
    """Photos the worker refuses (noise alpha, a 4000x40 strip) fail with one line each, no
    Ray traceback and no ``.work`` copy; a file that is no image is listed as skipped; names
    keep their script."""
    import numpy as np
    from PIL import Image

    from rf_distributed.dataset_run import format_dataset_summary, run_dataset

    photos = tmp_path / "photos"
    photos.mkdir()
    noise = np.random.default_rng(0).integers(1, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "写真.png")
    strip = np.zeros((40, 4000, 4), np.uint8)
    strip[10:30, 100:3900] = 255
    Image.fromarray(strip).save(photos / "画像.png")
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    summary = run_dataset(photos, out, preset="tiny", overrides=QUICK,
                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          experiment="bad")
    assert (summary["objects"], summary["finished"], summary["failed"],
            summary["skipped"]) == (3, 0, 2, 1)
    rows = {r["object"]: r for r in summary["rows"]}
    assert "noise" in rows["写真"]["error"] and str(photos / "写真.png") in rows["写真"]["error"]
    assert "crop the photo" in rows["画像"]["error"]
    assert not rows["写真"]["error"].startswith("UserError")
    assert rows["notes.txt"]["status"] == "skipped"
    assert sorted(p.stem for p in (out / "failed").iterdir()) == ["写真", "画像"]
    assert not any((out / ".work").glob("*")), list((out / ".work").glob("*"))
    text = format_dataset_summary(summary)
    assert "0 of 3 entries finished, 2 failed, 1 skipped" in text
    assert "skipped notes.txt: a .txt file, not an image format rf reads" in text
    captured = capfd.readouterr()
    assert "Unhandled error" not in captured.out + captured.err


# ---------------------------------------------------------------------------- objects per GPU
def test_object_memory_estimate_follows_the_renderer_settings():
    from rf_core.jobs.job_config import load_job_config
    from rf_distributed.placement import (
        BYTES_PER_POINT,
        NORMAL_FRACTION,
        NORMAL_PROBES,
        object_memory_estimate,
    )

    cfg = load_job_config("realfusion", overrides=["model.name=sd15-random",
                                                   "recon.renderer.normals_min_weight=0",
                                                   "recon.field.normal_difference=central"])
    full = object_memory_estimate(cfg)
    # Normals everywhere: (4096 input rays + 96^2 SDS pixels) x 256 samples x (1 + 6 normal
    # probes), issue 21's ~25 GB warm-up peak of one object
    assert full.points_per_step == (4096 + 96 ** 2) * 256 * (1 + NORMAL_PROBES["central"])
    assert full.activations_gb == pytest.approx(full.points_per_step * BYTES_PER_POINT / 2**30)
    assert 20 < full.total_gb < 28
    half = object_memory_estimate(load_job_config("realfusion", overrides=[
        "model.name=sd15-random", "recon.renderer.num_samples=128",
        "recon.renderer.normals_min_weight=0", "recon.field.normal_difference=central"]))
    assert half.activations_gb == pytest.approx(full.activations_gb / 2)
    # The preset as shipped: normals only above a weight, for a bounded share of the samples
    thresholded = object_memory_estimate(load_job_config("realfusion"))
    assert thresholded.points_per_step == round((4096 + 96 ** 2) * 256
                                                * (1 + NORMAL_PROBES["forward"]
                                                   * NORMAL_FRACTION))
    assert thresholded.total_gb < full.total_gb / 3
    assert object_memory_estimate(load_job_config("tiny")).total_gb < 3


def test_objects_per_gpu_from_memory():
    from rf_distributed.placement import PlacementError, plan_objects_per_gpu

    plan = plan_objects_per_gpu(139.0, 8.0, 23.6)
    assert plan.objects_per_gpu == 5 and plan.gpu_share == 0.2
    assert "5 object(s) per GPU" in plan.describe()
    third = plan_objects_per_gpu(80.0, 8.0, 20.0, "given")
    assert third.objects_per_gpu == 3 and 3 * third.gpu_share <= 1.0
    with pytest.raises(PlacementError) as err:  # the 24 GB GPU of deploy/cluster-aws.yaml
        plan_objects_per_gpu(23.5, 8.0, 23.6)
    message = str(err.value)
    assert "\n" not in message and "23.5 GB free" in message and "8.0 GB prior" in message
    assert "23.6 GB for one object" in message and "--object-memory-gb" in message


def test_prior_memory_counts_the_weights_on_disk():
    from rf_core.prior import ModelConfig
    from rf_distributed.placement import PRIOR_WORK_GB, prior_memory_gb

    sd15 = prior_memory_gb(ModelConfig(name="sd15-random"))
    assert sd15 == pytest.approx(1.066e9 * 2 / 2**30 + PRIOR_WORK_GB)
    tiny = prior_memory_gb(ModelConfig(name="tiny"))  # counted from its safetensors headers
    assert PRIOR_WORK_GB < tiny < PRIOR_WORK_GB + 0.1
    zero123 = prior_memory_gb(ModelConfig(type="zero123", name="kxic/zero123-xl"))
    assert zero123 == pytest.approx(1.25e9 * 2 / 2**30 + PRIOR_WORK_GB)  # never located
    assert prior_memory_gb(ModelConfig(type="none")) == 0  # no joint prior: nothing added


def test_a_gpu_too_small_for_one_object_fails_before_any_output(ray_local, tmp_path,
                                                                  monkeypatch, capsys):
    from rf_cli.main import main
    from rf_distributed import dataset_run as dataset

    monkeypatch.setattr(dataset.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(dataset, "probe_gpu_memory", lambda: 23.5)
    out = tmp_path / "out"
    code = main(["dataset", str(ROOT / "examples"), "--out", str(out), "--preset",
                 "realfusion", "--model", "tiny", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--object-memory-gb", "30"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("rf: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "23.5 GB free" in errors[0] and "30.0 GB for one object (given)" in errors[0]
    assert not out.exists()
