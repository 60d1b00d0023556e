"""The novel-view prior's training data: evaluation meshes stay out, cameras round-trip, views are
framed like photos and rendered like ground truth, and a tiny dataset builds, resumes and pairs.

This file names training meshes on purpose, so the repository scan below skips it (and
rf_core/prior/novel_view).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rf_core.ground_truth.example_objects import MESHES
from rf_core.ground_truth.gt_render import (
    load_textured_mesh,
    render_views,
    resolve_mesh_path,
    world_vertices,
)
from rf_core.prior.novel_view.data import (
    NovelViewDataConfig,
    NovelViewPairs,
    area_downsample,
    build_dataset,
    frame_scale,
    render_object,
)
from rf_core.prior.novel_view.geometry import CAMERA_FEATURES, angles_from_cameras, camera_features
from rf_core.prior.novel_view.objects import (
    TEXTURES,
    ObjectConfig,
    ObjectRenderer,
    Part,
    TrainingObject,
    make_texture,
    sample_object,
    training_meshes,
)
from rf_core.prior.novel_view.splits import EVALUATION_MESHES, is_evaluation_mesh, pybullet_name
from rf_core.scene.cameras import CameraSetup, orbit_cameras, sample_orbit, sphere_views

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


# ------------------------------------------------------------------------------ splits


def test_training_and_evaluation_meshes_are_disjoint():
    train = training_meshes()
    assert len(train) > 900  # the random_urdfs blobs and the named objects
    assert not [m for m in train if is_evaluation_mesh(m)]
    evaluation = {pybullet_name(m) for m in EVALUATION_MESHES}
    assert not evaluation & {pybullet_name(m) for m in train}
    assert {mesh for _, mesh, _, _ in MESHES} <= set(EVALUATION_MESHES)


@pytest.mark.parametrize("name", ["duck.obj", "pybullet_data:duck_vhacd.obj", "torus/torus.obj",
                                  "jenga/jenga.obj", "pybullet_data:jenga/other.obj",
                                  "soccerball.obj", "sphere_smooth.obj",
                                  "textured_sphere_smooth.obj"])
def test_evaluation_families_are_excluded(name):
    assert is_evaluation_mesh(name)


@pytest.mark.parametrize("name", ["bunny.obj", "random_urdfs/000/000.obj", "cube.obj",
                                  "domino/domino.obj", "sphere2.obj"])
def test_other_meshes_are_not_excluded(name):
    assert not is_evaluation_mesh(name)


SCANNED = ("tune_configs", "rf_bench", "tests", "examples", "docs", "scripts", "deploy", "rf_cli",
           "rf_core", "Makefile", "README.md", "BENCHMARKS.md")
NOT_SCANNED = ("rf_core/prior/novel_view", "tests/rf_core/test_novel_view_data.py")
"""The training side, which names training meshes on purpose."""
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".json", ".toml", ".cfg", ".sh", ""}
OBJ_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:-]*\.obj\b")


def _scanned_files():
    for entry in SCANNED:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if (f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts
                    and not rel.startswith(NOT_SCANNED)):
                yield f


def test_every_mesh_the_repository_evaluates_on_is_an_evaluation_mesh():
    """Any pybullet_data mesh named in a benchmark, test, sweep, example or doc (with or without
    the ``pybullet_data:`` prefix, as a path or a bare file name) must be in EVALUATION_MESHES
    (or its family): add new ones to splits.EXTRA_EVALUATION_MESHES."""
    root = resolve_mesh_path("pybullet_data:")
    by_name: dict[str, list[str]] = {}
    for f in root.rglob("*.obj"):
        by_name.setdefault(f.name, []).append(f.relative_to(root).as_posix())
    named, missing = set(), []
    for f in _scanned_files():
        for token in OBJ_TOKEN.findall(f.read_text(errors="replace")):
            token = token.split("pybullet_data:")[-1].split("pybullet_data/")[-1]
            hits = [token] if (root / token).is_file() else by_name.get(token, [])
            for rel in hits:
                named.add(rel)
                if not is_evaluation_mesh(rel):
                    missing.append(f"{rel} (in {f.relative_to(ROOT)})")
    assert {"duck.obj", "soccerball.obj", "torus/torus_textured.obj"} <= named  # scan works
    assert not missing, f"evaluation meshes missing from splits.EVALUATION_MESHES: {missing}"


# ---------------------------------------------------------------------------- geometry


def test_angles_from_cameras_inverts_orbit_cameras():
    g = torch.Generator().manual_seed(0)
    n = 64
    angles = {"elevation": -80 + 160 * torch.rand(n, generator=g),
              "azimuth": -180 + 360 * torch.rand(n, generator=g),
              "radius": 1 + 3 * torch.rand(n, generator=g),
              "fov": 20 + 60 * torch.rand(n, generator=g)}
    cams = orbit_cameras(angles["radius"], angles["elevation"], angles["azimuth"],
                         angles["fov"], 40, 30)  # not square: the fov is vertical
    got = angles_from_cameras(cams.c2w, cams.K, (cams.width, cams.height))
    for key in ("elevation", "radius", "fov"):
        torch.testing.assert_close(got[key], angles[key], atol=1e-3, rtol=1e-4)
    d_az = torch.deg2rad(got["azimuth"] - angles["azimuth"])
    torch.testing.assert_close(torch.cos(d_az), torch.ones(n), atol=1e-6, rtol=0)
    assert got["azimuth"].abs().max() <= 180


def test_angles_from_cameras_rejects_cameras_not_looking_at_the_origin():
    cams = orbit_cameras(3.0, 10.0, 20.0, 40.0, 16, 16)
    cams.c2w[0, :3, 3] += torch.tensor([0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="do not look at the origin"):
        angles_from_cameras(cams.c2w, cams.K, (16, 16))


def test_identical_cameras_give_the_copy_features():
    angles = {"elevation": torch.tensor([-10.0, 0.0, 15.0, 60.0]),
              "azimuth": torch.tensor([-170.0, 0.0, 33.0, 179.0]),
              "radius": torch.tensor([3.0, 3.0, 1.2, 1.7]), "fov": torch.tensor([40.0] * 4)}
    feats = camera_features(angles, angles)
    expected = torch.zeros(4, CAMERA_FEATURES)
    expected[:, 0] = torch.deg2rad(angles["elevation"])
    expected[:, 3] = 1.0
    torch.testing.assert_close(feats, expected, atol=1e-6, rtol=0)


def test_camera_features_of_a_known_pair():
    cond = {"elevation": 10.0, "azimuth": 30.0, "radius": 3.0, "fov": 40.0}
    target = {"elevation": 40.0, "azimuth": 120.0, "radius": 1.5, "fov": 60.0}
    feats = camera_features(cond, target)
    expected = torch.tensor([[math.radians(10), math.radians(30), 1.0, 0.0, math.log(0.5),
                              math.log(math.tan(math.radians(30)) / math.tan(math.radians(20)))]])
    torch.testing.assert_close(feats, expected, atol=1e-6, rtol=0)


def test_camera_features_agree_for_sampled_and_recovered_angles():
    g = torch.Generator().manual_seed(1)
    cond, cond_angles = sample_orbit(CameraSetup().random, 32, 32, 32, g)
    target, target_angles = sample_orbit(CameraSetup().random, 32, 32, 32, g)
    from_cams = camera_features(angles_from_cameras(cond.c2w, cond.K, (32, 32)),
                                angles_from_cameras(target.c2w, target.K, (32, 32)))
    torch.testing.assert_close(from_cams, camera_features(cond_angles, target_angles),
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- objects


def test_textures_are_patterns_of_two_colours():
    rng = np.random.default_rng(0)
    for kind in TEXTURES:
        tex = make_texture(kind, 32, rng)
        assert tex.shape == (32, 32, 3) and tex.dtype == np.uint8
        assert tex.reshape(-1, 3).std(0).max() > 1, kind  # not one flat colour


def test_objects_depend_only_on_their_seed():
    a = sample_object(np.random.default_rng(7))
    b = sample_object(np.random.default_rng(7))
    assert a.name == b.name and len(a.parts) == len(b.parts)
    np.testing.assert_array_equal(a.points(), b.points())
    pts = a.points()
    np.testing.assert_allclose(pts.min(0) + pts.max(0), 0, atol=1e-9)  # bbox centred


def test_frame_scale_puts_a_sphere_at_the_analytic_radius():
    """A sphere fills fill_ratio of a view from radius 3, fov 40 when its radius is
    3 sin(atan(0.7 tan 20 deg)) = 0.741."""
    i = np.arange(4000) + 0.5
    z = 1 - 2 * i / len(i)
    phi = i * math.pi * (3 - math.sqrt(5))
    r = np.sqrt(1 - z * z)
    sphere = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)
    cams = orbit_cameras(3.0, torch.tensor([0.0, 20.0]), torch.tensor([0.0, 90.0]), 40.0,
                         64, 64)
    scale = frame_scale(sphere, cams, 0.7, 10.0)
    expected = 3 * math.sin(math.atan(0.7 * math.tan(math.radians(20))))
    assert scale == pytest.approx(expected, rel=2e-3)
    assert frame_scale(sphere, cams, 0.7, 0.5) == pytest.approx(0.5)  # the cap


def test_input_like_views_are_framed_like_photos():
    """The rendered alpha's bounding box fills fill_ratio of the input-like views on average."""
    cfg = NovelViewDataConfig(size=64, supersample=1, objects=8, val_objects=1)
    fills = []
    with ObjectRenderer() as renderer:
        for index in range(6):
            row = render_object(index, cfg, renderer)
            if row["object_radius"] >= cfg.max_radius - 1e-6:
                continue  # capped: framed smaller on purpose
            per_view = []
            for view in row["rgba"][:cfg.input_views_per_object]:
                ys, xs = np.nonzero(view[..., 3] > 127)
                per_view.append(max(np.ptp(ys), np.ptp(xs)) + 1)
            fills.append(np.mean(per_view) / cfg.size)
    assert len(fills) >= 2
    np.testing.assert_allclose(fills, cfg.fill_ratio, atol=0.04)


