"""rf_distributed.tracking against a real sqlite MLflow store, and one real local Ray Tune sweep
(plus its restore) driving MLflowSweepCallback."""

from __future__ import annotations

import http.server
import json
import pickle
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from rf_distributed.tracking import (
    PARAM_VALUE_LIMIT,
    DatasetTracker,
    TrackingError,
    check_tracking_uri,
    default_tracking_uri,
    flatten_config,
    log_finished_run,
    mlflow_command,
    resolve_tracking_uri,
    sanitize_name,
    sweep_url_hint,
)
from rf_distributed.tracking.sweep_callback import MLflowSweepCallback, sweep_view_hint


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store per module (creating its tables takes ~2 s); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def ray_cluster():
    """Local Ray (2 CPUs) for this module, shut down at its end; one that an earlier fixture
    started (conftest's session-wide ``ray_local``) is reused and left running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _runs(client: mlflow.MlflowClient, experiment: str, kind: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`rf.kind` = '{kind}'")


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


# --------------------------------------------------------------------------- URIs


def test_default_and_resolved_tracking_uri(tmp_path, monkeypatch):
    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/outputs/mlflow/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None) == "http://example:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_check_refused_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 .*make mlflow-server"):
        check_tracking_uri("http://127.0.0.1:9")
    assert time.monotonic() - start < 6.0


def test_check_silent_server_respects_timeout():
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        start = time.monotonic()
        with pytest.raises(TrackingError, match="not reachable"):
            check_tracking_uri(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - start < 1.5


def _serve(status_by_path: dict[str, int]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status_by_path.get(self.path.split("?")[0], 404))
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_check_live_server_and_non_mlflow_server():
    ok, other = _serve({"/health": 200}), _serve({})
    try:
        check_tracking_uri(f"http://127.0.0.1:{ok.server_port}/")
        with pytest.raises(TrackingError, match="HTTP 404"):
            check_tracking_uri(f"http://127.0.0.1:{other.server_port}")
    finally:
        ok.shutdown()
        other.shutdown()


def test_check_sqlite_paths_and_schemes(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrackingError, match="cannot create"):
        check_tracking_uri(f"sqlite:///{tmp_path}/file/sub/mlflow.db")
    with pytest.raises(TrackingError, match="unknown scheme 'ftp'"):
        check_tracking_uri("ftp://host/x")


def test_sweep_url_hint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    hint = sweep_url_hint(uri)
    # a virtualenv that is not activated: the path of its mlflow, so the line runs as printed
    assert hint.startswith(f"{mlflow_command()} ui --backend-store-uri {uri} ")
    assert Path(hint.split()[0]).name == "mlflow"
    assert f"--default-artifact-root {tmp_path}/artifacts --port 5000" in hint
    assert hint.endswith("http://127.0.0.1:5000")
    assert sweep_url_hint("http://host:5000") == "http://host:5000"
    assert sweep_url_hint(default_tracking_uri()).startswith("make ui")


# --------------------------------------------------------------------------- names and values


def test_flatten_config_values_and_truncation():
    flat = flatten_config(
        {
            "recon": {"steps": 300, "lr": 1e-3, "weights": {"sds": [0, 0.1, 1.0, 1000]}},
            "invert": True,
            "model": None,
            "name": "duck",
            "empty": {},
            "overrides": ["recon.steps=10", "field.grid.log2_hashmap_size=17"],
            "long": "x" * 10_000,
        }
    )
    assert flat["recon.steps"] == "300"
    assert flat["recon.lr"] == "0.001"
    assert flat["recon.weights.sds"] == "[0, 0.1, 1.0, 1000]"
    assert (flat["invert"], flat["model"], flat["name"], flat["empty"]) == (
        "true",
        "null",
        "duck",
        "{}",
    )
    assert json.loads(flat["overrides"]) == ["recon.steps=10", "field.grid.log2_hashmap_size=17"]
    assert len(flat["long"]) == PARAM_VALUE_LIMIT and flat["long"].endswith("...")
    assert PARAM_VALUE_LIMIT == MAX_PARAM_VAL_LENGTH


def test_flatten_config_describes_search_spaces():
    from ray import tune

    flat = flatten_config({"w": tune.loguniform(1e-4, 1e-1), "x": tune.grid_search([1, 2])})
    assert flat == {"w": "Float(0.0001, 0.1) LogUniform", "x.grid_search": "[1, 2]"}


def test_sanitize_name():
    assert sanitize_name("loss/rgb") == "loss/rgb"
    assert sanitize_name("psnr@input (dB):") == "psnr_input _dB__"
    assert sanitize_name("/a//./b/../c/") == "a/_/b/_/c"
    assert sanitize_name("") == "_"


# --------------------------------------------------------------------------- single runs


def test_log_finished_run_puts_artifacts_beside_the_db(store, tmp_path):
    (tmp_path / "orbit.gif").write_bytes(b"GIF89a")
    run_id = log_finished_run(
        store,
        "single",
        "duck",
        params={"recon": {"steps": 300}},
        metrics={"input_psnr": 41.5, "heldout": {"psnr": 13.4}, "finished": True, "model": "x"},
        artifacts_dir=tmp_path,
        tags={"rf.kind": "dataset"},
    )
    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "duck"
    assert run.data.params == {"recon.steps": "300"}
    assert run.data.metrics == {"input_psnr": 41.5, "heldout.psnr": 13.4}
    assert run.data.tags["rf.kind"] == "dataset"
    # MLflow's own default would be <cwd>/mlruns/<id>; ours is beside the database.
    root = Path(store[len("sqlite:///") :]).parent / "artifacts"
    assert client.get_experiment_by_name("single").artifact_location == str(root / "single")
    assert (root / "single").is_dir()
    assert _artifacts(client, run_id, "") == {"orbit.gif"}


# --------------------------------------------------------------------------- callback, fake trials


def _fake_trial(tmp_path: Path, trial_id: str, x: float, *, export: bool = True):
    ckpt = tmp_path / f"ckpt_{trial_id}"
    if export:
        (ckpt / "export").mkdir(parents=True)
        (ckpt / "export" / "orbit.gif").write_bytes(b"GIF89a")
        (ckpt / "export" / "metrics.json").write_text(
            json.dumps({"input_psnr": 30.0 + x, "final_losses": {"loss/rgb": 0.01}})
        )
    return SimpleNamespace(
        trial_id=trial_id,
        experiment_tag=f"0_x={x}",
        config={"x": x, "recon": {"weights": {"sds": [0, 0.1, 1, 100]}}},
        checkpoint=SimpleNamespace(path=str(ckpt)) if export else None,
        last_result={"step": 30},
        status="TERMINATED",
        path=None,
        error_file=None,
    )


def test_callback_with_fake_trials_and_reopen(store, tmp_path):
    exp, params = "fake", {"x": {"grid_search": [1, 2]}}
    cb = MLflowSweepCallback(
        store, exp, "sweep-a", params, {"owner": "me"}, metric="input_psnr", mode="max"
    )
    cb.setup()
    good, bad = _fake_trial(tmp_path, "t1", 1.0), _fake_trial(tmp_path, "t2", 2.0, export=False)
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1\nTraceback ...\nRuntimeError: boom\n")
    bad.error_file, bad.status = str(err), "ERROR"
    for trial in (good, bad):
        cb.on_trial_start(0, [], trial)
    for step in (10, 20, 30):
        result = {"loss": 1.0 / step, "step": step, "grad": {"norm": 2}, "note": "text"}
        result.update(time_this_iter_s=0.1, done=False, config={"x": 1.0}, trial_id="t1")
        cb.on_trial_result(0, [], good, result)
    cb.on_trial_complete(0, [], good)
    cb.on_trial_error(0, [], bad)
    cb.on_experiment_end([good, bad])

    client = mlflow.MlflowClient(store)
    (parent,) = _runs(client, exp, "sweep")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-a"
    assert parent.data.params == {"x.grid_search": "[1, 2]"}
    assert parent.data.tags["owner"] == "me" and parent.data.tags["rf.sweep_id"] == cb.sweep_id
    assert parent.data.tags["rf.best_trial_id"] == "t1"
    assert parent.data.metrics == {"best.input_psnr": 31.0}
    assert parent.data.tags["rf.trials_errored"] == "1"
    children = {r.data.tags["rf.trial_id"]: r for r in _runs(client, exp, "trial")}
    assert set(children) == {"t1", "t2"}
    one, two = children["t1"], children["t2"]
    assert one.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert one.info.run_name == "x=1.0 sds=[0, 0.1, 1, 100]"  # its sampled values
    assert one.data.params == {"x": "1.0", "recon.weights.sds": "[0, 0.1, 1, 100]"}
    history = client.get_metric_history(one.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert set(one.data.metrics) == {"loss", "grad.norm", "input_psnr", "final_losses.loss/rgb"}
    assert _artifacts(client, one.info.run_id, "export") == {
        "export/orbit.gif",
        "export/metrics.json",
    }
    assert (one.info.status, one.data.tags["rf.status"]) == ("FINISHED", "finished")
    assert (two.info.status, two.data.tags["rf.status"]) == ("FAILED", "error")
    assert two.data.tags["rf.error"] == "RuntimeError: boom"
    assert _artifacts(client, two.info.run_id, "") == {"error.txt"}

    # A new callback with the same sweep id (a resumed sweep) reopens, never duplicates.
    again = MLflowSweepCallback(store, exp, "sweep-a", params, sweep_id=cb.sweep_id)
    again.setup()
    assert again.parent_run_id == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    bad.status = "TERMINATED"
    again.on_trial_start(0, [], bad)
    assert client.get_run(two.info.run_id).info.status == "RUNNING"
    again.on_trial_complete(0, [], bad)
    again.on_experiment_end([good, bad])
    assert len(_runs(client, exp, "sweep")) == 1 and len(_runs(client, exp, "trial")) == 2
    assert client.get_run(two.info.run_id).info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).data.tags["rf.trials_errored"] == "0"


def _preview(folder: Path, step: int) -> None:
    """A report's preview/ folder as train_trial writes it."""
    from PIL import Image

    folder.mkdir(parents=True)
    for name in ("heldout.png", "views.png", "mesh_preview.png"):
        Image.new("RGB", (8, 4), (200, step, 0)).save(folder / name)
    (folder / "orbit.gif").write_bytes(b"GIF89a")
    (folder / "config.yaml").write_text("recon:\n  steps: 30\n")
    (folder / "metrics.json").write_text(json.dumps({"step": step, "objective": step / 10}))


