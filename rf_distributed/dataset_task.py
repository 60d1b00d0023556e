"""One object of ``rf dataset``, on a worker: the task, its inputs as bytes, its live progress.

``run_object`` is the Ray task: invert -> reconstruct -> export -> evaluate one object on the
prior server of the node (and GPU) it lands on. The task ships its inputs (photo, mask, GT
views, mesh, embedding) as bytes, so worker nodes need none of the files, and returns the
metrics and the finished run folder as bytes (see ``rf_distributed.dataset_run`` for the driver).
Running objects tell a ``ProgressBoard`` actor on the driver's node how far they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from rf_core.config import build, deep_merge, parse_override, parse_yaml
from rf_core.errors import UserError
from rf_core.input.dataset_listing import DatasetObject
from rf_core.input.image_input import load_input
from rf_core.jobs.embedding_source import acquire_embedding
from rf_core.jobs.evaluate_run import evaluate_run, evaluation_metrics, object_overrides
from rf_core.jobs.job_config import ReconstructJobConfig
from rf_core.jobs.reconstruct_job import reconstruct
from rf_core.prior.registry import needs_inversion
from rf_core.progress import quiet
from rf_distributed.prior_server import job_prior

__all__ = ["ATTEMPT_FILE", "ObjectTask", "ProgressBoard", "Reporter", "board_detail",
           "describe_running", "pack_object", "run_object", "start_board", "unpack_files"]

ATTEMPT_FILE = ".rf_attempt"
"""Written into a finished run folder with the attempt's id: the driver compares it with the
returned one to tell whether it sees this very folder (shared storage)."""


class ProgressBoard:
    """Where running objects say how far they are; a Ray actor on the driver's node."""

    def __init__(self):
        self._state: dict[str, tuple[str, int | None, int | None]] = {}

    def report(self, name: str, stage: str, step: int | None = None,
               total: int | None = None) -> None:
        self._state[name] = (stage, step, total)

    def clear(self, name: str) -> None:
        self._state.pop(name, None)

    def snapshot(self) -> dict[str, tuple[str, int | None, int | None]]:
        return dict(self._state)


def describe_running(snapshot: dict, names: list[str], limit: int = 4) -> str:
    """``duck 150/300, cat inverting, +2 more`` for the objects in ``names``."""
    parts = []
    for name in names[:limit]:
        stage, step, total = snapshot.get(name, ("waiting", None, None))
        parts.append(f"{name} {step}/{total}" if step is not None else f"{name} {stage}")
    if len(names) > limit:
        parts.append(f"+{len(names) - limit} more")
    return ", ".join(parts)


class Reporter:
    """A task's side of the board: stage changes always, step counts every ``every_s``."""

    def __init__(self, board, name: str, every_s: float = 2.0):
        self.board, self.name, self.every = board, name, every_s
        self.last, self.stage = 0.0, None

    def __call__(self, stage: str, step: int | None = None, total: int | None = None) -> None:
        now = time.monotonic()
        if self.board is None or (stage == self.stage and step != total
                                  and now - self.last < self.every):
            return
        self.last, self.stage = now, stage
        self.board.report.remote(self.name, stage, step, total)  # fire and forget


@dataclass
class ObjectTask:
    """One object's work, as shipped to a worker."""

    name: str
    files: dict[str, bytes]
    """``role/filename`` -> bytes, roles: image, mask, gt (a folder), mesh, embedding."""
    input_view: int
    config_yaml: str
    """The dataset's resolved ``ReconstructJobConfig`` (before per-object camera overrides)."""
    work_dir: str
    """``OUT/.work/NAME`` as the driver sees it: shared storage lets a retry resume there."""
    threads: int = 1
    board: object = None
    """``ProgressBoard`` actor handle (None: no live progress)."""
    initializer: str | None = None
    """The manifest's initializer word for this object's textual inversion, if any."""
    callbacks: list = dataclasses.field(default_factory=list)
    """Extra ``rf_core.fitting.engine`` callbacks for the object's fitting loop (picklable)."""


def pack_object(obj: DatasetObject) -> dict[str, bytes]:
    files = {f"image/{obj.image.name}": obj.image.read_bytes()}
    if obj.mask is not None:
        files[f"mask/{obj.mask.name}"] = obj.mask.read_bytes()
    if obj.embedding is not None:
        files[f"embedding/{obj.embedding.name}"] = obj.embedding.read_bytes()
    if obj.gt is not None:
        for f in sorted(obj.gt.rglob("*")):
            if f.is_file():
                files[f"gt/{f.relative_to(obj.gt).as_posix()}"] = f.read_bytes()
        if isinstance(obj.mesh, Path):
            files[f"mesh/{obj.mesh.name}"] = obj.mesh.read_bytes()
        elif obj.mesh is not None:  # pybullet_data:NAME resolves on every node
            meta = json.loads(files["gt/cameras.json"])
            files["gt/cameras.json"] = json.dumps({**meta, "mesh": obj.mesh}).encode()
    return files


