"""rf_distributed.compare against a real sqlite MLflow store holding hand-made runs that follow
the tag contract: two sweeps whose trials differ in one swept param each, and one dataset
reconstructed with two presets (three objects each, plus a failed object)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.entities import Metric, Param
from PIL import Image

from rf_distributed.compare import (
    ID_COLUMNS,
    CompareError,
    CompareSelection,
    comparison_table,
    format_compare,
    format_table,
    plot_comparison,
    run_compare,
    select_runs,
    varying_params,
    write_csv,
    write_markdown,
)
from rf_distributed.compare import select as compare_select
from rf_distributed.tracking import TrackingError

# name -> (swept params, status, final objective, heldout_psnr or None)
SWEEP_A = {"a1": ({"recon.weights.entropy": "0.01"}, "finished", 20.5, None),
           "a2": ({"recon.weights.entropy": "0.1"}, "finished", 22.25, None),
           "a3": ({"recon.weights.entropy": "1.0"}, "error", 15.0, None)}
SWEEP_B = {"b1": ({"recon.lr": "0.001"}, "finished", 21.0, 19.5),
           "b2": ({"recon.lr": "0.01"}, "finished", 23.0, None),
           "b3": ({"recon.lr": "0.1"}, "finished", 18.0, 17.0)}
# preset -> object -> (status, input_psnr, chamfer_l1, total_seconds)
DATASET = {"fast": {"chair": ("finished", 24.0, 0.05, 100.0), "mug": ("finished", 22.0, 0.08, 90.0),
                    "shoe": ("finished", 26.0, 0.03, 110.0), "lamp": ("failed", 5.0, 0.9, 20.0)},
           "quality": {"chair": ("finished", 27.0, 0.02, 400.0),
                       "mug": ("finished", 25.5, 0.04, 380.0),
                       "shoe": ("finished", 28.5, 0.015, 420.0)}}
STEPS = {"fast": "300", "quality": "2000"}


def _run(client, experiment_id, name, tags, params=(), metrics=()) -> str:
    """A FINISHED run; a metric given as a list is a history over steps 0, 100, 200, ..."""
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    entities = []
    for key, value in dict(metrics).items():
        values = value if isinstance(value, list) else [value]
        entities += [Metric(key, float(v), now + i, 100 * i) for i, v in enumerate(values)]
    client.log_batch(run_id, metrics=entities,
                     params=[Param(k, v) for k, v in dict(params).items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _sweep(client, ids, name, trials, lr_config):
    exp = client.create_experiment(name)
    sweep_id = f"{name}-1234abcd"
    parent = _run(client, exp, name, {"rf.kind": "sweep", "rf.sweep_id": sweep_id,
                                      "rf.status": "finished"})
    ids[name] = parent
    for i, (trial, (swept, status, objective, heldout)) in enumerate(trials.items()):
        config = {"config.recon.weights.entropy": "0.1", "config.recon.lr": lr_config,
                  "config.recon.steps": "500", "config.device": f"cuda:{i}",
                  "config.embedding": f"/runs/{name}/{trial}/embedding.safetensors",
                  "config.model.name": "tiny"}
        config.update({f"config.{k}": v for k, v in swept.items()})
        metrics = {"objective": [objective - 5.0, objective], "input_psnr": objective + 1.0,
                   "input_mask_iou": 0.9, "loss/total": [1.0, 0.5 + i / 10, 0.3 + i / 10]}
        if heldout is not None:
            metrics["heldout_psnr"] = heldout
        ids[trial] = _run(client, exp, trial,
                          {"mlflow.parentRunId": parent, "rf.kind": "trial",
                           "rf.trial_id": trial, "rf.sweep_id": sweep_id, "rf.status": status},
                          {**swept, **config}, metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The sqlite store (created once per module: its tables take ~2 s) and the run ids by
    name: sweep parents by sweep name, trials a1..b3, objects as ``preset/object``."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = mlflow.MlflowClient(uri)
    ids: dict[str, str] = {}
    _sweep(client, ids, "sweep-a", SWEEP_A, "0.001")
    _sweep(client, ids, "sweep-b", SWEEP_B, "0.001")
    exp = client.create_experiment("dataset-mini")
    for preset, objects in DATASET.items():
        parent = _run(client, exp, f"mini-{preset}",
                      {"rf.kind": "dataset", "rf.dataset": "mini", "rf.dataset_id": preset[0],
                       "rf.status": "finished"})
        ids[f"mini-{preset}"] = parent
        for obj, (status, psnr, chamfer, seconds) in objects.items():
            config = {"config.recon.steps": STEPS[preset], "config.recon.lr": "0.001",
                      "config.recon.weights.entropy": "0.1", "config.model.name": "tiny",
                      "config.input.image": f"/data/mini/{obj}.png"}
            ids[f"{preset}/{obj}"] = _run(
                client, exp, obj,
                {"mlflow.parentRunId": parent, "rf.kind": "object", "rf.dataset": "mini",
                 "rf.object": obj, "rf.status": status, "rf.preset": preset, "rf.model": "tiny"},
                config,
                {"input_psnr": psnr, "input_mask_iou": 0.8, "chamfer_l1": chamfer,
                 "fscore": 1.0 - chamfer, "total_seconds": seconds,
                 "loss/total": [2.0, 1.0 + chamfer, 0.5 + chamfer]})
    return SimpleNamespace(uri=uri, db=db, client=client, ids=ids)


def _names(store, runs) -> set[str]:
    by_id = {v: k for k, v in store.ids.items()}
    return {by_id[r.info.run_id] for r in runs}


FINISHED_OBJECTS = {f"{p}/{o}" for p, objs in DATASET.items() for o, v in objs.items()
                    if v[0] == "finished"}


# --------------------------------------------------------------------------- selection


def test_select_by_experiment_kind_and_status(store):
    client = store.client
    assert _names(store, select_runs(client, CompareSelection(experiments=["sweep-a"]))) == {
        "a1", "a2"}  # a3 errored: finished only by default
    assert _names(store, select_runs(client, CompareSelection(experiments=["sweep-a"],
                                                              statuses=[]))) == {"a1", "a2", "a3"}
    everything = select_runs(client, CompareSelection())
    assert _names(store, everything) == {"a1", "a2", "b1", "b2", "b3"} | FINISHED_OBJECTS
    parents = select_runs(client, CompareSelection(kinds=["sweep", "dataset"]))
    assert _names(store, parents) == {"sweep-a", "sweep-b", "mini-fast", "mini-quality"}
    assert _names(store, select_runs(client, CompareSelection(
        experiments=["sweep-a"], kinds=[], statuses=[]))) == {"sweep-a", "a1", "a2", "a3"}


def test_select_by_tag_filter_and_failed_status(store):
    client = store.client
    quality = select_runs(client, CompareSelection(tags={"rf.preset": "quality"}))
    assert _names(store, quality) == {"quality/chair", "quality/mug", "quality/shoe"}
    failed = select_runs(client, CompareSelection(tags={"rf.dataset": "mini"},
                                                  statuses=["failed"]))
    assert _names(store, failed) == {"fast/lamp"}
    good = select_runs(client, CompareSelection(experiments=["dataset-mini"],
                                                filter="metrics.input_psnr > 25"))
    assert _names(store, good) == {"quality/shoe", "quality/chair", "fast/shoe", "quality/mug"}


def test_select_by_run_ids(store):
    client, ids = store.client, store.ids
    picked = select_runs(client, CompareSelection(run_ids=[ids["a1"], ids["b2"][:8]]))
    assert _names(store, picked) == {"a1", "b2"}
    # kinds do not apply to named runs: a sweep parent can be compared too
    assert _names(store, select_runs(client, CompareSelection(run_ids=[ids["sweep-a"]]))) == {
        "sweep-a"}
    with pytest.raises(CompareError, match=r"rf\.status=failed, not in \['finished', 'stopped'\]"):
        select_runs(client, CompareSelection(run_ids=[ids["fast/lamp"]]))
    assert _names(store, select_runs(client, CompareSelection(run_ids=[ids["fast/lamp"]],
                                                              statuses=[]))) == {"fast/lamp"}
    with pytest.raises(CompareError, match="run ids not found .*0123456789abcdef"):
        select_runs(client, CompareSelection(run_ids=["0123456789abcdef"]))
    with pytest.raises(CompareError, match="not an MLflow run id"):
        select_runs(client, CompareSelection(run_ids=["chair"]))


def test_select_paginates(store, monkeypatch):
    client = store.client
    calls = []
    search = client.search_runs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("max_results"))
        return search(*args, **kwargs)

    monkeypatch.setattr(client, "search_runs", counting)
    monkeypatch.setattr(compare_select, "PAGE_SIZE", 2)
    runs = select_runs(client, CompareSelection())
    assert _names(store, runs) == {"a1", "a2", "b1", "b2", "b3"} | FINISHED_OBJECTS
    assert len(runs) == 11 and len(calls) >= 6 and set(calls) == {2}


def test_selection_errors_say_what_to_do(store):
    client = store.client
    with pytest.raises(CompareError, match="no MLflow experiment named 'nope'") as e:
        select_runs(client, CompareSelection(experiments=["sweep-a", "nope"]))
    assert "available:" in str(e.value) and "dataset-mini" in str(e.value)
    with pytest.raises(CompareError, match=r"no runs matched .*tag rf.preset=nope.*loosen"):
        select_runs(client, CompareSelection(tags={"rf.preset": "nope"}))
    with pytest.raises(CompareError, match="no runs matched") as e:
        select_runs(client, CompareSelection(experiments=["dataset-mini"], statuses=["running"]))
    message = str(e.value)
    assert "6 object/finished" in message and "1 object/failed" in message
    assert "2 dataset/finished" in message and "widen" in message
    with pytest.raises(CompareError, match="cannot search with filter"):
        select_runs(client, CompareSelection(filter="metrics.input_psnr >> 3"))


# --------------------------------------------------------------------------- the table


def test_varying_params_prefer_swept_keys_and_skip_bookkeeping(store):
    sweeps = select_runs(store.client, CompareSelection(experiments=["sweep-a", "sweep-b"]))
    # config.device / config.embedding differ but are bookkeeping; config.* copies of swept
    # keys are shown once, under the swept name
    assert varying_params(sweeps) == ["recon.lr", "recon.weights.entropy"]
    everything = select_runs(store.client, CompareSelection())
    # config.input.image differs per object but is a path
    assert varying_params(everything) == ["recon.lr", "recon.weights.entropy",
                                          "config.recon.steps"]


def test_table_rows_groups_and_sort(store):
    client = store.client
    sweeps = select_runs(client, CompareSelection(experiments=["sweep-a", "sweep-b"]))
    rows = comparison_table(sweeps, client=client)
    assert list(rows[0]) == ["run_id", "run", "experiment", "group", "recon.lr",
                             "recon.weights.entropy", "objective", "input_psnr",
                             "input_mask_iou", "heldout_psnr"]
    # best objective first
    assert [r["run"] for r in rows] == ["b2", "a2", "b1", "a1", "b3"]
    assert [r["objective"] for r in rows] == [23.0, 22.25, 21.0, 20.5, 18.0]
    b2 = rows[0]
    assert b2["run_id"] == store.ids["b2"][:8] and b2["group"] == "sweep-b"
    assert b2["experiment"] == "sweep-b" and b2["heldout_psnr"] is None
    # a swept key missing on a run shows its config.* value
    assert b2["recon.weights.entropy"] == "0.1" and rows[1]["recon.lr"] == "0.001"
    by_heldout = comparison_table(sweeps, sort="heldout_psnr", client=client)
    assert [r["run"] for r in by_heldout[:2]] == ["b1", "b3"]
    assert all(r["heldout_psnr"] is None for r in by_heldout[2:])

    objects = select_runs(client, CompareSelection(experiments=["dataset-mini"]))
    rows = comparison_table(objects, sort="total_seconds", client=client)
    # lower is better for seconds: ascending
    assert [(r["group"], r["object"]) for r in rows] == [
        ("mini [fast]", "mug"), ("mini [fast]", "chair"), ("mini [fast]", "shoe"),
        ("mini [quality]", "mug"), ("mini [quality]", "chair"), ("mini [quality]", "shoe")]
    assert [r["total_seconds"] for r in rows] == [90.0, 100.0, 110.0, 380.0, 400.0, 420.0]
    assert [k for k in rows[0] if k not in ID_COLUMNS] == [
        "config.recon.steps", "input_psnr", "input_mask_iou", "chamfer_l1", "fscore",
        "total_seconds"]
    # sorting by a metric outside the chosen columns adds it
    assert list(comparison_table(objects, metrics=["chamfer_l1"], params=[],
                                 sort="total_seconds")[0])[-2:] == ["chamfer_l1", "total_seconds"]
    with_errors = comparison_table(
        select_runs(client, CompareSelection(experiments=["sweep-a"], statuses=[])))
    assert [(r["run"], r["status"]) for r in with_errors] == [
        ("a2", "finished"), ("a1", "finished"), ("a3", "error")]
    assert with_errors[0]["group"] == "sweep-a-1234abcd"  # no client: the sweep id
    by_param = comparison_table(objects, metrics=["chamfer_l1"], params=["recon.steps"],
                                sort="recon.steps")
    assert [r["recon.steps"] for r in by_param] == ["300"] * 3 + ["2000"] * 3  # numerically
    assert [r["chamfer_l1"] for r in by_param[:3]] == [0.05, 0.08, 0.03]  # ties keep run order


def test_table_rejects_unknown_columns(store):
    runs = select_runs(store.client, CompareSelection(experiments=["sweep-a"]))
    with pytest.raises(CompareError, match="metric 'input_psn'.*did you mean input_psnr"):
        comparison_table(runs, metrics=["input_psn"])
    with pytest.raises(CompareError, match="param 'recon.lrr'"):
        comparison_table(runs, params=["recon.lrr"])
    with pytest.raises(CompareError, match="cannot sort by 'psnr'"):
        comparison_table(runs, sort="psnr")


# --------------------------------------------------------------------------- writers


def test_csv_and_markdown_round_trip(store, tmp_path):
    sweeps = select_runs(store.client, CompareSelection(experiments=["sweep-a", "sweep-b"]))
    rows = comparison_table(sweeps, client=store.client)
    rows[0]["run"] = "b2 | best"  # a pipe must not break the markdown table
    columns = list(rows[0])
    with write_csv(rows, tmp_path / "t.csv").open(newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == columns and len(back) == len(rows)
    for row, read in zip(rows, back):
        for c in columns:
            if isinstance(row[c], float):
                assert float(read[c]) == row[c]
            else:
                assert read[c] == ("" if row[c] is None else row[c])
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed

    lines = write_markdown(rows, tmp_path / "t.md").read_text().splitlines()
    assert len(lines) == len(rows) + 2
    assert [c.strip() for c in lines[0].strip("|").split(" | ")] == columns
    marks = lines[1].strip("|").split("|")
    assert marks[columns.index("objective")] == "---:" and marks[columns.index("run")] == "---"
    first = [c.strip() for c in lines[2][2:-2].split(" | ")]
    assert first[columns.index("run")] == "b2 \\| best"
    assert first[columns.index("objective")] == "23"
    assert first[columns.index("heldout_psnr")] == "-"


def test_format_table_aligns_and_rounds():
    rows = [{"run": "a", "psnr": 23.456789, "time": 12345.678, "note": None},
            {"run": "longer", "psnr": 7.0, "time": 0.000123456, "note": "x" * 50}]
    text = format_table(rows, ["run", "psnr", "time", "note"], max_width=10)
    lines = text.splitlines()
    assert lines[0].split() == ["run", "psnr", "time", "note"]
    assert lines[2].split() == ["a", "23.46", "1.235e+04", "-"]
    assert lines[3].split() == ["longer", "7", "0.0001235", "xxxxxxxxx…"]
    time_end = lines[0].index("time") + 4  # numbers are right-aligned under their header
    assert all(line[:time_end].endswith(v) for line, v in
               zip(lines[2:], ["1.235e+04", "0.0001235"]))
    assert format_table([], ["run"]) == "(no runs)"


# --------------------------------------------------------------------------- plots


def _check_png(path: Path, size: tuple[int, int]) -> None:
    """A PNG about ``size`` (the figure at 100 dpi): the tight save trims margins and adds the
    legend outside the axes."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert all(0.75 * want <= got <= 1.25 * want for got, want in zip(im.size, size))
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # drawn on, not a blank canvas