def test_stopped_and_finished_trials_log_the_same_params_and_root_artifacts(store, tmp_path):
    """Runs named by sampled values; params = sampled keys + identity (never the whole
    config); every report's images through log_image; stopped and finished trials carry
    the same root artifacts and differ in rf.status; the parent describes and links the
    best trial; the experiment is a model-training one."""
    cb = MLflowSweepCallback(store, "parity", "s", {}, metric="objective", mode="max",
                             identity={"model": "tiny", "objects": "duck soccerball"},
                             table=(["objective", "heldout_psnr"],
                                    ["recon.weights.entropy", "recon.weights.normal_smooth"]))
    cb.setup()
    trials = {}
    for tid, entropy, last in (("a", 0.1, 30), ("b", 1.0, 20)):
        trial = SimpleNamespace(trial_id=tid, config={"recon": {"weights": {"entropy": entropy,
                                                                            "normal_smooth": 0.1}}},
                                status="TERMINATED", path=None, error_file=None,
                                last_result={"step": last})
        cb.on_trial_start(0, [], trial)
        for step in range(10, last + 1, 10):
            ckpt = tmp_path / f"{tid}_{step}"
            _preview(ckpt / "preview", step)
            if step == 30:  # only the last report exports
                (ckpt / "export").mkdir()
                (ckpt / "export" / "mesh.glb").write_bytes(b"glTF")
            cb.on_trial_result(0, [], trial, {"objective": step / 10 + 10 * entropy,
                                              "step": step})
            cb.on_checkpoint(0, [], trial, SimpleNamespace(path=str(ckpt)))
            trial.checkpoint = SimpleNamespace(path=str(ckpt))
        trials[tid] = trial
        cb.on_trial_complete(0, [], trial)
    cb.on_experiment_end(list(trials.values()))

    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("parity")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the saved runs-table view: run name, objective, its terms and the sampled params
    view = json.loads(exp.tags["mlflow.sharedViewState.rf-sweep"])
    state = json.loads(view["state"])
    assert state["selectedColumns"] == [
        "metrics.`objective`", "metrics.`heldout_psnr`", "params.`recon.weights.entropy`",
        "params.`recon.weights.normal_smooth`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`objective`", False)
    assert sweep_view_hint(store, "parity").endswith(
        f"/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=rf-sweep"
        "&workflowType=machine_learning")
    runs = {r.data.tags["rf.trial_id"]: r for r in _runs(client, "parity", "trial")}
    a, b = runs["a"], runs["b"]
    assert a.info.run_name == "entropy=0.1 normal_smooth=0.1"
    assert b.info.run_name == "entropy=1.0 normal_smooth=0.1"
    assert set(a.data.params) == set(b.data.params) == {
        "recon.weights.entropy", "recon.weights.normal_smooth", "model", "objects"}
    assert (a.data.tags["rf.status"], b.data.tags["rf.status"]) == ("finished", "stopped")
    root = {"heldout.png", "views.png", "mesh_preview.png", "orbit.gif", "config.yaml",
            "metrics.json"}
    assert _artifacts(client, a.info.run_id, "") == root | {"export", "images"}
    assert _artifacts(client, b.info.run_id, "") == root | {"images"}  # no export: stopped
    # one image per report and key, at the report's step (MLflow's image slider)
    images = _artifacts(client, b.info.run_id, "images")
    assert sum("heldout" in f and f.endswith(".png") and "compressed" not in f
               for f in images) == 2
    assert any("heldout+step+20+" in f for f in images) and any("views" in f for f in images)
    (parent,) = _runs(client, "parity", "sweep")
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Best trial: [entropy=1.0 normal_smooth=0.1]"
                           f"(#/experiments/{exp.experiment_id}/runs/{b.info.run_id}"
                           "?workflowType=machine_learning)**")
    assert "viewStateShareKey=rf-sweep" in note

    assert "objective = 12" in note and "at step 20" in note and "1 finished, 1 stopped" in note
    assert (parent.data.tags["rf.trials_finished"], parent.data.tags["rf.trials_stopped"]) == (
        "1", "1")


