"""``rf sweep``: Ray Tune over reconstruction settings, every trial tracked in MLflow.

The driver validates the sweep file, checks the tracking store and the Ray address, starts
(or finds) the shared prior server on its node, and prepares every object once: its processed
photo, its ground truth and its learned token (one textual inversion per object per sweep,
kept in ``embeddings/`` and reused by every trial and by ``--resume``). These reach every trial
through Ray's object store (``tune.with_parameters``), so worker nodes need none of the files.

A trial reconstructs every object with its sampled settings (``rf_distributed.sweep_objects``:
objects in parallel as Ray actors within the trial's resources, on the node's prior server),
and reports every ``report_every`` steps with a checkpoint (ASHA stops, PBT exploits and
restores these): the losses, the held-out metrics of every object on a fixed subset of views at
reduced size, their means and the worst object, and the objective. The last report evaluates
every view at full size and the exported meshes, and carries video, mesh and a held-out strip
per object. An interrupted sweep resumes with ``--resume`` (``Tuner.restore``): unfinished and
failed trials continue from their checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from rf_core.config import dump_yaml, to_dict
from rf_core.errors import OutputExistsError
from rf_core.evaluation.heldout import locate_clip
from rf_core.evaluation.preview import write_preview
from rf_core.files.atomic import atomic_write_text
from rf_core.files.checkpoint import load_checkpoint, save_checkpoint
from rf_core.files.fault_points import fault_point
from rf_core.files.run_folder import FolderLock, check_output_path
from rf_core.fitting.engine import Callback
from rf_core.input.dataset_listing import DatasetObject
from rf_core.input.image_input import load_input
from rf_core.jobs.embedding_source import acquire_embedding
from rf_core.prior.registry import check_available, needs_inversion
from rf_core.progress import quiet
from rf_distributed.cluster import autoscaling, check_trial_fits, connect
from rf_distributed.prior_server import PriorClient, server_name, start_prior_server
from rf_distributed.search_space import to_tune_space
from rf_distributed.sweep_console import (
    ConsoleReporter,
    format_summary,
    per_object_table,
    quiet_tune,
    rank_trials,
    result_loggers,
)
from rf_distributed.sweep_objects import (
    ObjectInputs,
    ReportPlan,
    aggregate,
    object_share,
    objective,
    start_object_fits,
)
from rf_distributed.sweep_spec import SweepSpec, load_sweep, make_scheduler
from rf_distributed.tracking import (
    check_tracking_uri,
    resolve_tracking_uri,
)
from rf_distributed.tracking.sweep_callback import MLflowSweepCallback, sweep_view_hint
from rf_distributed.tracking.tags import trial_status

REPORTED_STEP_METRICS = ("loss/", "sds/nonfinite_total", "amp/", "nonfinite_steps")
"""The last step's metrics each report carries beside the evaluation: the losses and the
silent-failure counters (dropped SDS views, the fp16 loss scale and its skipped steps)."""


@dataclass
class TrialInputs:
    """What every trial of one sweep shares (shipped once through the object store)."""

    spec: SweepSpec
    objects: list[ObjectInputs]
    """Each object's processed photo, learned token and ground truth."""
    callbacks: list[Callback] = dataclasses.field(default_factory=list)
    """Extra ``rf_core.fitting.engine`` callbacks every object of every trial runs (picklable)."""


def report_plan(spec: SweepSpec) -> ReportPlan:
    """What the sweep's reports compute besides losses (checked against the objective)."""
    clip = str(locate_clip(spec.clip_model)) if spec.needs_clip() else None
    return ReportPlan(spec.interim_plan, spec.needs_mesh_every_report(), clip)


