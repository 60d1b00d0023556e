import math
import sys

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from rf_core.output.export import (
    OrbitVideoConfig,
    extract_mesh,
    orbit_cameras_for,
    orbit_frames,
    write_mesh,
    write_video,
)
from rf_core.output.mesh_io import GLTF_FROM_WORLD, read_mesh
from rf_core.scene.cameras import generate_rays, project
from rf_core.scene.render import OccupancyConfig, RendererConfig, VolumeRenderer, render_image

CENTRE = torch.tensor([0.2, 0.0, 0.0])
RADIUS = 0.5
EDGE = 0.02  # width of the sigmoid edge, in scene units
RED, BLUE = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])


def sphere_density(x):
    """50 deep inside, exactly 10 (the default threshold) at distance RADIUS from CENTRE."""
    d = (x - CENTRE).norm(dim=-1)
    return 50.0 * torch.sigmoid((RADIUS - d) / EDGE - math.log(4.0))


def sphere_color(x):
    """Red above the centre's height, blue below."""
    top = (x[:, 2:3] >= 0).float()
    return top * RED + (1 - top) * BLUE


def sphere_field(x):
    return sphere_density(x), sphere_color(x)


def sphere_normals(x, density=None):
    return torch.nn.functional.normalize(x - CENTRE, dim=-1)


@pytest.fixture(scope="module")
def sphere_mesh():
    return extract_mesh(sphere_density, sphere_color, bound=1.0, resolution=64)


# ---------------------------------------------------------------------------- mesh


def test_mesh_lies_on_the_sphere(sphere_mesh):
    half_voxel = 0.5 * 2.0 / 63
    dist = np.linalg.norm(sphere_mesh.vertices - CENTRE.numpy(), axis=1)
    assert np.abs(dist - RADIUS).max() < half_voxel
    assert sphere_mesh.is_watertight
    exact = 4 / 3 * math.pi * RADIUS ** 3
    assert sphere_mesh.volume == pytest.approx(exact, rel=0.03)


def test_mesh_normals_point_outward(sphere_mesh):
    radial = sphere_mesh.vertices - CENTRE.numpy()
    outward = (sphere_mesh.vertex_normals * radial).sum(1) > 0
    assert outward.mean() > 0.99
    assert sphere_mesh.volume > 0  # consistent winding, counter-clockwise from outside


def test_mesh_vertex_colours(sphere_mesh):
    rgba = sphere_mesh.visual.vertex_colors
    assert rgba.dtype == np.uint8 and rgba.shape == (len(sphere_mesh.vertices), 4)
    z = sphere_mesh.vertices[:, 2]
    assert (rgba[z > 0.1] == [255, 0, 0, 255]).all()
    assert (rgba[z < -0.1] == [0, 0, 255, 255]).all()


def test_mesh_drops_floaters_and_caps_the_cube():
    def two_blobs(x):
        big = sphere_density(x)
        small = 50.0 * ((x - torch.tensor([-0.7, -0.7, -0.7])).norm(dim=-1) < 0.08).float()
        slab = 50.0 * (x[:, 2] > 0.9).float()  # dense up to the cube's top face
        return big + small + slab

    mesh = extract_mesh(two_blobs, sphere_color, bound=1.0, resolution=48)
    assert not (np.linalg.norm(mesh.vertices + 0.7, axis=1) < 0.2).any()  # floater dropped
    assert mesh.vertices.max() <= 1.0 + 1e-6  # the slab is capped on the cube face
    assert mesh.is_watertight
    kept = extract_mesh(two_blobs, sphere_color, bound=1.0, resolution=48, keep_largest=False)
    assert (np.linalg.norm(kept.vertices + 0.7, axis=1) < 0.2).any()


def test_empty_field_is_a_clear_error():
    message = "no surface at threshold 10: the field is empty.*lower export.threshold"
    with pytest.raises(ValueError, match=message):
        extract_mesh(lambda x: torch.zeros(x.shape[0]), sphere_color, bound=1.0, resolution=16)


