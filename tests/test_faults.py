"""Fault injection: every long-running command survives kill -9 and Ctrl-C.

Each case runs an ``rf`` command as a subprocess, interrupts it at a chosen moment (a seeded
step between checkpoints, while writing a checkpoint, during export, inside a rename window),
reruns the same command to completion and compares the result with an uninterrupted run of the
same command, made once per module: every checkpoint tensor (by sha256), metrics.json (timings
aside), history.jsonl (each step once, same values), the mesh (vertices and faces), and for
sweeps and datasets the MLflow runs (one per trial or object, each metric step once, same
values). Ctrl-C must exit 130 with one line; a lock left by a killed process must not block
the rerun; ``rf export`` must leave the run as it was or fully re-exported.

How a fault is injected:

- mostly the process signals itself at a named moment the code marks
  (``rf_core.files.fault_points``: ``RF_FAULT_POINT="fit.step:5:SIGKILL"``, the 5th fitting
  step; the second checkpoint's rename, an export's swap): a real SIGKILL or SIGINT at a real
  moment, the same moment on every run;
- cases with a ``step`` are signalled from outside, as a user would (kill -9 to the process,
  Ctrl-C's SIGINT to its process group), once the run's files show it got that far
  (history.jsonl rows, the checkpoint's step, Tune's result.json).

One case per command runs by default (the CI sample); the rest are marked ``slow`` and
``faults_full`` and run with ``RF_FAULTS_FULL=1``. Kill steps come from a seeded generator.
The uninterrupted reference runs start together in the background when the module starts;
sweeps and datasets run on one Ray cluster the module starts (``--address``), except the
``local-ray`` cases, whose killed driver takes its own Ray down with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "duck.png"
FULL = os.environ.get("RF_FAULTS_FULL") == "1"
FULL_ONLY = [pytest.mark.slow, pytest.mark.faults_full,
             pytest.mark.skipif(not FULL, reason="the full fault set runs with RF_FAULTS_FULL=1")]
RNG = random.Random(20240611)  # the kill steps: the same faults on every run
TIMEOUT = 300  # seconds for one command; a hung resume fails instead of blocking CI
INTERRUPTED = "rf: interrupted; rerun the same command to resume"
TIMINGS = {"fit_seconds", "total_seconds", "seconds", "resumed_from"}
"""Keys that describe the clock or the interruption, not the result."""

# Small runs; the seeded kills need steps between checkpoints to land in.
INVERT_STEPS, INVERT_EVERY = 24, 4
INVERT = [f"inversion.steps={INVERT_STEPS}", "inversion.grad_accum=1",
          f"inversion.checkpoint_every={INVERT_EVERY}", "input.size=64"]
RECON_STEPS, RECON_EVERY = 12, 4
RECON = [f"recon.steps={RECON_STEPS}", "recon.input_size=24", "recon.input_rays=256",
         "recon.sds_size=16", "recon.albedo_steps=2", "recon.renderer.num_samples=24",
         "recon.renderer.occupancy.resolution=16", "recon.renderer.occupancy.warmup_steps=2",
         "recon.renderer.occupancy.update_every=2", "recon.field.grid.n_levels=4",
         "recon.field.grid.log2_hashmap_size=12", "recon.levels=[0,2,4,4]",
         "inversion.steps=2", "input.size=64", "export.video.frames=2", "export.video.size=16",
         "export.mesh_resolution=24", "export.threshold=1.0",
         f"checkpoint_every={RECON_EVERY}", "log_every=1"]
EXPORT = ["video.frames=3", "mesh_resolution=20"]  # differs from the run's own export
SWEEP = {"name": "faults", "image": str(EXAMPLE), "preset": "tiny",
         "overrides": [o for o in RECON if not o.startswith(("checkpoint_", "log_every"))],
         "space": {"recon.weights.entropy": {"grid": [0.1, 1.0]}}, "report_every": 4,
         "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0}}


@dataclass(frozen=True)
class Fault:
    """One fault: ``sig`` sent by the process to itself the Nth time it reaches a fault point
    (``point="NAME:N"``, a name of ``rf_core.files.fault_points.POINTS``), or, without
    ``point``, by the test once the run reaches ``step`` (what a step is depends on the
    command, see each test). ``local_ray``: the driver starts its own Ray instead of joining
    the module's cluster."""

    name: str
    sig: signal.Signals = signal.SIGKILL
    point: str | None = None
    step: int | None = None
    local_ray: bool = False

    def __str__(self) -> str:
        return self.name


