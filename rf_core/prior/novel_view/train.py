"""Training a :class:`~rf_core.prior.novel_view.model.NovelViewModel` on the project's rendered
pairs.

    result = train("outputs/prior", data_folder, TrainConfig(steps=1600, max_minutes=15))
    model = NovelViewModel.from_pretrained(result.model_dir)

Everything a run writes lies in its ``out_dir`` (marked as an ``rf prior train`` run):

- ``train_config.yaml``: the resolved :class:`TrainConfig`; ``run.json``: the data folder and
  its config summary;
- ``checkpoint/``: a verified :mod:`rf_core.files.checkpoint` folder (weights, EMA weights, AdamW
  state, step, wall time), written every ``checkpoint_every`` steps and at the end;
- ``curve.csv``: step, wall time, lr, mean training loss, steps/s and, at validation steps,
  PSNR and mask IoU of the model and of the copy-the-conditioning-view baseline;
- ``model/`` (``save_pretrained``), ``summary.json`` and ``MODEL_CARD.md``, at the end.

Resuming continues at the checkpoint's step with the same batches and noise: both are drawn
from generators seeded by (seed, step) and the learning rate is a function of the step, so a
run cut into pieces ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rf_core.config import bounded, dump_yaml, parse_yaml, to_dict
from rf_core.errors import OutputError, UserError
from rf_core.files.atomic import atomic_write_json, atomic_write_text
from rf_core.files.checkpoint import load_checkpoint, save_checkpoint
from rf_core.files.run_folder import FolderLock, read_marker, staged_folder, write_marker
from rf_core.prior.novel_view.card import write_card
from rf_core.prior.novel_view.model import NovelViewConfig, NovelViewModel
from rf_core.prior.novel_view.validate import collate, evaluate, validation_indices

__all__ = ["RUN_KIND", "TrainConfig", "TrainResult", "batch_indices", "check_out_dir",
           "check_resume", "learning_rate", "previous_config", "train"]

RUN_KIND = "novel-view-train"
"""The marker kind of an ``rf prior train`` output folder."""
MODEL_KIND = "novel-view-model"
CURVE_COLUMNS = ("step", "wall_s", "lr", "loss", "steps_per_s", "val_psnr", "val_iou",
                 "copy_psnr", "copy_iou")
RESUMABLE_CHANGES = ("steps", "max_minutes", "log_every", "val_every", "checkpoint_every",
                     "weights_dtype")
"""Fields a resumed run may change; any other change would not continue the same run."""


@dataclasses.dataclass
class TrainConfig:
    """How to train the novel-view model. Defaults: the 32 px regressor, 1,600 steps of batch
    32 (the run that beat the copy baseline on 2 CPU cores in ~12 minutes)."""

    model: NovelViewConfig = dataclasses.field(default_factory=NovelViewConfig)
    """The model to train (kind, size, architecture, losses)."""
    steps: int = bounded(1600, lo=1)
    """Optimizer steps in all (a resumed run continues up to this)."""
    max_minutes: float | None = bounded(None, lo=0, lo_open=True)
    """Wall-clock budget of this call, in minutes: at it the run stops cleanly (checkpoint,
    model, card) and a rerun continues. None: no budget."""
    batch_size: int = bounded(32, lo=1)
    """Pairs per step."""
    lr: float = bounded(1e-3, lo=0, lo_open=True)
    """Peak AdamW learning rate."""
    lr_schedule: str = "cosine"
    """``cosine`` (decays from ``lr`` to ``final_lr_fraction * lr`` at ``steps``) or
    ``constant``; both after ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = bounded(100, lo=0)
    """Steps of linear warm-up from 0 to ``lr``."""
    final_lr_fraction: float = bounded(0.1, lo=0, hi=1)
    """Cosine schedule: the last step's learning rate as a fraction of ``lr``."""
    weight_decay: float = bounded(0.01, lo=0)
    """AdamW's decoupled weight decay (on every parameter)."""
    grad_clip: float | None = bounded(1.0, lo=0, lo_open=True)
    """Clip the gradient to this global L2 norm (None: no clipping)."""
    ema_decay: float | None = bounded(None, lo=0, hi=1, hi_open=True)
    """Keep an exponential moving average of the weights with this decay (warmed up as
    min(decay, (1 + step) / (10 + step))); validation and the saved model then use it. None:
    no EMA (the regressor's default; 0.999 helps a diffusion run of thousands of steps)."""
    seed: int = 0
    """Seeds the initial weights, the batch order and the diffusion noise."""
    log_every: int = bounded(20, lo=1)
    """Print a progress line and add a curve row every this many steps."""
    val_every: int = bounded(200, lo=1)
    """Validate every this many steps (and at the end)."""
    val_pairs: int = bounded(128, lo=1)
    """Validation pairs: this many, evenly spread over the val split's pairs whose target is
    not the conditioning view itself (all of them if fewer)."""
    checkpoint_every: int = bounded(200, lo=1)
    """Write the checkpoint every this many steps (and at the end)."""
    weights_dtype: str = "float32"
    """dtype of the shipped ``model/model.safetensors``: ``float32`` or ``float16`` (half the
    bytes; loads back as float32)."""

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be cosine or constant; got {self.lr_schedule!r}")
        if self.weights_dtype not in ("float32", "float16"):
            raise ValueError(f"weights_dtype must be float32 or float16; got "
                             f"{self.weights_dtype!r}")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did."""

    out_dir: Path
    model_dir: Path
    step: int
    """Steps done in all (``cfg.steps`` unless the time budget stopped the run)."""
    stopped: str
    """``finished`` or ``time budget``."""
    wall_seconds: float
    """Wall time of every call that built this run, together."""
    metrics: dict[str, float]
    """The last validation: val_psnr, val_iou, copy_psnr, copy_iou."""


# ---------------------------------------------------------------------------- pure pieces


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def batch_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The pair indices of step ``step``: positions ``[step * batch, (step + 1) * batch)`` of an
    endless stream of permutations of ``range(n)``, one per epoch, each seeded by (seed, epoch).
    A pure function of its arguments, so a resumed run draws the batches it would have."""
    out, perms = [], {}
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
                _seed(seed, 1, epoch))).tolist()
        out.append(perms[epoch][i])
    return out