def train_trial(config: dict, inputs: TrialInputs) -> None:
    """The Tune trainable: every object reconstructed with the sampled settings in
    ``config``, advanced together and reported every ``report_every`` steps, each report
    with a checkpoint (ASHA stops, PBT exploits and restores these); the last report also
    exports video, mesh and the held-out strip of every object and evaluates them fully."""
    spec = inputs.spec
    by_name = {o.name: o for o in spec.sweep_objects()}
    cfgs = [spec.job_config(config, by_name[o.name]) for o in inputs.objects]
    steps = cfgs[0].recon.steps
    plan = report_plan(spec)
    fits = start_object_fits(cfgs, inputs.objects, spec.resources, inputs.callbacks)
    resumed = tune.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            states = [load_checkpoint(Path(folder) / "checkpoint" / _sub(spec, n))[0]
                      for n in fits.names]
        fits.run("load_state", states)
    texts = fits.same("config_text")
    done = min(fits.same("step_count").values())
    while done < steps:
        target = min(steps, (done // spec.report_every + 1) * spec.report_every)
        losses = fits.same("advance", target)
        done = target
        last = done == steps
        with tempfile.TemporaryDirectory() as tmp:
            for name, state in fits.same("state").items():
                save_checkpoint(Path(tmp) / "checkpoint" / _sub(spec, name), state, texts[name])
            if last:
                per_object = {}
                for name, (metrics, files) in fits.same("final", plan).items():
                    per_object[name] = metrics
                    _write_files(Path(tmp) / "export" / _sub(spec, name), files)
            else:
                per_object = fits.same("interim_metrics", plan)
            for name in per_object:
                per_object[name].update({k: v for k, v in losses[name].items()
                                         if k.startswith(REPORTED_STEP_METRICS)})
            report = aggregate(per_object, per_object_keys=spec.per_object)
            report["step"] = done
            report["objective"] = objective(report, spec.objective, spec.mode)
            config_text = (dump_yaml(spec.job_config(config)) if spec.per_object
                           else texts[fits.names[0]])
            _write_preview(Path(tmp) / "preview", fits.same("preview", plan), report,
                           config_text)
            if last:
                (Path(tmp) / "export" / "metrics.json").write_text(
                    json.dumps(report, indent=2) + "\n")
                if spec.per_object:
                    (Path(tmp) / "export" / "config.yaml").write_text(config_text)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def _write_preview(folder: Path, previews: dict, report: dict, config_text: str) -> None:
    """Every report's ``preview/``: the pictures (``rf_core.evaluation.preview.write_preview``), the
    report and the trial's whole resolved config; MLflow logs them for stopped and finished
    trials alike."""
    write_preview(previews, folder)
    (folder / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "config.yaml").write_text(config_text)


def _sub(spec: SweepSpec, name: str) -> str:
    """An object's folder inside a report's checkpoint and export (flat for one photo)."""
    return name if spec.per_object else ""


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What one trial needs in all: ``cpu``, ``gpu`` and any custom resource of
    ``spec.resources``."""
    return {"cpu": spec.resources.get("cpu", 1), "gpu": spec.resources.get("gpu", 0),
            **{k: v for k, v in spec.resources.items() if k not in ("cpu", "gpu")}}


def trial_request(spec: SweepSpec):
    """What one trial asks Tune for (``tune.with_resources``): the resources as one bundle
    for a one-object sweep; with several objects an empty bundle for the trainable (it only
    waits on its objects) and one equal share per object's actor."""
    total = trial_resources(spec)
    n = len(spec.sweep_objects())
    if n == 1:
        return total
    share = object_share(total, n)
    bundle = {k.upper(): v for k, v in share.items() if v > 0}
    return tune.PlacementGroupFactory([{}] + [bundle] * n, strategy="PACK")


def run_sweep(sweep_file: str | os.PathLike, *, address: str | None = None,
              tracking_uri: str | None = None, gpus_per_trial: float | None = None,
              resume: bool = False, storage: str | os.PathLike = "outputs/sweeps",
              verbose: int = 1, check_resources: bool = True,
              callbacks: list[Callback] = ()) -> dict:
    """Run (or resume) the sweep in ``sweep_file``; returns a summary with the trial counts
    (``finished``, ``stopped`` early by the scheduler, ``errors``) and the best trial.

    ``check_resources=False`` skips the check that one node of the cluster can run a trial
    (see :func:`check_trial_fits`; skipped anyway on an autoscaling cluster). ``callbacks``:
    extra ``rf_core.fitting.engine`` callbacks every trial runs (picklable; tests use them)."""
    spec = load_sweep(sweep_file, gpus_per_trial)
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    storage = Path(storage).resolve()
    folder = storage / spec.name
    inputs = [p for o in spec.sweep_objects() for p in (o.image, o.mask, o.gt, o.embedding)]
    check_output_path(folder, [spec.objects, *inputs], flag="--storage")
    if folder.exists() and not resume:
        raise OutputExistsError(f"sweep {spec.name!r} already exists in {folder}; pass "
                                "--resume to continue it, or rename the sweep")
    base = spec.base_config()
    check_available(base.model)  # the prior's files: fail before Ray starts
    check_available(base.joint.model)
    connect(address)
    resources = trial_resources(spec)
    if check_resources and not autoscaling():
        check_trial_fits(resources, ray.nodes())
    with FolderLock(folder, "rf sweep"):  # one driver per sweep folder
        return _run_sweep(spec, base, folder, storage, uri, resume, resources, list(callbacks),
                          verbose)


def identity_params(spec: SweepSpec, base) -> dict[str, str]:
    """The few settings every trial's MLflow run shows besides its sampled values: what was
    reconstructed, with which model, for how long, judged by what. The rest of the config is
    the same for every trial and lives in the run's ``config.yaml``."""
    objective = (" + ".join(f"{w:g}*{k}" for k, w in spec.objective.items())
                 if spec.objective else spec.metric)
    params = {"model": base.model.name, "preset": spec.preset,
              "objects": " ".join(o.name for o in spec.sweep_objects()),
              "objective": objective}
    if not any(k.split("[")[0] == "recon.steps" for k in spec.space):
        params["steps"] = str(base.recon.steps)
    return params


def prepare_object(spec: SweepSpec, obj: DatasetObject, client: PriorClient, folder: Path,
                   verbose: int = 1) -> ObjectInputs:
    """Load one object's photo and ground truth, and learn its token once per sweep: kept in
    ``folder/embeddings/NAME.safetensors`` and reused by every trial and by ``--resume``.
    The object's own token file (a manifest's ``embedding``), else the config's, skips
    inversion."""
    cfg = spec.job_config({}, obj)
    photo = load_input(obj.image, obj.mask, cfg.input, fit_size=cfg.recon.input_size)
    path = folder / "embeddings" / f"{obj.name}.safetensors"
    given = obj.embedding or cfg.embedding
    if not needs_inversion(cfg.model):  # the prior reads no learned token
        return ObjectInputs(obj.name, photo.rgb, photo.mask, cfg.recon.prompt.token, None,
                            _load_gt(obj), obj.input_view)
    if given is None and not path.exists() and verbose:
        print(f"learning the token of {obj.name} ({cfg.inversion.steps} steps of textual "
              "inversion, once for the whole sweep)", flush=True)
    path.parent.mkdir(exist_ok=True)
    with quiet():  # the line above says so; the sweep's console shows no bar
        token, vector = acquire_embedding(client, rgb=photo.rgb, mask=photo.mask,
                                          inversion=cfg.inversion, given=given, path=path,
                                          model_name=cfg.model.name)
    return ObjectInputs(obj.name, photo.rgb, photo.mask, token, vector, _load_gt(obj),
                        obj.input_view)


def _load_gt(obj: DatasetObject):
    """The object's ground-truth views (with its mesh), or None."""
    if obj.gt is None:
        return None
    from rf_core.ground_truth.gt_render import load_gt

    gt = load_gt(obj.gt)
    if obj.mesh is not None:
        gt.mesh = str(obj.mesh)
    return gt


def _run_sweep(spec: SweepSpec, base, folder: Path, storage: Path, uri: str, resume: bool,
               resources: dict, callbacks: list[Callback], verbose: int) -> dict:
    gpu_trials = float(spec.resources.get("gpu", 0)) > 0
    # CPU trials on this node share this server; GPU trials start one per GPU, so the
    # driver's copy (used only to learn the embeddings) is stopped afterwards.
    name = server_name(gpu="driver" if gpu_trials else None, model=base.model)
    server = start_prior_server(base.model, name=name)
    folder.mkdir(parents=True, exist_ok=True)
    objects = [prepare_object(spec, obj, PriorClient(server), folder, verbose)
               for obj in spec.sweep_objects()]
    if gpu_trials:
        ray.kill(server, no_restart=True)
    inputs = TrialInputs(spec, objects, callbacks)
    resources = trial_request(spec)
    trainable = tune.with_resources(tune.with_parameters(train_trial, inputs=inputs), resources)
    param_space = to_tune_space(spec.space)
    id_file = folder / "sweep_id"
    if not id_file.exists():  # one MLflow parent run per sweep folder, kept across resumes
        id_file.write_text(f"{spec.name}-{uuid.uuid4().hex[:8]}")
    callback = MLflowSweepCallback(uri, spec.name, spec.name, to_dict(spec),
                                   sweep_id=id_file.read_text().strip(), metric=spec.metric,
                                   mode=spec.mode, identity=identity_params(spec, base),
                                   table=([spec.metric, *(spec.objective or {})],
                                          list(param_space)),
                                   steps_of=spec.trial_steps)
    # verbose 1: one line per report (ConsoleReporter); 2: Tune's own tables as well
    console = [ConsoleReporter(spec.metric, list(spec.objective or {}),
                               None if "recon.steps" in spec.space else base.recon.steps,
                               steps_of=spec.trial_steps)
               ] if verbose >= 1 else []
    tune_verbose = 0 if verbose <= 1 else verbose
    if resume and tune.Tuner.can_restore(str(folder)):
        tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode,
                                        num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent,
                                        scheduler=make_scheduler(spec)),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(storage),
                                      callbacks=[callback, *console, *result_loggers()],
                                      verbose=tune_verbose,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    with _plain_ctrl_c(), quiet_tune(verbose <= 1):
        results = tuner.fit()
    fault_point("sweep.fitted")
    counts = count_trials(spec, results)
    summary = {"sweep": spec.name, "folder": str(folder), "trials": len(results), **counts,
               "metric": spec.metric,
               "error_files": _error_files(results), "tracking_uri": uri,
               "mlflow": sweep_view_hint(uri, spec.name)}
    if counts["finished"] + counts["stopped"]:
        best = results.get_best_result(spec.metric, spec.mode, scope="last")
        worst = results.get_best_result(spec.metric, "min" if spec.mode == "max" else "max",
                                        scope="last")
        summary.update({"best_metric": best.metrics.get(spec.metric),
                        "best_config": dict(best.config),
                        "best_overrides": spec.job_overrides(best.config)[len(spec.overrides):],
                        "best_metrics": {k: v for k, v in best.metrics.items()
                                         if isinstance(v, (int, float))}})
        summary["ranking"] = rank_trials(
            results, spec.metric, spec.mode, spec.trial_steps)
        if spec.per_object:
            names = [o.name for o in spec.sweep_objects()]
            summary["per_object"] = {
                label: {"overrides": spec.job_overrides(r.config)[len(spec.overrides):],
                        "step": r.metrics.get("step"), spec.metric: r.metrics.get(spec.metric),
                        "objects": per_object_table(r.metrics, names)}
                for label, r in (("best", best), ("worst", worst))}
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


@contextlib.contextmanager
def _plain_ctrl_c():
    """Ctrl-C inside ``tuner.fit()`` raises KeyboardInterrupt, as anywhere else (``rf``: exit
    130, ``--resume`` continues from the checkpoints). Tune's own handler would end the fit
    normally, and the interrupted trials would be counted as stopped early by the scheduler."""
    old = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old


def count_trials(spec: SweepSpec, results) -> dict[str, int]:
    """Trials that ran all their steps, that the scheduler (ASHA) stopped early after
    reporting, that failed, and that never reported (an interrupted sweep)."""
    counts = {"finished": 0, "stopped": 0, "errors": 0, "unfinished": 0}
    for r in results:
        if r.error is not None:
            counts["errors"] += 1
        elif not r.metrics or "step" not in r.metrics:
            counts["unfinished"] += 1
        else:
            counts[trial_status(r.metrics["step"], spec.trial_steps(r.config or {}))] += 1
    return counts


def _error_files(results) -> list[str]:
    """Tune's ``error.txt`` of each failed trial (its trial folder if the file is missing)."""
    files = []
    for r in results:
        if r.error is not None and r.path:
            error = Path(r.path) / "error.txt"
            files.append(str(error if error.is_file() else r.path))
    return files


def usable(summary: dict) -> bool:
    """Whether any trial left a result: finished, or stopped early by the scheduler."""
    return bool(summary.get("finished", 0) + summary.get("stopped", 0))


__all__ = ["TrialInputs", "count_trials", "format_summary", "identity_params", "prepare_object",
           "report_plan",
           "run_sweep", "train_trial", "trial_request", "trial_resources", "usable"]
