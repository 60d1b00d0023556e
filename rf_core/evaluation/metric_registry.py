"""Every metric rf reports, once: its name, which way is better, whether it needs ground
truth, and where it is shown. Sweep objectives, dataset summaries, ``rf compare`` columns and
``rf sweep``'s tables all read this table, and :func:`flat_metrics` names every number
evaluated. Every other module names a metric by this module's constants (``HELDOUT_PSNR``),
never by a string (``tests/rf_core/test_metric_registry.py`` checks). The per-view numbers
(``evaluate_views``: PSNR, SSIM, mask IoU, depth error of one render against its GT view) are
listed here too, with the function that computes each (``VIEW_METRICS``); their means are
``heldout_<key>`` and, for the input GT view, ``gt_input_<key>``.

    METRICS["heldout_psnr"].higher_is_better   # True
    objective_metrics()                        # what a sweep's objective may weight
    needs_gt("chamfer_l1")                     # True
    needs_clip("clip_input_similarity")        # True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from rf_core.ground_truth.metrics import depth_error, mask_iou, psnr, ssim

__all__ = ["CHAMFER_L1", "CLIP_INPUT_SIMILARITY", "CLIP_SIMILARITY", "FIT_SECONDS", "FSCORE",
           "GT_INPUT_MASK_IOU", "GT_INPUT_PSNR", "HELDOUT_DEPTH_ERROR", "HELDOUT_MASK_IOU",
           "HELDOUT_PSNR", "HELDOUT_SSIM", "INPUT_MASK_IOU", "INPUT_PSNR", "LPIPS", "METRICS",
           "TOTAL_SECONDS", "VIEW_METRICS", "MetricSpec", "RenderedView", "ViewMetric",
           "column_metrics", "default_objective", "flat_metrics", "heldout_name",
           "higher_is_better", "mesh_metrics", "needs_clip", "needs_gt", "objective_metrics",
           "per_object_metrics", "summary_metrics", "view_metric_keys",
           "view_metrics"]

INPUT_PSNR = "input_psnr"
INPUT_MASK_IOU = "input_mask_iou"
HELDOUT_PSNR = "heldout_psnr"
HELDOUT_SSIM = "heldout_ssim"
HELDOUT_MASK_IOU = "heldout_mask_iou"
HELDOUT_DEPTH_ERROR = "heldout_depth_error"
GT_INPUT_PSNR = "gt_input_psnr"
GT_INPUT_MASK_IOU = "gt_input_mask_iou"
CHAMFER_L1 = "chamfer_l1"
FSCORE = "fscore"
CLIP_INPUT_SIMILARITY = "clip_input_similarity"
CLIP_SIMILARITY = "clip_similarity"
LPIPS = "lpips"
FIT_SECONDS = "fit_seconds"
TOTAL_SECONDS = "total_seconds"

_HELDOUT = "heldout_"
"""A per-view metric's mean over held-out GT views is ``heldout_<key>``."""
_GT_INPUT = "gt_input_"
"""A per-view metric of the input GT view is ``gt_input_<key>``."""


# ------------------------------------------------------------------------ per-view metrics


class RenderedView(NamedTuple):
    """One render and its GT view, both over white: rgb [H, W, 3], opacity/mask and z-depth
    [H, W] (``evaluate_views``)."""

    pred_rgb: object
    gt_rgb: object
    pred_opacity: object
    gt_mask: object
    pred_depth: object
    gt_depth: object


@dataclass(frozen=True)
class ViewMetric:
    """One number of a render against its GT view, and how ``rf evaluate``'s table shows it."""

    key: str
    compute: Callable[[RenderedView], float]
    label: str
    """Its column heading in ``format_report``'s table of views."""
    width: int
    """That column's width in characters."""
    digits: int = 4
    """Decimals shown."""


VIEW_METRICS: tuple[ViewMetric, ...] = (
    ViewMetric("psnr", lambda v: psnr(v.pred_rgb, v.gt_rgb), "PSNR", 9, digits=2),
    ViewMetric("ssim", lambda v: ssim(v.pred_rgb, v.gt_rgb), "SSIM", 8),
    ViewMetric("mask_iou", lambda v: mask_iou(v.pred_opacity, v.gt_mask), "IoU", 8),
    # mean |z_ours - z_gt| where both masks cover the pixel
    ViewMetric("depth_error", lambda v: depth_error(v.pred_depth, v.gt_depth, v.pred_opacity,
                                                    v.gt_mask), "depth err", 10),
)
"""The numbers ``evaluate_views`` computes for every view, in its order."""


