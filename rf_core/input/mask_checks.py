"""Is a mask a clean cut-out of one object? Pure checks on binary masks [H, W] (bool).

RealFusion fits the object inside its mask and empty space outside it, so a mask that is not an
object on a background reconstructs the wrong thing without a word. These checks find the
cases users actually hand in, and ``image_input`` turns each into a one-line refusal naming the
fix, or, where the intent is clear, does the right thing and says so in a note:

- noise: an alpha channel of random values, whose pixels flip between object and background
  everywhere (``boundary_share``);
- an opaque photo with transparent rounded corners or a transparent border, a sticker or
  screenshot export (``transparent_only_at_edges``): the rectangle would be the object;
- an inverted mask, black object on white: the "object" runs along all four borders
  (``border_share``);
- a mask drawn on a photo's stored pixels while the photo is turned by its EXIF orientation
  (``fits_edges_better``): its outline follows the image's edges only when turned the same way.
"""

from __future__ import annotations

import numpy as np

NOISE_BOUNDARY_SHARE = 0.25
"""Above this share of neighbouring pixel pairs that differ, a mask is noise, not an outline
(a clean object's outline is a few percent of the pixels, even for a 32 px mask)."""
INVERTED_BORDER_SHARE = 0.9
"""At least this share of the border pixels inside the mask: the mask is the background."""
EDGE_CORNER = 0.25
"""Rounded corners: transparent pixels within this fraction of the shorter side of a corner."""
EDGE_BAND = 0.02
"""Transparent border: transparent pixels within this fraction of the shorter side of an edge."""


def boundary_share(fg: np.ndarray) -> float:
    """Share of horizontally and vertically neighbouring pixel pairs on different sides."""
    pairs = fg[:, 1:].size + fg[1:, :].size
    if not pairs:
        return 0.0
    changes = np.count_nonzero(fg[:, 1:] != fg[:, :-1]) + np.count_nonzero(fg[1:] != fg[:-1])
    return changes / pairs


def is_noise(fg: np.ndarray) -> bool:
    """Too many flips to be an outline; not judged below 8 px a side, where a thin clean
    shape flips as often."""
    return min(fg.shape) >= 8 and boundary_share(fg) > NOISE_BOUNDARY_SHARE


def border_share(fg: np.ndarray) -> float:
    """Share of the image's border pixels that are inside the mask."""
    border = np.concatenate([fg[0], fg[-1], fg[1:-1, 0], fg[1:-1, -1]])
    return float(border.mean()) if border.size else 0.0


def transparent_only_at_edges(fg: np.ndarray) -> bool:
    """Whether the background is only rounded corners and/or a thin border of an image the mask
    otherwise covers (an opaque photo exported with transparent corners)."""
    h, w = fg.shape
    bg = ~fg
    if not bg.any() or fg.mean() < 0.8:
        return False
    c = max(1, int(EDGE_CORNER * min(h, w)))
    band = max(1, round(EDGE_BAND * min(h, w)))
    edges = np.zeros_like(fg)
    edges[:c, :c] = edges[:c, -c:] = edges[-c:, :c] = edges[-c:, -c:] = True
    edges[:band] = edges[-band:] = True
    edges[:, :band] = edges[:, -band:] = True
    return not (bg & ~edges).any()


def is_inverted(fg: np.ndarray) -> bool:
    """The mask runs along (nearly) all four borders and leaves a hole inside: it marks the
    background, and the hole is the object."""
    return border_share(fg) >= INVERTED_BORDER_SHARE and not transparent_only_at_edges(fg) \
        and (~fg).any()


def edge_score(luma: np.ndarray, fg: np.ndarray) -> float:
    """Mean image gradient magnitude along the mask's outline (both sides of it).

    luma: [H, W] float image; fg: [H, W] bool of the same size.
    """
    gy, gx = np.gradient(luma.astype(np.float32))
    grad = np.hypot(gx, gy)
    outline = np.zeros_like(fg)
    outline[:, 1:] |= fg[:, 1:] != fg[:, :-1]
    outline[:, :-1] |= fg[:, 1:] != fg[:, :-1]
    outline[1:] |= fg[1:] != fg[:-1]
    outline[:-1] |= fg[1:] != fg[:-1]
    return float(grad[outline].mean()) if outline.any() else 0.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def fits_edges_better(luma: np.ndarray, given: np.ndarray, other: np.ndarray,
                      margin: float = 1.5) -> bool:
    """Whether ``other`` (e.g. the mask turned like the photo) follows the photo's edges clearly
    better than ``given`` does, and the two differ enough for it to matter."""
    if iou(given, other) >= 0.9:
        return False
    return edge_score(luma, other) > margin * edge_score(luma, given) + 1e-3