def test_renderer_draws_a_mesh_exactly_where_the_gt_renderer_does():
    """Same mesh, same cameras: the silhouettes of ObjectRenderer and gt_render.render_views
    agree (same camera conversion and pixel-centre shift)."""
    mesh = "pybullet_data:domino/domino.obj"  # textured, z-up, not an evaluation mesh
    cams = sphere_views(4, 3.0, 40.0, 48, 48)
    gt = render_views(mesh, cams, up_axis="z", radius=0.8)
    faces = np.asarray(load_textured_mesh(mesh).faces)
    corners = world_vertices(mesh, "z", 0.8)[faces]  # [F, 3, 3]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    part = Part(corners.reshape(-1, 3), np.repeat(normals, 3, axis=0),
                np.zeros((corners.size // 3, 2)), np.ones(4))
    with ObjectRenderer() as renderer:
        ours = renderer.render(TrainingObject("domino", [part]), cams)
    assert gt["mask"].sum() > 500
    assert ((ours[..., 3] > 0) != gt["mask"]).mean() < 1e-3
    assert (ours[..., :3][~gt["mask"]] == 255).all()  # white background


def test_area_downsample_averages_blocks():
    x = np.zeros((1, 4, 4, 4), np.uint8)
    x[0, :2, :2] = 255
    x[0, 2:, 2:, 0] = 100
    x[0, 0, 2] = 40
    y = area_downsample(x, 2)
    assert y.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(y[0, 0, 0], [255] * 4)
    np.testing.assert_array_equal(y[0, 1, 1], [100, 0, 0, 0])
    np.testing.assert_array_equal(y[0, 0, 1], [10] * 4)


# ------------------------------------------------------------------------------ dataset


TINY = dict(size=8, supersample=2, objects=6, val_objects=2, input_views_per_object=2,
            target_views_per_object=3, shard_objects=4)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("novel-view") / "data"
    messages = []
    build_dataset(out, NovelViewDataConfig(**TINY), progress=messages.append)
    return out, messages


def test_build_writes_shards_and_a_manifest(tiny_dataset):
    out, messages = tiny_dataset
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"objects": 6, "train_objects": 4, "val_objects": 2,
                                  "views_per_object": 5, "pairs_per_object": 10,
                                  "train_pairs": 40, "val_pairs": 20}
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    assert manifest["excluded_evaluation_meshes"] == list(EVALUATION_MESHES)
    assert "done" in messages[-1]
    setup = CameraSetup()
    for shard in manifest["shards"]:
        with np.load(out / shard["file"]) as data:
            assert data["rgba"].shape == (shard["count"], 5, 8, 8, 4)
            assert data["rgba"].dtype == np.uint8
            assert not [n for n in data["name"] if is_evaluation_mesh(str(n))]
            el, _az, radius, fov = np.moveaxis(data["angles"], -1, 0)  # [n, V] each
            np.testing.assert_allclose(radius[:, :2], setup.input_radius)
            np.testing.assert_allclose(fov[:, :2], setup.input_fov)
            lo, hi = NovelViewDataConfig().cond_elevation_range
            assert (el[:, :2] >= lo).all() and (el[:, :2] <= hi).all()
            lo, hi = setup.random.radius_range
            assert (radius[:, 2:] >= lo).all() and (radius[:, 2:] <= hi).all()
            lo, hi = setup.random.fov_range
            assert (fov[:, 2:] >= lo).all() and (fov[:, 2:] <= hi).all()
            assert (data["object_radius"] <= 1.0 + 1e-5).all()


def test_pairs_are_cond_and_target_views_with_their_camera(tiny_dataset):
    out, _ = tiny_dataset
    train, val = NovelViewPairs(out, "train"), NovelViewPairs(out, "val")
    assert (len(train), len(val)) == (40, 20)
    with np.load(out / "shards/shard_00000.npz") as data:
        rgba, angles = data["rgba"], data["angles"]
    item = train[1 * 10 + 1 * 5 + 3]  # object 1, condition view 1, target view 3
    assert item["cond"].shape == item["target"].shape == (4, 8, 8)
    assert item["cond"].dtype == torch.float32 and 0 <= item["cond"].min() <= 1
    np.testing.assert_allclose(item["cond"].permute(1, 2, 0).numpy(), rgba[1, 1] / 255.0)
    np.testing.assert_allclose(item["target"].permute(1, 2, 0).numpy(), rgba[1, 3] / 255.0)
    keys = ("elevation", "azimuth", "radius", "fov")
    expected = camera_features({k: angles[1, 1, i] for i, k in enumerate(keys)},
                               {k: angles[1, 3, i] for i, k in enumerate(keys)})[0]
    torch.testing.assert_close(item["camera"], expected)
    same = train[2 * 10 + 0 * 5 + 0]  # the identical camera: a copy
    torch.testing.assert_close(same["cond"], same["target"])
    torch.testing.assert_close(same["camera"], torch.tensor(
        [math.radians(float(angles[2, 0, 0])), 0, 0, 1, 0, 0]), atol=1e-6, rtol=0)
    for ds in (train, val):
        views = ds.rgba.float() / 255
        assert (views[..., :3][views[..., 3] == 0] == 1).all()  # RGB over white
        assert (views[..., 3] > 0).any(dim=(-1, -2)).all()  # every view sees the object
    with pytest.raises(IndexError):
        train[40]


def test_build_resumes_from_finished_shards(tiny_dataset, tmp_path):
    out, _ = tiny_dataset
    copy = tmp_path / "data"
    (copy / "shards").mkdir(parents=True)
    for name in ("config.json", "shards/shard_00000.npz"):
        (copy / name).write_bytes((out / name).read_bytes())
    kept = (copy / "shards/shard_00000.npz").stat().st_mtime_ns
    messages = []
    build_dataset(copy, NovelViewDataConfig(**TINY), progress=messages.append)
    assert "1 of 2 shards already done" in messages[0]
    assert (copy / "shards/shard_00000.npz").stat().st_mtime_ns == kept
    with np.load(out / "shards/shard_00001.npz") as a, \
            np.load(copy / "shards/shard_00001.npz") as b:
        np.testing.assert_array_equal(a["rgba"], b["rgba"])  # resumed == uninterrupted
        np.testing.assert_array_equal(a["angles"], b["angles"])
    messages.clear()
    build_dataset(copy, NovelViewDataConfig(**TINY), progress=messages.append)
    assert messages == [f"novel-view data: {copy} is complete"]


def test_objects_do_not_depend_on_the_shard_size(tiny_dataset, tmp_path):
    out, _ = tiny_dataset
    build_dataset(tmp_path, NovelViewDataConfig(**{**TINY, "objects": 4, "val_objects": 1,
                                                   "shard_objects": 3}), progress=lambda m: None)
    with np.load(out / "shards/shard_00000.npz") as a, \
            np.load(tmp_path / "shards/shard_00000.npz") as b, \
            np.load(tmp_path / "shards/shard_00001.npz") as c:
        np.testing.assert_array_equal(a["rgba"][:3], b["rgba"])
        np.testing.assert_array_equal(a["rgba"][3], c["rgba"][0])


def test_a_folder_of_another_config_is_refused(tiny_dataset):
    out, _ = tiny_dataset
    with pytest.raises(ValueError, match="another config.*size"):
        build_dataset(out, NovelViewDataConfig(**{**TINY, "size": 16}), progress=lambda m: None)


def test_unfinished_folders_and_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished"):
        NovelViewPairs(tmp_path)
    with pytest.raises(ValueError, match="val_objects"):
        NovelViewDataConfig(objects=4, val_objects=4)
    with pytest.raises(ValueError, match="split"):
        NovelViewPairs(tmp_path, "test")
    assert ObjectConfig(mesh_fraction=1.0).mesh_fraction == 1.0
