"""Evaluation against ground truth (rf_core/evaluation/evaluate.py): alignment, view metrics,
Chamfer and F-score with exact answers, and optional metrics that never download. A 4-view 32x32
duck."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from rf_core.evaluation.evaluate import (
    align_from_input_view,
    chamfer_fscore,
    clip_similarity,
    evaluate_views,
    format_report,
    gt_world_mesh,
    mesh_metrics,
    optional_metrics,
)
from rf_core.ground_truth.gt_render import load_gt, render_gt
from rf_core.scene.cameras import orbit_cameras

DUCK = "pybullet_data:duck.obj"


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "gt"
    render_gt(DUCK, out, views=4, size=32)
    return load_gt(out)


def _cam(elevation, azimuth):
    return orbit_cameras(3.0, elevation, azimuth, 40.0, 32, 32)


@pytest.fixture(scope="module")
def T(gt):
    """Our input camera at azimuth 0 is GT view 1: a non-trivial rotation between worlds."""
    return align_from_input_view(_cam(0.0, 0.0).c2w[0], gt.cams.c2w[1])


def _gt_lookup(gt, T, cams, index) -> int:
    """The GT view whose camera is ``T @ cams.c2w[index]`` (fails if there is none)."""
    c2w = T @ cams.c2w[index].double()
    hits = [i for i in range(len(gt.cams))
            if torch.allclose(c2w, gt.cams.c2w[i].double(), atol=1e-4)
            and torch.equal(cams.K[index], gt.cams.K[i])]
    assert len(hits) == 1, "the evaluation camera matches no GT camera"
    return hits[0]


# ------------------------------------------------------------------------------ alignment


def test_align_maps_input_camera_onto_gt_camera():
    ours, theirs = _cam(0.0, 0.0).c2w[0], _cam(20.0, 70.0).c2w[0]
    T = align_from_input_view(ours, theirs)
    assert T.dtype == torch.float64
    torch.testing.assert_close(T @ ours.double(), theirs.double(), atol=1e-6, rtol=0)
    R = T[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert math.isclose(torch.linalg.det(R).item(), 1.0, abs_tol=1e-6)
    # Both cameras look at the origin from the same distance: the origins correspond.
    origin = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(T @ origin, origin, atol=1e-5, rtol=0)


def test_align_rejects_non_rigid_poses():
    good = _cam(0.0, 0.0).c2w[0]
    scaled, sheared, projective = good.clone(), good.clone(), good.clone()
    scaled[:3, :3] *= 2.0
    sheared[0, 1] += 0.3
    projective[3, 0] = 0.5
    for bad in (scaled, sheared, projective):
        with pytest.raises(ValueError, match="rigid|bottom row"):
            align_from_input_view(bad, good)
        with pytest.raises(ValueError):
            align_from_input_view(good, bad)
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        align_from_input_view(good[:3], good)


# -------------------------------------------------------------------------- view metrics


def test_gt_background_is_white(gt):
    """render_gt leaves every pixel outside the mask at 255: GT rgb is already over white."""
    outside = gt.mask < 0.5
    assert outside.any() and (gt.mask > 0.5).any()
    assert torch.all(gt.rgb[outside] == 1.0)


def test_evaluate_views_perfect_predictor(gt, T):
    def render_fn(cams, index):
        i = _gt_lookup(gt, T, cams, index)
        return {"rgb": gt.rgb[i], "opacity": gt.mask[i], "depth": gt.depth[i]}

    res = evaluate_views(render_fn, gt, T, [0, 1, 2, 3], return_images=True)
    assert [v["index"] for v in res["views"]] == [0, 1, 2, 3]
    for v in res["views"]:
        assert v["psnr"] == math.inf
        assert math.isclose(v["ssim"], 1.0, abs_tol=1e-6)
        assert v["mask_iou"] == 1.0
        assert v["depth_error"] == 0.0
    assert res["mean"]["psnr"] == math.inf and res["mean"]["mask_iou"] == 1.0
    images = res["images"]
    assert images["pred_rgb"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(images["pred_rgb"], gt.rgb.numpy())
    np.testing.assert_array_equal(images["gt_depth"], gt.depth.numpy())

    # The same prediction rendered without a background (premultiplied by opacity).
    def premultiplied(cams, index):
        out = render_fn(cams, index)
        return {**out, "rgb": out["rgb"] * out["opacity"][..., None]}

    res = evaluate_views(premultiplied, gt, T, [2], rgb_premultiplied=True)
    assert res["views"][0]["index"] == 2 and res["views"][0]["psnr"] == math.inf


def test_evaluate_views_perturbed_predictor(gt, T):
    def render_fn(cams, index):
        i = _gt_lookup(gt, T, cams, index)
        rgb = gt.rgb[i]
        # |error| = 0.1 on every channel and pixel (the white background included), kept
        # inside [0, 1]: MSE 0.01 -> 20 dB.
        rgb = torch.where(rgb < 0.5, rgb + 0.1, rgb - 0.1)
        return {"rgb": rgb, "opacity": gt.mask[i], "depth": gt.depth[i] + 0.05}

    res = evaluate_views(render_fn, gt, T)  # all views
    assert len(res["views"]) == 4
    for v in res["views"]:
        assert abs(v["psnr"] - 20.0) < 0.5
        assert v["ssim"] < 1.0
        assert v["mask_iou"] == 1.0
        assert math.isclose(v["depth_error"], 0.05, abs_tol=1e-5)
    assert abs(res["mean"]["psnr"] - 20.0) < 0.5
    assert math.isclose(res["mean"]["depth_error"], 0.05, abs_tol=1e-5)

    def top_half_missing(cams, index):
        i = _gt_lookup(gt, T, cams, index)
        opacity = gt.mask[i].clone()
        opacity[:16] = 0.3  # below the 0.5 threshold
        return {"rgb": gt.rgb[i], "opacity": opacity, "depth": gt.depth[i]}

    for v in evaluate_views(top_half_missing, gt, T)["views"]:
        m = gt.mask[v["index"]]
        assert math.isclose(v["mask_iou"], float(m[16:].sum() / m.sum()), rel_tol=1e-6)
        assert v["psnr"] == math.inf  # rgb over white is taken as it is


def test_premultiplied_and_white_renders_agree(gt, T):
    """Half-transparent object: rendering over white == premultiplied + (1 - opacity)."""
    def render(cams, index, premultiplied):
        i = _gt_lookup(gt, T, cams, index)
        opacity = 0.5 * gt.mask[i]
        rgb = gt.rgb[i] * opacity[..., None]
        return {"rgb": rgb if premultiplied else rgb + (1 - opacity)[..., None],
                "opacity": opacity, "depth": gt.depth[i]}

    a = evaluate_views(lambda c, j: render(c, j, True), gt, T, rgb_premultiplied=True,
                       return_images=True)
    b = evaluate_views(lambda c, j: render(c, j, False), gt, T, return_images=True)
    np.testing.assert_allclose(a["images"]["pred_rgb"], b["images"]["pred_rgb"], atol=1e-6)
    assert a["mean"]["psnr"] == pytest.approx(b["mean"]["psnr"], abs=1e-4)
    assert a["mean"]["mask_iou"] == 0.0  # opacity 0.5 is not above the 0.5 threshold


def test_evaluate_views_rejects_bad_input(gt, T):
    def wrong_size(cams, index):
        return {"rgb": torch.ones(16, 16, 3), "opacity": torch.ones(16, 16),
                "depth": torch.ones(16, 16)}

    with pytest.raises(ValueError, match="expected"):
        evaluate_views(wrong_size, gt, T, [0])
    with pytest.raises(IndexError, match="4 views"):
        evaluate_views(wrong_size, gt, T, [4])
    with pytest.raises(ValueError, match="rigid"):
        evaluate_views(wrong_size, gt, torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])), [0])


# -------------------------------------------------------------------------- mesh metrics


def _grid(spacing: float, n: int = 5) -> np.ndarray:
    axis = np.arange(n) * spacing
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def test_chamfer_fscore_identical_and_shifted():
    pts = _grid(0.1)
    same = chamfer_fscore(pts, pts, threshold=0.01)
    assert same["chamfer_l1"] == 0.0 and same["chamfer_l2"] == 0.0
    assert same["precision"] == same["recall"] == same["fscore"] == 1.0

    # Shift by d along x with spacing > 2d: every point's nearest neighbour is its own image.
    d = 0.03
    shifted = pts + np.array([d, 0.0, 0.0])
    res = chamfer_fscore(shifted, pts, threshold=0.05)
    assert math.isclose(res["chamfer_l1"], d, rel_tol=1e-9)
    assert math.isclose(res["chamfer_l2"], d * d, rel_tol=1e-9)
    assert res["fscore"] == 1.0
    assert chamfer_fscore(shifted, pts, threshold=0.02)["fscore"] == 0.0


def test_chamfer_fscore_incomplete_prediction():
    # Keep every other x-layer: precision 1, recall 3/5; each missing GT point is one
    # spacing s from a kept layer, so chamfer_l1 = (0 + (2/5) s) / 2.
    s = 0.1
    gt_pts = _grid(s)
    pred = gt_pts[np.isclose(np.round(gt_pts[:, 0] / s) % 2, 0)]
    res = chamfer_fscore(pred, gt_pts, threshold=0.05)
    assert res["precision"] == 1.0
    assert math.isclose(res["recall"], 3 / 5)
    assert math.isclose(res["fscore"], 2 * 0.6 / 1.6)
    assert math.isclose(res["chamfer_l1"], 0.5 * 0.4 * s, rel_tol=1e-9)
    assert math.isclose(res["chamfer_l2"], 0.5 * 0.4 * s * s, rel_tol=1e-9)
    with pytest.raises(ValueError):
        chamfer_fscore(np.zeros((0, 3)), gt_pts, 0.05)


def test_mesh_metrics_of_the_gt_mesh(gt, T):
    mesh = gt_world_mesh(gt)
    assert math.isclose(np.linalg.norm(mesh.vertices, axis=1).max(), gt.scene_radius,
                        rel_tol=1e-6)
    same = mesh_metrics(mesh, gt, torch.eye(4))
    # Two independent 20k samplings of one surface: only the sampling noise remains.
    assert same["chamfer_l1"] < 0.01 and same["fscore"] > 0.99
    assert mesh_metrics(mesh, gt, torch.eye(4)) == same  # seeded

    # The GT mesh expressed in OUR world comes back through T.
    ours = mesh.copy()
    ours.apply_transform(torch.linalg.inv(T).numpy())
    assert mesh_metrics(ours, gt, T)["chamfer_l1"] < 0.01

    moved = mesh.copy()
    moved.apply_translation([0.1, 0.0, 0.0])
    off = mesh_metrics(moved, gt, torch.eye(4), threshold=0.05)
    assert off["fscore"] < 0.8
    assert 0.02 < off["chamfer_l1"] < 0.1


# ---------------------------------------------------------------------- optional metrics


def test_optional_metrics_never_download_and_never_invent(gt):
    start = time.perf_counter()
    res = optional_metrics(gt.rgb, gt.rgb)
    assert time.perf_counter() - start < 10.0
    assert set(res) == {"clip_similarity", "lpips"}
    for value in res.values():
        if isinstance(value, dict):  # weights absent here: a reason, not a number
            assert value["available"] is False and value["reason"]
        else:
            assert isinstance(value, float)
    missing = clip_similarity(gt.rgb, gt.rgb, "nobody/no-such-clip-model")
    assert missing["available"] is False and "local Hugging Face cache" in missing["reason"]


def test_clip_similarity_with_local_weights(tmp_path):
    """A tiny random-weight CLIP saved to a folder stands in for the real model."""
    from tests.tiny_clip import make_tiny_clip

    make_tiny_clip(tmp_path / "clip")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 24, 40, 3, generator=g), torch.rand(2, 24, 40, 3, generator=g)
    assert math.isclose(clip_similarity(a, a, str(tmp_path / "clip")), 1.0, abs_tol=1e-5)
    assert clip_similarity(a, b, str(tmp_path / "clip")) < 1.0 - 1e-4


def test_format_report():
    views = {"views": [{"index": 0, "psnr": math.inf, "ssim": 1.0, "mask_iou": 1.0,
                        "depth_error": math.nan}],
             "mean": {"psnr": math.inf, "ssim": 1.0, "mask_iou": 1.0, "depth_error": math.nan}}
    mesh = {"chamfer_l1": 0.0123, "chamfer_l2": 0.0002, "precision": 0.9, "recall": 0.8,
            "fscore": 0.847, "threshold": 0.05, "n_points": 100}
    optional = {"clip_similarity": 0.91, "lpips": {"available": False, "reason": "no lpips"}}
    text = format_report({"views": views, "mesh": mesh, "optional": optional})
    assert "mean" in text and "inf" in text and "nan" in text
    assert "0.0123" in text and "F-score" in text and "0.8470" in text
    assert "unavailable: no lpips" in text and "0.9100" in text
    assert format_report({"mesh": mesh}).startswith("Mesh (100 points")