def test_plots_skip_what_the_data_lacks(store, tmp_path):
    client = store.client
    sweeps = select_runs(client, CompareSelection(experiments=["sweep-a", "sweep-b"]))
    rows = comparison_table(sweeps, client=client)
    paths, notes = plot_comparison(rows, sweeps, tmp_path, client=client,
                                   params=["recon.lr", "recon.weights.entropy"],
                                   metrics=["objective", "input_psnr"])
    assert [p.name for p in paths] == ["metric_vs_params.png", "learning_curves.png"]
    # each sweep varies one param from a shared base: 4 of the 6 cells, no heatmap
    assert notes == ["no objective heatmap over recon.lr × recon.weights.entropy: the runs "
                     "fill 4 of its 6 cells (a heatmap needs 75%)",
                     "no per-object bars: no selected run is a dataset object (rf.object)"]
    _check_png(paths[0], (1000, 380))  # two panels of 4.2 x 3.4 in (+0.4 title, +1.6 legend)
    _check_png(paths[1], (900, 450))

    paths, notes = plot_comparison(rows, sweeps, tmp_path / "fallback", client=client,
                                   params=[], metrics=["objective"], curve_metric="loss/none")
    assert [p.name for p in paths] == ["learning_curves.png"]  # objective's history instead
    assert any("learning curves show objective" in n for n in notes)
    assert any("no objective-vs-hyperparameter plot" in n for n in notes)

    # sweeps and objects: objects have no objective, so their config.recon.steps (300, 2000)
    # gets no panel beside the trials' single value (500), and the bars fall back
    everything = select_runs(client, CompareSelection())
    rows = comparison_table(everything, client=client)
    paths, notes = plot_comparison(rows, everything, tmp_path / "all", client=client,
                                   params=["recon.lr", "recon.weights.entropy",
                                           "config.recon.steps"],
                                   metrics=["objective", "input_psnr"])
    assert [p.name for p in paths] == ["metric_vs_params.png", "per_object.png",
                                       "learning_curves.png"]
    assert notes[1:] == ["per-object bars show input_psnr: no dataset object run has objective"]
    assert notes[0].startswith("no objective heatmap")
    _check_png(paths[0], (1000, 380))

    objects = select_runs(client, CompareSelection(experiments=["dataset-mini"]))
    rows = comparison_table(objects, client=client)
    paths, notes = plot_comparison(rows, objects, tmp_path / "objects", client=None,
                                   params=["config.recon.steps"], metrics=["input_psnr"])
    assert [p.name for p in paths] == ["metric_vs_params.png", "per_object.png"]
    assert notes == ["no learning curves: they need an MLflow client to read histories"]
    _check_png(paths[1], (760, 420))