def _cases(sample: Fault, *full: Fault) -> list:
    """The CI sample first, then the full set (RF_FAULTS_FULL=1)."""
    return [pytest.param(sample, id=sample.name)] + [
        pytest.param(f, id=f.name, marks=FULL_ONLY) for f in full]


def _between_checkpoints(lo: int, hi: int, every: int) -> int:
    """A seeded step in [lo, hi) that is not a checkpoint step."""
    return RNG.choice([s for s in range(lo, hi) if s % every])


# ---------------------------------------------------------------------------- processes

_GROUPS: list[int] = []


def _kill_groups(groups: list[int]) -> None:
    while groups:
        group = groups.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(group, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _reap():
    """The process groups a test started are gone when it ends (a killed driver's Ray
    helpers may outlive it)."""
    yield
    _kill_groups(_GROUPS)


def _env(folder: Path) -> dict[str, str]:
    env = {**os.environ, "RF_QUIET": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           # One torch thread everywhere: results must not depend on how many threads a
           # machine gives (a reference and a resumed run are compared bit for bit), and two
           # threads on a busy 2-core machine spin in OpenMP and run 10x slower.
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
           # Without --address, ray.init() joins the cluster a `ray start` on this machine
           # left behind (/tmp/ray/ray_current_cluster): "local" makes it start its own.
           "RAY_ADDRESS": "local",
           # Ray's default for a new local cluster; a driver joining one by --address
           # needs it said (it then uses Ray's own token file, ~/.ray/auth_token).
           "RAY_AUTH_MODE": "token"}
    for key in ("RF_DEBUG", "RF_FAULT_POINT"):
        env.pop(key, None)
    return env  # RF_CACHE: the session's (tests/conftest.py), so the tiny model is built once


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child, before exec: SIGINT does what it does for a command typed at a terminal.
    A shell's background job (``make test &``, a CI runner's) starts with SIGINT ignored, and a
    child inherits that: the Ctrl-C cases would then run to the end instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """One ``rf`` subprocess in its own process group, its output in files."""

    count = 0

    def __init__(self, args: list, cwd: Path, fault: Fault | None = None,
                 groups: list[int] = _GROUPS):
        Run.count += 1
        self.args = [str(a) for a in args]
        self.log = cwd / f"rf-{Run.count}-{self.args[0]}"
        env = _env(cwd)
        if fault is not None and fault.point:
            env["RF_FAULT_POINT"] = f"{fault.point}:{fault.sig.name}"
        with open(f"{self.log}.out", "w") as out, open(f"{self.log}.err", "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "rf_cli.main", *self.args],
                                         cwd=cwd, env=env, stdout=out, stderr=err,
                                         start_new_session=True,
                                         preexec_fn=_ctrl_c_as_at_a_terminal)
        groups.append(self.proc.pid)

    def wait(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rf {' '.join(self.args)} ran over {TIMEOUT} s:\n{self.err[-3000:]}")

    def succeed(self) -> Run:
        code = self.wait()
        assert code == 0, f"rf {' '.join(self.args)} exited {code}:\n{self.err[-4000:]}"
        return self

    @property
    def out(self) -> str:
        return Path(f"{self.log}.out").read_text()

    @property
    def err(self) -> str:
        return Path(f"{self.log}.err").read_text()

    def signal_when(self, ready: Callable[[], bool], sig: signal.Signals) -> None:
        """Send ``sig`` as soon as ``ready()``: SIGKILL to the process (``kill -9 PID``),
        SIGINT to its group (Ctrl-C in a terminal)."""
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"rf {self.args[0]} ended (exit {self.proc.returncode}) before the "
                            f"fault could be injected:\n{self.err[-3000:]}")
            time.sleep(0.005)
        if sig == signal.SIGINT:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def check_interrupted(self, fault: Fault) -> None:
        """Killed: exit -9. Ctrl-C: exit 130 and one line, no traceback."""
        code = self.wait()
        if fault.sig == signal.SIGINT:  # (libraries may have logged before: MLflow, Ray)
            said = [ln for ln in self.err.splitlines() if ln.startswith("rf: ")
                    and not ln.startswith("rf: note:")]
            assert code == 130 and said == [INTERRUPTED] and "Traceback" not in self.err \
                and self.err.strip().endswith(INTERRUPTED), (code, self.err[-3000:])
        else:
            assert code == -signal.SIGKILL, (code, self.err[-3000:])


