"""Every metric rf reports, once: its name, which way is better, whether it needs ground
truth, and where it is shown. Sweep objectives, dataset summaries, ``rf compare`` columns and
``rf sweep``'s tables all read this table, and :func:`flat_metrics` names every number
evaluated.

    METRICS["heldout_psnr"].higher_is_better   # True
    objective_metrics()                        # what a sweep's objective may weight
    needs_gt("chamfer_l1")                     # True
    needs_clip("clip_input_similarity")        # True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["METRICS", "MetricSpec", "column_metrics", "flat_metrics", "higher_is_better",
           "mesh_metrics", "needs_clip", "needs_gt", "objective_metrics", "per_object_metrics",
           "summary_metrics"]


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
    ``rf_core.evaluation.heldout.locate_clip``)."""
    column: bool = False
    """A default column of ``rf compare``'s table (after ``objective``)."""
    mesh: bool = False
    """Computed from an extracted mesh (a sweep report that weights it extracts one)."""


_SPECS = (
    MetricSpec("input_psnr", True, False, "PSNR (dB) of the input view against the photo "
               "inside its mask", objective=True, summary=True, column=True),
    MetricSpec("input_mask_iou", True, False, "IoU of the rendered opacity (> 0.5) and the "
               "photo's mask", objective=True, summary=True, column=True),
    MetricSpec("heldout_psnr", True, True, "mean PSNR (dB) over held-out GT views",
               objective=True, summary=True, column=True),
    MetricSpec("heldout_ssim", True, True, "mean SSIM over held-out GT views", objective=True,
               summary=True, column=True),
    MetricSpec("heldout_mask_iou", True, True, "mean mask IoU over held-out GT views",
               objective=True, summary=True, column=True),
    MetricSpec("heldout_depth_error", False, True, "mean absolute z-depth error over held-out "
               "GT views, inside both masks", column=True),
    MetricSpec("gt_input_psnr", True, True, "PSNR (dB) of the input view against its GT view"),
    MetricSpec("gt_input_mask_iou", True, True, "mask IoU of the input view against its GT "
               "view"),
    MetricSpec("chamfer_l1", False, True, "L1 Chamfer distance between the mesh and the GT "
               "mesh (scene units)", objective=True, summary=True, column=True, mesh=True),
    MetricSpec("fscore", True, True, "F-score of mesh points at 0.05 scene units",
               objective=True, summary=True, column=True, mesh=True),
    MetricSpec("clip_input_similarity", True, False, "mean CLIP image similarity of novel views "
               "to the input photo (the RealFusion paper's metric; needs CLIP weights)",
               objective=True, needs_clip=True),
    MetricSpec("clip_similarity", True, True, "CLIP image similarity of held-out renders and "
               "GT views (when CLIP weights are local)"),
    MetricSpec("lpips", False, True, "LPIPS of held-out renders against GT views (when its "
               "weights are local)"),
    MetricSpec("fit_seconds", False, False, "wall time of the fitting loop"),
    MetricSpec("total_seconds", False, False, "wall time of the whole object",
               summary=True, column=True),
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


def column_metrics() -> tuple[str, ...]:
    """Default metric columns of ``rf compare`` (after ``objective``), in order."""
    return tuple(s.name for s in _SPECS if s.column)


def mesh_metrics() -> tuple[str, ...]:
    """Metrics computed from an extracted mesh."""
    return tuple(s.name for s in _SPECS if s.mesh)


def per_object_metrics() -> tuple[str, ...]:
    """The objective metrics a sweep over objects reports per object (``heldout_psnr/duck``),
    the most telling first: ground-truth ones, then CLIP similarity to the photo, then the
    input view's (every report has those)."""
    return tuple(sorted(objective_metrics(),
                        key=lambda n: 0 if needs_gt(n) else 1 if needs_clip(n) else 2))


def flat_metrics(report: dict) -> dict[str, float]:
    """The one flat dict of evaluated numbers, under this table's names, from the parts of an
    evaluation report (each optional): ``input_view_metrics`` (``input_psnr``,
    ``input_mask_iou``, from ``Reconstructor.input_view_metrics``), ``views.mean``
    (-> ``heldout_<key>``), ``input``, the input GT view (-> ``gt_input_psnr``,
    ``gt_input_mask_iou``), ``mesh`` (``chamfer_l1``, ``fscore``) and ``optional``
    (``clip_similarity``, ``lpips``: numbers only, an unavailable one is left out)."""
    out: dict[str, float] = dict(report.get("input_view_metrics", {}))
    for key, value in report.get("views", {}).get("mean", {}).items():
        out[f"heldout_{key}"] = float(value)
    for key in ("psnr", "mask_iou"):
        if key in report.get("input", {}):
            out[f"gt_input_{key}"] = float(report["input"][key])
    for key in mesh_metrics():
        if key in report.get("mesh", {}):
            out[key] = float(report["mesh"][key])
    for key, value in report.get("optional", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


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
