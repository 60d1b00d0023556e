"""Report previews (rf_core/evaluation/preview.py): one object's pictures, several objects laid out
into the files a sweep logs, and the no-surface case."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from rf_core.evaluation.heldout import InterimPlan
from rf_core.evaluation.preview import PREVIEW_FILES, preview_object, write_preview
from rf_core.output.export import ExportConfig
from tests.rf_core.test_heldout import INPUT, gt, gt_dir, recon  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def field(recon):  # noqa: F811 - the untrained tiny field of test_heldout
    return recon


def test_preview_object_shapes_and_content(field, gt):  # noqa: F811
    export = ExportConfig(threshold=1.0, mesh_resolution=16)
    out = preview_object(field, export, gt, INPUT, InterimPlan(views=2, size=12), frames=3,
                         size=16)
    assert out["orbit"].shape == (3, 16, 16, 3) and out["orbit"].dtype == np.uint8
    assert out["heldout"].shape == (24, 24, 3)  # GT row over ours, 2 views of 12 px
    assert out["mesh"].shape == (32, 96, 3)  # 3 sides at 2 x 16 px
    # the untrained blob has a surface at threshold 1: the mesh panel is not blank
    assert (out["mesh"] < 250).any(axis=-1).mean() > 0.05
    # without ground truth: no held-out strip
    assert "heldout" not in preview_object(field, export, None, INPUT, frames=2, size=16)


def test_no_surface_is_a_picture_not_an_error(field):
    export = ExportConfig(threshold=1.0e9, mesh_resolution=16)  # nothing that dense
    out = preview_object(field, export, frames=2, size=16)
    mesh = out["mesh"]
    assert mesh.shape == (32, 96, 3)
    assert (mesh == 255).all(axis=-1).mean() > 0.8  # white, with the "no surface" label


def test_write_preview_lays_objects_out(tmp_path):
    rng = np.random.default_rng(0)

    def obj(colour, heldout=True):
        orbit = np.zeros((5, 16, 16, 3), np.uint8)
        orbit[..., :] = colour
        orbit[:, 0, 0, 1] = np.arange(5) * 50  # frames differ (a GIF merges equal ones)
        out = {"orbit": orbit, "mesh": rng.integers(0, 255, (32, 96, 3), dtype=np.uint8)}
        if heldout:
            out["heldout"] = np.full((24, 24, 3), colour, np.uint8)
        return out

    written = write_preview({"duck": obj((255, 0, 0)), "ball": obj((0, 0, 255), False)},
                            tmp_path)
    assert {p.name for p in written} == set(PREVIEW_FILES)
    gif = iio.imread(tmp_path / "orbit.gif", index=None)
    assert gif.shape[:3] == (5, 128, 256)  # both objects side by side, 16 px enlarged x8
    assert gif[0, 64, 96, 0] > 200 and gif[0, 64, 160, 2] > 200  # red left, blue right
    views = iio.imread(tmp_path / "views.png")
    assert views.shape[:2] == (2 * 128, 4 * 128)  # 4 frames per object, enlarged to 128 px
    heldout = iio.imread(tmp_path / "heldout.png")
    assert heldout.shape[:2] == (24 * 11, 24 * 11)  # only the duck has GT; 12 px views x11
    assert iio.imread(tmp_path / "mesh_preview.png").shape[:2] == (64, 96)