def test_the_objective_is_logged_first(store, tmp_path, monkeypatch):
    """MLflow's compare view plots the first metric the runs share, in logged order."""
    import rf_distributed.tracking.sweep_callback as module

    logged = []
    real = module.log_new_metrics
    monkeypatch.setattr(module, "log_new_metrics", lambda client, run_id, last, metrics, step:
                        logged.append(list(metrics)) or real(client, run_id, last, metrics, step))
    cb = MLflowSweepCallback(store, "order", "s", {}, metric="objective", mode="max")
    cb.setup()
    trial = _fake_trial(tmp_path, "t1", 1.0, export=False)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"input_psnr": 20.0, "loss/rgb": 0.1, "objective": 3.0,
                                      "step": 1})
    assert logged[0][0] == "objective" and set(logged[0]) == {"objective", "input_psnr",
                                                               "loss/rgb"}


def test_callback_reads_export_from_remote_storage_and_pickles(store, tmp_path):
    from pyarrow import fs

    trial = _fake_trial(tmp_path, "r1", 1.0)  # a non-local filesystem takes the download path
    remote = fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem())
    trial.checkpoint = SimpleNamespace(path="ckpt_r1", filesystem=remote)
    cb = MLflowSweepCallback(store, "remote", "s", {})
    cb.setup()
    cb.on_trial_start(0, [], trial)
    cb.on_trial_complete(0, [], trial)
    client = mlflow.MlflowClient(store)
    (child,) = _runs(client, "remote", "trial")
    assert child.data.metrics["input_psnr"] == 31.0
    assert _artifacts(client, child.info.run_id, "export") == {
        "export/orbit.gif",
        "export/metrics.json",
    }
    clone = pickle.loads(pickle.dumps(cb))  # what Tune stores in tuner.pkl
    assert clone.sweep_id == cb.sweep_id and clone.parent_run_id is None
    # a tuner.pkl written before identity/table existed still restores
    state = {k: v for k, v in cb.__getstate__().items() if k not in ("identity", "table")}
    older = MLflowSweepCallback.__new__(MLflowSweepCallback)
    older.__setstate__(state)
    assert older.identity == {} and older.table is None


