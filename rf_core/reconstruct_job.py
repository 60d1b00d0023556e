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

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rf_core.atomic import atomic_write_text
from rf_core.checkpoint import load_checkpoint, previous_path
from rf_core.config import (
    ConfigError,
    bounded,
    build,
    dump_yaml,
    load_config,
    parse_yaml,
)
from rf_core.embedding_source import acquire_embedding, with_token
from rf_core.engine import (
    Callback,
    Checkpointer,
    HistoryLog,
    ProgressBar,
    StepHook,
    fit,
    last_history_row,
    trim_history,
)
from rf_core.errors import OutputExistsError
from rf_core.export import OrbitVideoConfig, extract_mesh, orbit_frames, write_video
from rf_core.image_input import InputConfig, ProcessedInput, load_input
from rf_core.mesh_io import write_mesh, write_mesh_preview
from rf_core.precision import device_field, resolve_device
from rf_core.prior.embeddings import load_embedding
from rf_core.prior.inversion import InversionConfig
from rf_core.prior.joint import JointConfig, JointPrior
from rf_core.prior.loading import ModelConfig
from rf_core.prior.registry import make_prior, needs_inversion
from rf_core.reconstruct import Reconstructor, ReconstructorConfig
from rf_core.run_folder import (
    FolderLock,
    check_output_path,
    check_removable,
    read_marker,
    replace_folder,
    staged_folder,
    write_marker,
)


@dataclass
class ExportConfig:
    """What a finished run exports."""

    video: OrbitVideoConfig = dataclasses.field(default_factory=OrbitVideoConfig)
    """The 360° orbit video."""
    mesh: bool = True
    """Extract a mesh by marching cubes."""
    mesh_resolution: int = bounded(128, lo=8)
    """Grid points per side for marching cubes."""
    threshold: float | None = bounded(None, lo=0, lo_open=True)
    """Density level of the surface (None: rf_core.export's default, 10)."""


@dataclass
class ReconstructJobConfig:
    """Everything ``rf reconstruct`` needs. Presets (``rf_core/presets/*.yaml``) set it."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding: str | None = None
    """Textual-inversion file (.safetensors or the authors' .bin); None with --invert."""
    inversion: InversionConfig = dataclasses.field(default_factory=InversionConfig)
    """Used when the embedding is learned first (--invert)."""
    recon: ReconstructorConfig = dataclasses.field(default_factory=ReconstructorConfig)
    joint: JointConfig = dataclasses.field(default_factory=JointConfig)
    """A second prior whose score distillation adds to ``model``'s (Magic123's joint prior)."""
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    checkpoint_every: int = bounded(500, lo=1)
    """Save a resumable checkpoint every this many steps."""
    log_every: int = bounded(10, lo=1)
    """Append losses to history.jsonl every this many steps."""
    device: str = device_field("auto")
    """Where the field trains: auto (CUDA when available), cpu, cuda, cuda:N."""


def load_job_config(preset: str | None, files: list[str] = (), overrides: list[str] = ()
                    ) -> ReconstructJobConfig:
    """Preset, then YAML files, then dotted overrides -> a validated config."""
    return load_config(ReconstructJobConfig, presets=[preset] if preset else [], files=files,
                       overrides=overrides)


def config_yaml(cfg: ReconstructJobConfig) -> str:
    """The resolved config as the YAML text saved beside (and inside the checkpoint of) a run."""
    return dump_yaml(cfg)


def _device(name: str) -> torch.device:
    return resolve_device(name, "device")


def export_run(recon: Reconstructor, cfg: ExportConfig, folder: Path,
               show_progress: bool = True) -> list[Path]:
    """Write the orbit video and the mesh of ``recon`` into ``folder``."""
    white = (1.0, 1.0, 1.0)
    video = dataclasses.replace(cfg.video, radius=recon.cfg.camera.input_radius,
                                fov=recon.cfg.camera.input_fov,
                                start_azimuth=recon.cfg.camera.input_azimuth)
    with progress_context(show_progress):
        normals = "normal" in video.panels
        frames = orbit_frames(lambda cams, i: recon.render(cams, i, background=white,
                                                           normals=normals), video)
    written = write_video(frames, folder / "orbit", fps=video.fps, formats=video.formats)
    if cfg.mesh:
        field = recon.field
        with torch.no_grad():
            mesh = extract_mesh(field.density, lambda x: field(x)[1],
                                bound=recon.cfg.field.bound, resolution=cfg.mesh_resolution,
                                threshold=cfg.threshold, device=recon.device)
        written += write_mesh(mesh, folder / "mesh")
        # three sides of the mesh, the input photo's first: a look without a 3D viewer
        written.append(write_mesh_preview(mesh, folder / "mesh_preview.png",
                                          azimuth=recon.cfg.camera.input_azimuth))
    return written


@contextlib.contextmanager
def progress_context(show: bool):
    """Silence rf_core progress bars (``RF_QUIET``) inside the block unless ``show``."""
    old = os.environ.get("RF_QUIET")
    if not show:
        os.environ["RF_QUIET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RF_QUIET", None)
        else:
            os.environ["RF_QUIET"] = old


def reconstruct(image: str | os.PathLike, mask: str | os.PathLike | None, out: str | os.PathLike,
                cfg: ReconstructJobConfig, *, learn_embedding: bool = False,
                overwrite: bool = False, prior=None, show_progress: bool = True,
                on_step: Callable[[int, int, dict], None] | None = None,
                callbacks: Sequence[Callback] = ()) -> dict:
    """Reconstruct one object into the run folder ``out``; returns the final metrics.

    ``out`` is locked while the call runs (a second writer is refused), never overlaps the
    inputs, and ``overwrite`` replaces only a finished run rf wrote (see rf_core.run_folder).
    ``prior``: any ``rf_core.prior`` prior (a local model or a Ray ``PriorClient``); None
    builds the config's model. ``on_step(step, total_steps, metrics)`` is called after every
    step (progress reporting). ``callbacks`` (``rf_core.engine.Callback``) run after the run's
    own; one that stops the loop (``StopAfter``) leaves a resumable partial folder.
    """
    out = Path(out)
    if out.name in ("", ".."):  # `--out .` or `..`: name the folder itself
        out = Path(os.path.abspath(out))
    check_output_path(out, [image, mask, None if learn_embedding else cfg.embedding])
    # the photo is checked before anything (the lock, its folders) is created on disk
    processed = load_input(image, mask, cfg.input, fit_size=cfg.recon.input_size)
    with FolderLock(out, "rf reconstruct"):
        extra = [*([StepHook(on_step, cfg.recon.steps)] if on_step else []), *callbacks]
        return _reconstruct(processed, out, cfg, learn_embedding, overwrite, prior,
                            show_progress, extra)


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
                 learn_embedding: bool, overwrite: bool, prior, show_progress: bool,
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
    device = _device(cfg.device)  # a GPU this machine lacks fails before any write
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
                                     model_name=cfg.model.name, show_progress=show_progress)
    recon = Reconstructor(with_token(cfg.recon, token), processed.rgb, processed.mask, prior,
                          device=device)
    ckpt = work / "checkpoint"
    if not ckpt.exists() and previous_path(ckpt).is_dir():
        # Killed between save_checkpoint's two renames: the kept checkpoint is the latest
        # whole state (history.jsonl is trimmed to its step below).
        previous_path(ckpt).rename(ckpt)
    if ckpt.exists():
        state, _ = load_checkpoint(ckpt)
        recon.load_state_dict(state)
    trim_history(work / "history.jsonl", recon.step_count)
    t_fit = time.perf_counter()
    steps = cfg.recon.steps
    result = fit(recon, steps, [
        HistoryLog(work / "history.jsonl", cfg.log_every, steps),
        Checkpointer(ckpt, cfg.checkpoint_every, steps, text),
        ProgressBar(steps, show_progress),
        *callbacks,
    ])
    if not result.finished:
        return {"finished": False, "step": recon.step_count}
    # the final losses come from the history when no step was left to run
    metrics = result.metrics or last_history_row(work / "history.jsonl")
    fit_seconds = time.perf_counter() - t_fit
    export_run(recon, cfg.export, work, show_progress)
    result = {
        "finished": True, "steps": recon.step_count, "resumed_from": result.start_step,
        **recon.input_view_metrics(),
        "final_losses": {k: v for k, v in metrics.items() if k.startswith("loss/")},
        "skipped_steps": recon.skipped_steps, "sds_nonfinite_views": recon.sds_nonfinite_total,
        "fit_seconds": fit_seconds, "total_seconds": time.perf_counter() - t0,
        "model": cfg.model.name, "token": token, "input_notes": processed.notes,
    }
    atomic_write_text(work / "metrics.json", json.dumps(result, indent=2) + "\n")
    shutil.rmtree(previous_path(ckpt), ignore_errors=True)  # a finished run keeps one state
    write_marker(work, "reconstruct")
    replace_folder(work, out, kinds=("reconstruct",))
    return result


