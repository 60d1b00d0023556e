"""``rf bench gpu-check`` / ``python -m rf_bench.gpu_check``: every GPU test and benchmark in
one run, in at most 9 minutes, on a bare GPU machine.

The machine it is sized for has its own PyTorch (CUDA), Triton, transformers, accelerate,
safetensors, huggingface_hub, numpy, Pillow and scipy, and no package index: everything else
travels with the code as wheels (``scripts/gpu_wheels.sh`` downloads them, ``scripts/
gpu_check.sh`` installs them beside the machine's own packages and runs this module). No part
imports Ray, MLflow, pybullet or trimesh. Seven parts, in this order:

1. ``hashgrid``: the hash-grid backends (Triton, tiny-cuda-nn when it imports, torch):
   parity of values and gradients on random points and points/s (``rf_bench.gpu_kernels``).
2. ``attention``: PyTorch SDPA (and xformers when it imports) on SD-1.5-sized attention calls
   and on the whole SD-1.5-size UNet.
3. ``reconstruct``: ``sd15-random`` under the ``realfusion`` preset at fp16: the warm-up
   (steps 1-50: time and peak memory, beside the placement estimate of one object), then the
   steady state after step 50 (step time, peak memory), the GradScaler's scale and the
   non-finite counts.
4. ``inversion``: textual-inversion step time at batch 4 and as 1 x 4 accumulated micro-batches.
5. ``sharing``: prior sharing at K = 1, 4, 8 without Ray: one batched ``sds_grad_batch`` call
   (the prior server's batching) vs one call per trial, in one process.
6. ``step``: ``rf bench step`` on CUDA (``rf_bench.step.run_step_bench``), baseline vs
   optimised; skipped with a note where that module is absent.
7. ``pytest``: ``pytest -m gpu`` over the files holding gpu tests.

Each part runs in its own child process (a CUDA error or an out-of-memory cannot poison the
next part, and a hung part can be killed) under an explicit wall-clock limit (``BUDGETS_S``);
a part may also use the time earlier parts left unused, but never the time reserved for the
parts after it. When the total budget is nearly spent, the remaining parts are skipped with a
note. Every part records ``status`` (``ok``, ``skipped: why`` or ``failed: one-line error``),
its numbers and its wall time; the JSON report and the Markdown table are rewritten
atomically after each part, and each part's output is appended to a log beside them, so a
killed run keeps what it did.

Without CUDA the check refuses in one line (``GPUCheckUnavailable``) unless ``cpu_smoke=True``:
then every part runs in a tiny CPU configuration (tiny model, few points, K = 1, 2, a couple of
steps) to prove the plumbing, in about a minute.

The GPU sizes and budgets were written on a machine without a GPU: on the first GPU run,
check the per-part ``wall_s`` against ``limit_s`` in the report and adjust ``BUDGETS_S``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from rf_bench.common import (
    LOG_TAIL_CHARS,
    REPO_ROOT,
    cpu_name,
    fmt,
    one_line_error,
    package_version,
    write_json,
)
from rf_bench.gpu_kernels import part_attention, part_hashgrid
from rf_bench.gpu_pipeline import (
    parse_pytest_counts,
    part_inversion,
    part_pytest,
    part_reconstruct,
    part_sharing,
    part_step,
)
from rf_core.errors import UserError
from rf_core.files.atomic import atomic_write_text

__all__ = ["BUDGETS_S", "NO_CUDA_MESSAGE", "PART_FUNCTIONS", "PART_NAMES", "PARTS",
           "GPUCheckUnavailable", "environment", "format_table", "main", "no_cuda_message",
           "parse_pytest_counts", "run_gpu_check"]

PARTS: tuple[tuple[str, str], ...] = (
    ("hashgrid", "hash grid: Triton / tiny-cuda-nn vs torch, parity and speed"),
    ("attention", "attention: SDPA (and xformers) calls and the SD-1.5-size UNet"),
    ("reconstruct", "sd15-random, realfusion preset, fp16: warm-up, then steps after 50"),
    ("inversion", "textual inversion, sd15-random: batch 4 vs 1 x 4 accumulated"),
    ("sharing", "prior sharing without Ray, K = 1/4/8: batched vs one call each"),
    ("step", "rf bench step on CUDA: baseline vs optimised"),
    ("pytest", "pytest -m gpu"),
)
PART_NAMES = tuple(name for name, _ in PARTS)
SMOKE_TITLES = {
    "hashgrid": "hash grid on the CPU: backends vs reference (tcnn needs CUDA)",
    "attention": "attention on the CPU: SDPA vs fp32, tiny UNet SDPA vs plain",
    "reconstruct": "tiny, realfusion preset shrunk, fp32: 2 warm-up + 1 timed step",
    "inversion": "textual inversion, tiny: batch 4 vs 1 x 4, one step each",
    "sharing": "prior sharing without Ray, tiny, K = 1/2",
    "step": "rf bench step, tiny preset, 2 steps on the CPU",
    "pytest": "pytest -m gpu on one file (all skip without CUDA)",
}
BUDGETS_S = {
    "hashgrid": 40,      # Triton compile + autotune, 2^16 and 2^18 points x backends
    "attention": 35,     # attention calls: seconds; SD-1.5-size UNet build + 2 x 7 forwards
    "reconstruct": 110,  # SD-1.5-size build (seconds), 50 warm-up + up to 20 timed steps
    "inversion": 40,     # SD-1.5-size build, 2 settings x (1 + 5) steps at 512 px
    "sharing": 55,       # K = 1, 4, 8 x (shared, separate) x (1 + 5) rounds + parity
    "step": 150,         # rf bench step: sd15-random built and saved once, 2 variants x 60 steps
    "pytest": 40,        # collection + the gpu-marked tests (each builds what it needs)
}
"""Per-part wall-clock limits on a CUDA machine, seconds (sum 470 of the default 510)."""
SMOKE_BUDGETS_S = {"hashgrid": 30, "attention": 30, "reconstruct": 45, "inversion": 45,
                   "sharing": 45, "step": 90, "pytest": 60}
"""Per-part limits of the tiny CPU configuration (``cpu_smoke``); each takes far less."""
DEFAULT_BUDGET_S = 510
"""8.5 minutes: with the wheels' install, the one command stays under 9."""
RESERVE_S = 10
"""Kept back from the total for the environment, the kill grace and the final writes."""
MIN_PART_S = 15
"""A part with less time than this left is skipped with a note instead of started."""
KILL_GRACE_S = 5
"""After a part's limit: SIGINT (its ``finally`` blocks run), then this many seconds, then
SIGKILL to its whole process group."""
NO_CUDA_MESSAGE = ("gpu-check needs a CUDA GPU; torch sees none (torch.cuda.is_available() is "
                   "False). Run it on a CUDA machine, or pass --cpu-smoke for a tiny CPU run "
                   "of its plumbing")


