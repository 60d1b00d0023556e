"""``rf dataset``: reconstruct every object of a dataset across a Ray cluster, exactly once.

Each object is one Ray task (``run_object``): invert -> reconstruct -> export -> evaluate, on
the prior server of the node (and GPU) the task lands on. The task ships its inputs (photo,
mask, GT views, mesh, embedding) as bytes, so worker nodes need none of the files. It returns
its result in two parts: the metrics, and the finished run folder as bytes. When the driver
sees the worker's folder itself (shared storage), it moves that folder into place and never
fetches the bytes; otherwise it fetches them, so ``OUT`` is complete either way.

Fault tolerance, in layers:

- a worker process or a whole node lost mid-object: Ray re-runs the task (``max_retries``) on a
  surviving node. It resumes from the object's last checkpoint in ``OUT/.work/NAME`` when that
  folder is shared between nodes (NFS and the like, the usual cluster set-up), else it starts
  the object again;
- exactly one result per object: only the driver writes results. ``OUT/NAME/`` appears
  atomically (built beside, then renamed), its MLflow run is looked up by tags before one is
  created, and ``OUT/NAME/result.json`` is written last; a rerun skips objects that have it and
  completes any that crashed between those steps;
- a bad object (unreadable photo, missing mask) fails alone: ``OUT/failed/NAME.json`` and a
  FAILED MLflow run hold its error, and a rerun tries it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from rf_core.config import ConfigError, parse_yaml, to_dict
from rf_core.errors import OutputError, UserError
from rf_core.evaluation.metric_registry import INPUT_PSNR
from rf_core.files.atomic import atomic_write_text
from rf_core.files.fault_points import fault_point
from rf_core.files.run_folder import (
    FolderLock,
    check_output_path,
    check_removable,
    claim_files,
    staged_folder,
    write_marker,
)
from rf_core.input.dataset_listing import BadRow, DatasetError, DatasetObject, read_dataset
from rf_core.jobs.job_config import ReconstructJobConfig, config_yaml, load_job_config
from rf_core.prior.registry import check_available
from rf_core.progress import in_quiet_block, progress
from rf_distributed.cluster import check_reachable, connect
from rf_distributed.dataset_summary import SUMMARY_METRICS, format_dataset_summary
from rf_distributed.dataset_task import (
    ATTEMPT_FILE,
    ObjectTask,
    board_detail,
    pack_object,
    run_object,
    start_board,
)
from rf_distributed.placement import (
    GpuPlan,
    object_memory_estimate,
    plan_objects_per_gpu,
    prior_memory_gb,
    probe_gpu_memory,
)
from rf_distributed.tracking import (
    DatasetTracker,
    check_tracking_uri,
    resolve_tracking_uri,
    sweep_url_hint,
)
from rf_distributed.tracking import tags as rf_tags

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the driver side


def _shared_run(info: dict) -> Path | None:
    """The worker's run folder, if this driver sees that very folder (shared storage)."""
    run = Path(info["run_dir"])
    try:
        return run if (run / ATTEMPT_FILE).read_text() == info["attempt"] else None
    except OSError:
        return None


