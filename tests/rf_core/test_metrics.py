import math

import numpy as np
import torch

from rf_core.ground_truth.metrics import depth_error, mask_iou, psnr, ssim


def test_psnr_known_values():
    gt = torch.rand(8, 8, 3) * 0.5
    assert math.isclose(psnr(gt + 0.1, gt), 20.0, rel_tol=1e-5)
    assert psnr(gt, gt) == float("inf")


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3)).astype(np.float32)
    assert math.isclose(ssim(img, img), 1.0, rel_tol=1e-6)
    noisy = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1).astype(np.float32)
    assert ssim(noisy, img) < 0.9
    assert ssim(torch.from_numpy(noisy), torch.from_numpy(img)) == ssim(noisy, img)


def test_mask_iou_and_depth_error():
    a = np.zeros((4, 4))
    a[:2] = 1.0
    b = np.zeros((4, 4))
    b[1:3] = 1.0
    assert math.isclose(mask_iou(a, b), 4 / 12)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    d_pred, d_gt = np.full((4, 4), 2.0), np.full((4, 4), 2.5)
    assert math.isclose(depth_error(d_pred, d_gt, a, b), 0.5)
    assert math.isnan(depth_error(d_pred, d_gt, a, np.zeros((4, 4))))
