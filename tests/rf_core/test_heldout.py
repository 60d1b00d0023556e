"""Intermediate-report metrics (rf_core/evaluation/heldout.py): the fixed held-out subset,
downsampled GT that still matches the object, the fast path equal to the full evaluation, the GT |
ours strip and CLIP similarity to the input photo. A 6-view 16x16 duck and an untrained tiny
field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rf_core.config import ConfigError, load_config
from rf_core.errors import UserError
from rf_core.evaluation.evaluate import align_from_input_view, composite_white, transform_cameras
from rf_core.evaluation.heldout import (
    ClipWeightsError,
    InterimPlan,
    clip_input_similarity,
    downsample_gt,
    evaluate_interim,
    heldout_indices,
    heldout_strip,
    locate_clip,
)
from rf_core.evaluation.metric_registry import METRICS, needs_clip, needs_gt, objective_metrics
from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig
from rf_core.ground_truth.gt_render import load_gt, render_gt
from rf_core.ground_truth.metrics import mask_iou, psnr
from rf_core.jobs.evaluate_run import (
    evaluate_reconstruction,
    evaluation_metrics,
    input_view_overrides,
)
from rf_core.scene.cameras import orbit_cameras
from tests.rf_core.test_reconstruct import FAST
from tests.tiny_clip import make_tiny_clip

DUCK = "pybullet_data:duck.obj"
INPUT = 1  # not view 0, so that "every view but the input" is not just a slice
HELDOUT = ("heldout_psnr", "heldout_ssim", "heldout_mask_iou", "heldout_depth_error")


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "gt"
    render_gt(DUCK, out, views=6, size=16)
    return out


@pytest.fixture(scope="module")
def gt(gt_dir):
    return load_gt(gt_dir)


@pytest.fixture(scope="module")
def recon(gt_dir, gt):
    """An untrained tiny field (its initial blob) whose input camera is GT view INPUT."""
    camera = [o.removeprefix("recon.") for o in input_view_overrides(gt_dir, INPUT)
              if o.startswith("recon.")]
    cfg = load_config(ReconstructorConfig, overrides=[*FAST, "input_size=16",
                                                         "renderer.num_samples=12", *camera])
    return Reconstructor(cfg, gt.rgb[INPUT].permute(2, 0, 1), gt.mask[INPUT][None], prior=None,
                         device="cpu")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


# ---------------------------------------------------------------------------- the plan


def test_interim_plan_rejects_bad_values_in_one_line():
    assert InterimPlan() == InterimPlan(views=4, size=64, mesh_resolution=32)
    InterimPlan(views=1, size=11, mesh_resolution=8)  # the smallest
    for bad in ({"views": 0}, {"size": 10}, {"mesh_resolution": 7}, {"views": 2.5}):
        with pytest.raises(ConfigError) as info:
            InterimPlan(**bad)
        msg = str(info.value)
        assert isinstance(info.value, UserError) and "\n" not in msg
        assert msg.startswith(next(iter(bad))) and ">=" in msg


def test_heldout_indices_spread_evenly_without_the_input():
    assert heldout_indices(6, 1, None) == [0, 2, 3, 4, 5]
    assert heldout_indices(6, 1, 5) == heldout_indices(6, 1, 99) == [0, 2, 3, 4, 5]
    assert heldout_indices(10, 0, 3) == [1, 4, 7]  # every third of views 1..9
    assert heldout_indices(10, 0, 3) == heldout_indices(10, 0, 3)  # deterministic
    assert heldout_indices(9, 4, 4) == [0, 2, 5, 7]
    assert heldout_indices(32, 0, 4) == [1, 8, 16, 24]
    assert 5 not in heldout_indices(32, 5, 31) and len(heldout_indices(32, 5, 31)) == 31
    with pytest.raises(ConfigError, match="input_view 6 is out of range"):
        heldout_indices(6, 6, 2)
    with pytest.raises(ConfigError, match=">= 1"):
        heldout_indices(6, 0, 0)


# ------------------------------------------------------------------------ downsampling


def test_downsample_gt_shapes_intrinsics_and_binary_mask(gt):
    small = downsample_gt(gt, [0, 2, 5], 8)
    assert small.rgb.shape == (3, 8, 8, 3) and small.mask.shape == small.depth.shape \
        == (3, 8, 8)
    assert (small.cams.width, small.cams.height, len(small.cams)) == (8, 8, 3)
    torch.testing.assert_close(small.cams.c2w, gt.cams.c2w[[0, 2, 5]])
    K, K0 = small.cams.K, gt.cams.K[[0, 2, 5]]
    torch.testing.assert_close(K[:, :2, :], K0[:, :2, :] / 2)
    assert torch.equal(K[:, 2], K0[:, 2])
    assert set(small.mask.unique().tolist()) <= {0.0, 1.0} and small.mask.sum() > 0
    assert torch.all(small.depth[small.mask == 0] == 0)
    assert small.depth[small.mask == 1].min() > 2.0  # no background zero averaged in
    assert small.mesh == gt.mesh and small.scene_radius == gt.scene_radius
    assert torch.equal(small.world_transform, gt.world_transform)
    # Same size: nothing changes.
    same = downsample_gt(gt, [3], 16)
    for key in ("rgb", "mask", "depth"):
        assert torch.equal(getattr(same, key), getattr(gt, key)[[3]])

    # Width != height: fx, cx scale with the width, fy, cy with the height.
    wide = type(gt)(gt.rgb[:, :8], gt.mask[:, :8], gt.depth[:, :8],
                    type(gt.cams)(gt.cams.c2w, gt.cams.K, 16, 8), gt.world_transform, gt.mesh)
    K = downsample_gt(wide, [0], 4).cams.K[0]
    torch.testing.assert_close(K[0], gt.cams.K[0, 0] / 4)
    torch.testing.assert_close(K[1], gt.cams.K[0, 1] / 2)


def test_downsampled_gt_matches_the_object_rendered_at_that_size(tmp_path, gt):
    """A 32-pixel GT downsampled to 16 matches the 16-pixel GT: the scaled intrinsics look
    at the same object (a wrong cx or fx would shift or scale the silhouette)."""
    big = load_gt(render_gt(DUCK, tmp_path / "gt32", views=6, size=32))
    small = downsample_gt(big, [0, 2, 4], 16)
    # The scaled cameras are the ones the 16-pixel GT was rendered with.
    torch.testing.assert_close(small.cams.K, gt.cams.K[[0, 2, 4]])
    for j, i in enumerate([0, 2, 4]):
        assert mask_iou(small.mask[j], gt.mask[i]) > 0.85
        assert psnr(small.rgb[j], gt.rgb[i]) > 20.0
    # Depth: averaging across the silhouette (with the background's 0) would be off by ~1 at
    # the edges; averaging object pixels only stays close to the 16-pixel render everywhere.
    naive = F.interpolate(big.depth[[0, 2, 4], None], size=(16, 16), mode="area")[:, 0]
    for j, i in enumerate([0, 2, 4]):
        both = (small.mask[j] > 0) & (gt.mask[i] > 0)
        error = (small.depth[j] - gt.depth[i])[both].abs()
        assert error.median() < 0.01 and error.mean() < 0.03 and error.max() < 0.3
        assert (naive[j] - gt.depth[i])[both].abs().max() > 0.5


# --------------------------------------------------------------------------- metrics


def test_evaluate_interim_keys_and_subset(recon, gt):
    metrics = evaluate_interim(recon, gt, INPUT, InterimPlan(views=2, size=12))
    assert set(metrics) == {"input_psnr", "input_mask_iou", *HELDOUT}
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0.0 < metrics["heldout_mask_iou"] <= 1.0 and math.isfinite(metrics["heldout_psnr"])
    assert all(METRICS[k] for k in metrics)  # every name is in the registry


def test_evaluate_interim_at_full_size_equals_the_full_evaluation(recon, gt):
    """The fast path with every view at the GT size is the reference evaluation."""
    fast = evaluate_interim(recon, gt, INPUT, InterimPlan(views=100, size=16))
    report = evaluate_reconstruction(recon, gt, INPUT, optional=False)
    full = evaluation_metrics(report)
    for key in HELDOUT:
        assert fast[key] == pytest.approx(full[key], abs=1e-5), key
    assert fast["input_psnr"] == recon.input_view_metrics()["input_psnr"]
    # A subset is the mean over exactly those GT views (indices into the subset are mapped).
    subset = heldout_indices(len(gt.cams), INPUT, 2)
    two = evaluate_interim(recon, gt, INPUT, InterimPlan(views=2, size=16))
    per_view = {v["index"]: v for v in report["views"]["views"]}
    for metric in ("psnr", "ssim", "mask_iou"):
        expected = np.mean([per_view[i][metric] for i in subset])
        assert two[f"heldout_{metric}"] == pytest.approx(expected, abs=1e-5), metric


def test_evaluate_interim_mesh_metrics_and_the_no_surface_fallback(recon, gt):
    plan = InterimPlan(views=1, size=12, mesh_resolution=16)
    metrics = evaluate_interim(recon, gt, INPUT, plan, mesh=True)
    assert set(metrics) == {"input_psnr", "input_mask_iou", *HELDOUT, "chamfer_l1", "fscore"}
    assert math.isfinite(metrics["chamfer_l1"]) and 0 < metrics["chamfer_l1"] < 1.0
    assert 0.0 <= metrics["fscore"] <= 1.0
    # No density reaches the level: ranked last, not a crash or an inf.
    empty = evaluate_interim(recon, gt, INPUT, plan, mesh=True, threshold=1e12)
    assert empty["fscore"] == 0.0
    assert math.isfinite(empty["chamfer_l1"]) and empty["chamfer_l1"] > 2 * gt.scene_radius
    assert empty["chamfer_l1"] > metrics["chamfer_l1"]


def test_heldout_strip_is_gt_over_ours(recon, gt):
    strip = heldout_strip(recon, gt, INPUT, views=3, size=16)
    assert strip.dtype == np.uint8 and strip.shape == (32, 48, 3)
    views = heldout_indices(len(gt.cams), INPUT, 3)
    top = composite_white(gt.rgb[views], gt.mask[views])
    expected = (torch.cat(list(top), dim=1).numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(strip[:16], expected)
    cams = downsample_gt(gt, views, 16).cams
    T = align_from_input_view(recon.input_camera().c2w[0], gt.cams.c2w[INPUT])
    ours_cams = transform_cameras(cams, torch.linalg.inv(T))  # the same cameras in our world
    ours = [recon.render(ours_cams, j)["rgb"] for j in range(3)]
    bottom = (torch.cat(ours, dim=1).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(strip[16:], bottom)
    small = heldout_strip(recon, gt, INPUT, views=2, size=8)
    assert small.shape == (16, 16, 3)
    down = downsample_gt(gt, heldout_indices(len(gt.cams), INPUT, 2), 8)
    top = torch.cat(list(composite_white(down.rgb, down.mask)), dim=1)
    np.testing.assert_array_equal(small[:8], (top.numpy() * 255 + 0.5).astype(np.uint8))


# ------------------------------------------------------------------------------ CLIP


def test_locate_clip_finds_folders_and_explains_what_is_missing(tmp_path, clip_dir):
    assert locate_clip(str(clip_dir)) == clip_dir
    for missing in ("nobody/no-such-clip-model", str(tmp_path / "absent")):
        with pytest.raises(ClipWeightsError) as info:
            locate_clip(missing)
        msg = str(info.value)
        assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)
        assert "\n" not in msg and "clip_model:" in msg and "hf download" in msg
    assert "hf download nobody/no-such-clip-model" in str(
        pytest.raises(ClipWeightsError, locate_clip, "nobody/no-such-clip-model").value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipWeightsError, match="no config.json"):
        locate_clip(str(tmp_path / "empty"))


def test_clip_input_similarity_matches_a_direct_computation(recon, gt, clip_dir):
    from transformers import CLIPModel

    photo = gt.rgb[INPUT].permute(2, 0, 1)
    sim = clip_input_similarity(recon, photo, clip_dir, views=3, size=16)
    assert isinstance(sim, float) and -1.0 <= sim <= 1.0
    assert clip_input_similarity(recon, photo, clip_dir, views=3, size=16) == sim

    # views=1 is the view opposite the input, rendered over white.
    c = recon.cfg.camera
    back = orbit_cameras(c.input_radius, c.input_elevation, c.input_azimuth + 180.0,
                         c.input_fov, 24, 24)
    render = recon.render(back, 0)["rgb"]
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def embed(img):  # [H, W, 3] square -> [D]: CLIP's bicubic resize to 32 and normalisation
        x = F.interpolate(img.permute(2, 0, 1)[None], size=(32, 32), mode="bicubic",
                          antialias=True, align_corners=False)
        with torch.no_grad():
            out = clip.get_image_features(pixel_values=(x - mean) / std)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out[0], dim=-1)

    reference = float(embed(render) @ embed(gt.rgb[INPUT]))
    assert reference < 1.0 - 1e-4  # the tiny CLIP tells the two images apart
    got = clip_input_similarity(recon, photo, clip_dir, views=1, size=24)
    assert got == pytest.approx(reference, abs=1e-5)


# -------------------------------------------------------------------------- registry


def test_registry_knows_clip_input_similarity():
    assert needs_clip("clip_input_similarity") and not needs_gt("clip_input_similarity")
    assert "clip_input_similarity" in objective_metrics()
    assert METRICS["clip_input_similarity"].higher_is_better
    assert not needs_clip("clip_similarity") and not needs_clip("heldout_psnr")
    assert not needs_clip("no_such_metric")