def _materialise(out: Path, name: str, info: dict, files_ref) -> Path:
    """``OUT/NAME``, appearing all at once: the worker's folder moved here when this driver
    sees it, else rebuilt from the returned bytes (fetched only then). An existing ``OUT/NAME``
    is replaced only if rf wrote it (a user's folder of that name makes the object fail)."""
    final = out / name
    check_removable(final, kinds=("reconstruct",))
    shared = _shared_run(info)
    with staged_folder(final, "reconstruct", kinds=("reconstruct",)) as stage:
        if shared is not None:
            (shared / ATTEMPT_FILE).unlink()
            os.rmdir(stage)
            shutil.move(str(shared), str(stage))
        else:
            for rel, data in ray.get(files_ref).items():
                path = stage / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        # The evaluation arrives with the folder: a driver killed before MLflow records the
        # object leaves a result its rerun records as it is (it has no evaluation to redo).
        if info.get("evaluation") is not None:
            atomic_write_text(stage / "evaluation.json",
                          json.dumps(info["evaluation"], indent=2, default=float) + "\n")
        metrics = {**json.loads((stage / "metrics.json").read_text()), **info["metrics"]}
        atomic_write_text(stage / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return final


def _dataset_state(out: Path, source: str, cfg_text: str) -> dict:
    """``OUT/dataset.json``: the dataset's id and settings; a rerun must match them."""
    state_file = out / "dataset.json"
    if not state_file.is_file() and out.is_dir() and any(out.iterdir()):
        raise OutputError(f"--out {out} is not empty and is not an rf dataset folder (no "
                          "dataset.json); choose a new or empty folder")
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("config") != cfg_text:
            raise ConfigError(f"{out} holds a dataset run with other settings (preset, model or "
                              "overrides); rerun with the same ones to continue it, or choose "
                              "another --out")
        return state
    out.mkdir(parents=True, exist_ok=True)
    state = {"dataset_id": f"{out.name}-{uuid.uuid4().hex[:8]}", "source": source,
             "config": cfg_text, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(state_file, json.dumps(state, indent=2) + "\n")
    write_marker(out, "dataset")
    return state


def _one_line(err: BaseException) -> str:
    """The root cause of a task error in one line (RayTaskError wraps the worker's error)."""
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(cause).__name__)[:500]


def _user_paths(error: str, obj: DatasetObject, inputs: Path) -> str:
    """Name the user's files in a worker's error, not the worker's copies of them."""
    for role in ("image", "mask", "embedding", "mesh"):
        path = getattr(obj, role)
        if isinstance(path, Path):
            error = error.replace(str(inputs / role / path.name), str(path))
    if obj.gt is not None:
        error = error.replace(str(inputs / "gt"), str(obj.gt))
    return error


class _Progress:
    """Objects done, failed and running, with an ETA from the mean object time so far."""

    def __init__(self, total: int):
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self.detail = ""
        self.t0 = time.perf_counter()
        # tqdm's own remaining-time guess counts skipped and failed objects as work done;
        # the postfix ETA uses the mean time of the objects finished so far.
        self.bar = progress(total, "objects",
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, *, done: int = 0, failed: int = 0, running: int | None = None,
               detail: str | None = None) -> None:
        self.done += done
        self.failed += failed
        if running is not None:
            self.running = running
        if detail is not None:
            self.detail = detail
        self.bar.update(done + failed)
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}, running "
                                 f"{self.running}, ETA {self.eta()}"
                                 + (f" | {self.detail}" if self.detail else ""))

    def eta(self) -> str:
        finished = self.done + self.failed
        if not finished:
            return "?"
        left = (time.perf_counter() - self.t0) / finished * (self.total - finished)
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class DatasetOptions:
    """How ``run_dataset`` runs: the job's config, the cluster, tracking and placement."""

    preset: str = "realfusion"
    model: str | None = None
    """A model name that replaces the preset's (``model.name``)."""
    config_files: Sequence[str] = ()
    overrides: Sequence[str] = ()
    address: str | None = None
    """The Ray cluster (None: a local one)."""
    tracking_uri: str | None = None
    experiment: str | None = None
    """MLflow experiment (None: ``dataset-<folder name>``)."""
    cpus_per_object: float = 1.0
    gpus_per_object: float | None = None
    """None: on a cluster with GPUs, as many objects per GPU as its free memory holds beside
    the prior (``rf_distributed.placement``), from ``object_memory_gb`` when given (a measured
    figure), else from the preset's estimate; 0 without GPUs."""
    object_memory_gb: float | None = None
    max_retries: int = 3
    callbacks: Sequence = ()
    """Fitting-loop callbacks (``rf_core.fitting.engine.Callback``) every object's run adds."""


@dataclass
class _DatasetJob:
    """What the driver settled before the first object: config, tracking, GPU share."""

    cfg: ReconstructJobConfig
    cfg_text: str
    uri: str
    tracker: DatasetTracker
    plan: GpuPlan | None
    gpus_per_object: float


