"""Image and geometry metrics against ground truth.

Images are float arrays in [0, 1]: rgb [H, W, 3], masks [H, W], depths [H, W] z-depth.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def psnr(pred, gt) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = float(np.mean((_np(pred).astype(np.float64) - _np(gt).astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def ssim(pred, gt) -> float:
    """Structural similarity (Wang et al. 2004; Gaussian window, sigma 1.5), as scikit-image."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_np(pred), _np(gt), channel_axis=-1, data_range=1.0,
                                       gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def mask_iou(pred_mask, gt_mask, threshold: float = 0.5) -> float:
    """Intersection over union of two masks (the prediction thresholded at ``threshold``)."""
    p, g = _np(pred_mask) > threshold, _np(gt_mask) > 0.5
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def depth_error(pred_depth, gt_depth, pred_mask, gt_mask, threshold: float = 0.5) -> float:
    """Mean absolute z-depth error over pixels that both masks cover (NaN if none)."""
    both = (_np(pred_mask) > threshold) & (_np(gt_mask) > 0.5)
    if not both.any():
        return float("nan")
    return float(np.abs(_np(pred_depth)[both] - _np(gt_depth)[both]).mean())
