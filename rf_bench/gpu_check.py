"""``rf bench gpu-check``: every GPU test and benchmark in one run, in at most 8 minutes.

One call on a CUDA machine (sized for one H100/H200) runs six parts, in this order:

1. ``hashgrid``: tiny-cuda-nn vs our torch hash grid (parity of values and parameter gradients
   on random points, points/s forward and forward+backward), via ``rf_bench.hashgrid``;
   skipped, with the install hint, when ``tinycudann`` does not import.
2. ``attention``: xformers vs PyTorch SDPA on Stable-Diffusion-1.5-sized attention calls
   (parity against an fp32 reference, calls/s) and on the full SD-1.5-size UNet output;
   skipped (SDPA numbers still reported) when xformers is not usable.
3. ``reconstruct``: ``sd15-random`` (SD 1.5's architecture, random weights) under the
   ``realfusion`` preset at fp16: ``Reconstructor`` steps/s after one warm-up step, and the
   peak GPU memory (``torch.cuda.max_memory_allocated``).
4. ``prior``: ``rf bench prior`` (``run_prior_bench``) at batch 1/4/8.
5. ``sharing``: ``rf bench prior-sharing`` (``run_sharing_bench``) with K = 8; its GPU part
   puts the priors on the GPU (SD-1.5 size, fp16, K = 8). Its CPU part runs first, as always.
6. ``pytest``: ``pytest -m gpu -q`` with the pass/fail/skip counts.

Each part runs in its own child process (a CUDA error or an out-of-memory cannot poison the
next part, and a hung part can be killed) under an explicit wall-clock limit (``BUDGETS_S``);
a part may also use the time earlier parts left unused, but never the time reserved for the
parts after it. When the total budget is nearly spent, the remaining parts are skipped with a
note. Every part records ``status`` (``ok``, ``skipped: why`` or ``failed: one-line error``),
its numbers and its wall time; the JSON report (and the Markdown table) are rewritten
atomically after each part, so a killed run keeps what it did.

Without CUDA the check refuses to run (``GPUCheckUnavailable``) unless ``cpu_smoke=True``: then
every part runs in a tiny CPU configuration (tiny model, few points, K = 2, one step) to prove
the plumbing, in about a minute.

The parts are in ``rf_bench.gpu_kernels`` (1, 2) and ``rf_bench.gpu_pipeline`` (3 to 6); this
module runs them and writes the report.

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
    part_prior,
    part_pytest,
    part_reconstruct,
    part_sharing,
)
from rf_core.atomic import atomic_write_text
from rf_core.errors import UserError

__all__ = ["BUDGETS_S", "NO_CUDA_MESSAGE", "PART_FUNCTIONS", "PART_NAMES", "PARTS",
           "GPUCheckUnavailable", "environment", "format_table", "parse_pytest_counts",
           "run_gpu_check"]

PARTS: tuple[tuple[str, str], ...] = (
    ("hashgrid", "hash grid: tiny-cuda-nn vs torch"),
    ("attention", "attention: xformers vs SDPA"),
    ("reconstruct", "sd15-random, realfusion preset, fp16: Reconstructor steps"),
    ("prior", "rf bench prior, batch 1/4/8"),
    ("sharing", "prior sharing, K = 8"),
    ("pytest", "pytest -m gpu"),
)
PART_NAMES = tuple(name for name, _ in PARTS)
SMOKE_TITLES = {
    "hashgrid": "hash grid on the CPU: torch vs reference (tcnn needs CUDA)",
    "attention": "attention on the CPU: SDPA vs fp32, tiny UNet SDPA vs plain",
    "reconstruct": "tiny, realfusion preset shrunk, fp32: 1 Reconstructor step",
    "prior": "rf bench prior, tiny, batch 1",
    "sharing": "prior sharing, K = 2, tiny",
    "pytest": "pytest -m gpu on one file (all skip without CUDA)",
}
BUDGETS_S = {
    "hashgrid": 30,     # 2^16 and 2^18 points x (torch, tcnn, reference): seconds of GPU work
    "attention": 45,    # attention calls: seconds; SD-1.5-size UNet build + 2 x 7 forwards
    "reconstruct": 90,  # build/save/load sd15-random (first use), warm-up + up to 20 steps
    "prior": 70,        # tiny on the CPU, then SD-1.5-size SDS b1/4/8 x 2 backends, inversion
    "sharing": 140,     # CPU K=8 (medium model), then GPU K=8 (SD-1.5-size fp16), 8 req/trial
    "pytest": 90,       # collection + the gpu-marked tests (each builds what it needs)
}
"""Per-part wall-clock limits on a CUDA machine, seconds (sum 465 of the default 480)."""
SMOKE_BUDGETS_S = {"hashgrid": 30, "attention": 30, "reconstruct": 45, "prior": 45,
                   "sharing": 90, "pytest": 60}
"""Per-part limits of the tiny CPU configuration (``cpu_smoke``); each takes far less."""
DEFAULT_BUDGET_S = 480
RESERVE_S = 10
"""Kept back from the total for the environment, the kill grace and the final writes."""
MIN_PART_S = 15
"""A part with less time than this left is skipped with a note instead of started."""
KILL_GRACE_S = 5
"""After a part's limit: SIGINT (its ``finally`` blocks run, e.g. Ray shuts down), then this
many seconds, then SIGKILL to its whole process group."""
NO_CUDA_MESSAGE = ("gpu-check needs a CUDA GPU; torch sees none (torch.cuda.is_available() is "
                   "False). Run it on a CUDA machine, or pass --cpu-smoke for a tiny CPU run "
                   "of its plumbing")


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
    """Versions and devices: GPU name and memory, CUDA, driver, torch, diffusers, xformers,
    tinycudann (None: not installed)."""
    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None,
           "diffusers": package_version("diffusers"),
           "transformers": package_version("transformers"),
           "xformers": package_version("xformers"),
           "tinycudann": package_version("tinycudann"),
           "ray": package_version("ray"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
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
    "prior": part_prior, "sharing": part_sharing, "pytest": part_pytest}



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
        json_path: the JSON report, rewritten atomically after every part.
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
        raise GPUCheckUnavailable(NO_CUDA_MESSAGE)
    unknown = sorted(set(parts or ()) - set(PART_NAMES))
    if unknown:
        raise ValueError(f"unknown gpu-check part(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PART_NAMES)}")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    json_path = Path(json_path)
    table_path = Path(table_path) if table_path is not None else None
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
            log(f"gpu-check [{i + 1}/{len(selected)}] {name}: {entry['status']} "
                f"({entry['wall_s']:.1f} s)")
            _save(report, json_path, table_path, t0)
    report["ok"] = not any(p["status"].startswith("failed") for p in report["parts"].values())
    _save(report, json_path, table_path, t0)
    return report



# ---------------------------------------------------------------------------- child entry
def _child_main(argv: list[str] | None = None) -> int:
    """``python -m rf_bench.gpu_check --part NAME --result OUT.json [--cpu-smoke]``: run
    one part here and write its record (status, summary, numbers) atomically."""
    p = argparse.ArgumentParser(description="run one gpu-check part (internal)")
    p.add_argument("--part", required=True, choices=PART_NAMES)
    p.add_argument("--result", required=True)
    p.add_argument("--limit", type=float, default=60.0)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.limit
    try:
        record = PART_FUNCTIONS[args.part](args.cpu_smoke, deadline)
    except BaseException as err:  # KeyboardInterrupt too: the parent's timeout
        record = {"status": f"failed: {one_line_error(err)}",
                  "traceback": traceback.format_exc()[-LOG_TAIL_CHARS:]}
        traceback.print_exc()
    write_json(args.result, record)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
