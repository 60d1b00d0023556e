"""Ground truth rendered by pybullet obeys our camera convention (rf_core/scene/cameras.py).

The duck and a few other pybullet_data meshes at 64x64; each test runs in well under a second.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pybullet as p
import pytest
import torch

from rf_core.ground_truth.gt_render import (
    MeshError,
    OutputExistsError,
    load_gt,
    load_textured_mesh,
    normalize_transform,
    opengl_view_matrix,
    render_gt,
    render_views,
    resolve_mesh_path,
    world_vertices,
)
from rf_core.scene.cameras import (
    Cameras,
    generate_rays,
    intrinsics_from_fov,
    orbit_cameras,
    project,
    sphere_views,
)

DUCK = "pybullet_data:duck.obj"
SIZE = 64
RADIUS = 0.8


@pytest.fixture(scope="module")
def duck():
    cams = sphere_views(8, 3.0, 40.0, SIZE, SIZE)
    return cams, render_views(DUCK, cams, radius=RADIUS), world_vertices(DUCK, "y", RADIUS)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One-pixel (3x3) dilation of [..., H, W] bool masks."""
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    H, W = mask.shape[-2:]
    out = np.zeros_like(mask)
    for di in range(3):
        for dj in range(3):
            out |= padded[..., di:di + H, dj:dj + W]
    return out


def _point_mesh_distance(points: np.ndarray, triangles: np.ndarray, chunk: int = 256):
    """Exact distance from points [N, 3] to the nearest triangle of [F, 3, 3]: [N]."""
    P, T = torch.tensor(points, dtype=torch.float64), torch.tensor(triangles, dtype=torch.float64)
    a, b, c = T[:, 0], T[:, 1], T[:, 2]
    n = torch.linalg.cross(b - a, c - a, dim=-1)
    area = n.norm(dim=-1)
    n = n / area.clamp_min(1e-20)[:, None]

    def to_segment(ap, ab):
        t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-20)).clamp(0, 1)
        return (ap - t[..., None] * ab).norm(dim=-1)

    def same_side(e, q):
        return (torch.linalg.cross(e.expand_as(q), q, dim=-1) * n).sum(-1) >= 0

    out = []
    for pts in P.split(chunk):
        ap, bp, cp = pts[:, None] - a, pts[:, None] - b, pts[:, None] - c
        to_plane = (ap * n).sum(-1)
        q = pts[:, None] - to_plane[..., None] * n  # projection onto each triangle's plane
        inside = (same_side(b - a, q - a) & same_side(c - b, q - b) & same_side(a - c, q - c)
                  & (area > 1e-12))
        edge = torch.minimum(torch.minimum(to_segment(ap, b - a), to_segment(bp, c - b)),
                             to_segment(cp, a - c))
        out.append(torch.where(inside, to_plane.abs(), edge).min(dim=1).values)
    return torch.cat(out).numpy()


