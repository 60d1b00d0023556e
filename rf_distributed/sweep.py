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

from rf_core.checkpoint import load_checkpoint, save_checkpoint
from rf_core.config import to_dict
from rf_core.errors import OutputExistsError
from rf_core.image_input import load_input
from rf_core.prior.embeddings import load_embedding, save_embedding
from rf_core.prior.loading import locate_model
from rf_core.reconstruct import Reconstructor
from rf_core.reconstruct_job import config_yaml, export_run
from rf_core.run_folder import FolderLock, atomic_write_text, check_output_path
from rf_distributed.prior_server import PriorClient, server_name, start_prior_server
from rf_distributed.search_space import SweepSpec, load_sweep, make_scheduler, to_tune_space
from rf_distributed.sweep_tracking import MLflowSweepCallback
from rf_distributed.tracking import (
    check_tracking_uri,
    resolve_tracking_uri,
    sweep_url_hint,
)


class ClusterError(ConnectionError):
    """The Ray cluster cannot be reached, or cannot ever run a trial of this sweep."""


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
    fail_at_step: int | None = None
    """Testing aid: a fresh (not resumed) trial raises at this step, like a crashed worker."""


def objective(metrics: dict, weights: dict[str, float]) -> float:
    """Weighted sum of the objective's metrics that are present (held-out ones appear only in
    the final report)."""
    return float(sum(w * metrics[k] for k, w in weights.items()
                     if k in metrics and math.isfinite(metrics[k])))


def _final_metrics(recon: Reconstructor, inputs: TrialInputs, export_dir: Path) -> dict:
    metrics = recon.input_view_metrics()
    if inputs.gt is not None:
        from rf_core.evaluate import align_from_input_view, evaluate_views, mesh_metrics

        gt, k = inputs.gt, inputs.spec.input_view
        T = align_from_input_view(recon.input_camera().c2w[0], gt.cams.c2w[k])
        held_out = [i for i in range(len(gt.cams)) if i != k]
        mean = evaluate_views(lambda c, j: recon.render(c, j), gt, T, held_out)["mean"]
        metrics.update({f"heldout_{m}": v for m, v in mean.items()})
        mesh_file = export_dir / "mesh.glb"
        if mesh_file.exists():
            import trimesh

            try:
                mesh = mesh_metrics(trimesh.load(mesh_file, force="mesh"), gt, T)
                metrics.update({"chamfer_l1": mesh["chamfer_l1"], "fscore": mesh["fscore"]})
            except (OSError, ValueError) as err:  # GT mesh file not on this node, empty mesh
                metrics["mesh_metrics_error"] = str(err)
    return metrics


def train_trial(config: dict, inputs: TrialInputs) -> None:
    """The Tune trainable: one reconstruction with the sampled settings in ``config``."""
    spec = inputs.spec
    cfg = spec.job_config(config)
    cpus = max(1, int(spec.resources.get("cpu", 1)))
    torch.set_num_threads(cpus)
    prior = PriorClient(start_prior_server(cfg.model))  # this node's (and GPU's) shared server
    prior.register_embedding(inputs.token, inputs.vector)
    recon_cfg = dataclasses.replace(cfg.recon, prompt=dataclasses.replace(cfg.recon.prompt,
                                                                          token=inputs.token))
    device = "cuda" if torch.cuda.is_available() and spec.resources.get("gpu", 0) else "cpu"
    recon = Reconstructor(recon_cfg, inputs.rgb, inputs.mask, prior, device=device)
    text = config_yaml(cfg)
    resumed = tune.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            state, _ = load_checkpoint(Path(folder) / "checkpoint")
        recon.load_state_dict(state)
    weights = spec.objective
    while recon.step_count < cfg.recon.steps:
        metrics = recon.step()
        done = recon.step_count
        if inputs.fail_at_step is not None and resumed is None and done == inputs.fail_at_step:
            raise RuntimeError(f"injected failure at step {done} (fail_at_step)")
        last = done == cfg.recon.steps
        if done % spec.report_every and not last:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "checkpoint", recon.state_dict(), text)
            report = {k: v for k, v in metrics.items() if k.startswith("loss/")}
            report.update(recon.input_view_metrics() if not last else {})
            if last:
                export = Path(tmp) / "export"
                export.mkdir()
                export_run(recon, cfg.export, export, show_progress=False)
                report.update(_final_metrics(recon, inputs, export))
                (export / "config.yaml").write_text(text)
                (export / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
            report["step"] = done
            report["objective"] = objective(report, weights)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP check of ``host:port`` (ray.init itself retries for minutes on a dead address)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} must look like HOST:PORT (e.g. "
                           "10.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); "
                           "start it with `ray start --head` there, or leave out --address "
                           "for a local one") from err


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local one); one clear error if unreachable."""
    if ray.is_initialized():
        return
    if address and address != "auto":
        _reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({err}); start it with "
                           "`ray start --head` or leave out --address for a local one") from err


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What one trial asks Tune for (``tune.with_resources``): ``cpu``, ``gpu`` and any
    custom resource of ``spec.resources``."""
    return {"cpu": spec.resources.get("cpu", 1), "gpu": spec.resources.get("gpu", 0),
            **{k: v for k, v in spec.resources.items() if k not in ("cpu", "gpu")}}