def no_cuda_message() -> str:
    """``NO_CUDA_MESSAGE``, or, where an NVIDIA GPU is present that torch cannot use, the
    reason and its fix (one line either way)."""
    from rf_core.precision import unusable_gpu_message

    unusable = unusable_gpu_message()
    if unusable is None:
        return NO_CUDA_MESSAGE
    return "gpu-check needs CUDA: " + unusable.removeprefix("rf: warning: ")


class GPUCheckUnavailable(UserError, RuntimeError):
    """Raised when the check cannot run here (no CUDA and no ``cpu_smoke``)."""


# ---------------------------------------------------------------------------- environment
def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def environment() -> dict:
    """Versions and devices: GPU name and memory, CUDA, driver, Python and where its torch
    comes from, torch, triton, diffusers, transformers, xformers, tinycudann, ray (None: not
    installed)."""
    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "python_executable": sys.executable,
           "platform": platform.platform(), "torch": torch.__version__,
           "torch_path": str(Path(torch.__file__).parent), "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None,
           **{name: package_version(name) for name in (
               "triton", "diffusers", "transformers", "accelerate", "huggingface-hub",
               "safetensors", "xformers", "tinycudann", "ray")},
           "pythonpath": os.environ.get("PYTHONPATH"), "cpu": cpu_name(),
           "cpu_count": os.cpu_count(),
           "cuda_available": cuda, "gpu_count": torch.cuda.device_count() if cuda else 0,
           "gpu": None, "gpu_memory_gb": None, "driver": None}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   driver=_nvidia_smi("driver_version"))
    return env


PART_FUNCTIONS: dict[str, Callable[[bool, float], dict]] = {
    "hashgrid": part_hashgrid, "attention": part_attention, "reconstruct": part_reconstruct,
    "inversion": part_inversion, "sharing": part_sharing, "step": part_step,
    "pytest": part_pytest}



# ---------------------------------------------------------------------------- report
def _cell(value) -> str:
    return str(value or "").replace("|", "\\|").replace("\n", " ")


