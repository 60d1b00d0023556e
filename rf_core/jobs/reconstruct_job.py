"""``rf reconstruct`` / ``rf export``: one photo in, a finished run folder out.

A run is built in ``.OUT.partial/`` and renamed to ``OUT`` only when everything (checkpoint,
video, mesh, metrics) is written, so a folder named ``OUT`` is always complete. Running the same
command again after an interruption resumes from ``.OUT.partial/checkpoint`` (and from the
inversion checkpoint), giving the same result as an uninterrupted run.

Run folder::

    config.yaml            resolved configuration
    input/                 processed photo (image.png, mask.png, rgba.png)
    embedding.safetensors  the learned token (when --invert)
    checkpoint/            config.yaml + state.safetensors + state.json (resumable, exportable)
    .rf-run.json           rf's marker: the files rf wrote (only such folders are replaced)
    orbit.mp4, orbit.gif   360° turntable: rgb | normals | depth
    mesh.glb, mesh.obj     marching-cubes mesh with vertex colours
    metrics.json           input-view PSNR / mask IoU, losses, timings
    history.jsonl          losses every few steps
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rf_core.config import ConfigError
from rf_core.errors import OutputExistsError
from rf_core.evaluation.metric_registry import FIT_SECONDS, TOTAL_SECONDS
from rf_core.files.atomic import atomic_write_text
from rf_core.files.checkpoint import load_checkpoint, previous_path, restore_previous
from rf_core.files.fault_points import fault_point
from rf_core.files.run_folder import (
    FolderLock,
    check_output_path,
    check_removable,
    read_marker,
    replace_folder,
    write_marker,
)
from rf_core.fitting.engine import (
    Callback,
    Checkpointer,
    HistoryLog,
    ProgressBar,
    StepHook,
    fit,
    last_history_row,
    trim_history,
)
from rf_core.fitting.reconstruct import Reconstructor
from rf_core.input.image_input import ProcessedInput, load_input
from rf_core.jobs.embedding_source import acquire_embedding, with_token
from rf_core.jobs.export_job import export_run
from rf_core.jobs.job_config import ReconstructJobConfig, config_yaml
from rf_core.precision import resolve_device
from rf_core.prior.embeddings import load_embedding
from rf_core.prior.joint import JointPrior
from rf_core.prior.registry import make_prior, needs_inversion


def reconstruct(image: str | os.PathLike, mask: str | os.PathLike | None, out: str | os.PathLike,
                cfg: ReconstructJobConfig, *, learn_embedding: bool = False,
                overwrite: bool = False, prior=None,
                on_step: Callable[[int, int, dict], None] | None = None,
                callbacks: Sequence[Callback] = ()) -> dict:
    """Reconstruct one object into the run folder ``out``; returns the final metrics.

    ``out`` is locked while the call runs (a second writer is refused), never overlaps the
    inputs, and ``overwrite`` replaces only a finished run rf wrote (see rf_core.files.run_folder).
    ``prior``: any ``rf_core.prior`` prior (a local model or a Ray ``PriorClient``); None
    builds the config's model. ``on_step(step, total_steps, metrics)`` is called after every
    step (progress reporting). ``callbacks`` (``rf_core.fitting.engine.Callback``) run after the
    run's own; one that stops the loop (``StopAfter``) leaves a resumable partial folder.
    Progress bars show unless the call runs inside ``rf_core.progress.quiet()``.
    """
    out = Path(out)
    if out.name in ("", ".."):  # `--out .` or `..`: name the folder itself
        out = Path(os.path.abspath(out))
    check_output_path(out, [image, mask, None if learn_embedding else cfg.embedding])
    # the photo is checked before anything (the lock, its folders) is created on disk
    processed = load_input(image, mask, cfg.input, fit_size=cfg.recon.input_size)
    with FolderLock(out, "rf reconstruct"):
        extra = [*([StepHook(on_step, cfg.recon.steps)] if on_step else []), *callbacks]
        return _reconstruct(processed, out, cfg, learn_embedding, overwrite, prior, extra)


def _start_work(work: Path, text: str, overwrite: bool) -> None:
    """Create, resume or replace the partial folder ``work`` for a run with config ``text``."""
    if work.exists():
        # only our own work folder; "reconstruct": finished, and killed before its rename
        check_removable(work, kinds=("partial", "reconstruct"), exact=False)
        saved = work / "config.yaml"
        stale = not saved.is_file() or saved.read_text() != text
        progress_kept = (work / "checkpoint").exists() or (work / "embedding.safetensors").exists()
        if stale and progress_kept and not overwrite:
            raise ConfigError(f"{work} holds an interrupted run with a different configuration; "
                              "rerun with the same settings to resume it, or pass --overwrite "
                              "to discard it")
        if stale or overwrite:
            shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        write_marker(work, "partial")
        atomic_write_text(work / "config.yaml", text)


def _finished_work(work: Path, cfg: ReconstructJobConfig) -> bool:
    """Whether ``work`` holds a complete run of ``cfg`` that a crash kept from its rename."""
    saved = work / "config.yaml"
    return ((read_marker(work) or {}).get("kind") == "reconstruct"
            and (work / "metrics.json").is_file() and saved.is_file()
            and saved.read_text() == config_yaml(cfg))


def _reconstruct(processed: ProcessedInput, out: Path, cfg: ReconstructJobConfig,
                 learn_embedding: bool, overwrite: bool, prior,
                 callbacks: list[Callback]) -> dict:
    work = out.with_name(f".{out.name}.partial")
    if out.exists():
        if not overwrite:
            if (read_marker(out) or {}).get("kind") != "reconstruct":
                raise OutputExistsError(f"{out} already exists and is not a run rf wrote, so "
                                        "--overwrite will not replace it; choose another --out")
            raise OutputExistsError(f"{out} already exists (a finished run); choose another "
                                    "--out or pass --overwrite")
        check_removable(out, kinds=("reconstruct",))  # before any work, not after hours
    elif _finished_work(work, cfg):  # killed after the run was complete, before its rename
        replace_folder(work, out, kinds=("reconstruct",))
        return json.loads((out / "metrics.json").read_text())
    reads_text = needs_inversion(cfg.model)
    if not reads_text:  # the prior reads no learned token: nothing to learn or load
        learn_embedding, token = False, cfg.recon.prompt.token
    elif not learn_embedding and cfg.embedding is None:
        raise ConfigError("no embedding: pass --embedding FILE (from `rf invert`) or --invert")
    if reads_text and not learn_embedding:
        load_embedding(cfg.embedding)  # missing, malformed or non-finite: before the model loads
    device = resolve_device(cfg.device, "device")  # a GPU this machine lacks fails before any write
    t0 = time.perf_counter()
    prior = prior or make_prior(cfg.model)  # a missing model fails before any write
    if cfg.joint.enabled and not isinstance(prior, JointPrior):
        prior = JointPrior(prior, make_prior(cfg.joint.model), cfg.joint)
    if reads_text and not learn_embedding:  # a wrong-size vector fails before any write
        token, _ = acquire_embedding(prior, given=cfg.embedding)
    text = config_yaml(cfg)
    _start_work(work, text, overwrite)
    processed.save(work / "input")
    if learn_embedding:
        token, _ = acquire_embedding(prior, rgb=processed.rgb, mask=processed.mask,
                                     inversion=cfg.inversion,
                                     path=work / "embedding.safetensors",
                                     model_name=cfg.model.name)
    recon = Reconstructor(with_token(cfg.recon, token), processed.rgb, processed.mask, prior,
                          device=device)
    ckpt = work / "checkpoint"
    # Killed between save_checkpoint's two renames: the kept checkpoint is the latest whole
    # state (history.jsonl is trimmed to its step below).
    restore_previous(ckpt)
    if ckpt.exists():
        state, _ = load_checkpoint(ckpt)
        recon.load_state_dict(state)
    trim_history(work / "history.jsonl", recon.step_count)
    t_fit = time.perf_counter()
    steps = cfg.recon.steps
    result = fit(recon, steps, [
        HistoryLog(work / "history.jsonl", cfg.log_every, steps),
        Checkpointer(ckpt, cfg.checkpoint_every, steps, text),
        ProgressBar(steps),
        *callbacks,
    ])
    if not result.finished:
        return {"finished": False, "step": recon.step_count}
    # the final losses come from the history when no step was left to run
    metrics = result.metrics or last_history_row(work / "history.jsonl")
    fit_seconds = time.perf_counter() - t_fit
    export_run(recon, cfg.export, work)
    result = {
        "finished": True, "steps": recon.step_count, "resumed_from": result.start_step,
        **recon.input_view_metrics(),
        "final_losses": {k: v for k, v in metrics.items() if k.startswith("loss/")},
        "skipped_steps": recon.skipped_steps, "sds_nonfinite_views": recon.sds_nonfinite_total,
        FIT_SECONDS: fit_seconds, TOTAL_SECONDS: time.perf_counter() - t0,
        "model": cfg.model.name, "token": token, "input_notes": processed.notes,
    }
    atomic_write_text(work / "metrics.json", json.dumps(result, indent=2) + "\n")
    shutil.rmtree(previous_path(ckpt), ignore_errors=True)  # a finished run keeps one state
    fault_point("run.before_marker")
    write_marker(work, "reconstruct")
    fault_point("run.before_rename")
    replace_folder(work, out, kinds=("reconstruct",))
    return result