def test_callback_stops_logging_instead_of_failing_trials(store, tmp_path, caplog, monkeypatch):
    cb = MLflowSweepCallback(store, "broken", "s", {})
    cb.setup()

    def store_gone(*args, **kwargs):
        raise MlflowException("store gone")

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", store_gone)
    trial = _fake_trial(tmp_path, "t1", 1.0)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"loss": 1.0})
    assert "MLflow logging" in caplog.text and caplog.text.count("MLflow logging") == 1


def test_callback_logs_each_step_once_after_reopen(store, tmp_path):
    cb = MLflowSweepCallback(store, "resumed", "s", {}, metric="loss", mode="min")
    cb.setup()
    trial = _fake_trial(tmp_path, "t1", 1.0, export=False)
    cb.on_trial_start(0, [], trial)
    for step in (10, 20):
        cb.on_trial_result(0, [], trial, {"loss": 1.0 / step, "step": step})
    cb.on_experiment_end([trial])  # interrupted: the trial's run is left unfinished

    # Tuner.restore unpickles the callback; the trial restores its step-10 checkpoint and
    # reports 20 again (with other values), then 30, twice (a retry within the session).
    again = pickle.loads(pickle.dumps(cb))
    again.setup()
    again.on_trial_start(0, [], trial)
    for step in (20, 30, 30):
        again.on_trial_result(0, [], trial, {"loss": 2.0 / step, "psnr": float(step),
                                             "step": step})
    export = tmp_path / "ckpt_t1" / "export"
    export.mkdir(parents=True)  # the final metrics repeat the last report, plus one more
    (export / "metrics.json").write_text(json.dumps({"loss": 2.0 / 30, "fscore": 0.5}))
    trial.checkpoint = SimpleNamespace(path=str(export.parent))
    again.on_trial_complete(0, [], trial)
    again.on_experiment_end([trial])

    client = mlflow.MlflowClient(store)
    (child,) = _runs(client, "resumed", "trial")
    history = {k: [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, k)]
               for k in ("loss", "psnr", "fscore")}
    assert sorted(history["loss"]) == [(10, 0.1), (20, 0.05), (30, 2.0 / 30)]
    assert history["psnr"] == [(20, 20.0), (30, 30.0)] and history["fscore"] == [(30, 0.5)]
    (parent,) = _runs(client, "resumed", "sweep")  # the best so far, one step per session
    best = client.get_metric_history(parent.info.run_id, "best.loss")
    assert sorted((m.step, m.value) for m in best) == [(0, 0.05), (1, 2.0 / 30)]