def _backproject(cams: Cameras, depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World points of mask pixels: o + d * z / (d . forward)."""
    rays_o, rays_d = generate_rays(cams)
    forward = cams.c2w[:, None, None, :3, 2]
    t = torch.from_numpy(depth)[..., None] / (rays_d * forward).sum(-1, keepdim=True)
    return (rays_o + rays_d * t)[torch.from_numpy(mask)].numpy()


def _check_vertices_in_mask(cams, rendered, verts):
    """Every vertex, occluded or not, projects into the 1-pixel-dilated silhouette."""
    uv, z = project(torch.tensor(verts, dtype=torch.float32), cams)
    assert (z > 0).all()
    ij = np.floor(uv.numpy()[..., ::-1]).astype(int)  # (row, column) of the pixel it falls in
    assert (ij >= 0).all() and (ij < SIZE).all()
    dilated = _dilate(rendered["mask"])
    inside = np.stack([dilated[b][ij[b, :, 0], ij[b, :, 1]] for b in range(len(cams))])
    assert inside.all(), f"{(~inside).sum()} vertex projections fall outside the silhouette"


def _surface_distance(cams, rendered, verts, faces, n: int = 1500) -> np.ndarray:
    """Distances to the mesh of ``n`` random back-projected mask pixels."""
    pts = _backproject(cams, rendered["depth"], rendered["mask"])
    pts = pts[np.random.default_rng(0).permutation(len(pts))[:n]]
    return _point_mesh_distance(pts, verts[faces])


def _textured_quad(folder, half_x: float, half_y: float, name: str = "quad"):
    """A textured rectangle [-half_x, half_x] x [-half_y, half_y] in the plane z = 0."""
    import imageio.v3 as iio

    iio.imwrite(folder / "tex.png", np.full((4, 4, 3), 200, np.uint8))
    (folder / "quad.mtl").write_text("newmtl m\nKd 1 1 1\nmap_Kd tex.png\n")
    x, y = half_x, half_y
    (folder / f"{name}.obj").write_text(
        f"mtllib quad.mtl\nv {-x} {-y} 0\nv {x} {-y} 0\nv {x} {y} 0\nv {-x} {y} 0\n"
        "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nusemtl m\nf 1/1 2/2 3/3\nf 1/1 3/3 4/4\n")
    return folder / f"{name}.obj"


# ------------------------------------------------------------------------ convention proofs


def test_quad_matches_generate_rays_exactly(tmp_path):
    """Arbitrary cameras, odd sizes, off-centre principal point: mask and depth are exact."""
    rng = np.random.default_rng(1)
    for k in range(4):
        half = rng.uniform(0.2, 0.8, 2)
        obj = _textured_quad(tmp_path, *half, name=f"quad{k}")
        W, H = (int(s) for s in rng.integers(31, 70, 2))
        cams = orbit_cameras(rng.uniform(2.5, 3.5), rng.uniform(20, 85), rng.uniform(-180, 180),
                             rng.uniform(30, 60), W, H)
        cams.K[:, :2, 2] += torch.tensor(rng.uniform(-4, 4, 2), dtype=torch.float32)
        out = render_views(obj, cams, up_axis="z", radius=RADIUS)
        # Intersect every pixel-centre ray with the (normalised) rectangle.
        half_world = half * RADIUS / np.hypot(*half)
        rays_o, rays_d = generate_rays(cams)
        t = -rays_o[..., 2] / rays_d[..., 2]
        hit = rays_o + t[..., None] * rays_d
        expected = ((hit[..., 0].abs() < half_world[0]) & (hit[..., 1].abs() < half_world[1])
                    & (t > 0))[0].numpy()
        z = (t[..., None] * rays_d * cams.c2w[:, None, None, :3, 2]).sum(-1)[0].numpy()
        assert expected.sum() > 50
        assert (out["mask"][0] == expected).all(), f"{(out['mask'][0] != expected).sum()} px"
        np.testing.assert_allclose(out["depth"][0][expected], z[expected], atol=1e-4)
        assert (out["depth"][0][~expected] == 0).all()


def test_view_matrix_matches_pybullet_look_at():
    cams = orbit_cameras(3.0, 25.0, 40.0, 40.0, 32, 32)
    eye = cams.c2w[0, :3, 3].tolist()
    expected = p.computeViewMatrix(eye, [0, 0, 0], [0, 0, 1])
    np.testing.assert_allclose(opengl_view_matrix(cams.c2w[0].numpy()), expected, atol=1e-5)


def test_duck_vertices_project_inside_mask(duck):
    cams, rendered, verts = duck
    _check_vertices_in_mask(cams, rendered, verts)


def test_duck_depth_backprojects_onto_surface(duck):
    cams, rendered, verts = duck
    faces = load_textured_mesh(DUCK).faces
    dist = _surface_distance(cams, rendered, verts, faces)
    assert np.percentile(dist, 95) < 0.02 * RADIUS
    assert dist.max() < 1e-3, dist.max()  # measured ~1e-5: the depth is exact, not just close


def test_duck_silhouette_agrees_with_projection(duck):
    cams, rendered, verts = duck
    uv, _ = project(torch.tensor(verts, dtype=torch.float32), cams)
    for b in range(len(cams)):
        rows, cols = np.nonzero(rendered["mask"][b])
        centroid = np.array([cols.mean(), rows.mean()]) + 0.5
        assert np.abs(centroid - uv[b].mean(0).numpy()).max() < 0.12 * SIZE
        # The extreme points of a projected mesh are vertices: bounding boxes agree to a pixel
        # (plus a little: a pixel counts only if its centre is covered).
        sil_lo = np.array([cols.min(), rows.min()]) + 0.5
        sil_hi = np.array([cols.max(), rows.max()]) + 0.5
        assert np.abs(sil_lo - uv[b].min(0).values.numpy()).max() < 1.5
        assert np.abs(sil_hi - uv[b].max(0).values.numpy()).max() < 1.5


def test_duck_is_upright_and_textured(duck):
    cams, rendered, verts = duck
    side = orbit_cameras(3.0, 0.0, 90.0, 40.0, SIZE, SIZE)
    out = render_views(DUCK, side, radius=RADIUS)
    v = project(torch.tensor(verts, dtype=torch.float32), side)[0][0, :, 1].numpy()
    z = verts[:, 2]
    assert v[z.argmax()] < SIZE / 2 < v[z.argmin()]  # the duck's top is up in the image
    assert z[v.argmin()] > 0.5 * z.max() and z[v.argmax()] < 0.5 * z.min()
    rows = np.nonzero(out["mask"][0].any(1))[0]  # and so is the rendered silhouette's
    assert abs(rows.min() + 0.5 - v.min()) < 1.5 and abs(rows.max() + 0.5 - v.max()) < 1.5

    colours = rendered["rgb"][rendered["mask"]].astype(int)
    assert (rendered["rgb"][~rendered["mask"]] == 255).all()  # white background
    r, g, b = colours.mean(0)
    assert r > 150 and g > 120 and b < 30  # yellow, not untextured grey
    assert (colours.max(1) < 80).sum() > 5  # the eye
    assert ((colours[:, 0] > 180) & (colours[:, 1] < 150)).mean() > 0.005  # the orange beak


def test_normalize_transform_and_up_axis():
    mesh = load_textured_mesh(DUCK)
    for up in ("y", "z"):
        scale, offset = normalize_transform(mesh, RADIUS, up)
        verts = world_vertices(DUCK, up, RADIUS)
        np.testing.assert_allclose(0.5 * (verts.min(0) + verts.max(0)), 0, atol=1e-9)
        assert np.linalg.norm(verts, axis=1).max() == pytest.approx(RADIUS)
    y_up, z_up = world_vertices(DUCK, "y", RADIUS), world_vertices(DUCK, "z", RADIUS)
    # y-up files: file +y becomes world +z by a proper rotation (x, y, z) -> (x, -z, y).
    np.testing.assert_allclose(y_up, z_up[:, [0, 2, 1]] * [1, -1, 1], atol=1e-9)
    with pytest.raises(ValueError, match="up_axis"):
        normalize_transform(mesh, RADIUS, "x")


def test_view_independent_shading():
    """A surface point has one colour in every view that sees it (light fixed in the world)."""
    import trimesh

    from rf_core.ground_truth.gt_render import LightConfig

    cams = orbit_cameras(3.0, [20, 20, 60, -10], [0, 70, 30, 120], 40.0, 96, 96)
    out = render_views(DUCK, cams, radius=RADIUS, light=LightConfig(ambient=0.2, diffuse=0.8))
    verts = world_vertices(DUCK, "y", RADIUS)
    surface = trimesh.Trimesh(verts, load_textured_mesh(DUCK).faces, process=False)
    pts, _ = trimesh.sample.sample_surface(surface, 5000, seed=0)
    uv, z = project(torch.tensor(pts, dtype=torch.float32), cams)
    ij = np.floor(uv.numpy()[..., ::-1]).astype(int).clip(0, 95)
    colour, seen = [], []
    for b in range(len(cams)):
        depth = out["depth"][b][ij[b, :, 0], ij[b, :, 1]]
        seen.append(np.abs(depth - z[b].numpy()) < 5e-3)
        colour.append(out["rgb"][b][ij[b, :, 0], ij[b, :, 1]].astype(int))
    for a in range(len(cams)):
        for b in range(a + 1, len(cams)):
            both = seen[a] & seen[b]
            if both.sum() > 50:
                assert np.median(np.abs(colour[a][both] - colour[b][both]).max(1)) <= 2


@pytest.mark.parametrize("name, up", [("soccerball.obj", "y"), ("torus/torus_textured.obj", "y"),
                                      ("jenga/jenga.obj", "z")])
def test_other_pybullet_objects(name, up):
    mesh_path = f"pybullet_data:{name}"
    cams = sphere_views(4, 3.0, 40.0, SIZE, SIZE)
    rendered = render_views(mesh_path, cams, up_axis=up, radius=RADIUS)
    verts = world_vertices(mesh_path, up, RADIUS)
    _check_vertices_in_mask(cams, rendered, verts)
    dist = _surface_distance(cams, rendered, verts, load_textured_mesh(mesh_path).faces, n=500)
    assert dist.max() < 1e-3
    assert rendered["rgb"][rendered["mask"]].std(0).min() > 5  # a visible texture


# ---------------------------------------------------------------------------- folders


def test_render_gt_round_trips(tmp_path, duck):
    out = render_gt(DUCK, tmp_path / "gt", views=3, size=32)
    gt = load_gt(out)
    cams = sphere_views(3, 3.0, 40.0, 32, 32)
    again = render_views(DUCK, cams, radius=RADIUS)
    torch.testing.assert_close(gt.cams.c2w, cams.c2w)
    torch.testing.assert_close(gt.cams.K, cams.K)
    assert gt.rgb.shape == (3, 32, 32, 3) and 0 <= gt.rgb.min() and gt.rgb.max() <= 1
    assert (gt.rgb * 255).round().to(torch.uint8).numpy().tolist() == again["rgb"].tolist()
    assert (gt.mask.numpy() == again["mask"]).all()
    np.testing.assert_array_equal(gt.depth.numpy(), again["depth"])
    assert gt.mesh == DUCK and gt.scene_radius == RADIUS
    # world_transform maps mesh-file vertices to the vertices the images show.
    verts = np.asarray(load_textured_mesh(DUCK).vertices)
    mapped = verts @ gt.world_transform[:3, :3].numpy().T + gt.world_transform[:3, 3].numpy()
    np.testing.assert_allclose(mapped, world_vertices(DUCK, "y", RADIUS), atol=1e-9)
    meta = json.loads((out / "cameras.json").read_text())
    assert meta["frames"][2]["rgb"] == "rgb/002.png" and meta["up_axis"] == "y"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["gt"]  # no temporary folders left

    with pytest.raises(OutputExistsError, match="overwrite"):
        render_gt(DUCK, out, views=2, size=16)
    assert len(load_gt(out).rgb) == 3
    render_gt(DUCK, out, views=2, size=16, overwrite=True)
    assert len(load_gt(out).rgb) == 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["gt"]


def test_load_gt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gt(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cameras.json"):
        load_gt(tmp_path / "empty")
    out = render_gt(DUCK, tmp_path / "gt", views=2, size=16)
    (out / "depth" / "001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="partial"):
        load_gt(out)


def _untextured(tmp_path):
    obj = tmp_path / "plain.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    return obj


def _missing_texture(tmp_path):
    obj = _textured_quad(tmp_path, 0.5, 0.5)
    (tmp_path / "tex.png").unlink()
    return obj


def _no_map_kd(tmp_path):
    obj = _textured_quad(tmp_path, 0.5, 0.5)
    (tmp_path / "quad.mtl").write_text("newmtl m\nKd 1 0 0\n")
    return obj


def _no_faces(tmp_path):
    obj = _textured_quad(tmp_path, 0.5, 0.5)
    obj.write_text("mtllib quad.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\n")
    return obj


def _not_obj(tmp_path):
    ply = tmp_path / "mesh.ply"
    ply.write_text("ply\n")
    return ply


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.obj", "not found"),
    (_untextured, "untextured.*mtllib"),
    (_no_map_kd, "map_Kd"),
    (_missing_texture, "tex.png.*missing"),
    (_no_faces, "no faces"),
    (_not_obj, "not a Wavefront OBJ"),
])
def test_bad_meshes_fail_cleanly(tmp_path, make, message):
    mesh = make(tmp_path)
    before = set(tmp_path.iterdir())
    with pytest.raises(MeshError, match=message) as err:
        render_gt(mesh, tmp_path / "out", views=2, size=16)
    assert "\n" not in str(err.value)
    assert set(tmp_path.iterdir()) == before  # no output folder, finished or not


@pytest.mark.parametrize("kwargs, message", [({"views": 0}, "views"), ({"size": 0}, "size"),
                                             ({"views": -3}, "views")])
def test_bad_counts_fail_cleanly(tmp_path, kwargs, message):
    from rf_core.errors import UserError

    with pytest.raises(UserError, match=message):
        render_gt(DUCK, tmp_path / "out", **{"views": 2, "size": 16, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_resolve_mesh_path(tmp_path):
    assert resolve_mesh_path(DUCK).is_file()
    assert resolve_mesh_path(tmp_path / "a.obj") == tmp_path / "a.obj"
    assert math.isclose(float(intrinsics_from_fov(40.0, 8, 8)[1, 2]), 4.0)
