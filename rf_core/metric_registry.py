"""Every metric rf reports, once: its name, which way is better, and whether it needs ground
truth. Sweep objectives, dataset summaries and ``rf compare`` all read this table.

    METRICS["heldout_psnr"].higher_is_better   # True
    objective_metrics()                        # what a sweep's objective may weight
    needs_gt("chamfer_l1")                     # True
    needs_clip("clip_input_similarity")        # True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["METRICS", "MetricSpec", "higher_is_better", "needs_clip", "needs_gt",
           "objective_metrics", "summary_metrics"]


@dataclass(frozen=True)
class MetricSpec:
    """One reported number."""

    name: str
    higher_is_better: bool
    needs_gt: bool
    """Computed only against ground-truth views or a GT mesh (``rf render-gt`` folders)."""
    doc: str
    objective: bool = False
    """A sweep's ``objective`` may weight it (it is in every final trial report)."""
    summary: bool = False
    """A column of ``rf dataset``'s summary table and means."""
    needs_clip: bool = False
    """Computed with CLIP weights, which must be on this machine (see
    ``rf_core.heldout.locate_clip``)."""


_SPECS = (
    MetricSpec("input_psnr", True, False, "PSNR (dB) of the input view against the photo "
               "inside its mask", objective=True, summary=True),
    MetricSpec("input_mask_iou", True, False, "IoU of the rendered opacity (> 0.5) and the "
               "photo's mask", objective=True, summary=True),
    MetricSpec("heldout_psnr", True, True, "mean PSNR (dB) over held-out GT views",
               objective=True, summary=True),
    MetricSpec("heldout_ssim", True, True, "mean SSIM over held-out GT views", objective=True,
               summary=True),
    MetricSpec("heldout_mask_iou", True, True, "mean mask IoU over held-out GT views",
               objective=True, summary=True),
    MetricSpec("heldout_depth_error", False, True, "mean absolute z-depth error over held-out "
               "GT views, inside both masks"),
    MetricSpec("gt_input_psnr", True, True, "PSNR (dB) of the input view against its GT view"),
    MetricSpec("gt_input_mask_iou", True, True, "mask IoU of the input view against its GT "
               "view"),
    MetricSpec("chamfer_l1", False, True, "L1 Chamfer distance between the mesh and the GT "
               "mesh (scene units)", objective=True, summary=True),
    MetricSpec("fscore", True, True, "F-score of mesh points at 0.05 scene units",
               objective=True, summary=True),
    MetricSpec("clip_input_similarity", True, False, "mean CLIP image similarity of novel views "
               "to the input photo (the RealFusion paper's metric; needs CLIP weights)",
               objective=True, needs_clip=True),
    MetricSpec("clip_similarity", True, True, "CLIP image similarity of held-out renders and "
               "GT views (when CLIP weights are local)"),
    MetricSpec("lpips", False, True, "LPIPS of held-out renders against GT views (when its "
               "weights are local)"),
    MetricSpec("fit_seconds", False, False, "wall time of the fitting loop"),
    MetricSpec("total_seconds", False, False, "wall time of the whole object",
               summary=True),
)

METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}
"""Metric name -> :class:`MetricSpec`."""

_LOWER_IS_BETTER = re.compile(r"error|chamfer|seconds|loss|lpips")


def objective_metrics() -> tuple[str, ...]:
    """Names a sweep's ``objective`` (or ``metric``) may use."""
    return tuple(s.name for s in _SPECS if s.objective)


def summary_metrics() -> tuple[str, ...]:
    """Columns of a dataset summary, in order."""
    return tuple(s.name for s in _SPECS if s.summary)


def needs_gt(name: str) -> bool:
    """Whether ``name`` can only be computed against ground truth."""
    spec = METRICS.get(name)
    return bool(spec and spec.needs_gt)


def needs_clip(name: str) -> bool:
    """Whether ``name`` needs CLIP weights on this machine."""
    spec = METRICS.get(name)
    return bool(spec and spec.needs_clip)


def higher_is_better(name: str) -> bool:
    """Direction of ``name``; names outside the table (``loss/rgb``, ``heldout_x/duck``) are
    judged by their last part: errors, distances, losses and times are better lower."""
    spec = METRICS.get(name) or METRICS.get(name.split("/")[0])
    if spec is not None:
        return spec.higher_is_better
    return not _LOWER_IS_BETTER.search(name)
