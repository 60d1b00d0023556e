"""The model card of a novel-view training run: ``MODEL_CARD.md`` in the run folder.

Written from what the run left there (``summary.json``, ``run.json``, ``train_config.yaml``,
``curve.csv``), so it can be rewritten at any time. Sections added later (evaluation-object
metrics) are kept in ``card_sections.json`` and survive every rewrite:

    write_card(run_dir, {"Evaluation objects": table_markdown})
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from rf_core.config import dump_yaml, parse_yaml
from rf_core.errors import UserError
from rf_core.files.atomic import atomic_write_json, atomic_write_text

__all__ = ["CARD_NAME", "SECTIONS_NAME", "write_card"]

CARD_NAME = "MODEL_CARD.md"
SECTIONS_NAME = "card_sections.json"
MAX_CURVE_ROWS = 10
"""Loss rows (and, separately, validation rows) the card's curve table shows at most."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _spread(rows: list[dict], n: int) -> list[dict]:
    """At most ``n`` of ``rows``, evenly spread, the first and last among them."""
    if len(rows) <= n:
        return rows
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n).round()]


def _num(value: str, digits: int) -> str:
    return f"{float(value):.{digits}f}" if value not in (None, "") else ""


def curve_table(curve_path: Path) -> str:
    """Markdown table of the curve: step, mean loss, val PSNR and IoU (model | copy)."""
    if not curve_path.is_file():
        return "(no curve.csv)"
    with open(curve_path, newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = {int(r["step"]): r for r in _spread([r for r in rows if r["loss"]], MAX_CURVE_ROWS)
              + _spread([r for r in rows if r["val_psnr"]], MAX_CURVE_ROWS)}
    body = [[str(step), _num(r["loss"], 4), _num(r["lr"], 6), _num(r["val_psnr"], 2),
             _num(r["val_iou"], 3), _num(r["copy_psnr"], 2), _num(r["copy_iou"], 3)]
            for step, r in sorted(chosen.items())]
    return _table(["step", "loss", "lr", "val PSNR (dB)", "val mask IoU", "copy PSNR",
                   "copy IoU"], body)


def _about(summary: dict) -> str:
    kind = summary.get("kind", "?")
    how = ("one UNet pass predicts the target view's rgba" if kind == "regressor" else
           "a DDPM over the target view's rgba, classifier-free guided, sampled with DDIM")
    return (f"A {summary.get('size', '?')} px novel-view model in Zero-1-to-3's form (Liu et al. "
            f"2023), kind `{kind}`: given an object's view (rgba, rgb over white) and the "
            f"relative camera of another view, {how}. Trained by `rf prior train` on objects "
            "the project rendered itself, never on the objects it is evaluated on.\n\n"
            "```python\nfrom rf_core.prior.novel_view.model import NovelViewModel\n\n"
            "model = NovelViewModel.from_pretrained(\"model\")  # this folder's model/\n"
            "rgba = model.predict(cond, camera)  # [B,4,S,S] in [0,1], camera [B,6]\n```")


def _training(summary: dict, cfg: dict) -> str:
    wall = float(summary.get("wall_seconds", 0))
    rows = [
        ("steps", f"{summary.get('step', '?')} of {summary.get('steps', '?')} "
                  f"({summary.get('stopped', '?')})"),
        ("parameters", f"{summary.get('parameters', 0):,}"),
        ("batch size", str(cfg.get("batch_size", "?"))),
        ("optimizer", f"AdamW, lr {cfg.get('lr')} ({cfg.get('lr_schedule')}, "
                      f"{cfg.get('warmup_steps')} warm-up steps), weight decay "
                      f"{cfg.get('weight_decay')}, grad clip {cfg.get('grad_clip')}"),
        ("EMA", str(cfg.get("ema_decay")) if cfg.get("ema_decay") is not None else "none"),
        ("seed", str(summary.get("seed", "?"))),
        ("wall time", f"{wall / 60:.1f} min on {summary.get('threads', '?')} CPU threads"),
        ("training pairs", f"{summary.get('train_pairs', 0):,}"),
        ("weights", f"model/model.safetensors, {summary.get('weights_dtype', '?')}, "
                    f"{summary.get('model_bytes', 0) / 1e6:.1f} MB"),
    ]
    return _table(["", ""], [[k, v] for k, v in rows])


def _validation(summary: dict) -> str:
    m = summary.get("val") or {}
    if not m:
        return "(not validated)"
    table = _table(["", "PSNR (dB, rgb over white)", "mask IoU (alpha > 0.5)"], [
        ["model", f"{m['val_psnr']:.2f}", f"{m['val_iou']:.3f}"],
        ["copy the conditioning view", f"{m['copy_psnr']:.2f}", f"{m['copy_iou']:.3f}"]])
    return (f"Mean over {summary.get('val_pairs', '?')} pairs of the val split (objects kept "
            "out of training; pairs whose target is the conditioning view itself left out), at "
            f"step {summary.get('step', '?')}.\n\n{table}")


def write_card(out_dir: str | Path, extra_sections: dict[str, str] | None = None) -> Path:
    """Write ``out_dir/MODEL_CARD.md`` for a finished (or budget-stopped) training run.

    ``extra_sections``: {title: markdown}, added after the built-in sections and kept for
    later rewrites (a title given again replaces its text; an empty text removes it).
    """
    out_dir = Path(out_dir)
    summary = _read_json(out_dir / "summary.json")
    if not summary:
        raise UserError(f"{out_dir} has no summary.json: it is not a finished `rf prior train` "
                        "run; run `rf prior train --out DIR` to the end (or its time budget)")
    cfg_path = out_dir / "train_config.yaml"
    cfg_text = cfg_path.read_text() if cfg_path.is_file() else ""
    cfg = (parse_yaml(cfg_text, str(cfg_path)) or {}) if cfg_text else {}
    run = _read_json(out_dir / "run.json")
    sections = _read_json(out_dir / SECTIONS_NAME)
    if extra_sections:
        sections.update(extra_sections)
        sections = {k: v for k, v in sections.items() if v}
        atomic_write_json(out_dir / SECTIONS_NAME, sections)
    data = run.get("data") or {}
    data_table = _table(["key", "value"], [[str(k), f"`{json.dumps(v)}`"]
                                           for k, v in data.items()]) if data else "(unknown)"
    parts = [
        f"# Novel-view prior: {summary.get('kind', '?')}, {summary.get('size', '?')} px",
        _about(summary),
        "## Training", _training(summary, cfg),
        "## Data", f"Folder `{run.get('data_folder', '?')}`.\n\n{data_table}",
        "## Validation", _validation(summary),
        "## Curve", f"From `curve.csv` (loss: mean over the steps since the row before).\n\n"
                    f"{curve_table(out_dir / 'curve.csv')}",
    ]
    for title, text in sections.items():
        parts += [f"## {title}", text.strip()]
    parts += ["## Config", f"`train_config.yaml`:\n\n```yaml\n{cfg_text or dump_yaml({})}```"]
    return atomic_write_text(out_dir / CARD_NAME, "\n\n".join(parts) + "\n")
