"""The metric registry is the one list of names, directions and columns: ``rf compare``'s
columns, ``rf sweep``'s per-object tables and the flat metric dict of every evaluation route
read it."""

from __future__ import annotations

from rf_core.evaluation.metric_registry import (
    METRICS,
    column_metrics,
    flat_metrics,
    mesh_metrics,
    per_object_metrics,
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