def test_dataset_tracker_logs_each_step_once(store, tmp_path):
    folder = tmp_path / "duck"
    folder.mkdir()
    # A task retried after a lost worker resumed from its step-2 checkpoint and wrote steps
    # 3 and 4 again: the rows the result continued from are the later ones.
    rows = [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6), (3, 0.75), (4, 0.65), (5, 0.5)]
    (folder / "history.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss/total": v}) + "\n" for s, v in rows))
    (folder / "metrics.json").write_text("{}")
    for attempt in range(2):  # the same dataset command run twice reopens the parent
        tracker = DatasetTracker(store, "ds", "ds", "ds-1")
        tracker.start({"preset": "tiny"})
        run_id = tracker.log_finished("duck", folder, {"input_psnr": 20.0}, {})
        tracker.end({"objects": 1, "finished": 1, "failed": 0, "means": {"psnr": 20.0 + attempt}})
    client = tracker.client
    curve = client.get_metric_history(run_id, "loss/total")
    assert sorted((m.step, m.value) for m in curve) == [
        (1, 0.9), (2, 0.8), (3, 0.75), (4, 0.65), (5, 0.5)]
    means = client.get_metric_history(tracker.parent_id, "mean.psnr")
    assert sorted((m.step, m.value) for m in means) == [(0, 20.0), (1, 21.0)]


def test_callback_setup_fails_fast_on_unreachable_server():
    with pytest.raises(TrackingError):
        MLflowSweepCallback("http://127.0.0.1:9", "e", "s", {}).setup()


# --------------------------------------------------------------------------- real Ray Tune


def _write_export(folder: Path, x: float) -> None:
    export = folder / "export"
    export.mkdir()
    (export / "orbit.gif").write_bytes(b"GIF89a" + bytes(16))
    (export / "metrics.json").write_text(
        json.dumps({"input_psnr": 30.0 + x, "input_mask_iou": 0.9, "heldout": {"psnr": 12.0}})
    )


