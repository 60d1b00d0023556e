"""Argument helpers shared by the command groups: overrides, the preset a command defaults
to, and the one-line notes about the machine and the model."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["PAPER_CPU_SECONDS_PER_STEP", "add_overrides", "choose_preset", "examples",
           "note_paper_on_cpu", "note_random_weights"]

PAPER_CPU_SECONDS_PER_STEP = 90.0
"""One reconstruction step of the paper preset (SDS at 512 px through SD-1.5-sized UNet and
VAE, bf16 autocast) on 2 CPU cores, measured (BENCHMARKS.md: UNet 31 s + VAE 56 s)."""


def add_overrides(p: argparse.ArgumentParser, example: str) -> None:
    """Give a command ``--config YAML`` (repeatable) and trailing ``KEY=VALUE`` overrides;
    ``example`` is one valid override of this command (tests/rf_cli/test_examples.py checks
    it)."""
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="YAML preset(s), merged in order before the overrides")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"dotted config overrides, e.g. {example}")


def examples(*commands: str) -> dict:
    """``add_parser`` keywords for a help that ends with runnable examples (each checked by
    tests/rf_cli/test_examples.py)."""
    return {"epilog": "examples:\n" + "\n".join(f"  {c}" for c in commands),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_preset(preset: str | None, model: str | None, gpu_here: bool | None = None) -> str:
    """The preset of a command run without ``--preset``: ``tiny`` for the tiny model;
    ``learned`` (the project's own novel-view prior, offline) on a machine without a CUDA GPU
    when no model is named (the paper's settings take days on a CPU); ``realfusion``
    otherwise. Says which, in one line, when it picked ``learned``."""
    if preset:
        return preset
    if model == "tiny":
        return "tiny"
    if model is None and not (_cuda() if gpu_here is None else gpu_here):
        print("rf: note: no CUDA GPU here, so --preset learned: the project's own small "
              "novel-view prior, offline, minutes on a CPU; real work runs Stable Diffusion on "
              "a GPU (--preset realfusion)", file=sys.stderr)
        return "learned"
    return "realfusion"


def note_random_weights(model: str) -> None:
    """One line when ``model`` has random weights, and the loader's own note silenced, in
    this process and in the Ray workers it starts (they inherit the environment)."""
    from rf_core.prior.random_models import is_random_model
    from rf_core.prior.zero123_random import is_zero123_random

    if not (is_random_model(model) or is_zero123_random(model)):
        return
    os.environ["RF_RANDOM_NOTED"] = "1"
    print(f"rf: note: model {model!r} has random weights: every code path runs, but the "
          "prior knows nothing about objects (results are not meaningful)", file=sys.stderr)


def note_paper_on_cpu(preset: str, device: str, steps: int, inversion_steps: int = 0) -> None:
    """A warning with the expected time when the paper preset runs on the CPU."""
    if preset != "realfusion" or not (device == "cpu" or (device == "auto" and not _cuda())):
        return
    threads = max(1, min(os.cpu_count() or 1, 64))
    per_step = PAPER_CPU_SECONDS_PER_STEP * 2 / threads
    # an inversion step runs the UNet forward and backward grad_accum (4) times: ~2 SDS steps
    seconds = (steps + 2 * inversion_steps) * per_step
    took = f"{seconds / 3600:,.0f} h" if seconds >= 5400 else f"{max(1, round(seconds / 60))} min"
    print(f"rf: warning: --preset realfusion on the CPU takes about {took} ({steps:,} "
          f"steps + {inversion_steps:,} inversion steps at ~{per_step:.0f} s per step: measured "
          "on 2 cores, scaled to this machine's); use a CUDA GPU, or --preset tiny for a run "
          "in minutes", file=sys.stderr)
