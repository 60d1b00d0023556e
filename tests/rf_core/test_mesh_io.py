"""Mesh files in glTF's y-up frame, read back into the z-up world, and mesh previews."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import trimesh
from PIL import Image

from rf_core.errors import UserError
from rf_core.output.mesh_io import (
    GLTF_FROM_WORLD,
    read_mesh,
    render_mesh_preview,
    write_mesh,
    write_mesh_preview,
)

RED, GREEN, BLUE = (230, 20, 20), (20, 200, 20), (20, 20, 230)
BOX_CENTRE = np.array([0.1, -0.2, 0.3])


def tall_box() -> trimesh.Trimesh:
    """A box 0.4 x 0.6 x 1.2 (tall in world z) off the origin: red on top, green on its +x
    half and blue on its -x half below that."""
    box = trimesh.creation.box([0.4, 0.6, 1.2]).subdivide().subdivide()
    p = box.vertices
    rgb = np.where(p[:, :1] > 0, GREEN, BLUE)
    rgb[p[:, 2] > 0.55] = RED
    box.visual.vertex_colors = np.c_[rgb, np.full(len(p), 255)].astype(np.uint8)
    box.apply_translation(BOX_CENTRE)
    return box


def sphere(radius: float = 0.5) -> trimesh.Trimesh:
    """An icosphere at BOX_CENTRE whose colour is linear in position (so barycentric blends
    of vertex colours are the colour of the blended position, up to rounding)."""
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    mesh.visual.vertex_colors = np.c_[linear_colour(mesh.vertices, radius),
                                      np.full(len(mesh.vertices), 255)].astype(np.uint8)
    mesh.apply_translation(BOX_CENTRE)
    return mesh


def linear_colour(p: np.ndarray, radius: float) -> np.ndarray:
    return np.round(255 * (0.5 + 0.5 * p / radius)).clip(0, 255)


def glb(path) -> tuple[dict, bytes]:
    """(JSON chunk, BIN chunk) of a GLB file, parsed by hand (the format, not trimesh)."""
    data = path.read_bytes()
    assert data[:4] == b"glTF" and struct.unpack_from("<I", data, 4)[0] == 2
    doc_len, doc_kind = struct.unpack_from("<II", data, 12)
    assert doc_kind == 0x4E4F534A
    doc = json.loads(data[20:20 + doc_len])
    bin_len, bin_kind = struct.unpack_from("<II", data, 20 + doc_len)
    assert bin_kind == 0x004E4942
    start = 28 + doc_len
    return doc, data[start:start + bin_len]


def accessor(doc: dict, blob: bytes, index: int) -> np.ndarray:
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    dtype = {5121: np.uint8, 5125: np.uint32, 5126: np.float32}[acc["componentType"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
    assert view.get("byteStride", width * np.dtype(dtype).itemsize) == width * np.dtype(
        dtype).itemsize
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    return np.frombuffer(blob, dtype, acc["count"] * width, start).reshape(acc["count"], width)


def primitive(doc: dict) -> dict:
    (mesh,) = doc["meshes"]
    (prim,) = mesh["primitives"]
    return prim


# ---------------------------------------------------------------------------- files


def test_frame_is_a_rotation():
    assert np.array_equal(GLTF_FROM_WORLD @ [0, 0, 1], [0, 1, 0])  # world up is glTF up
    assert np.allclose(GLTF_FROM_WORLD @ GLTF_FROM_WORLD.T, np.eye(3))
    assert np.linalg.det(GLTF_FROM_WORLD) == pytest.approx(1.0)


def test_glb_stands_upright(tmp_path):
    box = tall_box()
    paths = write_mesh(box, tmp_path / "mesh")
    assert [p.name for p in paths] == ["mesh.glb", "mesh.obj"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb", "mesh.obj"]  # no temps
    loaded = trimesh.load(paths[0], force="mesh", process=False)
    assert np.argmax(loaded.extents) == 1  # tall in y
    assert loaded.extents == pytest.approx([0.4, 1.2, 0.6])
    world = box.vertices.astype(np.float32).astype(np.float64)
    assert np.array_equal(loaded.vertices, world @ GLTF_FROM_WORLD.T)
    assert np.array_equal(loaded.vertices[:, 1], world[:, 2])  # y <- z
    assert np.array_equal(loaded.vertices[:, 2], -world[:, 1])  # z <- -y
    assert np.array_equal(loaded.faces, box.faces)
    assert (loaded.visual.vertex_colors == box.visual.vertex_colors).all()
    # The top (red, world +z) is the glTF top: largest y.
    red = (loaded.visual.vertex_colors[:, :3] == RED).all(1)
    assert loaded.vertices[red, 1].min() > loaded.vertices[~red, 1].max()


def test_glb_has_outward_normals_and_colours(tmp_path):
    ball = sphere()
    (path, _) = write_mesh(ball, tmp_path / "ball")
    doc, blob = glb(path)
    assert doc["asset"]["extras"]["rf_frame"] == "gltf_y_up"
    attributes = primitive(doc)["attributes"]
    assert {"POSITION", "NORMAL", "COLOR_0"} <= attributes.keys()
    position = accessor(doc, blob, attributes["POSITION"])
    normal = accessor(doc, blob, attributes["NORMAL"])
    assert np.allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-5)
    radial = position - GLTF_FROM_WORLD @ BOX_CENTRE
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    assert ((normal * radial).sum(1) > 0.99).all()  # outward, in the file's frame
    colour = accessor(doc, blob, attributes["COLOR_0"])
    assert np.array_equal(colour, ball.visual.vertex_colors)
    # Winding kept: right-hand face normals point outward and the volume is positive.
    loaded = trimesh.load(path, force="mesh", process=False)
    assert loaded.volume == pytest.approx(ball.volume, rel=1e-5) and loaded.volume > 0


def test_read_mesh_undoes_the_frame_exactly(tmp_path):
    box = tall_box()
    glb_path, obj_path = write_mesh(box, tmp_path / "mesh")
    back = read_mesh(glb_path)
    assert np.array_equal(back.vertices, box.vertices.astype(np.float32))
    assert np.array_equal(back.faces, box.faces)
    assert (back.visual.vertex_colors == box.visual.vertex_colors).all()
    assert np.allclose(back.vertex_normals, box.vertex_normals, atol=1e-6)
    obj = read_mesh(obj_path)
    assert np.allclose(obj.vertices, box.vertices, atol=1e-7)
    assert np.array_equal(obj.faces, box.faces)


def test_mesh_metrics_see_the_same_surface_as_before(tmp_path):
    """Evaluation samples the surface read back; it must match the z-up file of old."""
    box = tall_box()
    (tmp_path / "old.glb").write_bytes(box.export(file_type="glb"))
    glb_path, _ = write_mesh(box, tmp_path / "new")
    old = trimesh.load(tmp_path / "old.glb", force="mesh")  # what evaluation used to read
    new = read_mesh(glb_path)
    a, _ = trimesh.sample.sample_surface(old, 2000, seed=1)
    b, _ = trimesh.sample.sample_surface(new, 2000, seed=1)
    assert np.array_equal(a, b)


def test_obj_round_trip(tmp_path):
    ball = sphere()
    _, path = write_mesh(ball, tmp_path / "ball")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# rf_frame: gltf_y_up")
    assert sum(line.startswith("vn ") for line in lines) == len(ball.vertices)
    v = [line.split() for line in lines if line.startswith("v ")]
    assert all(len(f) == 7 for f in v)  # v x y z r g b
    raw = trimesh.load(path, force="mesh", process=False)
    assert np.allclose(raw.vertices, ball.vertices @ GLTF_FROM_WORLD.T, atol=1e-7)
    assert (raw.visual.vertex_colors == ball.visual.vertex_colors).all()
    assert np.allclose(raw.vertex_normals, ball.vertex_normals @ GLTF_FROM_WORLD.T, atol=1e-6)


def test_untagged_files_are_read_as_they_are(tmp_path):
    """Files rf wrote before the y-up change (no frame tag) are already in the world frame."""
    box = tall_box()
    (tmp_path / "old.glb").write_bytes(box.export(file_type="glb"))
    (tmp_path / "old.obj").write_text(box.export(file_type="obj"))
    for name in ("old.glb", "old.obj"):
        assert np.allclose(read_mesh(tmp_path / name).vertices, box.vertices, atol=1e-6)


def test_textured_glb_samples_the_vertex_colours(tmp_path):
    pytest.importorskip("xatlas")
    ball = sphere()
    paths = write_mesh(ball, tmp_path / "ball", texture=True, texture_size=256)
    assert [p.name for p in paths] == ["ball.glb", "ball.obj", "ball_textured.glb"]
    doc, blob = glb(paths[2])
    prim = primitive(doc)
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= prim["attributes"].keys()
    tex = doc["materials"][prim["material"]]["pbrMetallicRoughness"]["baseColorTexture"]
    image = doc["images"][doc["textures"][tex["index"]]["source"]]
    view = doc["bufferViews"][image["bufferView"]]
    png = blob[view.get("byteOffset", 0):view.get("byteOffset", 0) + view["byteLength"]]
    texture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64)
    assert texture.shape == (256, 256, 3)

    uv = accessor(doc, blob, prim["attributes"]["TEXCOORD_0"]).astype(np.float64)
    faces = accessor(doc, blob, prim["indices"]).reshape(-1, 3)
    world = accessor(doc, blob, prim["attributes"]["POSITION"]) @ GLTF_FROM_WORLD
    assert len(faces) == len(ball.faces)

    def sample(at):  # glTF: u across, v down the image; the texel under the point
        col = np.clip((at[:, 0] * 256).astype(int), 0, 255)
        row = np.clip((at[:, 1] * 256).astype(int), 0, 255)
        return texture[row, col]

    expected = linear_colour(world[faces].mean(1) - BOX_CENTRE, 0.5)
    err = np.abs(sample(uv[faces].mean(1)) - expected)
    assert err.mean() < 2.0 and err.max() <= 12
    # At the corners the texel may lie outside the triangle: padding keeps it close.
    err = np.abs(sample(uv) - linear_colour(world - BOX_CENTRE, 0.5))
    assert np.median(err) < 3.0 and err.max() <= 40
    back = read_mesh(paths[2])  # textured files come back in the world frame too
    assert np.allclose(back.vertices, world, atol=1e-6)


def test_textured_mesh_without_xatlas_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xatlas", None)  # import xatlas raises ImportError
    with pytest.raises(UserError, match=r"pip install xatlas.*pip install -e \.\[texture\]"):
        write_mesh(sphere(), tmp_path / "ball", texture=True)
    assert not list(tmp_path.iterdir())


VALIDATE_JS = """
const fs = require("fs");
const validator = require(process.argv[2]);
const bytes = new Uint8Array(fs.readFileSync(process.argv[3]));
validator.validateBytes(bytes, {uri: process.argv[3]}).then((report) => {
  const s = report.issues;
  console.log(JSON.stringify({errors: s.numErrors, warnings: s.numWarnings, infos: s.numInfos,
                              hints: s.numHints, messages: s.messages}));
}, (err) => { console.error(String(err)); process.exit(2); });
"""


def test_khronos_validator_accepts_the_files(tmp_path):
    """Set RF_GLTF_VALIDATOR to the installed module folder, e.g. after
    ``npm install --prefix /tmp/gltfv gltf-validator``: /tmp/gltfv/node_modules/gltf-validator."""
    module = os.environ.get("RF_GLTF_VALIDATOR")
    if not module or not shutil.which("node"):
        pytest.skip("set RF_GLTF_VALIDATOR to the gltf-validator node module folder")
    script = tmp_path / "validate.js"
    script.write_text(VALIDATE_JS)
    paths = write_mesh(tall_box(), tmp_path / "mesh",
                       texture=importlib.util.find_spec("xatlas") is not None,
                       texture_size=128)
    for path in (p for p in paths if p.suffix == ".glb"):
        out = subprocess.run(["node", str(script), module, str(path)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["errors"] == 0 and report["warnings"] == 0, (path.name, report)


# ---------------------------------------------------------------------------- preview


def panels(image: np.ndarray, views: int) -> list[np.ndarray]:
    return np.split(image, views, axis=1)


def is_colour(panel: np.ndarray, rgb) -> np.ndarray:
    """Pixels whose hue is that of ``rgb`` (shading only scales the colour)."""
    p = panel.astype(np.float64)
    direction = np.asarray(rgb, np.float64) / np.linalg.norm(rgb)
    norm = np.linalg.norm(p, axis=-1)
    return (norm > 30) & ((p @ direction) > 0.98 * norm) & ~(panel == 255).all(-1)


def test_preview_of_a_tall_box(tmp_path):
    image = render_mesh_preview(tall_box(), size=96, views=3)
    assert image.shape == (96, 288, 3) and image.dtype == np.uint8
    for panel in panels(image, 3):
        assert (panel[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()  # white background
        rows, cols = np.nonzero(~(panel == 255).all(-1))
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert height > 1.4 * width  # tall in z is tall in the image
        assert abs(rows.mean() - 48) < 8 and abs(cols.mean() - 48) < 8  # centred
        red_rows = np.nonzero(is_colour(panel, RED))[0]
        assert len(red_rows) > 20
        assert red_rows.max() < rows.min() + 0.35 * height  # the +z top is at the top


def test_preview_views_turn_counter_clockwise_from_x():
    front, back = panels(render_mesh_preview(tall_box(), size=96, views=2), 2)
    # View 0 looks from +x (the green side), view 1 from -x (the blue side).
    assert is_colour(front, GREEN).sum() > 20 * max(is_colour(front, BLUE).sum(), 1)
    assert is_colour(back, BLUE).sum() > 20 * max(is_colour(back, GREEN).sum(), 1)
    # Seen from +x with +z up, +y is on the right.
    left = trimesh.creation.box([0.2, 0.2, 0.2])
    right = left.copy()
    left.apply_translation([0, -0.5, 0])
    right.apply_translation([0, 0.5, 0])
    left.visual.vertex_colors = [*BLUE, 255]
    right.visual.vertex_colors = [*RED, 255]
    (view,) = panels(render_mesh_preview(trimesh.util.concatenate([left, right]), size=64,
                                         views=1), 1)
    assert np.nonzero(is_colour(view, RED))[1].min() > np.nonzero(is_colour(view, BLUE))[1].max()


def test_preview_covers_a_square_without_holes():
    """A square facing view 0, seen head-on: every pixel inside it is drawn, none outside."""
    square = trimesh.Trimesh([[0, -1, -1], [0, 1, -1], [0, 1, 1], [0, -1, 1]],
                             [[0, 1, 2], [0, 2, 3]])
    square.visual.vertex_colors = [*GREEN, 255]
    image = render_mesh_preview(square, size=100, views=1, elevation=0.0)
    drawn = ~(image == 255).all(-1)
    rows, cols = np.nonzero(drawn)
    side = 0.45 * 100 * 2 / np.sqrt(2)  # the bounding sphere (radius sqrt 2) fills 90%
    assert abs(np.ptp(rows) + 1 - side) <= 1.5 and abs(np.ptp(cols) + 1 - side) <= 1.5
    assert drawn[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert is_colour(image, GREEN)[drawn].all()


def test_empty_mesh_preview_is_white():
    image = render_mesh_preview(trimesh.Trimesh(), size=16, views=2)
    assert image.shape == (16, 32, 3) and (image == 255).all()


def test_write_mesh_preview(tmp_path):
    box = tall_box()
    path = write_mesh_preview(box, tmp_path / "sub" / "preview.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["preview.png"]
    assert np.array_equal(np.asarray(Image.open(path)), render_mesh_preview(box))


def test_preview_of_50k_faces_is_fast():
    mesh = trimesh.creation.uv_sphere(count=[114, 114])
    assert len(mesh.faces) > 50000
    start = time.perf_counter()
    render_mesh_preview(mesh, size=256, views=3)
    # Measured ~0.6 s on one core; the margin keeps a loaded machine from failing it while
    # still catching a rasteriser that stopped being vectorised.
    assert time.perf_counter() - start < 6.0
