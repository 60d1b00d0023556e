"""Validation of a novel-view model on held-out pairs, against copying the input view.

Copying the conditioning view is the baseline a novel-view model must beat: it is right
wherever the object looks alike from both cameras, and costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rf_core.ground_truth.metrics import mask_iou, psnr
from rf_core.prior.novel_view.model import NovelViewModel

__all__ = ["collate", "evaluate", "validation_indices"]


def collate(pairs: Sequence[dict], indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """The pairs ``pairs[indices]`` stacked: cond, target [B, 4, S, S], camera [B, F]."""
    items = [pairs[i] for i in indices]
    return {k: torch.stack([torch.as_tensor(it[k], dtype=torch.float32) for it in items])
            for k in ("cond", "target", "camera")}


def validation_indices(pairs: Sequence[dict], count: int) -> list[int]:
    """``count`` pair indices evenly spread over ``pairs``, leaving out the pairs whose target
    is the conditioning view itself: copying those is exact, and their infinite PSNR would
    swamp the copy baseline's mean."""
    novel = [i for i in range(len(pairs))
             if not torch.equal(torch.as_tensor(pairs[i]["cond"]),
                                torch.as_tensor(pairs[i]["target"]))]
    if not novel:
        return []
    return [novel[int(i)] for i in sorted(set(np.linspace(0, len(novel) - 1,
                                                          min(len(novel), count)).round()))]


@torch.no_grad()
def evaluate(model: NovelViewModel, pairs: Sequence[dict], indices: Sequence[int],
             batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Mean per-pair PSNR (rgb over white, dB) and mask IoU (alpha > 0.5) of ``model`` and of
    the baseline that answers the conditioning view itself, over ``pairs[indices]``.
    The diffusion model samples with a generator seeded by ``seed``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    scores: dict[str, list[float]] = {k: [] for k in ("val_psnr", "val_iou", "copy_psnr",
                                                      "copy_iou")}
    for start in range(0, len(indices), batch_size):
        b = collate(pairs, indices[start:start + batch_size])
        pred = model.predict(b["cond"], b["camera"], generator=gen)
        for name, guess in (("val", pred), ("copy", b["cond"])):
            for g, t in zip(guess, b["target"]):
                scores[f"{name}_psnr"].append(min(psnr(g[:3], t[:3]), 100.0))
                scores[f"{name}_iou"].append(mask_iou(g[3], t[3]))
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items()}