def format_table(report: dict) -> str:
    """The report as Markdown: an environment line and one row per part."""
    env = report["environment"]
    mode = " (cpu smoke)" if report["cpu_smoke"] else ""
    lines = [f"# gpu-check{mode}", "",
             f"GPU: {env['gpu'] or 'none'} ({fmt(env['gpu_memory_gb'], '.0f')} GB), driver "
             f"{env['driver'] or '-'}, CUDA {env['torch_cuda'] or '-'}; torch {env['torch']}, "
             f"diffusers {env['diffusers'] or '-'}, xformers {env['xformers'] or '-'}, "
             f"tinycudann {env['tinycudann'] or '-'}; CPU {env['cpu']} ({env['cpu_count']} "
             f"cores)", "",
             f"Total {report['total_wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| # | part | what | status | result | wall s / limit s |",
             "|---|---|---|---|---|---|"]
    for i, name in enumerate(PART_NAMES, 1):
        p = report["parts"][name]
        lines.append(f"| {i} | {name} | {_cell(p['title'])} | {_cell(p['status'])} | "
                     f"{_cell(p.get('summary'))} | {fmt(p.get('wall_s'), '.1f')} / "
                     f"{fmt(p.get('limit_s'), '.0f')} |")
    return "\n".join(lines) + "\n"


def _save(report: dict, json_path: Path, table_path: Path | None, t0: float) -> None:
    report["total_wall_s"] = time.monotonic() - t0
    write_json(json_path, report)
    if table_path is not None:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(table_path, format_table(report))



