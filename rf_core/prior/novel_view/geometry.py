"""Camera features for the novel-view prior: where the target camera is relative to the input.

Zero-1-to-3 (Liu et al. 2023) conditions on the relative camera (Δelevation, sin/cos Δazimuth,
Δradius) plus, since the absolute elevation of the input changes what "up" looks like, the
input's own elevation. Our random views also change the field of view, so the zoom is a
feature too. Azimuth enters only as a difference: the object's front is wherever the photo
looked from. Angles follow ``rf_core.scene.cameras``: degrees, elevation above the xy-plane, azimuth
counter-clockwise around +z from +x.
"""

from __future__ import annotations

import torch

__all__ = ["CAMERA_FEATURES", "angles_from_cameras", "camera_features"]

CAMERA_FEATURES = 6
"""Width of ``camera_features``' output."""

ANGLE_KEYS = ("elevation", "azimuth", "radius", "fov")
"""The orbit parameters of a camera, as ``sample_orbit`` names them."""


def _angles(angles: dict, which: str) -> dict[str, torch.Tensor]:
    missing = [k for k in ANGLE_KEYS if k not in angles]
    if missing:
        raise KeyError(f"{which} angles lack {missing}; pass a dict with keys {list(ANGLE_KEYS)}")
    return {k: torch.as_tensor(angles[k], dtype=torch.float64) for k in ANGLE_KEYS}


def camera_features(cond_angles: dict, target_angles: dict) -> torch.Tensor:
    """Features of the target camera relative to the conditioning (input) camera.

    cond_angles, target_angles: {"elevation", "azimuth", "radius", "fov"} -> [B] tensors (or
    scalars, broadcast), degrees where angular, as ``sample_orbit`` returns them.
    Returns [B, 6] float32: (cond elevation, target elevation - cond elevation,
    sin Δazimuth, cos Δazimuth, log(target radius / cond radius),
    log(tan(target fov / 2) / tan(cond fov / 2))), angles in radians. Identical cameras give
    (elevation, 0, 0, 1, 0, 0).
    """
    c, t = _angles(cond_angles, "cond"), _angles(target_angles, "target")
    el_c, el_t = torch.deg2rad(c["elevation"]), torch.deg2rad(t["elevation"])
    d_az = torch.deg2rad(t["azimuth"] - c["azimuth"])
    log_r = torch.log(t["radius"] / c["radius"])
    log_zoom = (torch.log(torch.tan(torch.deg2rad(t["fov"]) / 2))
                - torch.log(torch.tan(torch.deg2rad(c["fov"]) / 2)))
    feats = torch.broadcast_tensors(el_c, el_t - el_c, torch.sin(d_az), torch.cos(d_az),
                                    log_r, log_zoom)
    out = torch.stack(feats, dim=-1).float()
    return out[None] if out.dim() == 1 else out


def angles_from_cameras(c2w: torch.Tensor, K: torch.Tensor, image_size: tuple[int, int],
                        atol: float = 1e-3) -> dict[str, torch.Tensor]:
    """The orbit parameters of cameras looking at the origin: the inverse of ``orbit_cameras``.

    c2w: [B, 4, 4] camera-to-world (OpenCV axes, columns [right, down, forward, eye]);
    K: [B, 3, 3]; image_size: (width, height) in pixels, as ``Cameras`` stores them (the field of
    view is vertical: 2 atan(height / (2 fy))). Returns {"elevation", "azimuth", "radius",
    "fov"}: [B] float32, degrees where angular, azimuth in (-180, 180].
    A camera that does not look at the origin (forward off by more than ``atol``) is a
    ValueError.
    """
    if c2w.dim() != 3 or c2w.shape[-2:] != (4, 4) or K.shape != (c2w.shape[0], 3, 3):
        raise ValueError(f"expected c2w [B, 4, 4] and K [B, 3, 3], got {tuple(c2w.shape)} and "
                         f"{tuple(K.shape)}")
    _width, height = image_size
    c2w, K = c2w.double(), K.double()
    eye = c2w[:, :3, 3]
    radius = eye.norm(dim=-1)
    if not bool((radius > 0).all()):
        raise ValueError("a camera sits at the origin; orbit cameras look at it from outside")
    forward = c2w[:, :3, 2]
    off = (forward + eye / radius[:, None]).norm(dim=-1)
    if bool((off > atol).any()):
        raise ValueError(f"{int((off > atol).sum())} camera(s) do not look at the origin "
                         f"(forward off by up to {float(off.max()):.3g}); "
                         "angles_from_cameras inverts orbit cameras only")
    elevation = torch.rad2deg(torch.asin((eye[:, 2] / radius).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
    fov = torch.rad2deg(2 * torch.atan(0.5 * height / K[:, 1, 1]))
    return {"elevation": elevation.float(), "azimuth": azimuth.float(),
            "radius": radius.float(), "fov": fov.float()}