# --------------------------------------------------------------------------- run_compare


def test_run_compare_writes_files_and_logs_a_comparison_run(store, tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare(CompareSelection(experiments=["dataset-mini"]),
                          tracking_uri=store.uri, out_dir=out)
    assert [r["input_psnr"] for r in summary["rows"]] == [28.5, 27.0, 26.0, 25.5, 24.0, 22.0]
    assert summary["params"] == ["config.recon.steps"] and summary["sort"] == "input_psnr"
    assert summary["notes"] == ["left out 1 run with rf.status failed (1); an empty status "
                                "list includes them"]
    names = {"table.csv", "table.md", "selection.json", "metric_vs_params.png",
             "per_object.png", "learning_curves.png"}
    assert {Path(f).name for f in summary["files"]} == names
    assert {p.name for p in out.iterdir()} == names
    saved = json.loads((out / "selection.json").read_text())
    assert set(saved["run_ids"]) == {store.ids[n] for n in FINISHED_OBJECTS}

    client = store.client
    run = client.get_run(summary["comparison_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["rf.kind"] == "comparison"
    assert json.loads(run.data.tags["rf.compare.selection"])["experiments"] == ["dataset-mini"]
    assert run.data.tags["mlflow.note.content"].startswith("| run_id | run | experiment |")
    assert client.get_experiment(run.info.experiment_id).name == "comparisons"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == names
    # a sqlite store keeps artifacts beside its database
    assert run.info.artifact_uri.removeprefix("file://").startswith(
        str(store.db.parent / "artifacts"))
    copy = client.download_artifacts(run.info.run_id, "table.csv", str(tmp_path))
    assert Path(copy).read_bytes() == (out / "table.csv").read_bytes()

    text = format_compare(summary)
    assert "experiment" not in text.splitlines()[0]  # one experiment: column hidden
    assert text.splitlines()[2].split()[:3] == [store.ids["quality/shoe"][:8], "shoe",
                                                "mini"]
    assert "6 runs, sorted by input_psnr, best (highest) first" in text
    assert f"logged as run {run.info.run_id} in MLflow experiment 'comparisons'" in text
    assert "MLflow: " in text and " ui --backend-store-uri" in text

    # comparison runs are not compared by default; a plot the data no longer allows is removed
    (out / "metric_heatmap.png").write_bytes(b"an older comparison's")
    again = run_compare(CompareSelection(experiments=["sweep-a", "sweep-b"]),
                        tracking_uri=store.uri, out_dir=out, log_to_mlflow=False)
    assert again["comparison_run_id"] is None and len(again["rows"]) == 5
    assert not (out / "per_object.png").exists()
    assert not (out / "metric_heatmap.png").exists()
    assert len(select_runs(client, CompareSelection())) == 11


def test_run_compare_unreachable_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is not reachable"):
        run_compare(CompareSelection(), tracking_uri="http://127.0.0.1:9")
    assert time.monotonic() - start < 6.0


def test_run_compare_missing_sqlite_store(tmp_path):
    db = tmp_path / "none" / "mlflow.db"
    with pytest.raises(CompareError, match="no MLflow store at .*rf sweep"):
        run_compare(CompareSelection(), tracking_uri=f"sqlite:///{db}", out_dir=tmp_path)
    assert not db.parent.exists()


def test_cli_compare_end_to_end(store, tmp_path, capsys):
    """`rf compare` through the command line: selection flags, files, exit codes."""
    from rf_cli.main import main

    uri = store.uri
    code = main(["compare", "--tracking-uri", uri, "--kind", "object", "--tag",
                 "rf.preset=quality", "--sort", "chamfer_l1", "--out", str(tmp_path / "c"),
                 "--no-log"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.split()[:1] and len(ln.split()) > 3]
    objects = [ln.split()[3] for ln in lines if ln.split()[3] in ("chair", "mug", "shoe")]
    assert objects == ["shoe", "chair", "mug"]  # chamfer 0.015 < 0.02 < 0.04
    rows = list(csv.DictReader((tmp_path / "c" / "table.csv").open()))
    assert [r["object"] for r in rows] == ["shoe", "chair", "mug"]
    assert main(["compare", "--tracking-uri", uri, "--tag", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_sweeps_over_objects_get_per_object_columns():
    from rf_distributed.compare.table import per_object_columns, table_columns

    present = {"objective", "input_psnr", "input_psnr/duck", "heldout_psnr", "heldout_psnr/duck",
               "heldout_psnr/ball", "heldout_psnr/worst", "chamfer_l1", "chamfer_l1/duck",
               "loss/rgb"}
    assert per_object_columns(present) == ["heldout_psnr/ball", "heldout_psnr/duck",
                                           "heldout_psnr/worst"]
    assert per_object_columns({"objective", "input_psnr"}) == []
    assert per_object_columns({"input_psnr/duck", "input_psnr/worst"}) == [
        "input_psnr/duck", "input_psnr/worst"]
    run = SimpleNamespace(data=SimpleNamespace(metrics=dict.fromkeys(present, 1.0),
                                               params={"recon.weights.entropy": "0.1"}))
    _, metrics = table_columns([run], None, ["recon.weights.entropy"], None)
    assert metrics == ["objective", "input_psnr", "heldout_psnr", "chamfer_l1",
                       "heldout_psnr/ball", "heldout_psnr/duck", "heldout_psnr/worst"]


# --------------------------------------------------------------------------- readable plots


def _trials(settings: list[dict], metric: str, values: list[float], group: str = "grid-sweep"
            ) -> list[dict]:
    """Table rows of a Ray sweep: run names ``3f2a1_0000i (tag)``, labelled ``0000i``."""
    return [{"run_id": f"{i:08x}", "run": f"3f2a1_{i:05d} ({i}_tag)", "group": group,
             **params, metric: value} for i, (params, value) in enumerate(zip(settings, values))]


@pytest.mark.parametrize("values, scale", [
    ([1e-4, 1e-3, 1e-2], ("log", None)),  # even ratios over two decades
    ([1, 3, 10, 30], ("log", None)),
    ([1, 2, 3, 30], ("log", None)),  # a straggler far out: linear would squash the rest
    ([0.001, 0.1, 0.1], ("log", None)),  # two distinct values a decade or more apart
    ([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], ("linear", None)),  # even steps
    ([1, 2, 4, 8], ("linear", None)),  # even ratios, but under a decade
    ([300, 2000], ("linear", None)),
    ([0, 1e-3, 1e-2, 1e-1], ("symlog", 1e-3)),  # switched off, then decades
    ([0, 0.1, 0.2, 0.3], ("linear", None)),
    ([-1e-3, 1e-3, 1e-1], ("linear", None)),  # signed: an offset, not a scale
    ([0.5], ("linear", None)),
])
def test_axis_scale_rule(values, scale):
    from rf_distributed.compare.plots import axis_scale

    assert axis_scale(values) == scale


def test_metric_vs_params_axes_labels_and_best():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from rf_distributed.compare.plots import metric_vs_params_figure

    settings = [{"recon.lr": lr, "recon.steps": steps, "recon.weights.entropy": ent}
                for lr, steps, ent in [("0.0001", "500", "0"), ("0.001", "1000", "0.001"),
                                       ("0.01", "1500", "0.01"), ("0.1", "2000", "0.1"),
                                       ("0.01", "2500", "0.1")]]
    rows = _trials(settings, "chamfer_l1", [0.09, 0.05, 0.03, 0.08, 0.04])
    notes: list[str] = []
    fig = metric_vs_params_figure(rows, ["recon.lr", "recon.steps", "recon.weights.entropy"],
                                  "chamfer_l1", notes)
    assert notes == [] and isinstance(fig.canvas, FigureCanvasAgg)
    lr, steps, entropy = fig.axes
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "linear", "symlog"]
    assert entropy.xaxis.get_transform().linthresh == 1e-3
    # a log axis ticks exactly the swept values
    assert [t.get_text() for t in lr.get_xticklabels()] == ["0.0001", "0.001", "0.01", "0.1"]
    assert [t.get_text() for t in entropy.get_xticklabels()] == ["0", "0.001", "0.01", "0.1"]
    for ax in fig.axes:  # every point labelled with its run; the best (lowest) in bold
        labels = {t.get_text(): t for t in ax.texts}
        assert set(labels) == {"00000", "00001", "00002", "00003", "00004"}
        assert [k for k, t in labels.items() if t.get_fontweight() == "bold"] == ["00002"]
        assert labels["00002"].xy == (float(settings[2][ax.get_xlabel()]), 0.03)
    legend = [t.get_text() for t in entropy.get_legend().get_texts()]
    assert legend == ["grid-sweep", "best: 00002 (0.03)"]
    legend_box = entropy.get_legend().get_window_extent()
    assert legend_box.x0 >= entropy.get_window_extent().x1  # outside the axes, not over data
    title = fig.get_suptitle()
    assert "chamfer_l1 (lower is better)" in title and "grid-sweep" in title


def test_point_labels_do_not_overlap():
    from rf_distributed.compare.plots import metric_vs_params_figure

    # four runs at one lr with almost the same value: their labels are moved apart
    settings = [{"recon.lr": lr} for lr in ["0.01", "0.01", "0.01", "0.01", "0.1", "0.001"]]
    fig = metric_vs_params_figure(_trials(settings, "input_psnr",
                                          [20.0, 20.01, 20.02, 20.03, 18.0, 19.0]),
                                  ["recon.lr"], "input_psnr", [])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 6
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_heatmap_for_a_two_param_grid():
    import numpy as np
    from matplotlib.patches import Rectangle

    from rf_distributed.compare.plots import metric_heatmap_figure

    # lr x 3, entropy x 2: (0.1, 0.1) missing, (0.01, 0) run twice
    grid = [("0.001", "0", 20.0), ("0.01", "0", 22.0), ("0.01", "0", 23.0), ("0.1", "0", 18.0),
            ("0.001", "0.1", 21.0), ("0.01", "0.1", 24.5)]
    settings = [{"recon.weights.entropy": ent, "recon.lr": lr} for lr, ent, _ in grid]
    rows = _trials(settings, "heldout_psnr", [v for _, _, v in grid])
    notes: list[str] = []
    fig = metric_heatmap_figure(rows, ["recon.weights.entropy", "recon.lr"], "heldout_psnr",
                                notes)
    assert notes == []
    ax, colorbar = fig.axes
    # the param with more values along x; both in value order, rows bottom-up
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("recon.lr", "recon.weights.entropy")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "0.1"]
    cells = ax.images[0].get_array()
    np.testing.assert_array_equal(cells.filled(np.nan),
                                  [[20.0, 22.5, 18.0], [21.0, 24.5, np.nan]])
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    assert texts == {(0, 0): "20", (1, 0): "22.5\nn=2", (2, 0): "18", (0, 1): "21",
                     (1, 1): "24.5", (2, 1): "no run"}
    best = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [(p.get_x(), p.get_y()) for p in best] == [(0.5, 0.5)]  # 24.5 outlined
    assert colorbar.get_ylabel() == "heldout_psnr (higher is better)"
    assert "heldout_psnr over recon.lr × recon.weights.entropy" in ax.get_title()

    lower = metric_heatmap_figure(_trials(settings, "chamfer_l1", [v for _, _, v in grid]),
                                  ["recon.weights.entropy", "recon.lr"], "chamfer_l1", [])
    assert lower.axes[1].get_ylabel() == "chamfer_l1 (lower is better)"
    assert [(p.get_x(), p.get_y()) for p in lower.axes[0].patches] == [(1.5, -0.5)]  # 18
    objective = metric_heatmap_figure(_trials(settings, "objective", [v for _, _, v in grid]),
                                      ["recon.weights.entropy", "recon.lr"], "objective", [])
    assert objective.axes[1].get_ylabel() == "objective"  # its sweep's mode is not recorded

    # a text param is a category axis too
    models = [{"model.name": m, "recon.lr": lr} for m in ("tiny", "base") for lr in ("1", "2")]
    fig = metric_heatmap_figure(_trials(models, "input_psnr", [1.0, 2.0, 3.0, 4.0]),
                                ["model.name", "recon.lr"], "input_psnr", [])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "tiny"]
    np.testing.assert_array_equal(ax.images[0].get_array(), [[3.0, 1.0], [4.0, 2.0]])


def test_no_heatmap_for_one_param_a_sparse_grid_or_three_params():
    from rf_distributed.compare.plots import metric_heatmap_figure

    notes: list[str] = []
    line = [{"recon.lr": lr, "recon.steps": "500"} for lr in ("0.001", "0.01", "0.1")]
    assert metric_heatmap_figure(_trials(line, "objective", [1.0, 2.0, 3.0]),
                                 ["recon.lr", "recon.steps"], "objective", notes) is None
    assert notes == []  # a 1-D sweep has no grid to miss
    cross = [{"a": a, "b": b} for a, b in [("1", "1"), ("2", "1"), ("3", "1"), ("1", "2"),
                                           ("1", "3")]]
    assert metric_heatmap_figure(_trials(cross, "objective", [1.0] * 5), ["a", "b"],
                                 "objective", notes) is None
    assert notes == ["no objective heatmap over a × b: the runs fill 5 of its 9 cells (a "
                     "heatmap needs 75%)"]
    cube = [{"a": a, "b": b, "c": c} for a in "12" for b in "12" for c in "12"]
    assert metric_heatmap_figure(_trials(cube, "objective", [1.0] * 8), ["a", "b", "c"],
                                 "objective", notes) is None
    assert len(notes) == 1


def test_plot_comparison_writes_the_heatmap_for_a_grid(tmp_path):
    settings = [{"recon.lr": lr, "recon.weights.entropy": ent}
                for lr in ("0.001", "0.01", "0.1") for ent in ("0", "0.01", "0.1")]
    rows = _trials(settings, "heldout_psnr", [float(i) for i in range(9)])
    paths, notes = plot_comparison(rows, [], tmp_path, params=["recon.lr",
                                                                "recon.weights.entropy"],
                                   metrics=["heldout_psnr"])
    assert [p.name for p in paths] == ["metric_vs_params.png", "metric_heatmap.png"]
    assert notes == ["no per-object bars: no selected run is a dataset object (rf.object)",
                     "no learning curves: they need an MLflow client to read histories"]
    _check_png(paths[0], (1000, 380))
    _check_png(paths[1], (540, 350))
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in paths}

    paths, _ = plot_comparison(rows[:3], [], tmp_path / "line", params=["recon.weights.entropy"],
                               metrics=["heldout_psnr"])
    assert [p.name for p in paths] == ["metric_vs_params.png"]  # 1-D: no heatmap