def unpack_files(files: dict[str, bytes], folder: Path) -> dict[str, Path]:
    """Write the shipped files under ``folder``; returns role -> path (gt: the folder)."""
    if folder.exists():
        shutil.rmtree(folder)
    roles: dict[str, Path] = {}
    for key, data in files.items():
        role, _, rel = key.partition("/")
        path = folder / role / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        roles[role] = folder / "gt" if role == "gt" else path
    if "mesh" in roles and "gt" in roles:
        meta_file = roles["gt"] / "cameras.json"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, "mesh": str(roles["mesh"])}))
    return roles


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != ATTEMPT_FILE}


def _object_config(task: ObjectTask, roles: dict[str, Path]) -> ReconstructJobConfig:
    data = parse_yaml(task.config_yaml)
    # a photo that is a GT view is reconstructed in that view's camera
    for o in object_overrides(roles.get("gt"), task.input_view, task.initializer):
        data = deep_merge(data, parse_override(o))
    return build(ReconstructJobConfig, data)


def _embedding(roles: dict, cfg, prior, work: Path, say) -> Path:
    """The object's token file: its own, else learned here once (kept in ``work``)."""
    if "embedding" in roles:
        return Path(roles["embedding"])
    path = work / "embedding.safetensors"
    if not path.exists():
        say("inverting")
        photo = load_input(roles["image"], roles.get("mask"), cfg.input,
                           fit_size=cfg.recon.input_size)
        with quiet():  # the driver's bar and board show progress, not the worker's console
            acquire_embedding(prior, rgb=photo.rgb, mask=photo.mask, inversion=cfg.inversion,
                              path=path, model_name=cfg.model.name)
    return path


def run_object(task: ObjectTask) -> tuple[dict, dict[str, bytes]]:
    """invert -> reconstruct -> export -> evaluate one object; runs inside a Ray task.

    Returns ({"name", "metrics", "evaluation", "run_dir", "attempt", "node", "node_id",
    "seconds", "notes"}, the run folder's files as bytes). ``run_dir`` holds an ``.rf_attempt``
    file with ``attempt`` in it, so the driver can tell whether it sees this very folder. The
    user's mistakes (an unusable photo or mask) are not raised but returned as ({"name",
    "error"}, {}), with the object's work folder removed: a raised error would reach the
    console as Ray's multi-line traceback.
    """
    t0 = time.perf_counter()
    say = Reporter(task.board, task.name)
    say("starting")
    torch.set_num_threads(max(1, task.threads))
    work = Path(task.work_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError:  # the driver's path is not writable here: work in a local folder
        work = Path(tempfile.gettempdir()) / "rf-dataset" / task.name
        work.mkdir(parents=True, exist_ok=True)
    notes = logging.getLogger(load_input.__module__)
    level = notes.level
    notes.setLevel(logging.ERROR)  # the driver prints the input's notes, once, by name
    try:
        return _run_object(task, work, say, t0)
    except UserError as err:
        shutil.rmtree(work, ignore_errors=True)
        return {"name": task.name, "error": str(err)}, {}
    finally:
        notes.setLevel(level)


def _run_object(task: ObjectTask, work: Path, say: Reporter, t0: float
                ) -> tuple[dict, dict[str, bytes]]:
    (work / "node").write_text(ray.get_runtime_context().get_node_id())
    roles = unpack_files(task.files, work / "inputs")
    cfg = _object_config(task, roles)
    prior = job_prior(cfg)
    if needs_inversion(cfg.model):  # else the prior reads no learned token: nothing to learn
        cfg = dataclasses.replace(cfg, embedding=str(_embedding(roles, cfg, prior, work, say)))
    run = work / "run"
    if not (run / "metrics.json").is_file():
        with quiet():
            reconstruct(roles["image"], roles.get("mask"), run, cfg, prior=prior,
                        on_step=lambda step, total, _: say("reconstructing", step, total),
                        callbacks=task.callbacks)
    metrics = json.loads((run / "metrics.json").read_text())
    evaluation = None
    if "gt" in roles:
        say("evaluating")
        with quiet():
            evaluation, _ = evaluate_run(run, roles["gt"], task.input_view)
        metrics.update(evaluation_metrics(evaluation))
    say("sending")
    files = _read_tree(run)
    attempt = uuid.uuid4().hex
    (run / ATTEMPT_FILE).write_text(attempt)
    info = {"name": task.name, "metrics": metrics, "evaluation": evaluation,
            "run_dir": str(run), "attempt": attempt, "node": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "seconds": time.perf_counter() - t0, "notes": metrics.get("input_notes", [])}
    return info, files


def start_board():
    """The progress board, on this (the driver's) node so it outlives any worker node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=here).remote()


def board_detail(board, names: list[str]) -> str | None:
    if board is None:
        return None
    try:
        return describe_running(ray.get(board.snapshot.remote(), timeout=2.0), names)
    except (ray.exceptions.RayError, TimeoutError):
        return None  # progress is best effort; the run goes on
