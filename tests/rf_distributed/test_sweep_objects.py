"""Sweeps over a set of objects: per-object aggregation, an objective that means the same at
every report, one textual inversion per object per sweep, and the start-up errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rf_distributed.search_space import SearchSpaceError
from rf_distributed.sweep_objects import aggregate, object_share, objective
from rf_distributed.sweep_spec import load_sweep
from tests.rf_distributed.test_sweep import FAST

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "duck.png")



@pytest.fixture(scope="module")
def gt_objects(tmp_path_factory) -> Path:
    """A folder of two `rf render-gt` objects (5 views of 32 px each)."""
    from rf_core.ground_truth.gt_render import render_gt

    root = tmp_path_factory.mktemp("objects")
    for name, mesh in (("duck", "pybullet_data:duck.obj"),
                       ("ball", "pybullet_data:soccerball.obj")):
        render_gt(mesh, root / name, views=5, size=32)
    return root


def _sweep_file(tmp_path: Path, name: str, **extra) -> Path:
    spec = {"name": name, "preset": "tiny", "overrides": FAST,
            "space": {"recon.weights.entropy": {"grid": [0.1, 1.0]}}, "report_every": 2,
            "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_reports_mean_each_object_and_the_worst():
    per_object = {"duck": {"heldout_psnr": 20.0, "chamfer_l1": 0.1, "loss/rgb": 1.0},
                  "ball": {"heldout_psnr": 10.0, "chamfer_l1": 0.3, "loss/rgb": 3.0}}
    out = aggregate(per_object)
    assert out["heldout_psnr"] == 15.0 and out["chamfer_l1"] == pytest.approx(0.2)
    assert out["heldout_psnr/duck"] == 20.0 and out["heldout_psnr/ball"] == 10.0
    assert out["heldout_psnr/worst"] == 10.0  # higher is better: the worst is the lowest
    assert out["chamfer_l1/worst"] == 0.3  # lower is better: the worst is the highest
    assert out["loss/rgb"] == 2.0 and "loss/rgb/duck" not in out  # losses: the mean only
    assert aggregate(per_object, per_object_keys=False) == {
        "heldout_psnr": 15.0, "chamfer_l1": pytest.approx(0.2), "loss/rgb": 2.0}


def test_objective_needs_every_weighted_metric_and_ranks_non_finite_last():
    assert objective({"heldout_psnr": 20.0, "heldout_mask_iou": 0.5},
                     {"heldout_psnr": 1.0, "heldout_mask_iou": 10.0}) == 25.0
    with pytest.raises(KeyError, match="heldout_psnr"):
        objective({"input_psnr": 30.0}, {"heldout_psnr": 1.0})  # never a silent zero
    assert objective({"heldout_psnr": math.nan}, {"heldout_psnr": 1.0}) == -math.inf
    assert objective({"chamfer_l1": math.inf}, {"chamfer_l1": 1.0}, mode="min") == math.inf


def test_each_object_gets_an_equal_share_of_the_trial():
    assert object_share({"cpu": 1, "gpu": 0.5}, 3) == {"cpu": 0.3333, "gpu": 0.1666}
    assert object_share({"cpu": 4}, 2) == {"cpu": 2.0, "gpu": 0.0}


# ------------------------------------------------------------------------ start-up errors


def test_objects_source_is_read_like_rf_dataset(tmp_path, gt_objects):
    spec = load_sweep(_sweep_file(tmp_path, "ok", objects=str(gt_objects)))
    assert [o.name for o in spec.sweep_objects()] == ["ball", "duck"]
    assert spec.objective == {"heldout_psnr": 1.0}  # every object has GT: held out by default
    cfg = spec.job_config({"recon.weights.entropy": 0.1}, spec.sweep_objects()[1])
    assert cfg.input.recenter is False and cfg.recon.weights.entropy == 0.1
    assert abs(cfg.recon.camera.input_radius - 3.0) < 1e-4  # the GT view's camera


@pytest.mark.parametrize("case, match", [
    ("empty", "objects: dataset .* is empty"),
    ("bad_rows", "cannot be used .*missing.png"),
    ("no_gt", "heldout_psnr needs ground truth, which photo lack"),
    ("clip", "clip_input_similarity needs CLIP weights: .*clip_model"),
    ("both", "either image: .* or objects:"),
    ("shared_key", "input.size is shared by every trial"),
    ("worst_metric_no_gt", "metric: heldout_mask_iou needs ground truth"),
])
def test_bad_object_sweeps_fail_at_load(tmp_path, gt_objects, case, match):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"name": "duck", "image": str(gt_objects / "duck/rgb/000.png"),
                                 "gt": str(gt_objects / "duck")}) + "\n"
                     + json.dumps({"name": "photo", "image": EXAMPLE}) + "\n")
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": EXAMPLE}) + "\n" + json.dumps({"image": "missing.png"}))
    extra = {
        "empty": {"objects": str(tmp_path / "empty")},
        "bad_rows": {"objects": str(bad)},
        "no_gt": {"objects": str(mixed), "objective": {"heldout_psnr": 1.0}},
        "clip": {"objects": str(mixed), "objective": {"clip_input_similarity": 1.0},
                 "clip_model": str(tmp_path / "no-clip")},
        "both": {"objects": str(gt_objects), "image": EXAMPLE},
        "shared_key": {"objects": str(gt_objects), "space": {"input.size": {"grid": [64, 96]}}},
        "worst_metric_no_gt": {"image": EXAMPLE, "metric": "heldout_mask_iou/worst"},
    }[case]
    with pytest.raises(SearchSpaceError, match=match) as err:
        load_sweep(_sweep_file(tmp_path, case, **extra))
    assert "\n" not in str(err.value)


def test_cli_start_up_error_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    path = _sweep_file(tmp_path, "nothing", objects=str(tmp_path / "empty"))
    out = subprocess.run([sys.executable, "-m", "rf_cli.main", "sweep", str(path), "--storage",
                          str(tmp_path / "sweeps"), "--tracking-uri",
                          f"sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "is empty" in out.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_clip_objective_is_accepted_with_local_weights(tmp_path):
    from tests.tiny_clip import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    spec = load_sweep(_sweep_file(tmp_path, "clip", image=EXAMPLE, clip_model=str(clip),
                                  objective={"clip_input_similarity": 1.0}))
    assert spec.needs_clip() and not spec.needs_mesh_every_report()


# ----------------------------------------------------------------------------- end to end


def _reports(storage: Path, name: str) -> dict[str, list[dict]]:
    """Every trial's Tune reports, in order, by the trial's sampled entropy weight."""
    out = {}
    for result in sorted((storage / name).glob("train_trial_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[str(rows[0]["config"]["recon.weights.entropy"])] = rows
    return out


def test_sweep_over_objects_reports_held_out_objective_at_every_report(
        ray_local, tmp_path, gt_objects, monkeypatch):
    import mlflow

    from rf_distributed.prior_server import PriorClient
    from rf_distributed.sweep import run_sweep

    inversions = []
    original = PriorClient.invert

    def counting(self, *args, **kwargs):
        inversions.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PriorClient, "invert", counting)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _sweep_file(tmp_path, "objs", objects=str(gt_objects),
                       objective={"heldout_psnr": 1.0, "heldout_mask_iou": 10.0},
                       interim={"views": 2, "size": 16})
    summary = run_sweep(path, tracking_uri=uri, storage=tmp_path / "sweeps", verbose=0)
    assert summary["finished"] == 2 and summary["errors"] == 0
    # one textual inversion per object for the whole sweep, not per trial
    assert len(inversions) == 2
    assert sorted(p.name for p in (tmp_path / "sweeps/objs/embeddings").iterdir()) == [
        "ball.safetensors", "duck.safetensors"]

    reports = _reports(tmp_path / "sweeps", "objs")
    assert len(reports) == 2
    for rows in reports.values():
        assert [r["step"] for r in rows] == [2, 4, 6]
        for r in rows:  # the held-out objective at every report, not only the last
            for key in ("heldout_psnr", "heldout_mask_iou"):
                assert {f"{key}/duck", f"{key}/ball", f"{key}/worst"} <= set(r)
                assert r[key] == pytest.approx((r[f"{key}/duck"] + r[f"{key}/ball"]) / 2)
                assert r[f"{key}/worst"] == min(r[f"{key}/duck"], r[f"{key}/ball"])
            assert r["objective"] == pytest.approx(r["heldout_psnr"] + 10 * r["heldout_mask_iou"])
        assert "chamfer_l1/duck" in rows[-1] and "chamfer_l1" not in rows[0]  # mesh: at the end
    first = [rows[0]["objective"] for rows in reports.values()]
    assert first[0] != first[1], "the first report must tell trials apart"
    assert all(math.isfinite(v) for v in first)

    by_object = summary["per_object"]
    assert set(by_object) == {"best", "worst"}
    assert set(by_object["best"]["objects"]) == {"duck", "ball"}
    assert "heldout_psnr" in by_object["best"]["objects"]["duck"]

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("objs")
    trials = client.search_runs([exp.experiment_id], "tags.`rf.kind` = 'trial'")
    assert len(trials) == 2
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "heldout_psnr/duck")
        assert sorted(m.step for m in history) == [2, 4, 6]
        assert "heldout_psnr" in run.data.metrics and "heldout_psnr/worst" in run.data.metrics
        names = {a.path for a in client.list_artifacts(run.info.run_id, "export/duck")}
        assert {"export/duck/heldout.png", "export/duck/mesh.glb",
                "export/duck/orbit.gif"} <= names

    # --resume finds every token learned: no inversion again
    inversions.clear()
    run_sweep(path, tracking_uri=uri, storage=tmp_path / "sweeps", verbose=0, resume=True)
    assert inversions == []


def test_default_sweep_optimises_held_out_quality_over_two_objects(monkeypatch):
    from rf_distributed.search_space import to_tune_space
    from tests.rf_distributed.test_search_space import variants

    monkeypatch.chdir(ROOT)  # renders outputs/example_dataset on first use (a few seconds)
    spec = load_sweep("tune_configs/default.yaml")
    objects = spec.sweep_objects()
    assert len(objects) == 2 and all(o.gt is not None and o.input_view == 0 for o in objects)
    assert set(spec.objective) == {"heldout_psnr", "heldout_mask_iou"}
    assert spec.scheduler["type"] == "asha" and spec.per_object
    assert len(variants(to_tune_space(spec.space))) == 4


def test_sweep_without_ground_truth_ranks_by_clip_similarity_to_the_photo(ray_local, tmp_path):
    from rf_distributed.sweep import run_sweep
    from tests.tiny_clip import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    path = _sweep_file(tmp_path, "clip_e2e", image=EXAMPLE, clip_model=str(clip),
                       objective={"clip_input_similarity": 1.0},
                       space={"recon.weights.entropy": {"grid": [0.1]}})
    summary = run_sweep(path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                        storage=tmp_path / "sweeps", verbose=0)
    assert summary["finished"] == 1
    (rows,) = _reports(tmp_path / "sweeps", "clip_e2e").values()
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:  # at every report, and an image: sweep keeps its flat metric names
        assert -1.0 <= r["clip_input_similarity"] <= 1.0
        assert r["objective"] == pytest.approx(r["clip_input_similarity"])
        assert not any("/" in k for k in r if k.startswith("clip"))
