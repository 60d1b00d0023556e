"""Sweeps end to end on a real local Ray (2 CPUs) and a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.small_run import SMALL

pytest.importorskip("ray")

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "duck.png")
FAST = [o for o in SMALL if not o.startswith(("checkpoint_every=", "device="))]
"""The shared small run; a sweep checkpoints at each report and picks its own device."""


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
    assert summary["trials"] == 2 and summary["errors"] == 0 and summary["finished"] == 2
    assert summary["best_overrides"][0].startswith("recon.weights.entropy=")
    client, parents, trials = _runs(uri, "two")
    assert len(parents) == 1 and len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # params: the sampled key and a few identifying settings; the config is an artifact
        params = client.get_run(run.info.run_id).data.params
        assert set(params) == {"recon.weights.entropy", "model", "preset", "objects",
                               "objective", "steps"}
        assert params["steps"] == "6" and params["model"] == "tiny"
        assert run.info.run_name == f"entropy={params['recon.weights.entropy']}"
        assert len(client.get_metric_history(run.info.run_id, "input_psnr")) >= 2
        root = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"orbit.gif", "mesh_preview.png", "views.png", "config.yaml",
                "metrics.json"} <= root
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
        assert "steps: 6" in config.read_text()
        names = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
        assert {"export/orbit.gif", "export/mesh.glb", "export/mesh_preview.png",
                "export/config.yaml", "export/metrics.json"} <= names
        images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert sum(p.endswith(".png") and "views+step+" in p for p in images) == 3  # 2, 4, 6
    # rf compare lists what the trials differ in: the swept key, nothing else
    from rf_distributed.compare import CompareSelection, run_compare

    compared = run_compare(CompareSelection(experiments=["two"]), tracking_uri=uri,
                           out_dir=tmp_path / "compare", log_to_mlflow=False)
    assert compared["params"] == ["recon.weights.entropy"], compared["params"]


def test_interrupted_sweep_resumes_from_checkpoints(ray_local, tmp_path):
    from rf_distributed.sweep import run_sweep
    from tests.fault_callbacks import FailFreshRunAt, ship_by_value

    ship_by_value()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _sweep_file(tmp_path, "crash")
    first = run_sweep(path, tracking_uri=uri, storage=tmp_path / "sweeps",
                      callbacks=[FailFreshRunAt(4)], verbose=0)
    assert first["errors"] == 2 and first["finished"] == first["stopped"] == 0
    assert len(first["error_files"]) == 2 and all(Path(f).is_file() for f in first["error_files"])
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
        # step-2 checkpoint; export/metrics.json repeats step 6 at the end: each step once.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "input_psnr")]
        assert sorted(steps) == [2, 4, 6]


def test_bad_sweeps_fail_before_any_trial(ray_local, tmp_path):
    from rf_distributed.cluster import ClusterError
    from rf_distributed.search_space import SearchSpaceError
    from rf_distributed.sweep import run_sweep
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


@pytest.mark.ray  # joins (tries to join) a Ray cluster in a fresh process
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


def test_trial_must_fit_on_one_node():
    from rf_distributed.cluster import ClusterError, check_trial_fits

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # dead: ignored
    check_trial_fits({"cpu": 1, "gpu": 1}, nodes)
    check_trial_fits({"cpu": 8, "gpu": 0}, nodes)
    with pytest.raises(ClusterError, match=r"asks for 2 GPU but no Ray node has more than 1 "
                                           r"\(1 in the cluster\).*--gpus-per-trial 0"):
        check_trial_fits({"cpu": 1, "gpu": 2}, nodes)
    with pytest.raises(ClusterError, match=r"asks for 2 CPU, 1 GPU on one node.*"
                                           r"8 CPU, 0 GPU; 1 CPU, 1 GPU\)"):
        check_trial_fits({"cpu": 2, "gpu": 1}, nodes)
    with pytest.raises(ClusterError, match="asks for 1 accelerator_type:H200"):
        check_trial_fits({"cpu": 1, "accelerator_type:H200": 1}, nodes)


def test_unsatisfiable_gpu_request_fails_before_any_trial(ray_local, tmp_path, capsys):
    import time

    from rf_cli.main import main

    gpus = int(ray_local.cluster_resources().get("GPU", 0)) + 1
    start = time.monotonic()
    code = main(["sweep", str(_sweep_file(tmp_path, "gpu")), "--gpus-per-trial", str(gpus),
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--storage", str(tmp_path / "s")])
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.startswith("rf: ") and not ln.startswith("rf: note:")]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"rf: error: a trial asks for {gpus} GPU but no Ray node has "
                             f"more than {gpus - 1}") and "--gpus-per-trial 0" in err[0]
    assert time.monotonic() - start < 20 and not (tmp_path / "s").exists()


def test_trial_counts_tell_finished_from_stopped(tmp_path):
    from types import SimpleNamespace

    from rf_distributed.sweep import count_trials, format_summary, usable
    from rf_distributed.sweep_spec import load_sweep

    spec = load_sweep(_sweep_file(tmp_path, "counts"))  # recon.steps=6
    config = {"recon.weights.entropy": 0.1}
    results = [SimpleNamespace(error=None, metrics={"step": 6}, config=config),
               SimpleNamespace(error=None, metrics={"step": 2}, config=config),  # ASHA stop
               SimpleNamespace(error=RuntimeError("boom"), metrics={"step": 2}, config=config),
               SimpleNamespace(error=None, metrics={}, config=config)]  # never ran
    counts = count_trials(spec, results)
    assert counts == {"finished": 1, "stopped": 1, "errors": 1, "unfinished": 1}
    summary = {"sweep": "counts", "trials": 4, "folder": "f", "mlflow": "m", **counts}
    assert format_summary(summary).splitlines()[0] == (
        "sweep counts: 4 trials: 1 finished, 1 stopped early, 1 failed, 1 not run")
    assert usable(summary) and usable({**counts, "finished": 0})
    assert not usable({**counts, "finished": 0, "stopped": 0})


def test_sweep_whose_every_trial_fails_exits_1(ray_local, tmp_path, capsys):
    from rf_cli.main import main

    # Valid at start-up; every trial's loss overflows at step 1 (NonFiniteLossError).
    path = _sweep_file(tmp_path, "allfail", overrides=[*FAST, "recon.max_nonfinite_steps=1"],
                       space={"recon.weights.rgb": {"grid": [1.0e39]}})
    code = main(["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--storage", str(tmp_path / "s")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "allfail: 1 trials: 0 finished, 0 stopped early, 1 failed" in out
    (line,) = [ln for ln in err.splitlines()
               if ln.startswith("rf: ") and not ln.startswith("rf: note:")]
    assert line.startswith("rf: no trial finished (1 of 1 failed)")
    assert f"{tmp_path / 's' / 'allfail'}/*/error.txt" in line and "rf.error" in line
    (error,) = (tmp_path / "s" / "allfail").glob("*/error.txt")
    assert "NonFiniteLossError" in error.read_text()