def run_dataset(source: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Reconstruct every object of ``source`` into ``out``; returns the summary dict.

    ``options`` are the fields of :class:`DatasetOptions`. Rerunning the same call skips
    finished objects and retries failed ones. Objects on one GPU share its prior server; a GPU
    that cannot hold the prior and one object is a ``PlacementError`` before any object
    starts. The objects' bar (and the live
    board behind it) shows unless the call runs inside ``rf_core.progress.quiet()``.
    """
    opts = DatasetOptions(**options)
    out = Path(out).resolve()
    objects, bad_rows = read_dataset(source)
    if not objects:  # nothing could run: say why now, before Ray, MLflow or any output
        more = f" (and {len(bad_rows) - 1} more bad entries)" if len(bad_rows) > 1 else ""
        raise DatasetError(f"no usable object in {source}: {bad_rows[0].where}: "
                           f"{bad_rows[0].error}{more}")
    check_output_path(out, [source] + [p for o in objects for p in (o.image, o.mask, o.embedding,
                                                                     o.gt)])
    with FolderLock(out, "rf dataset"):
        job = _start(source, out, opts)
        rows, todo = _sort_objects(out, job, objects, bad_rows)
        t0 = _run_objects(out, job, opts, todo, rows)
        return _finish(out, job.tracker, rows, objects, bad_rows, job.uri, t0)


def _start(source, out: Path, opts: DatasetOptions) -> _DatasetJob:
    """Config, prior files, tracking store and cluster checked, GPU share planned, the MLflow
    parent run started: everything that can fail before an object runs."""
    extra = [f"model.name={opts.model}"] if opts.model else []
    cfg = load_job_config(opts.preset, list(opts.config_files), extra + list(opts.overrides))
    if cfg.embedding is not None:
        raise ConfigError("embedding is per object in a dataset: give a manifest column "
                          "'embedding', or leave it out to invert each photo")
    check_available(cfg.model)  # the prior's files: fail before Ray starts
    check_available(cfg.joint.model)
    cfg_text = config_yaml(cfg)
    uri = resolve_tracking_uri(opts.tracking_uri)
    check_tracking_uri(uri)
    if opts.address and opts.address != "auto" and not ray.is_initialized():
        check_reachable(opts.address)  # both checked before anything is written
    connect(opts.address)
    plan, gpus = None, opts.gpus_per_object
    if gpus is None:  # GPU work must be reserved, or every object lands on GPU 0
        plan = _gpu_plan(cfg, opts.object_memory_gb)  # a GPU too small fails before any output
        gpus = plan.gpu_share if plan is not None else 0.0
    state = _dataset_state(out, str(source), cfg_text)
    tracker = DatasetTracker(uri, opts.experiment or f"dataset-{out.name}", out.name,
                             state["dataset_id"], tags={rf_tags.PRESET: opts.preset,
                                                        rf_tags.MODEL: cfg.model.name})
    tracker.start({"source": str(source), "preset": opts.preset, "config": to_dict(cfg)})
    return _DatasetJob(cfg, cfg_text, uri, tracker, plan, gpus)


def _sort_objects(out: Path, job: _DatasetJob, objects: list[DatasetObject],
                  bad_rows: list[BadRow]) -> tuple[dict[str, dict], list[DatasetObject]]:
    """The summary rows known before any task (bad entries, objects finished earlier) and the
    objects left to run."""
    tracker, cfg = job.tracker, job.cfg
    rows: dict[str, dict] = {}
    for bad in bad_rows:
        if bad.skipped:  # not an object (a file that is no image): listed, not failed
            rows[bad.where] = {"object": Path(bad.where).name, "status": "skipped",
                               "error": bad.error.removeprefix("skipped: ")}
            continue
        _record_failure(out, tracker, rows, bad.name, bad.error, where=bad.where)
    todo: list[DatasetObject] = []
    for obj in objects:
        folder = out / obj.name
        if (folder / "result.json").is_file():
            rows[obj.name] = {"object": obj.name, "status": "finished (earlier)",
                              **json.loads((folder / "result.json").read_text())["metrics"]}
        elif (folder / "metrics.json").is_file():  # crashed before MLflow: finish the record
            rows[obj.name] = _record_result(out, tracker, cfg, folder, obj.name, None)
        else:
            try:  # a folder of that name that rf did not write is never replaced
                check_removable(folder, kinds=("reconstruct",))
            except OutputError as err:
                _record_failure(out, tracker, rows, obj.name, str(err))
                continue
            todo.append(obj)
            continue
        shutil.rmtree(out / ".work" / obj.name, ignore_errors=True)  # a crash may have left it

    return rows, todo


def _run_objects(out: Path, job: _DatasetJob, opts: DatasetOptions, todo: list[DatasetObject],
                 rows: dict[str, dict]) -> float:
    """Run ``todo`` as Ray tasks, a window at a time, recording each result or failure as it
    arrives; returns the start time of the progress bar."""
    tracker, cfg, cfg_text, plan = job.tracker, job.cfg, job.cfg_text, job.plan
    failed_dir = out / "failed"
    bar = _Progress(len(todo))
    # the live board only feeds the bar's detail: not started when the caller asked for quiet
    board = None if in_quiet_block() else start_board()
    pending: dict = {}
    queue = list(reversed(todo))
    if plan is not None:
        bar.write(f"rf dataset: {plan.describe()}")
    cpus = opts.cpus_per_object
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-3)))
    remote = ray.remote(run_object).options(
        num_returns=2, num_cpus=cpus, num_gpus=job.gpus_per_object,
        max_retries=opts.max_retries, retry_exceptions=False, scheduling_strategy="SPREAD")
    try:
        while queue or pending:
            while queue and len(pending) < window:
                obj = queue.pop()
                try:
                    task = ObjectTask(obj.name, pack_object(obj), obj.input_view, cfg_text,
                                      str(out / ".work" / obj.name),
                                      threads=max(1, int(cpus)),
                                      board=board, initializer=obj.initializer,
                                      callbacks=list(opts.callbacks))
                except OSError as err:
                    _record_failure(out, tracker, rows, obj.name, f"cannot read input: {err}")
                    bar.update(failed=1)
                    continue
                info_ref, files_ref = remote.remote(task)
                pending[info_ref] = (obj, files_ref)
            bar.update(running=len(pending),
                       detail=board_detail(board, [o.name for o, _ in pending.values()]))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in ready:
                obj, files_ref = pending.pop(ref)
                name = obj.name
                if board is not None:
                    board.clear.remote(name)
                try:
                    result = ray.get(ref)
                    if "error" in result:  # the object's input is unusable: one line
                        raise UserError(result["error"])
                    folder = _materialise(out, name, result, files_ref)
                except (ray.exceptions.RayError, OSError, UserError) as err:
                    text = str(err) if isinstance(err, UserError) else _one_line(err)
                    error = _user_paths(text, obj, out / ".work" / name / "inputs")
                    _record_failure(out, tracker, rows, name, error)
                    _drop(files_ref)
                    if isinstance(err, UserError):  # nothing to resume from: no copy kept
                        shutil.rmtree(out / ".work" / name, ignore_errors=True)
                    bar.update(failed=1, running=len(pending))
                    bar.write(f"failed   {name}: {error}")
                    continue
                for note in result.get("notes", []):
                    bar.write(f"note     {name}: "
                              + _user_paths(note, obj, out / ".work" / name / "inputs"))
                rows[name] = _record_result(out, tracker, cfg, folder, name, result)
                (failed_dir / f"{name}.json").unlink(missing_ok=True)
                shutil.rmtree(out / ".work" / name, ignore_errors=True)
                bar.update(done=1, running=len(pending))
                psnr = result["metrics"].get(INPUT_PSNR)
                bar.write(f"finished {name} on {result['node']} in {result['seconds']:.0f} s"
                          + (f", input PSNR {psnr:.2f} dB" if psnr is not None else ""))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return bar.t0


def _drop(files_ref) -> None:
    """Fetch a failed task's second result, so Ray does not print it as an unhandled error."""
    with contextlib.suppress(Exception):  # its error is the one already reported
        ray.get(files_ref, timeout=10)