class _Ema:
    """Shadow weights, w_ema <- d w_ema + (1 - d) w, with d warmed up by the step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def apply(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Load the shadow into ``model``; return the weights it had (to load back)."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        return own


# ---------------------------------------------------------------------------- the run folder


def check_out_dir(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` is an earlier ``rf prior train`` run (to resume); False when it is
    missing or empty. Raises :class:`OutputError` for a non-empty folder of anything else."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file; choose a folder for the training run")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    marker = read_marker(out_dir)
    if marker is None or marker.get("kind") != RUN_KIND:
        raise OutputError(f"--out {out_dir} is not empty and is not an `rf prior train` run; "
                          "choose a new or empty folder (a previous run's folder resumes it)")
    return True


def previous_config(out_dir: str | Path) -> tuple[dict, dict] | None:
    """(train config as a dict, run.json) of the earlier run in ``out_dir``, or None."""
    out_dir = Path(out_dir)
    if not check_out_dir(out_dir) or not (out_dir / "train_config.yaml").is_file():
        return None
    saved = parse_yaml((out_dir / "train_config.yaml").read_text(),
                       str(out_dir / "train_config.yaml")) or {}
    run = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() \
        else {}
    return saved, run


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"model": {"size": 32}} -> {"model.size": 32}."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(out_dir: str | Path, cfg: TrainConfig) -> bool:
    """Whether ``out_dir`` is an earlier run that ``cfg`` continues (False: a new run).

    Raises :class:`UserError` when it is not a run of ours, or when ``cfg`` changes more than
    :data:`RESUMABLE_CHANGES` of that run's config (a different run would not continue it).
    """
    out_dir = Path(out_dir)
    previous = previous_config(out_dir)
    if previous is None:
        return check_out_dir(out_dir)
    saved, new = _flat(previous[0]), _flat(to_dict(cfg))
    changed = sorted(k for k in set(saved) | set(new)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != new.get(k))
    if changed:
        key = changed[0]
        raise UserError(f"--out {out_dir} is a run with {key}={saved.get(key)!r}, not "
                        f"{new.get(key)!r}; resume it with the same settings (only "
                        f"{', '.join(RESUMABLE_CHANGES)} may change) or choose a new --out")
    return True


def _read_curve(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


def _write_curve(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _open_pairs(folder: Path) -> Callable[[str], Sequence[dict]]:
    from rf_core.prior.novel_view.data import NovelViewPairs

    return lambda split: NovelViewPairs(folder, split)


# ---------------------------------------------------------------------------- training


def train(out_dir: str | Path, data_folder: str | Path, cfg: TrainConfig | None = None,
          progress: Callable[[str], None] = print, *, data_summary: dict | None = None,
          open_split: Callable[[str], Sequence[dict]] | None = None,
          threads: int | None = None) -> TrainResult:
    """Train (or resume) a novel-view model in ``out_dir`` on the pairs in ``data_folder``.

    ``data_summary``: the data config, recorded in the model and its card. ``open_split``
    (``"train"`` or ``"val"`` -> a sequence of pair dicts: cond, target [4, S, S], camera [F])
    defaults to ``NovelViewPairs(data_folder, split)``. ``threads``: recorded in the card (the
    caller sets ``torch.set_num_threads``). Raises :class:`UserError` for an ``out_dir`` that
    is not this run's, or data of another size.
    """
    cfg = cfg or TrainConfig()
    out_dir, data_folder = Path(out_dir), Path(data_folder)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir, "rf prior train"):
        if not check_resume(out_dir, cfg):
            out_dir.mkdir(exist_ok=True)
            write_marker(out_dir, RUN_KIND)
        atomic_write_text(out_dir / "train_config.yaml", dump_yaml(cfg))
        run_info = {"data_folder": str(data_folder.resolve()),
                    "data": data_summary or {"folder": str(data_folder)}}
        atomic_write_json(out_dir / "run.json", run_info)
        open_split = open_split or _open_pairs(data_folder)
        result = _Run(out_dir, cfg, open_split("train"), open_split("val"), progress,
                      run_info, threads).run()
        write_marker(out_dir, RUN_KIND)  # now listing every file the run wrote
    return result


class _Run:
    """One call of :func:`train`: the model, optimizer and curve of a run folder."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, train_pairs: Sequence[dict],
                 val_pairs: Sequence[dict], progress: Callable[[str], None], run_info: dict,
                 threads: int | None):
        self.out, self.cfg, self.progress = out_dir, cfg, progress
        self.train_pairs, self.val_pairs, self.run_info = train_pairs, val_pairs, run_info
        self.threads = threads or torch.get_num_threads()
        for name, pairs in (("train", train_pairs), ("val", val_pairs)):
            if len(pairs) == 0:
                raise UserError(f"the {name} split of {run_info['data_folder']} has no pairs; "
                                "build the data again (rf prior train builds it when missing)")
        size = tuple(torch.as_tensor(train_pairs[0]["cond"]).shape)
        if size != (4, cfg.model.size, cfg.model.size):
            raise UserError(f"the pairs in {run_info['data_folder']} are {size} but the model "
                            f"takes (4, {cfg.model.size}, {cfg.model.size}); pass --size "
                            f"{size[-1]} or data built at {cfg.model.size} px")
        with torch.random.fork_rng(devices=[]):  # seeds the weights, not the caller's RNG
            torch.manual_seed(_seed(cfg.seed, 0))
            self.model = NovelViewModel(cfg.model).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.ema = _Ema(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step, self.wall_before, self.metrics = 0, 0.0, {}
        self.val_idx = validation_indices(val_pairs, cfg.val_pairs)
        if not self.val_idx:
            raise UserError(f"the val split of {run_info['data_folder']} has no pair with a "
                            "target other than its conditioning view; build the data with "
                            "more views per object")
        if (out_dir / "checkpoint").is_dir():
            self._load()
        self.curve = _read_curve(out_dir / "curve.csv", self.step)

    # -------------------------------------------------------------- state

    def _load(self) -> None:
        state, _ = load_checkpoint(self.out / "checkpoint", fallback=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.shadow = state["ema"] if state.get("ema") is not None else \
                {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.step, self.wall_before = int(state["step"]), float(state["wall_seconds"])
        self.metrics = dict(state.get("metrics") or {})
        self.progress(f"resuming {self.out} at step {self.step}/{self.cfg.steps}")

    def _save(self, wall: float) -> None:
        state = {"step": self.step, "wall_seconds": wall, "model": self.model.state_dict(),
                 "optimizer": self.opt.state_dict(),
                 "ema": self.ema.shadow if self.ema is not None else None,
                 "metrics": self.metrics}
        save_checkpoint(self.out / "checkpoint", state, dump_yaml(self.cfg))

    # -------------------------------------------------------------- the loop

    def _train_step(self) -> float:
        cfg = self.cfg
        batch = collate(self.train_pairs, batch_indices(len(self.train_pairs), cfg.batch_size,
                                                         cfg.seed, self.step))
        gen = torch.Generator().manual_seed(_seed(cfg.seed, 3, self.step))
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.step, cfg)
        loss = self.model.loss(batch["cond"], batch["target"], batch["camera"], generator=gen)
        if not torch.isfinite(loss):
            raise UserError(f"the training loss became {loss.item()} at step {self.step}; "
                            "lower lr (or raise warmup_steps) and start a new --out")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return float(loss.detach())

    def _validate(self) -> dict[str, float]:
        own = self.ema.apply(self.model) if self.ema is not None else None
        try:
            return evaluate(self.model, self.val_pairs, self.val_idx, self.cfg.batch_size,
                            _seed(self.cfg.seed, 2))
        finally:
            if own is not None:
                self.model.load_state_dict(own)

    def _row(self, wall: float, **values) -> None:
        row = next((r for r in self.curve if int(r["step"]) == self.step), None)
        if row is None:
            row = {"step": self.step}
            self.curve.append(row)
        row.update({k: _fmt(v) for k, v in values.items()}, step=self.step,
                   wall_s=_fmt(round(wall, 2)))
        _write_curve(self.out / "curve.csv", self.curve)

    def _report_val(self, wall: float) -> None:
        self.metrics = self._validate()
        m = self.metrics
        self._row(wall, **m)
        self.progress(f"val step {self.step}: PSNR {m['val_psnr']:.2f} dB, mask IoU "
                      f"{m['val_iou']:.3f} (copy the input: {m['copy_psnr']:.2f} dB, "
                      f"{m['copy_iou']:.3f}; {len(self.val_idx)} pairs)")

    def run(self) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        budget = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
        stopped = "finished"
        losses, tick, tick_step = [], time.perf_counter(), self.step
        if self.step < cfg.steps:
            self.progress(f"training a {cfg.model.kind} ({self.model.num_parameters():,} "
                          f"parameters, {cfg.model.size} px) for {cfg.steps - self.step} steps "
                          f"on {len(self.train_pairs):,} pairs, {self.threads} threads")
        while self.step < cfg.steps:
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                stopped = "time budget"
                self.progress(f"stopping at step {self.step}/{cfg.steps}: the "
                              f"{cfg.max_minutes:g}-minute budget is spent; rerun to continue")
                break
            losses.append(self._train_step())
            wall = self.wall_before + time.perf_counter() - start
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                rate = (self.step - tick_step) / max(now - tick, 1e-9)
                eta = min((cfg.steps - self.step) / max(rate, 1e-9), budget - (now - start))
                loss = float(np.mean(losses))
                self._row(wall, lr=learning_rate(self.step - 1, cfg), loss=loss,
                          steps_per_s=rate)
                self.progress(f"step {self.step}/{cfg.steps}  loss {loss:.4f}  "
                              f"{rate:.2f} steps/s  ETA {_duration(eta)}")
                losses, tick, tick_step = [], now, self.step
            if self.step % cfg.val_every == 0:
                self._report_val(wall)
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self._save(wall)
        wall = self.wall_before + time.perf_counter() - start
        if not self.metrics or self.step % cfg.val_every:
            self._report_val(wall)
        self._save(wall)
        return self._finish(stopped, wall)

    def _finish(self, stopped: str, wall: float) -> TrainResult:
        cfg = self.cfg
        summary = {"kind": cfg.model.kind, "size": cfg.model.size, "step": self.step,
                   "steps": cfg.steps, "stopped": stopped, "wall_seconds": round(wall, 1),
                   "seed": cfg.seed, "threads": self.threads,
                   "parameters": self.model.num_parameters(), "ema": cfg.ema_decay is not None,
                   "weights_dtype": cfg.weights_dtype, "train_pairs": len(self.train_pairs),
                   "val_pairs": len(self.val_idx), "val": self.metrics}
        if self.ema is not None:
            self.ema.apply(self.model)  # the shipped model is the average
        model_dir = self.out / "model"
        with staged_folder(model_dir, MODEL_KIND, kinds=[MODEL_KIND]) as stage:
            stage.chmod(0o755)  # mkdtemp's 0700 would hide the shipped model from others
            self.model.save_pretrained(stage, {"data": self.run_info["data"],
                                               "training": summary}, cfg.weights_dtype)
        summary["model_bytes"] = (model_dir / "model.safetensors").stat().st_size
        atomic_write_json(self.out / "summary.json", summary)
        write_card(self.out)
        self.progress(f"{'done' if stopped == 'finished' else 'stopped'}: step {self.step}/"
                      f"{cfg.steps} in {_duration(wall)}; val PSNR "
                      f"{self.metrics['val_psnr']:.2f} dB vs {self.metrics['copy_psnr']:.2f} "
                      f"copying the input; model in {model_dir}")
        return TrainResult(self.out, model_dir, self.step, stopped, wall, dict(self.metrics))

