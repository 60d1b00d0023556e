"""``rf sweep``: Ray Tune over reconstruction settings, every trial tracked in MLflow.

The driver validates the sweep file, checks the tracking store and the Ray address, starts
(or finds) the shared prior server on its node, learns the embedding once, and hands the
processed photo, the embedding and the ground truth to every trial through Ray's object store
(``tune.with_parameters``), so worker nodes need none of the files. Trials are thin: build the
trial's config, wrap the server in a ``PriorClient``, step a ``Reconstructor``, report
metrics with a checkpoint every ``report_every`` steps (ASHA stops, PBT exploits and restores
these), and export video, mesh and metrics at the end. An interrupted sweep resumes with
``--resume`` (``Tuner.restore``): unfinished and failed trials continue from their checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from rf_core.atomic import atomic_write_text
from rf_core.checkpoint import load_checkpoint, save_checkpoint
from rf_core.config import to_dict
from rf_core.embedding_source import acquire_embedding, with_token
from rf_core.engine import Callback, fit
from rf_core.errors import OutputExistsError
from rf_core.evaluate_run import evaluate
from rf_core.image_input import load_input
from rf_core.prior.loading import locate_model
from rf_core.reconstruct import Reconstructor
from rf_core.reconstruct_job import config_yaml, export_run
from rf_core.run_folder import FolderLock, check_output_path
from rf_distributed.cluster import autoscaling, check_trial_fits, connect
from rf_distributed.prior_server import PriorClient, server_name, start_prior_server
from rf_distributed.search_space import to_tune_space
from rf_distributed.sweep_spec import SweepSpec, load_sweep, make_scheduler
from rf_distributed.tracking import (
    check_tracking_uri,
    resolve_tracking_uri,
    sweep_url_hint,
)
from rf_distributed.tracking.sweep_callback import MLflowSweepCallback


@dataclass
class TrialInputs:
    """What every trial of one sweep shares (shipped once through the object store)."""

    spec: SweepSpec
    rgb: torch.Tensor
    mask: torch.Tensor
    token: str
    vector: torch.Tensor
    gt: object | None = None
    """GTViews when the sweep has ground truth."""
    callbacks: list[Callback] = dataclasses.field(default_factory=list)
    """Extra ``rf_core.engine`` callbacks every trial runs after its own (picklable)."""


def objective(metrics: dict, weights: dict[str, float]) -> float:
    """Weighted sum of the objective's metrics that are present (held-out ones appear only in
    the final report)."""
    return float(sum(w * metrics[k] for k, w in weights.items()
                     if k in metrics and math.isfinite(metrics[k])))


class TuneReport(Callback):
    """Report to Tune every ``report_every`` steps and at the last one, each report with a
    checkpoint (ASHA stops, PBT exploits and restores these); the last report also exports
    video, mesh and metrics and evaluates against the sweep's ground truth."""

    def __init__(self, cfg, inputs: TrialInputs, config_text: str):
        self.cfg, self.inputs, self.text = cfg, inputs, config_text
        self.spec = inputs.spec

    def on_step(self, recon, metrics: dict) -> None:
        done, steps = recon.step_count, self.cfg.recon.steps
        last = done == steps
        if done % self.spec.report_every and not last:
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "checkpoint", recon.state_dict(), self.text)
            report = {k: v for k, v in metrics.items() if k.startswith("loss/")}
            if last:
                export = Path(tmp) / "export"
                export.mkdir()
                export_run(recon, self.cfg.export, export, show_progress=False)
                report.update(evaluate(recon, self.inputs.gt, self.spec.input_view,
                                       export / "mesh.glb"))
                (export / "config.yaml").write_text(self.text)
                (export / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
            else:
                report.update(recon.input_view_metrics())
            report["step"] = done
            report["objective"] = objective(report, self.spec.objective)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_trial(config: dict, inputs: TrialInputs) -> None:
    """The Tune trainable: one reconstruction with the sampled settings in ``config``."""
    spec = inputs.spec
    cfg = spec.job_config(config)
    torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1))))
    prior = PriorClient(start_prior_server(cfg.model))  # this node's (and GPU's) shared server
    prior.register_embedding(inputs.token, inputs.vector)
    recon_cfg = with_token(cfg.recon, inputs.token)
    device = "cuda" if torch.cuda.is_available() and spec.resources.get("gpu", 0) else "cpu"
    recon = Reconstructor(recon_cfg, inputs.rgb, inputs.mask, prior, device=device)
    resumed = tune.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            state, _ = load_checkpoint(Path(folder) / "checkpoint")
        recon.load_state_dict(state)
    fit(recon, cfg.recon.steps, [TuneReport(cfg, inputs, config_yaml(cfg)), *inputs.callbacks])


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What one trial asks Tune for (``tune.with_resources``): ``cpu``, ``gpu`` and any
    custom resource of ``spec.resources``."""
    return {"cpu": spec.resources.get("cpu", 1), "gpu": spec.resources.get("gpu", 0),
            **{k: v for k, v in spec.resources.items() if k not in ("cpu", "gpu")}}


def run_sweep(sweep_file: str | os.PathLike, *, address: str | None = None,
              tracking_uri: str | None = None, gpus_per_trial: float | None = None,
              resume: bool = False, storage: str | os.PathLike = "outputs/sweeps",
              verbose: int = 1, check_resources: bool = True,
              callbacks: list[Callback] = ()) -> dict:
    """Run (or resume) the sweep in ``sweep_file``; returns a summary with the trial counts
    (``finished``, ``stopped`` early by the scheduler, ``errors``) and the best trial.

    ``check_resources=False`` skips the check that one node of the cluster can run a trial
    (see :func:`check_trial_fits`; skipped anyway on an autoscaling cluster). ``callbacks``:
    extra ``rf_core.engine`` callbacks every trial runs (picklable; tests use them)."""
    spec = load_sweep(sweep_file)
    if gpus_per_trial is not None:
        spec.resources = {**spec.resources, "gpu": gpus_per_trial}
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    storage = Path(storage).resolve()
    folder = storage / spec.name
    check_output_path(folder, [spec.image, spec.mask, spec.gt], flag="--storage")
    if folder.exists() and not resume:
        raise OutputExistsError(f"sweep {spec.name!r} already exists in {folder}; pass "
                                "--resume to continue it, or rename the sweep")
    base = spec.base_config()
    locate_model(base.model.name, base.model.single_file_config)  # fail before Ray starts
    connect(address)
    resources = trial_resources(spec)
    if check_resources and not autoscaling():
        check_trial_fits(resources, ray.nodes())
    with FolderLock(folder, "rf sweep"):  # one driver per sweep folder
        return _run_sweep(spec, base, folder, storage, uri, resume, resources, list(callbacks),
                          verbose)


def _run_sweep(spec: SweepSpec, base, folder: Path, storage: Path, uri: str, resume: bool,
               resources: dict, callbacks: list[Callback], verbose: int) -> dict:
    gpu_trials = float(spec.resources.get("gpu", 0)) > 0
    # CPU trials on this node share this server; GPU trials start one per GPU, so the
    # driver's copy (used only to learn the embedding) is stopped afterwards.
    name = server_name(gpu="driver" if gpu_trials else None)
    server = start_prior_server(base.model, name=name)
    client = PriorClient(server)
    photo = load_input(spec.image, spec.mask, base.input)
    folder.mkdir(parents=True, exist_ok=True)
    # the sweep's token: the config's file, a previous run's, or learned now on the server
    token, vector = acquire_embedding(client, rgb=photo.rgb, mask=photo.mask,
                                      inversion=base.inversion, given=base.embedding,
                                      path=folder / "embedding.safetensors",
                                      model_name=base.model.name)
    if gpu_trials:
        ray.kill(server, no_restart=True)
    gt = None
    if spec.gt:
        from rf_core.gt_render import load_gt

        gt = load_gt(spec.gt)
    inputs = TrialInputs(spec, photo.rgb, photo.mask, token, vector, gt, callbacks)
    trainable = tune.with_resources(tune.with_parameters(train_trial, inputs=inputs), resources)
    param_space = to_tune_space(spec.space)
    id_file = folder / "sweep_id"
    if not id_file.exists():  # one MLflow parent run per sweep folder, kept across resumes
        id_file.write_text(f"{spec.name}-{uuid.uuid4().hex[:8]}")
    callback = MLflowSweepCallback(uri, spec.name, spec.name, to_dict(spec),
                                   sweep_id=id_file.read_text().strip(), metric=spec.metric,
                                   mode=spec.mode)
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
                                      callbacks=[callback], verbose=verbose,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    with _plain_ctrl_c():
        results = tuner.fit()
    counts = count_trials(spec, results)
    summary = {"sweep": spec.name, "folder": str(folder), "trials": len(results), **counts,
               "error_files": _error_files(results), "tracking_uri": uri,
               "mlflow": sweep_url_hint(uri)}
    if counts["finished"] + counts["stopped"]:
        best = results.get_best_result(spec.metric, spec.mode, scope="last")
        summary.update({"best_metric": best.metrics.get(spec.metric),
                        "best_config": dict(best.config),
                        "best_overrides": spec.job_overrides(best.config)[len(spec.overrides):],
                        "best_metrics": {k: v for k, v in best.metrics.items()
                                         if isinstance(v, (int, float))}})
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
        elif r.metrics["step"] >= spec.job_config(r.config or {}).recon.steps:
            counts["finished"] += 1
        else:
            counts["stopped"] += 1
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


def format_summary(summary: dict) -> str:
    lines = [f"sweep {summary['sweep']}: {summary['trials']} trials: {summary['finished']} "
             f"finished, {summary['stopped']} stopped early, {summary['errors']} failed"
             + (f", {summary['unfinished']} not run" if summary.get("unfinished") else "")]
    if "best_metric" in summary:
        lines.append(f"best objective: {summary['best_metric']:.4f}")
        lines.append("best config: " + (" ".join(summary["best_overrides"]) or "(base)"))
    lines.append(f"results: {summary['folder']}")
    lines.append(f"MLflow: {summary['mlflow']}")
    return "\n".join(lines)


__all__ = ["TrialInputs", "TuneReport", "count_trials",
           "format_summary", "objective", "run_sweep", "train_trial", "trial_resources",
           "usable"]