def _gpu_plan(cfg: ReconstructJobConfig, object_memory_gb: float | None) -> GpuPlan | None:
    """Objects per GPU from measured free memory (None: the cluster has no GPU)."""
    if not ray.cluster_resources().get("GPU", 0):
        return None
    free = probe_gpu_memory()
    if free is None:
        raise UserError("could not measure a GPU's free memory on the cluster (the probe task "
                        "did not run within 2 minutes); pass --gpus-per-object")
    if object_memory_gb is not None:
        object_gb, source = object_memory_gb, "given"
    else:
        object_gb, source = object_memory_estimate(cfg).total_gb, "estimated"
    prior_gb = prior_memory_gb(cfg.model) + prior_memory_gb(cfg.joint.model)  # 0 when off
    return plan_objects_per_gpu(free, prior_gb, object_gb, source)


def _record_result(out: Path, tracker: DatasetTracker, cfg: ReconstructJobConfig, folder: Path,
                   name: str, result: dict | None) -> dict:
    """Log the object's one MLflow run, then ``result.json`` (the 'finished' mark)."""
    fault_point("dataset.before_record")
    metrics = json.loads((folder / "metrics.json").read_text())  # evaluation included
    config = parse_yaml((folder / "config.yaml").read_text()) if (
        folder / "config.yaml").is_file() else to_dict(cfg)
    node = (result or {}).get("node", "")
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))
               and not isinstance(v, bool)}
    try:
        run_id = tracker.log_finished(name, folder, metrics, config, tags={rf_tags.NODE: node})
    except Exception as err:  # noqa: BLE001 - a tracking outage must not stop the dataset
        # No result.json: the result stays on disk and the next run of the same command
        # records it in MLflow (see run_dataset's "crashed before MLflow" branch).
        logger.warning("%s: not recorded in MLflow (%s); rerun the command to record it",
                       name, _one_line(err))
        return {"object": name, "status": "finished (not in MLflow yet; rerun)", **numbers}
    record = {"name": name, "status": "finished", "mlflow_run_id": run_id, "node": node,
              "seconds": (result or {}).get("seconds"), "metrics": numbers}
    atomic_write_text(folder / "result.json", json.dumps(record, indent=2) + "\n")
    claim_files(folder, ["evaluation.json", "metrics.json", "result.json"])
    fault_point("dataset.recorded")
    return {"object": name, "status": "finished", **numbers}