def _autoscaling() -> bool:
    # Tune's own test (ray.tune.execution.cluster_info): the cluster launcher leaves this file
    # on the head node. Such a cluster may grow into a request it cannot run today.
    return Path("~/ray_bootstrap_config.yaml").expanduser().exists()


_RAY_NAMES = {"cpu": "CPU", "gpu": "GPU"}  # Tune's resource dict -> Ray's resource names


def check_trial_fits(resources: dict[str, float], nodes: list[dict]) -> None:
    """Raise :class:`ClusterError` unless one alive node of ``nodes`` (``ray.nodes()``) has at
    least ``resources`` (:func:`trial_resources`) in total: a trial's resources form one
    placement-group bundle, so they must all fit on one node, or the trial stays PENDING."""
    request = {_RAY_NAMES.get(k, k): float(v) for k, v in resources.items() if v}
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    fix = ("pass --gpus-per-trial 0, lower resources: in the sweep file, or use a bigger "
           "cluster (--address)")
    for name, amount in request.items():
        most = max((r.get(name, 0.0) for r in alive), default=0.0)
        if amount > most:
            total = sum(r.get(name, 0.0) for r in alive)
            raise ClusterError(f"a trial asks for {amount:g} {name} but no Ray node has more "
                               f"than {most:g} ({total:g} in the cluster), so it would wait "
                               f"forever; {fix}")
    if not any(all(r.get(k, 0.0) >= v for k, v in request.items()) for r in alive):
        want = ", ".join(f"{v:g} {k}" for k, v in request.items())
        shapes = dict.fromkeys(", ".join(f"{r.get(k, 0.0):g} {k}" for k in request)
                               for r in alive)  # distinct node shapes, in order
        have = "; ".join(list(shapes)[:4]) + ("; ..." if len(shapes) > 4 else "")
        raise ClusterError(f"a trial asks for {want} on one node but no Ray node has all of "
                           f"it (nodes: {have}), so it would wait forever; {fix}")


def _embedding(spec: SweepSpec, client: PriorClient, folder: Path, rgb, mask
               ) -> tuple[str, torch.Tensor]:
    """The sweep's learned token: from the config's file, a previous run, or learned now."""
    base = spec.base_config()
    if base.embedding:
        return load_embedding(base.embedding)
    path = folder / "embedding.safetensors"
    if path.exists():
        return load_embedding(path)
    result = client.invert(rgb, mask, base.inversion)
    save_embedding(path, result.token, result.vector, metadata={"model": base.model.name})
    return result.token, result.vector


def run_sweep(sweep_file: str | os.PathLike, *, address: str | None = None,
              tracking_uri: str | None = None, gpus_per_trial: float | None = None,
              resume: bool = False, storage: str | os.PathLike = "outputs/sweeps",
              fail_at_step: int | None = None, verbose: int = 1,
              check_resources: bool = True) -> dict:
    """Run (or resume) the sweep in ``sweep_file``; returns a summary with the trial counts
    (``finished``, ``stopped`` early by the scheduler, ``errors``) and the best trial.

    ``check_resources=False`` skips the check that one node of the cluster can run a trial
    (see :func:`check_trial_fits`; skipped anyway on an autoscaling cluster)."""
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
    if check_resources and not _autoscaling():
        check_trial_fits(resources, ray.nodes())
    with FolderLock(folder, "rf sweep"):  # one driver per sweep folder
        return _run_sweep(spec, base, folder, storage, uri, resume, resources, fail_at_step,
                          verbose)


def _run_sweep(spec: SweepSpec, base, folder: Path, storage: Path, uri: str, resume: bool,
               resources: dict, fail_at_step: int | None, verbose: int) -> dict:
    gpu_trials = float(spec.resources.get("gpu", 0)) > 0
    # CPU trials on this node share this server; GPU trials start one per GPU, so the
    # driver's copy (used only to learn the embedding) is stopped afterwards.
    name = server_name(gpu="driver" if gpu_trials else None)
    server = start_prior_server(base.model, name=name)
    client = PriorClient(server)
    photo = load_input(spec.image, spec.mask, base.input)
    folder.mkdir(parents=True, exist_ok=True)
    token, vector = _embedding(spec, client, folder, photo.rgb, photo.mask)
    if gpu_trials:
        ray.kill(server, no_restart=True)
    gt = None
    if spec.gt:
        from rf_core.gt_render import load_gt

        gt = load_gt(spec.gt)
    inputs = TrialInputs(spec, photo.rgb, photo.mask, token, vector, gt, fail_at_step)
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
    counts = _count_trials(spec, results)
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


def _count_trials(spec: SweepSpec, results) -> dict[str, int]:
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


__all__ = ["ClusterError", "TrialInputs", "check_trial_fits", "format_summary", "objective",
           "run_sweep", "train_trial", "trial_resources", "usable"]