def view_metric_keys() -> tuple[str, ...]:
    """The keys of a view's numbers (``psnr``, ``ssim``, ``mask_iou``, ``depth_error``)."""
    return tuple(m.key for m in VIEW_METRICS)


def view_metrics(view: RenderedView) -> dict[str, float]:
    """Every per-view number of ``view``, under :func:`view_metric_keys`."""
    return {m.key: m.compute(view) for m in VIEW_METRICS}


def heldout_name(key: str) -> str:
    """The reported name of per-view metric ``key``'s mean over held-out views."""
    return _HELDOUT + key


# ------------------------------------------------------------------------ reported metrics


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
    MetricSpec(INPUT_PSNR, True, False, "PSNR (dB) of the input view against the photo "
               "inside its mask", objective=True, summary=True, column=True),
    MetricSpec(INPUT_MASK_IOU, True, False, "IoU of the rendered opacity (> 0.5) and the "
               "photo's mask", objective=True, summary=True, column=True),
    MetricSpec(HELDOUT_PSNR, True, True, "mean PSNR (dB) over held-out GT views",
               objective=True, summary=True, column=True),
    MetricSpec(HELDOUT_SSIM, True, True, "mean SSIM over held-out GT views", objective=True,
               summary=True, column=True),
    MetricSpec(HELDOUT_MASK_IOU, True, True, "mean mask IoU over held-out GT views",
               objective=True, summary=True, column=True),
    MetricSpec(HELDOUT_DEPTH_ERROR, False, True, "mean absolute z-depth error over held-out "
               "GT views, inside both masks", column=True),
    MetricSpec(GT_INPUT_PSNR, True, True, "PSNR (dB) of the input view against its GT view"),
    MetricSpec(GT_INPUT_MASK_IOU, True, True, "mask IoU of the input view against its GT "
               "view"),
    MetricSpec(CHAMFER_L1, False, True, "L1 Chamfer distance between the mesh and the GT "
               "mesh (scene units)", objective=True, summary=True, column=True, mesh=True),
    MetricSpec(FSCORE, True, True, "F-score of mesh points at 0.05 scene units",
               objective=True, summary=True, column=True, mesh=True),
    MetricSpec(CLIP_INPUT_SIMILARITY, True, False, "mean CLIP image similarity of novel views "
               "to the input photo (the RealFusion paper's metric; needs CLIP weights)",
               objective=True, needs_clip=True),
    MetricSpec(CLIP_SIMILARITY, True, True, "CLIP image similarity of held-out renders and "
               "GT views (when CLIP weights are local)"),
    MetricSpec(LPIPS, False, True, "LPIPS of held-out renders against GT views (when its "
               "weights are local)"),
    MetricSpec(FIT_SECONDS, False, False, "wall time of the fitting loop"),
    MetricSpec(TOTAL_SECONDS, False, False, "wall time of the whole object",
               summary=True, column=True),
)

METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}
"""Metric name -> :class:`MetricSpec`."""

_GT_INPUT_METRICS = tuple(s.name for s in _SPECS if s.name.startswith(_GT_INPUT))

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


def default_objective(ground_truth: bool) -> str:
    """The metric a sweep's objective weights when its file names none: the held-out PSNR
    when every object has ground truth, else the input view's PSNR. Higher is better for
    both, so the objective is maximised (a sweep's default ``mode: max``)."""
    return HELDOUT_PSNR if ground_truth else INPUT_PSNR


def flat_metrics(report: dict) -> dict[str, float]:
    """The one flat dict of evaluated numbers, under this table's names, from the parts of an
    evaluation report (each optional): ``input_view_metrics`` (``input_psnr``,
    ``input_mask_iou``, from ``Reconstructor.input_view_metrics``), ``views.mean``
    (-> ``heldout_<key>``), ``input``, the input GT view (-> ``gt_input_psnr``,
    ``gt_input_mask_iou``), ``mesh`` (``chamfer_l1``, ``fscore``) and ``optional``
    (``clip_similarity``, ``lpips``: numbers only, an unavailable one is left out)."""
    out: dict[str, float] = dict(report.get("input_view_metrics", {}))
    for key, value in report.get("views", {}).get("mean", {}).items():
        out[heldout_name(key)] = float(value)
    for name in _GT_INPUT_METRICS:
        key = name.removeprefix(_GT_INPUT)
        if key in report.get("input", {}):
            out[name] = float(report["input"][key])
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