def _record_failure(out: Path, tracker: DatasetTracker, rows: dict, name: str | None, error: str,
                    where: str | None = None) -> None:
    key = name or where or "?"
    rows[key] = {"object": key, "status": "failed", "error": error}
    if name is None:
        return  # a manifest row without a name: reported in the summary only
    failed = out / "failed"
    failed.mkdir(exist_ok=True)
    atomic_write_text(failed / f"{name}.json", json.dumps({"name": name, "error": error,
                                                        "where": where}, indent=2) + "\n")
    try:
        tracker.log_failed(name, error)
    except Exception as err:  # noqa: BLE001 - a tracking outage must not stop the dataset
        logger.warning("%s: failure not recorded in MLflow (%s)", name, _one_line(err))


def _finish(out: Path, tracker: DatasetTracker, rows: dict, objects: list[DatasetObject],
            bad_rows: list[BadRow], uri: str, t0: float) -> dict:
    fault_point("dataset.before_finish")
    ordered = [rows[o.name] for o in objects if o.name in rows]
    ordered += [r for k, r in rows.items() if k not in {o.name for o in objects}]
    finished = [r for r in ordered if r["status"].startswith("finished")]
    skipped = [r for r in ordered if r["status"] == "skipped"]
    means = {}
    for m in SUMMARY_METRICS:
        values = [r[m] for r in finished if isinstance(r.get(m), (int, float))]
        if values:
            means[m] = sum(values) / len(values)
    summary = {"dataset": out.name, "folder": str(out), "objects": len(ordered),
               "finished": len(finished), "skipped": len(skipped),
               "failed": len(ordered) - len(finished) - len(skipped),
               "means": means, "rows": ordered, "wall_seconds": time.perf_counter() - t0,
               "tracking_uri": uri, "experiment": tracker.experiment,
               "mlflow": sweep_url_hint(uri)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    tracker.end(summary)
    return summary


__all__ = ["DatasetOptions", "format_dataset_summary", "run_dataset"]