# ---------------------------------------------------------------------------- running parts
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGINT the part's process group (its cleanup runs, e.g. Ray shuts down), wait
    ``KILL_GRACE_S``, then SIGKILL whatever of the group is left."""
    for sig, wait in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):  # the group is already gone
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):  # escalate to the next signal
            proc.wait(timeout=wait)


def _run_part(name: str, smoke: bool, limit: float, log_dir: Path) -> dict:
    """Run one part in a child process under ``limit`` seconds; its record (without wall_s)."""
    result_path = log_dir / f"{name}.json"
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "rf_bench.gpu_check", "--part", name,
           "--result", str(result_path), "--limit", f"{limit:.1f}"]
    if smoke:
        cmd.append("--cpu-smoke")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=REPO_ROOT)
        try:
            rc = proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.returncode, True
        except BaseException:  # e.g. Ctrl-C here: the child has its own session, stop it too
            _kill_group(proc)
            raise
    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    record = None
    if result_path.is_file():
        try:
            record = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            record = None
    if timed_out:
        record = {**(record or {}), "status": f"failed: timed out after its {limit:.0f} s limit"}
    elif record is None:
        last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
        record = {"status": f"failed: part process exited with code {rc} and no result: "
                            f"{last[:200]}"}
    if not record["status"].startswith(("ok", "skipped")) or timed_out:
        record["log_tail"] = tail
    return record


def _append_log(log_path: Path, name: str, part_log: Path) -> None:
    """Append one part's output to the run's log, under a header line."""
    text = part_log.read_text(errors="replace") if part_log.is_file() else "(no output)\n"
    with open(log_path, "a") as log:
        log.write(f"===== {name} =====\n{text}\n")


def _limit_for(index: int, names: list[str], budgets: dict[str, float], remaining: float
               ) -> float:
    """This part's limit: its budget plus whatever earlier parts left unused, but never the
    budgets of the parts after it; squeezed to what is left when the total is short."""
    later = sum(budgets[n] for n in names[index + 1:])
    own = budgets[names[index]]
    limit = remaining - later
    return limit if limit >= own else min(own, remaining)


def run_gpu_check(json_path: str | os.PathLike, table_path: str | os.PathLike | None,
                  cpu_smoke: bool = False, budget_s: float = DEFAULT_BUDGET_S,
                  parts: list[str] | None = None, log: Callable[[str], None] | None = None
                  ) -> dict:
    """Run every GPU test and benchmark (see the module docstring); returns the report.

    Args:
        json_path: the JSON report, rewritten atomically after every part; each part's output
            is appended to the same name with ``.log``.
        table_path: the Markdown table, rewritten with the JSON (None: don't write one).
        cpu_smoke: run every part in a tiny CPU configuration (no GPU needed).
        budget_s: the whole run's wall-clock limit, seconds (default 480 = 8 minutes).
        parts: a subset of ``PART_NAMES`` to run (default all); the others say skipped.
        log: called with one progress line per part (default: print to stderr).
    Returns:
        ``{"benchmark", "cpu_smoke", "budget_s", "budgets_s", "environment", "parts",
        "total_wall_s", "ok"}``; ``parts[name]`` has ``title``, ``status``, ``summary``,
        ``numbers``, ``budget_s``, ``limit_s``, ``wall_s`` (and ``log_tail`` on failure).
    Raises:
        GPUCheckUnavailable: no CUDA and not ``cpu_smoke``; nothing is written.
    """
    if not cpu_smoke and not torch.cuda.is_available():
        raise GPUCheckUnavailable(no_cuda_message())
    unknown = sorted(set(parts or ()) - set(PART_NAMES))
    if unknown:
        raise ValueError(f"unknown gpu-check part(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PART_NAMES)}")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    json_path = Path(json_path)
    table_path = Path(table_path) if table_path is not None else None
    log_path = json_path.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    budgets = dict(SMOKE_BUDGETS_S if cpu_smoke else BUDGETS_S)
    titles = {**dict(PARTS), **(SMOKE_TITLES if cpu_smoke else {})}
    selected = [n for n in PART_NAMES if parts is None or n in parts]
    report = {"benchmark": "gpu-check", "cpu_smoke": cpu_smoke, "budget_s": budget_s,
              "budgets_s": budgets, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "environment": environment(),
              "parts": {n: {"title": titles[n], "status": "pending" if n in selected else
                            "skipped: not selected", "budget_s": budgets[n]}
                        for n in PART_NAMES},
              "total_wall_s": 0.0, "ok": None}
    _save(report, json_path, table_path, t0)
    with tempfile.TemporaryDirectory(prefix="rf-gpu-check-") as tmp:
        for i, name in enumerate(selected):
            remaining = budget_s - RESERVE_S - KILL_GRACE_S - (time.monotonic() - t0)
            limit = _limit_for(i, selected, budgets, remaining)
            entry = report["parts"][name]
            if limit < MIN_PART_S:
                entry.update(status=f"skipped: total budget of {budget_s:.0f} s nearly spent "
                                    f"({max(0.0, remaining):.0f} s left)", limit_s=0.0,
                             wall_s=0.0)
            else:
                entry.update(status="running", limit_s=round(limit, 1))
                _save(report, json_path, table_path, t0)
                start = time.monotonic()
                try:
                    entry.update(_run_part(name, cpu_smoke, limit, Path(tmp)))
                except Exception as err:  # the harness itself failed for this part
                    entry["status"] = f"failed: {one_line_error(err)}"
                entry["wall_s"] = round(time.monotonic() - start, 2)
                _append_log(log_path, name, Path(tmp) / f"{name}.log")
            log(f"gpu-check [{i + 1}/{len(selected)}] {name}: {entry['status']} "
                f"({entry['wall_s']:.1f} s)")
            _save(report, json_path, table_path, t0)
    report["ok"] = not any(p["status"].startswith("failed") for p in report["parts"].values())
    _save(report, json_path, table_path, t0)
    return report



# ---------------------------------------------------------------------------- command line
def _child(args) -> int:
    """Run one part here and write its record (status, summary, numbers) atomically."""
    deadline = time.monotonic() + args.limit
    try:
        record = PART_FUNCTIONS[args.part](args.cpu_smoke, deadline)
    except BaseException as err:  # KeyboardInterrupt too: the parent's timeout
        record = {"status": f"failed: {one_line_error(err)}",
                  "traceback": traceback.format_exc()[-LOG_TAIL_CHARS:]}
        traceback.print_exc()
    write_json(args.result, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rf_bench.gpu_check [--out DIR] [--budget S] [--parts a,b] [--cpu-smoke]``:
    the whole check, ``DIR/gpu_check.json``, ``.md`` and ``.log`` rewritten after each part;
    exit 0 when no part failed, 1 when one did, 2 when it cannot run here (one line).
    ``--part NAME --result OUT.json`` runs one part (the check's own child processes)."""
    p = argparse.ArgumentParser(prog="python -m rf_bench.gpu_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/gpu_check",
                   help="folder of gpu_check.json, .md and .log (default outputs/gpu_check)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"the whole run's limit, seconds (default {DEFAULT_BUDGET_S})")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(PART_NAMES)}")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny CPU configuration of every part (no GPU needed)")
    p.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        if not args.result:
            p.error("--part needs --result")
        return _child(args)
    out = Path(args.out)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()] if args.parts else None
    try:
        report = run_gpu_check(out / "gpu_check.json", out / "gpu_check.md",
                               cpu_smoke=args.cpu_smoke, budget_s=args.budget, parts=parts)
    except (GPUCheckUnavailable, ValueError) as err:
        print(f"gpu-check: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'} and "
          f"{out / 'gpu_check.log'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