def export_folder(run_dir: str | os.PathLike, cfg: ExportConfig | None = None,
                  show_progress: bool = True) -> list[Path]:
    """``rf export``: re-export a finished run's video and mesh, all files at once.

    The new files are written into a hard-linked copy of the run that replaces it in one
    rename, so a failure leaves the run exactly as it was.
    """
    run = Path(run_dir)
    with FolderLock(run, "rf export"):
        _require_run(run)
        check_removable(run, kinds=("reconstruct",))
        recon, run_cfg = load_run(run)
        cfg = cfg or run_cfg.export
        with staged_folder(run, "reconstruct", copy_from=run, kinds=("reconstruct",)) as stage:
            written = export_run(recon, cfg, stage, show_progress)
        return [run / p.relative_to(stage) for p in written]


def _require_run(run: Path) -> None:
    if not (run / "checkpoint").is_dir():
        raise FileNotFoundError(f"{run} is not a run folder (no checkpoint/); make one with "
                                "`rf reconstruct`")


def run_config(run_dir: str | os.PathLike) -> ReconstructJobConfig:
    """The resolved configuration a run folder was made with (from its checkpoint)."""
    run = Path(run_dir)
    _require_run(run)
    return build(ReconstructJobConfig, parse_yaml((run / "checkpoint" / "config.yaml")
                                                 .read_text()))


def load_run(run_dir: str | os.PathLike, device: str = "auto"
             ) -> tuple[Reconstructor, ReconstructJobConfig]:
    """Rebuild a run's reconstruction (no prior attached) from its checkpoint."""
    run = Path(run_dir)
    _require_run(run)
    state, text = load_checkpoint(run / "checkpoint")
    cfg = build(ReconstructJobConfig, parse_yaml(text))
    processed = ProcessedInput.load(run / "input")
    recon = Reconstructor(cfg.recon, processed.rgb, processed.mask, prior=None,
                          device=_device(device))
    recon.load_state_dict(state)
    return recon, cfg