def test_tune_sweep_logs_runs_and_restore_reuses_them(ray_cluster, store, tmp_path):
    from ray import tune

    def trainable(config):  # defined here so Ray ships it by value
        for step in (1, 2, 3):
            metrics = {"loss": config["x"] / step, "step": step * 10}
            if step < 3:
                tune.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as d:
                _write_export(Path(d), config["x"])
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    space = {"x": tune.grid_search([1.0, 2.0]), "recon": {"steps": 3}}
    cb = MLflowSweepCallback(store, "tune", "sweep", space, metric="input_psnr", mode="max")
    run_config = tune.RunConfig(
        name="sweep", storage_path=str(tmp_path / "ray"), callbacks=[cb], verbose=0
    )
    tune.Tuner(trainable, param_space=space, run_config=run_config).fit()

    client = mlflow.MlflowClient(store)
    (parent,) = _runs(client, "tune", "sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"x.grid_search": "[1.0, 2.0]", "recon.steps": "3"}
    assert parent.data.metrics["best.input_psnr"] == 32.0
    children = _runs(client, "tune", "trial")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["rf.status"] == "finished"
        x = float(child.data.params["x"])
        assert child.data.params["recon.steps"] == "3"
        history = client.get_metric_history(child.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(10, x), (20, x / 2), (30, x / 3)]
        assert child.data.metrics["input_psnr"] == 30.0 + x
        assert child.data.metrics["heldout.psnr"] == 12.0
        assert not {"time_this_iter_s", "training_iteration", "step"} & set(child.data.metrics)
        assert _artifacts(client, child.info.run_id, "export") == {
            "export/orbit.gif",
            "export/metrics.json",
        }
    best = max(children, key=lambda r: r.data.metrics["input_psnr"])
    assert parent.data.tags["rf.best_trial_id"] == best.data.tags["rf.trial_id"]

    # Restoring unpickles a fresh callback carrying the same sweep id: same runs, no copies.
    tune.Tuner.restore(str(tmp_path / "ray" / "sweep"), trainable=trainable).fit()
    assert [r.info.run_id for r in _runs(client, "tune", "sweep")] == [parent.info.run_id]
    assert {r.info.run_id for r in _runs(client, "tune", "trial")} == {
        r.info.run_id for r in children
    }
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_tune_resumed_errored_trial_continues_its_child_run(ray_cluster, store, tmp_path):
    from ray import tune

    marker = tmp_path / "failed_once"

    def flaky(config):
        tune.report({"loss": 1.0, "step": 1})
        if config["x"] == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("boom")
        with tempfile.TemporaryDirectory() as d:
            _write_export(Path(d), config["x"])
            tune.report({"loss": 0.5, "step": 2}, checkpoint=tune.Checkpoint.from_directory(d))

    space = {"x": tune.grid_search([1, 2])}
    cb = MLflowSweepCallback(store, "flaky", "sweep", space)
    run_config = tune.RunConfig(
        name="flaky", storage_path=str(tmp_path / "ray"), callbacks=[cb], verbose=0
    )
    tune.Tuner(flaky, param_space=space, run_config=run_config).fit()

    client = mlflow.MlflowClient(store)
    children = {r.data.params["x"]: r for r in _runs(client, "flaky", "trial")}
    failed = children["2"]
    assert (failed.info.status, failed.data.tags["rf.status"]) == ("FAILED", "error")
    assert "boom" in failed.data.tags["rf.error"]
    assert children["1"].info.status == "FINISHED"

    tune.Tuner.restore(str(tmp_path / "ray" / "flaky"), trainable=flaky, resume_errored=True).fit()
    assert len(_runs(client, "flaky", "sweep")) == 1
    after = {r.data.params["x"]: r for r in _runs(client, "flaky", "trial")}
    assert {k: r.info.run_id for k, r in after.items()} == {
        k: r.info.run_id for k, r in children.items()
    }
    resumed = after["2"]
    assert (resumed.info.status, resumed.data.tags["rf.status"]) == ("FINISHED", "finished")
    # The restarted trial reports step 1 again: its run keeps the first report of it.
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "loss")) == [1, 2]
    assert _artifacts(client, resumed.info.run_id, "export") == {
        "export/orbit.gif",
        "export/metrics.json",
    }
