"""Sweeps end to end on a real local Ray (2 CPUs) and a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "duck.png")
FAST = ["recon.steps=6", "recon.input_size=24", "recon.input_rays=256", "recon.sds_size=16",
        "recon.albedo_steps=2", "recon.renderer.num_samples=24",
        "recon.renderer.occupancy.resolution=16", "recon.field.grid.n_levels=4",
        "recon.field.grid.log2_hashmap_size=12", "recon.levels=[0,2,4,4]",
        "inversion.steps=2", "input.size=64", "export.video.frames=2", "export.video.size=16",
        "export.mesh_resolution=24", "export.threshold=1.0"]


def _sweep_file(tmp_path: Path, name: str, **extra) -> Path:
    spec = {"name": name, "image": EXAMPLE, "preset": "tiny", "overrides": FAST,
            "space": {"recon.weights.entropy": {"grid": [0.1, 1.0]}}, "report_every": 2,
            "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _runs(uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get("rf.kind") == "sweep"], \
        [r for r in runs if r.data.tags.get("rf.kind") == "trial"]


def test_two_trial_sweep_is_tracked_with_artifacts(ray_local, tmp_path):
    from rf_distributed.sweep import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(_sweep_file(tmp_path, "two"), tracking_uri=uri,
                        storage=tmp_path / "sweeps", verbose=0)
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert summary["best_overrides"][0].startswith("recon.weights.entropy=")
    client, parents, trials = _runs(uri, "two")
    assert len(parents) == 1 and len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "recon.weights.entropy" in run.data.params
        params = client.get_run(run.info.run_id).data.params
        assert params["config.recon.steps"] == "6" and "config.model.name" in params
        assert len(client.get_metric_history(run.info.run_id, "input_psnr")) >= 2
        names = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
        assert {"export/orbit.gif", "export/mesh.glb", "export/config.yaml",
                "export/metrics.json"} <= names


def test_interrupted_sweep_resumes_from_checkpoints(ray_local, tmp_path):
    from rf_distributed.sweep import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _sweep_file(tmp_path, "crash")
    first = run_sweep(path, tracking_uri=uri, storage=tmp_path / "sweeps", fail_at_step=4,
                      verbose=0)
    assert first["errors"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(path, tracking_uri=uri, storage=tmp_path / "sweeps", verbose=0)
    second = run_sweep(path, tracking_uri=uri, storage=tmp_path / "sweeps", resume=True,
                       verbose=0)
    assert second["errors"] == 0 and second["trials"] == 2
    client, parents, trials = _runs(uri, "crash")
    assert len(parents) == 1 and len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        # Reported at step 2 before the crash at 4, then 4 and 6 after resuming from the
        # step-2 checkpoint: a restart from scratch would report step 2 twice. (The final
        # metrics are logged once more from export/metrics.json at the end.)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "input_psnr")]
        assert sorted(set(steps)) == [2, 4, 6] and steps.count(2) == 1


def test_bad_sweeps_fail_before_any_trial(ray_local, tmp_path):
    from rf_distributed.search_space import SearchSpaceError
    from rf_distributed.sweep import ClusterError, run_sweep
    from rf_distributed.tracking import TrackingError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    bad = _sweep_file(tmp_path, "bad", space={"recon.weights.nope": {"uniform": [0, 1]}})
    with pytest.raises(SearchSpaceError, match="recon.weights.nope"):
        run_sweep(bad, tracking_uri=uri, storage=tmp_path / "s")
    ok = _sweep_file(tmp_path, "ok")
    with pytest.raises(TrackingError):
        run_sweep(ok, tracking_uri="http://127.0.0.1:9", storage=tmp_path / "s")
    missing = _sweep_file(tmp_path, "nomodel", overrides=[*FAST, "model.name=nobody/missing"])
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        run_sweep(missing, tracking_uri=uri, storage=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    del ClusterError  # exercised by the CLI test below with a fresh process


def test_unreachable_ray_address_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    path = _sweep_file(tmp_path, "addr")
    out = subprocess.run([sys.executable, "-m", "rf_cli.main", "sweep", str(path),
                          "--address", "127.0.0.1:1", "--tracking-uri",
                          f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("rf: error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Ray cluster" in errors[0], out.stderr