def rf(args: list, cwd: Path) -> Run:
    """Run ``rf args`` to completion; it must succeed."""
    return Run(args, cwd).succeed()


# ---------------------------------------------------------------------------- what a run is


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (rf's marker: its file list)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or rel in skip:
            continue
        if p.name == ".rf-run.json":  # its "written" time differs; the file list must not
            marker = json.loads(p.read_text())
            out[rel] = json.dumps({k: v for k, v in marker.items() if k != "written"})
        else:
            out[rel] = sha256(p)
    return out


def checkpoint_hashes(folder: Path) -> dict[str, str]:
    """Every tensor of a checkpoint folder by sha256 (the manifest's, checked by loading),
    plus its JSON skeleton."""
    from rf_core.files.checkpoint import load_checkpoint

    load_checkpoint(folder)  # verifies the files against the manifest
    manifest = folder / "manifest.json"
    if manifest.is_file():
        tensors = {k: v["sha256"] for k, v in json.loads(manifest.read_text())["tensors"].items()}
    else:  # a checkpoint written before manifests existed
        from safetensors.numpy import load_file

        tensors = {k: hashlib.sha256(v.tobytes()).hexdigest()
                   for k, v in load_file(str(folder / "state.safetensors")).items()}
    return {**tensors, "state.json": sha256(folder / "state.json")}


def numbers(metrics: dict) -> dict:
    """Metrics without the clock and the resume bookkeeping."""
    return {k: v for k, v in metrics.items() if k not in TIMINGS and "seconds" not in k}


def history(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{path}: steps logged more than once: {steps}"
    return rows


def mesh_arrays(path: Path) -> tuple[bytes, bytes]:
    import numpy as np
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    return np.asarray(mesh.vertices).tobytes(), np.asarray(mesh.faces).tobytes()


def run_summary(folder: Path, skip: tuple[str, ...] = ()) -> dict:
    """What must not change when a run folder's run is interrupted and resumed."""
    return {
        "checkpoint": checkpoint_hashes(folder / "checkpoint"),
        "metrics": numbers(json.loads((folder / "metrics.json").read_text())),
        "history": history(folder / "history.jsonl"),
        "mesh": mesh_arrays(folder / "mesh.obj"),
        "files": file_hashes(folder, skip=("metrics.json", *skip)),
    }


def assert_same(got: dict, want: dict, what: str) -> None:
    for key in want:
        assert got[key] == want[key], f"{what}: {key} differs from the uninterrupted run"
    assert got.keys() == want.keys()


def litter(folder: Path, *allowed: str) -> list[str]:
    """What ``folder`` holds but our logs and names starting with ``allowed``. A kill between
    building a stage folder and swapping it in leaves the hidden ``.NAME.stage-*`` behind:
    nothing removes stale stages yet (rf_core.files.run_folder.staged_folder could, under its
    lock), so those are allowed where a case kills there."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(("rf-", *allowed)))


def history_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def mlflow_runs(folder: Path, experiment: str) -> tuple[object, list]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {folder}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def metric_histories(client, run) -> dict[str, dict[int, float]]:
    """key -> {step: value} of one MLflow run; each (key, step) must be there once."""
    out = {}
    for key in sorted(run.data.metrics):
        if "seconds" in key or key in TIMINGS:
            continue
        points = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in points]
        assert len(steps) == len(set(steps)), f"{run.info.run_name}: {key} logged twice: {steps}"
        out[key] = {m.step: m.value for m in points}
    return out


# ---------------------------------------------------------------------------- rf invert


def invert_args(folder: Path) -> list:
    return ["invert", EXAMPLE, "--model", "tiny", "--out", folder / "e.safetensors", *INVERT]


def invert_result(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "e.safetensors"), "pt") as f:
        tensors = {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest()
                   for k in f.keys()}
        meta = f.metadata()
    return {"tensors": tensors, "metadata": meta, "input": file_hashes(folder / "e.input")}


def _invert_ckpt_step(path: Path) -> int:
    """The step of ``rf invert``'s checkpoint folder, or of the previous one it keeps when a
    kill came between a save's renames (-1 while there is none)."""
    for folder in (path, path.with_name(f".{path.name}.prev")):
        try:
            return int(json.loads((folder / "manifest.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):  # none, or being replaced
            continue
    return -1


_k = [_between_checkpoints(INVERT_EVERY + 1, INVERT_STEPS, INVERT_EVERY) for _ in range(2)]
INVERT_FAULTS = _cases(
    Fault(f"sigint-step-{_k[0]}", signal.SIGINT, f"inversion.step:{_k[0]}"),
    Fault(f"kill-step-{_k[1]}", point=f"inversion.step:{_k[1]}"),
    Fault("kill-writing-checkpoint", point="inversion.checkpoint.written:3"),
    Fault("kill-external", step=RNG.randrange(INVERT_EVERY, INVERT_STEPS - INVERT_EVERY)),
    Fault("kill-before-writing", point="embedding.before_save:1"),
    Fault("kill-after-writing", point="embedding.saved:1"),
    Fault("kill-in-input-rename", point="folder.before_swap:1"),
    Fault("kill-writing-checkpoint-tensors", point="inversion.checkpoint.tensors_written:2"),
    Fault("kill-between-checkpoint-renames", point="inversion.checkpoint.between_renames:3"),
)


@pytest.mark.parametrize("fault", INVERT_FAULTS)
def test_invert_survives(fault, refs, tmp_path):
    want = refs.get("invert")
    ckpt = tmp_path / ".e.safetensors.ckpt"
    run = Run(invert_args(tmp_path), tmp_path, fault)
    if fault.step is not None:  # kill -9 from outside once a checkpoint holds that step
        run.signal_when(lambda: _invert_ckpt_step(ckpt) >= fault.step, fault.sig)
    run.check_interrupted(fault)
    assert (tmp_path / ".e.safetensors.lock").exists() == (fault.sig == signal.SIGKILL)
    saved = _invert_ckpt_step(ckpt)
    again = rf(invert_args(tmp_path), tmp_path)  # the same command resumes
    if saved > 0:
        assert f"(resumed at step {saved})" in again.out, again.out
    assert not ckpt.exists() and not (tmp_path / ".e.safetensors.lock").exists()
    assert invert_result(tmp_path) == want
    assert litter(tmp_path, ".e.input.stage-") == ["e.input", "e.safetensors"]


# ---------------------------------------------------------------------------- rf reconstruct


def recon_args(folder: Path) -> list:
    return ["reconstruct", EXAMPLE, "--preset", "tiny", "--invert", "--out", folder / "run",
            *RECON, "device=cpu"]


_k = [_between_checkpoints(1, RECON_STEPS, RECON_EVERY) for _ in range(2)]
RECON_FAULTS = _cases(
    Fault(f"kill-step-{_k[0]}", point=f"fit.step:{_k[0]}"),
    Fault(f"sigint-step-{_k[1]}", signal.SIGINT, f"fit.step:{_k[1]}"),
    Fault(f"kill-before-checkpoint-{2 * RECON_EVERY}", point=f"fit.step:{2 * RECON_EVERY}"),
    Fault("kill-writing-checkpoint", point="checkpoint.tensors_written:2"),
    Fault("kill-between-checkpoint-renames", point="checkpoint.between_renames:2"),
    Fault("kill-external", step=RNG.randrange(1, RECON_STEPS - 2)),
    Fault("kill-during-export", point="export.video_written:1"),
    Fault("sigint-during-export", signal.SIGINT, "export.before_mesh:1"),
    Fault("kill-after-inverting", point="embedding.before_save:1"),
    Fault("kill-after-embedding", point="embedding.saved:1"),
    Fault("kill-before-marking", point="run.before_marker:1"),
    Fault("kill-in-final-rename", point="run.before_rename:1"),
    Fault("kill-before-checkpoint-renames", point="checkpoint.written:2"),
)


@pytest.mark.parametrize("fault", RECON_FAULTS)
def test_reconstruct_survives(fault, refs, tmp_path):
    want = refs.get("reconstruct")
    out, partial = tmp_path / "run", tmp_path / ".run.partial"
    run = Run(recon_args(tmp_path), tmp_path, fault)
    if fault.step is not None:  # kill -9 from outside once that step is in history.jsonl
        run.signal_when(lambda: history_rows(partial / "history.jsonl") > fault.step, fault.sig)
    run.check_interrupted(fault)
    assert not out.exists()
    assert (tmp_path / ".run.lock").exists() == (fault.sig == signal.SIGKILL)  # left behind
    rf(recon_args(tmp_path), tmp_path)  # the same command resumes, taking over the lock
    assert not partial.exists() and not (tmp_path / ".run.lock").exists()
    assert_same(run_summary(out), want, f"rf reconstruct after {fault}")
    assert litter(tmp_path) == ["run"]


# ---------------------------------------------------------------------------- rf export

EXPORT_FAULTS = _cases(
    Fault("kill-between-video-and-mesh", point="export.video_written:1"),
    Fault("sigint-while-rendering", signal.SIGINT, "export.rendered:1"),
    Fault("kill-external", step=0),  # as soon as the stage folder exists
    Fault("kill-while-linking", point="folder.linking:3"),
    Fault("kill-before-swap", point="folder.before_swap:1"),
    Fault("kill-after-swap", point="folder.after_swap:1"),
)


@pytest.mark.parametrize("fault", EXPORT_FAULTS)
def test_export_is_all_or_nothing(fault, refs, tmp_path):
    before, after = refs.get("export")
    run_dir = tmp_path / "run"
    shutil.copytree(refs.folder("reconstruct") / "run", run_dir)
    run = Run(["export", run_dir, *EXPORT], tmp_path, fault)
    if fault.step is not None:
        run.signal_when(lambda: any(tmp_path.glob(".run.stage-*")), fault.sig)
    run.check_interrupted(fault)
    assert file_hashes(run_dir) in (before, after), f"rf export after {fault}: a mixed folder"
    rf(["export", run_dir, *EXPORT], tmp_path)  # takes over the stale lock
    assert file_hashes(run_dir) == after
    assert litter(tmp_path, ".run.stage-") == ["run"]


# ---------------------------------------------------------------------------- rf sweep


def sweep_args(folder: Path, address: str | None) -> list:
    import yaml

    spec = folder / "faults.yaml"
    spec.write_text(yaml.safe_dump(SWEEP))
    return ["sweep", spec, "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
            "--storage", folder / "sweeps", *(["--address", address] if address else [])]


def sweep_result(folder: Path) -> dict[str, dict]:
    """Per trial (by its sampled value): its last checkpoint's tensors, its exported metrics
    and mesh, and its MLflow run (one per trial, under the sweep's one parent run)."""
    client, runs = mlflow_runs(folder, SWEEP["name"])
    parents = [r for r in runs if r.data.tags.get("rf.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("rf.kind") == "trial"]
    assert len(parents) == 1 and len(runs) == 1 + len(trials), [r.data.tags for r in runs]
    by_value = {r.data.params["recon.weights.entropy"]: r for r in trials}
    assert len(by_value) == len(trials) == 2, "one MLflow run per trial"
    out = {}
    for value, run in by_value.items():
        assert run.info.status == "FINISHED" and run.data.tags["rf.status"] == "finished"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        last = max(Path(run.data.tags["rf.trial_path"]).glob("checkpoint_*"))
        export = last / "export"
        out[value] = {"checkpoint": checkpoint_hashes(last / "checkpoint"),
                      "metrics": numbers(json.loads((export / "metrics.json").read_text())),
                      "mesh": mesh_arrays(export / "mesh.obj"),
                      "mlflow": metric_histories(client, run)}
    return out


SWEEP_FAULTS = _cases(
    Fault("kill-after-first-report", point="sweep.trial_result:1"),
    Fault("kill-mid-way", point="sweep.trial_result:3"),
    Fault("kill-after-first-trial", point="sweep.trial_complete:1"),
    Fault("kill-logging-a-finished-trial", point="sweep.finishing_trial:1"),
    Fault("kill-external", step=2),  # once two reports are in Tune's result.json files
    Fault("kill-after-fit", point="sweep.fitted:1"),
    Fault("kill-local-ray", point="sweep.trial_result:2", local_ray=True),
    Fault("sigint-mid-way", signal.SIGINT, "sweep.trial_result:2"),
)


@pytest.mark.ray
@pytest.mark.parametrize("fault", SWEEP_FAULTS)
def test_sweep_resumes_exactly_once(fault, refs, cluster, tmp_path):
    want = refs.get("sweep")
    args = sweep_args(tmp_path, None if fault.local_ray else cluster())
    run = Run(args, tmp_path, fault)
    if fault.step is not None:
        def reports() -> int:
            return sum(history_rows(p) for p in tmp_path.glob("sweeps/faults/*/result.json"))

        run.signal_when(lambda: reports() >= fault.step, fault.sig)
    run.check_interrupted(fault)
    lock = tmp_path / "sweeps" / ".faults.lock"
    assert lock.exists() == (fault.sig == signal.SIGKILL)  # left behind by kill -9
    rf([*args, "--resume"], tmp_path)
    assert not lock.exists()
    # A restored trial goes on from the checkpoint Tune's experiment state last recorded (it
    # saves that state every few seconds, so maybe an earlier one than the trial reported
    # last) and repeats the steps after it. Its whole state, random generators included, is
    # in the checkpoint, so the repeated steps give the same numbers, and the MLflow
    # callback skips the steps a run already holds: each step once, same values.
    got = sweep_result(tmp_path)
    for value in want:
        assert_same(got[value], want[value], f"trial entropy={value} after {fault}")


# ---------------------------------------------------------------------------- rf dataset


def dataset_inputs(folder: Path) -> Path:
    """Two objects: the duck photo, and view 0 of rendered ground truth (evaluated too)."""
    from rf_core.ground_truth.gt_render import render_gt

    gt = render_gt("pybullet_data:duck.obj", folder / "gt", views=3, size=32)
    rows = [{"name": "photo", "image": str(EXAMPLE)},
            {"name": "rendered", "image": str(gt / "rgb/000.png"),
             "mask": str(gt / "mask/000.png"), "gt": str(gt)}]
    manifest = folder / "objects.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def dataset_args(folder: Path, manifest: Path, address: str | None) -> list:
    return ["dataset", manifest, "--out", folder / "out", "--preset", "tiny",
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--experiment", "faults",
            *(["--address", address] if address else []), *RECON]


def dataset_result(folder: Path) -> dict[str, dict]:
    """Per object: its result folder and its one MLflow run, finished."""
    client, runs = mlflow_runs(folder, "faults")
    parents = [r for r in runs if r.data.tags.get("rf.kind") == "dataset"]
    objects = [r for r in runs if r.data.tags.get("rf.kind") == "object"]
    assert len(parents) == 1 and len(runs) == 1 + len(objects)
    names = sorted(r.data.tags["rf.object"] for r in objects)
    assert names == ["photo", "rendered"], "one MLflow run per object: " + str(
        [(r.data.tags["rf.object"], r.data.tags["rf.status"], r.info.status) for r in objects])
    out = {}
    for run in objects:
        name = run.data.tags["rf.object"]
        assert run.info.status == "FINISHED" and run.data.tags["rf.status"] == "finished"
        result = folder / "out" / name
        # The configs name the object's work folder (another path in the reference) and
        # result.json its MLflow run and timings: compared below, not by their bytes.
        summary = run_summary(result, skip=("config.yaml", "checkpoint/config.yaml",
                                            "checkpoint/manifest.json", "result.json"))
        record = json.loads((result / "result.json").read_text())
        assert record["mlflow_run_id"] == run.info.run_id
        out[name] = {**summary, "result": numbers(record["metrics"]),
                     "mlflow": metric_histories(client, run)}
    work = folder / "out" / ".work"
    assert not work.exists() or not any(work.iterdir())
    return out


DATASET_FAULTS = _cases(
    Fault("kill-reconstructing", step=RNG.randrange(3, RECON_STEPS)),
    Fault("kill-before-recording", point="dataset.before_record:1"),
    Fault("kill-before-recording-2", point="dataset.before_record:2"),
    Fault("kill-after-recording", point="dataset.recorded:1"),
    Fault("kill-while-recording", point="dataset.run_created:1"),
    Fault("kill-before-result-json", point="dataset.logged:1"),
    Fault("kill-moving-the-result", point="folder.before_swap:1"),
    Fault("kill-after-all", point="dataset.before_finish:1"),
    Fault("kill-local-ray", step=RNG.randrange(3, RECON_STEPS), local_ray=True),
    Fault("sigint-reconstructing", signal.SIGINT, step=RNG.randrange(3, RECON_STEPS)),
)


@pytest.mark.ray
@pytest.mark.parametrize("fault", DATASET_FAULTS)
def test_dataset_finishes_each_object_once(fault, refs, cluster, tmp_path):
    want = refs.get("dataset")
    args = dataset_args(tmp_path, refs.manifest(), None if fault.local_ray else cluster())
    run = Run(args, tmp_path, fault)
    if fault.step is not None:  # kill -9 the driver while the workers reconstruct
        def rows() -> int:
            return sum(history_rows(p) for p in
                       tmp_path.glob("out/.work/*/.run.partial/history.jsonl"))

        run.signal_when(lambda: rows() >= fault.step, fault.sig)
    run.check_interrupted(fault)
    assert (tmp_path / ".out.lock").exists() == (fault.sig == signal.SIGKILL)
    rf(args, tmp_path)  # the same command resumes, taking over the lock
    assert not (tmp_path / ".out.lock").exists()
    got = dataset_result(tmp_path)
    for name in want:
        assert_same(got[name], want[name], f"object {name} after {fault}")


# ---------------------------------------------------------------------------- the points

SAMPLE_POINTS = {"inversion.step", "fit.step", "export.video_written", "sweep.trial_result"}
"""The fault points the default sample arms; every other point of
``rf_core.files.fault_points.POINTS`` is reached only in the full set (RF_FAULTS_FULL=1)."""


def test_every_fault_point_is_listed_and_armed_by_a_case():
    from rf_core.files.fault_points import POINTS, parse

    lists = [INVERT_FAULTS, RECON_FAULTS, EXPORT_FAULTS, SWEEP_FAULTS, DATASET_FAULTS]
    armed, sample = set(), set()
    for cases in lists:
        for i, case in enumerate(cases):
            fault = case.values[0]
            if fault.point:
                name, _, _ = parse(f"{fault.point}:{fault.sig.name}")  # listed, N >= 1
                armed.add(name)
                if i == 0:  # _cases puts the sample first
                    sample.add(name)
    assert sample == SAMPLE_POINTS
    assert sorted(set(POINTS) - armed) == [], "fault points no case arms"


# ---------------------------------------------------------------------------- references


class Cluster:
    """A Ray cluster for the module's sweeps and datasets (``--address``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._groups: list[int] = []
        self._head: subprocess.Popen | None = None
        self._address: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._head is None:
            with open(self.folder / "head.err", "w") as err:
                self._head = subprocess.Popen(
                    [sys.executable, "-c", _HEAD], cwd=self.folder, env=_env(self.folder),
                    text=True, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            self._groups.append(self._head.pid)

    def __call__(self) -> str:
        """The cluster's address (started now if it was not)."""
        with self._lock:
            if self._address is None:
                self.start()
                self._address = self._head.stdout.readline().strip()
        assert self._address, "the Ray head did not start: " + \
            (self.folder / "head.err").read_text()[-3000:]
        return self._address

    def close(self) -> None:
        _kill_groups(self._groups)


_HEAD = """
import time, ray
ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
while True:
    time.sleep(3600)
"""


class References:
    """The uninterrupted runs, one per command, made once per module: each when a test first
    needs it, but those of sweeps and datasets (which mostly wait on process start-up) start
    in the background with the module, on its cluster as soon as that is up."""

    def __init__(self, root: Path, cluster: Cluster):
        self.root, self.cluster = root, cluster
        self._groups: list[int] = []
        self._running: dict[str, Run | threading.Thread] = {}
        self._results: dict[str, object] = {}
        self._manifest: Path | None = None

    def folder(self, name: str) -> Path:
        return self.root / name

    def manifest(self) -> Path:
        if self._manifest is None:
            (self.root / "inputs").mkdir(exist_ok=True)
            self._manifest = dataset_inputs(self.root / "inputs")
        return self._manifest

    def start(self, name: str) -> None:
        if name in self._running or name in self._results:
            return
        folder = self.folder(name)
        folder.mkdir()
        if name in ("invert", "reconstruct"):
            args = invert_args(folder) if name == "invert" else recon_args(folder)
            self._running[name] = Run(args, folder, groups=self._groups)
            return
        manifest = self.manifest() if name == "dataset" else None

        def launch() -> None:  # once the cluster answers
            args = (sweep_args(folder, self.cluster()) if name == "sweep" else
                    dataset_args(folder, manifest, self.cluster()))
            self._running[name] = Run(args, folder, groups=self._groups)

        self._running[name] = threading.Thread(target=launch, daemon=True)
        self._running[name].start()

    def get(self, name: str):
        if name == "export":
            return self._export()
        if name not in self._results:
            self.start(name)
            if isinstance(self._running[name], threading.Thread):
                self._running[name].join()
            self._running.pop(name).succeed()
            folder = self.folder(name)
            self._results[name] = {"invert": invert_result,
                                   "reconstruct": lambda f: run_summary(f / "run"),
                                   "sweep": sweep_result,
                                   "dataset": dataset_result}[name](folder)
        return self._results[name]

    def _export(self) -> tuple[dict, dict]:
        """(file hashes of a finished run, the same after an uninterrupted ``rf export``)."""
        if "export" not in self._results:
            self.get("reconstruct")
            folder = self.folder("export")
            shutil.copytree(self.folder("reconstruct") / "run", folder / "run")
            before = file_hashes(folder / "run")
            rf(["export", folder / "run", *EXPORT], folder)
            after = file_hashes(folder / "run")
            assert after != before
            self._results["export"] = before, after
        return self._results["export"]

    def close(self) -> None:
        _kill_groups(self._groups)


_NEEDS = {"test_invert_survives": ["invert"], "test_reconstruct_survives": ["reconstruct"],
          "test_export_is_all_or_nothing": ["reconstruct"],
          "test_sweep_resumes_exactly_once": ["sweep", "cluster"],
          "test_dataset_finishes_each_object_once": ["dataset", "cluster"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_cluster = Cluster(tmp_path_factory.mktemp("ray"))
    yield ray_cluster
    ray_cluster.close()


@pytest.fixture(scope="module")
def refs(request, cluster, tmp_path_factory):
    """The references and the cluster the tests that will run need, started now."""
    from rf_core.prior.tiny import tiny_model_path

    tiny_model_path("tiny")  # built once here, not by the concurrent processes below
    will_run = [item for item in request.session.items if item.module is request.module
                and (FULL or item.get_closest_marker("faults_full") is None)]
    wanted = {n for item in will_run for n in _NEEDS.get(item.originalname, [])}
    references = References(tmp_path_factory.mktemp("references"), cluster)
    if "cluster" in wanted:
        cluster.start()
    for name in ("invert", "reconstruct", "sweep", "dataset"):
        if name in wanted:
            references.start(name)
    yield references
    references.close()