def test_mesh_files_round_trip(sphere_mesh, tmp_path):
    paths = write_mesh(sphere_mesh, tmp_path / "sub" / "mesh")
    assert [p.name for p in paths] == ["mesh.glb", "mesh.obj"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["mesh.glb", "mesh.obj"]
    n = len(sphere_mesh.vertices)
    # The files are y-up (glTF's frame): world (x, y, z) is stored as (x, z, -y).
    file_vertices = sphere_mesh.vertices @ GLTF_FROM_WORLD.T
    for path in paths:
        loaded = trimesh.load(path, force="mesh")
        assert len(loaded.vertices) == n and len(loaded.faces) == len(sphere_mesh.faces)
        # Match vertices by position (a loader may reorder them) and compare colours.
        order_in = np.lexsort(file_vertices.T)
        order_out = np.lexsort(loaded.vertices.T)
        assert np.allclose(loaded.vertices[order_out], file_vertices[order_in], atol=1e-5)
        colours = loaded.visual.vertex_colors[order_out, :3]
        assert (colours == sphere_mesh.visual.vertex_colors[order_in, :3]).all(), path.name
        back = read_mesh(path)  # the world frame again
        assert np.allclose(back.vertices, sphere_mesh.vertices, atol=1e-5), path.name


# ---------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def video():
    cfg = OrbitVideoConfig(frames=4, size=32, start_azimuth=90.0)
    renderer = VolumeRenderer(RendererConfig(num_samples=96, occupancy=OccupancyConfig(
        enabled=False)), bound=1.0).eval()

    def render_fn(cams, index):
        return render_image(renderer, sphere_field, cams, index, background_fn=torch.ones_like,
                            normal_fn=sphere_normals, want_normals=True)

    return cfg, orbit_frames(render_fn, cfg)


def test_orbit_frames_panels(video):
    cfg, frames = video
    assert frames.shape == (4, 32, 96, 3) and frames.dtype == np.uint8
    rgb, normal, depth = frames[0, :, :32], frames[0, :, 32:64], frames[0, :, 64:]
    for panel in (rgb, normal, depth):
        for corner in (panel[0, 0], panel[0, -1], panel[-1, 0], panel[-1, -1]):
            assert (corner == 255).all()

    cam = orbit_cameras_for(cfg)[0]
    (u, v), = project(CENTRE[None], cam)[0][0].tolist()
    row, col = round(v - 0.5), round(u - 0.5)  # the pixel whose centre is nearest
    # Seen from 15 degrees above, the front of the sphere at the centre pixel is red (z > 0);
    # a few rows lower it is blue.
    assert rgb[row - 3, col].tolist() == [255, 0, 0]
    assert rgb[row + 5, col].tolist() == [0, 0, 255]
    # The normal where that pixel's ray meets the sphere, mapped from [-1, 1] to [0, 1].
    rays_o, rays_d = generate_rays(cam)
    o, d = rays_o[0, row, col], rays_d[0, row, col]
    oc = o - CENTRE
    t = -(oc @ d) - torch.sqrt((oc @ d) ** 2 - oc @ oc + RADIUS ** 2)
    expected = 0.5 * (torch.nn.functional.normalize(o + t * d - CENTRE, dim=0) + 1)
    assert np.allclose(normal[row, col] / 255, expected.numpy(), atol=0.02)
    # Depth: viridis reversed, so green grows towards the camera: the sphere's front is
    # brighter than its flanks, and brightest in frame 3 (azimuth 0), where the sphere is
    # nearest the camera, darkest in frame 1 (azimuth 180).
    assert depth[row, col, 1] > max(depth[row, col - 5, 1], depth[row, col + 5, 1])
    (u3, v3), (u1, v1) = project(CENTRE[None], orbit_cameras_for(cfg)[[3, 1]])[0][:, 0].tolist()
    near = frames[3, round(v3 - 0.5), 64 + round(u3 - 0.5)]
    far = frames[1, round(v1 - 0.5), 64 + round(u1 - 0.5)]
    assert near[0] > 200 and near[2] < 80  # yellow: the video's nearest point
    assert far[1] < near[1] - 60


def test_orbit_object_at_projected_centre(video):
    cfg, frames = video
    cams = orbit_cameras_for(cfg)
    uv = project(CENTRE[None], cams)[0][:, 0]  # [F, 2]
    for i in range(len(frames)):
        coverage = 1 - frames[i, :, :32].min(-1) / 255.0  # zero where white
        rows, cols = np.mgrid[:32, :32] + 0.5
        centroid = [(cols * coverage).sum() / coverage.sum(),
                    (rows * coverage).sum() / coverage.sum()]
        assert np.allclose(centroid, uv[i].tolist(), atol=1.0), i
    # The sphere sits 0.2 off the axis; at azimuth 90 it is ~2.9 px left of the image centre.
    assert uv[0, 0] < 16 - 2


def test_orbit_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown 'webm'"):
        OrbitVideoConfig(formats=["webm"])
    with pytest.raises(ValueError, match="unknown 'alpha'"):
        OrbitVideoConfig(panels=["rgb", "alpha"])


def test_write_video_gif_and_mp4(video, tmp_path):
    _, frames = video
    frames = frames[:, :31]  # odd height: the MP4 is padded to even size
    paths = write_video(frames, tmp_path / "orbit", fps=8, formats=["mp4", "gif"])
    assert [p.name for p in paths] == ["orbit.gif", "orbit.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit.gif", "orbit.mp4"]

    gif = iio.imread(paths[0], index=None)
    assert gif.shape[:3] == frames.shape[:3]
    assert np.abs(gif[..., :3].astype(int) - frames).mean() < 4  # palette quantisation only

    with Image.open(paths[0]) as im:
        assert im.info["loop"] == 0  # forever
        assert abs(im.info["duration"] - 1000 / 8) <= 10  # GIF delays are whole centiseconds

    mp4 = _read_mp4(paths[1])
    assert abs(len(mp4) - len(frames)) <= 1
    assert mp4.shape[1:3] == (32, 96)
    assert np.abs(mp4[0, :31].astype(int) - frames[0]).mean() < 10


def test_missing_ffmpeg_still_writes_gif(video, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    with pytest.raises(RuntimeError, match="pip install imageio-ffmpeg"):
        write_video(video[1], tmp_path / "orbit", fps=8, formats=["mp4", "gif"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit.gif"]


def _read_mp4(path):
    """All frames of a video [F, H, W, 3] uint8, decoded by imageio-ffmpeg's ffmpeg."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])
