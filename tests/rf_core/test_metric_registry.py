"""The metric registry is the one list of names, directions and columns: ``rf compare``'s
columns, ``rf sweep``'s per-object tables and the flat metric dict of every evaluation route
read it."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import torch

from rf_core.evaluation import metric_registry as registry
from rf_core.evaluation.metric_registry import (
    HELDOUT_DEPTH_ERROR,
    HELDOUT_MASK_IOU,
    HELDOUT_PSNR,
    HELDOUT_SSIM,
    INPUT_MASK_IOU,
    INPUT_PSNR,
    METRICS,
    RenderedView,
    column_metrics,
    default_objective,
    flat_metrics,
    heldout_name,
    higher_is_better,
    mesh_metrics,
    needs_gt,
    objective_metrics,
    per_object_metrics,
    view_metric_keys,
    view_metrics,
)


def test_columns_and_per_object_order():
    assert column_metrics() == ("input_psnr", "input_mask_iou", "heldout_psnr", "heldout_ssim",
                                "heldout_mask_iou", "heldout_depth_error", "chamfer_l1",
                                "fscore", "total_seconds")
    # ground truth first, then CLIP similarity to the photo, the input view's last
    assert per_object_metrics() == ("heldout_psnr", "heldout_ssim", "heldout_mask_iou",
                                    "chamfer_l1", "fscore", "clip_input_similarity",
                                    "input_psnr", "input_mask_iou")
    assert mesh_metrics() == ("chamfer_l1", "fscore")


def test_flat_metrics_names_every_number_as_the_registry_does():
    report = {"input_view": 0, "input_view_metrics": {"input_psnr": 21.0, "input_mask_iou": 0.9},
              "input": {"psnr": 20.0, "ssim": 0.8, "mask_iou": 0.85, "depth_error": 0.1},
              "views": {"mean": {"psnr": 18.5, "ssim": 0.7, "mask_iou": 0.8,
                                 "depth_error": 0.2}},
              "mesh": {"chamfer_l1": 0.05, "chamfer_l2": 0.01, "fscore": 0.6, "n_points": 9},
              "optional": {"clip_similarity": 0.9, "lpips": {"available": False,
                                                             "reason": "no weights"}},
              "mesh_error": None}
    flat = flat_metrics(report)
    assert list(flat) == ["input_psnr", "input_mask_iou", "heldout_psnr", "heldout_ssim",
                          "heldout_mask_iou", "heldout_depth_error", "gt_input_psnr",
                          "gt_input_mask_iou", "chamfer_l1", "fscore", "clip_similarity"]
    assert set(flat) <= set(METRICS) and flat["heldout_psnr"] == 18.5
    assert flat_metrics({}) == {}


# ------------------------------------------------------------------ one place for each name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rf_core", "rf_distributed", "rf_cli", "rf_bench")
REGISTRY = ROOT / "rf_core" / "evaluation" / "metric_registry.py"
ALLOWED = {
    # fitting comes before evaluation in rf_core's stages (tests/test_layering.py), so the
    # Reconstructor cannot import the registry; test_input_view_metrics_are_registered ties
    # its two names to the table
    ("rf_core/fitting/reconstruct.py", "input_psnr"): 1,
    ("rf_core/fitting/reconstruct.py", "input_mask_iou"): 1,
    # the lpips package's import name, not the metric's
    ("rf_core/evaluation/evaluate.py", "lpips"): 1,
}
"""(module, metric name) -> how many literals of the name that module may hold, and why."""


def _metric_literals(path: Path, names: set[str]) -> list[tuple[str, int]]:
    """(name, line) of every string constant that is exactly a metric name; ``__all__``'s
    entries (Python names, e.g. the function ``clip_input_similarity``) and prose do not
    count."""
    tree = ast.parse(path.read_text())
    exported = {id(node) for assign in ast.walk(tree) if isinstance(assign, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in assign.targets)
                for node in ast.walk(assign.value)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in names and id(node) not in exported]


def test_no_metric_name_literal_outside_the_registry():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if p != REGISTRY]
    assert len(files) > 50
    counts: Counter = Counter()
    where: dict = {}
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for name, line in _metric_literals(path, set(METRICS)):
            counts[rel, name] += 1
            where.setdefault((rel, name), []).append(line)
    found = [f"{rel}:{line}: {name!r}" for (rel, name), n in counts.items()
             if n > ALLOWED.get((rel, name), 0) for line in where[rel, name]]
    assert not found, ("name these metrics by rf_core.evaluation.metric_registry's "
                       "constants:\n" + "\n".join(found))
    stale = [key for key in ALLOWED if counts[key] != ALLOWED[key]]
    assert not stale, f"exceptions no longer needed (remove them from ALLOWED): {stale}"


def test_the_checker_sees_literals_only(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('__all__ = ["fscore"]\nX = {"heldout_psnr": 1}\n'
                     'Y = "heldout_psnr of the duck"\n"""Docs name ``chamfer_l1``."""\n'
                     'Z = f"{1}chamfer_l1"\nW = m.get("chamfer_l1")\n')
    # a piece of an f-string that is exactly a name spells it too
    assert sorted(_metric_literals(probe, set(METRICS)), key=lambda hit: hit[1]) == [
        ("heldout_psnr", 2), ("chamfer_l1", 5), ("chamfer_l1", 6)]


def test_constants_name_every_metric_once():
    constants = {getattr(registry, n) for n in registry.__all__
                 if n.isupper() and isinstance(getattr(registry, n), str)}
    assert constants == set(METRICS)


def test_view_metrics_and_their_reported_means():
    assert view_metric_keys() == ("psnr", "ssim", "mask_iou", "depth_error")
    heldout = [n for n in METRICS if n.startswith("heldout_")]
    assert heldout == [heldout_name(k) for k in view_metric_keys()]
    assert heldout == [HELDOUT_PSNR, HELDOUT_SSIM, HELDOUT_MASK_IOU, HELDOUT_DEPTH_ERROR]
    for name in heldout + [n for n in METRICS if n.startswith("gt_input_")]:
        key = name.removeprefix("heldout_").removeprefix("gt_input_")
        assert key in view_metric_keys()
        # a view metric's direction is its means'
        assert higher_is_better(name) == (key != "depth_error")
    rgb = torch.full((16, 16, 3), 0.5)
    mask = torch.ones(16, 16)
    values = view_metrics(RenderedView(rgb, rgb, mask, mask, mask, mask))
    assert list(values) == list(view_metric_keys())
    assert values["psnr"] == float("inf") and values["mask_iou"] == 1.0
    assert values["depth_error"] == 0.0


def test_default_objective_is_maximised():
    assert default_objective(ground_truth=True) == HELDOUT_PSNR
    assert default_objective(ground_truth=False) == INPUT_PSNR
    for gt in (True, False):
        name = default_objective(gt)
        assert name in objective_metrics() and higher_is_better(name)  # the default mode: max
        assert needs_gt(name) == gt


def test_input_view_metrics_are_registered():
    """``Reconstructor.input_view_metrics`` (which cannot import the registry) reports
    exactly the registry's input-view metrics."""
    source = (ROOT / "rf_core" / "fitting" / "reconstruct.py").read_text()
    method = next(node for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.FunctionDef) and node.name == "input_view_metrics")
    keys = [k.value for node in ast.walk(method) if isinstance(node, ast.Dict)
            for k in node.keys]
    assert keys == [INPUT_PSNR, INPUT_MASK_IOU]
    assert [n for n in METRICS if n.startswith("input_")] == keys
