"""`rf view`: the scene of a run, following a run while it trains, bad input, a real browser.

The browser test starts the viewer and screenshots it with headless Chromium (software WebGL);
the screenshot is kept as ``outputs/view_screenshot.png``. It is skipped where no chromium
binary is installed (Debian: ``apt-get install chromium``); the viewer tests are skipped where
viser, the ``[viewer]`` extra, is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rf_cli.view import add_commands, cmd_view
from rf_core.config import ConfigError
from rf_core.errors import UserError
from rf_core.fitting.engine import StopAfter
from rf_core.jobs.job_config import load_job_config
from rf_core.jobs.reconstruct_job import reconstruct
from rf_core.jobs.viewer import VIEWER_HINT, Viewer, ViewerConfig, locate_run
from rf_core.output.mesh_io import read_mesh, write_mesh
from rf_core.progress import quiet
from tests.rf_core.test_reconstruct_job import EXAMPLE
from tests.rf_core.test_reconstruct_job import SMALL as JOB_SMALL

ROOT = Path(__file__).resolve().parents[2]
# the reconstruct-job tests' small run, with 4 orbit frames and only the GIF
SMALL = [*JOB_SMALL, "export.video.frames=4", "export.video.formats=[gif]"]
FAST = ViewerConfig(port=0, follow=False, mesh_resolution=24)

needs_viser = pytest.mark.skipif(importlib.util.find_spec("viser") is None,
                                 reason="viser is not installed: pip install -e .[viewer]")


def _reconstruct(out: Path, stop_after: int | None = None) -> dict:
    cfg = load_job_config("tiny", overrides=SMALL)
    with quiet():
        return reconstruct(EXAMPLE, None, out, cfg, learn_embedding=True,
                           callbacks=[StopAfter(stop_after)] if stop_after else [])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("view") / "run"
    assert _reconstruct(out)["finished"]
    return out


def _glb_mesh(handle):
    import trimesh

    return trimesh.load(io.BytesIO(handle.glb_data), file_type="glb", force="mesh",
                        process=False)


def _wait_until(condition, seconds: float = 60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rf")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- the scene


@needs_viser
def test_scene_holds_the_mesh_the_input_camera_and_every_orbit_view(finished_run):
    with Viewer(finished_run, FAST) as viewer:
        scene = viewer.server.scene
        assert viewer.mesh_source == "mesh.glb"
        shown, saved = _glb_mesh(scene.get_handle_by_name("/mesh")), read_mesh(
            finished_run / "mesh.glb")
        np.testing.assert_allclose(shown.vertices, saved.vertices, atol=1e-6)
        np.testing.assert_array_equal(shown.visual.vertex_colors, saved.visual.vertex_colors)

        cam = scene.get_handle_by_name("/input_camera")
        photo = np.asarray(Image.open(finished_run / "input" / "image.png").convert("RGB"))
        np.testing.assert_array_equal(cam.image, photo)
        np.testing.assert_allclose(cam.position, [3.0, 0.0, 0.0], atol=1e-5)  # the config's
        assert cam.fov == pytest.approx(np.radians(40.0))
        forward = _rotation(cam.wxyz)[:, 2]  # OpenCV: +z looks at the object
        np.testing.assert_allclose(forward, [-1.0, 0.0, 0.0], atol=1e-5)

        gif = Image.open(finished_run / "orbit.gif")
        assert viewer.orbit_frames.shape == (4, 16, 16, 3)
        for i in range(4):
            view = scene.get_handle_by_name(f"/orbit/view_{i:03d}")
            gif.seek(i)
            np.testing.assert_array_equal(view.image, np.asarray(gif.convert("RGB"))[:, :16])
            azimuth = np.radians(90.0 * i)  # 4 frames from the input azimuth, 15° up
            expected = 3.0 * np.array([np.cos(np.radians(15)) * np.cos(azimuth),
                                       np.cos(np.radians(15)) * np.sin(azimuth),
                                       np.sin(np.radians(15))])
            np.testing.assert_allclose(view.position, expected, atol=1e-5)
        assert scene.get_handle_by_name("/orbit/view_004") is None
        assert "orbit views: 4" in viewer.status_line and "(finished)" in viewer.status_line


def _rotation(wxyz) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    w, x, y, z = wxyz
    return Rotation.from_quat([x, y, z, w]).as_matrix()


@needs_viser
def test_a_sweep_trial_export_folder_is_shown(tmp_path, finished_run):
    export = tmp_path / "checkpoint_000001" / "export"
    export.mkdir(parents=True)
    for name in ("mesh.glb", "orbit.gif", "config.yaml", "metrics.json"):
        shutil.copy(finished_run / name, export / name)
    with Viewer(tmp_path / "checkpoint_000001", FAST) as viewer:
        assert locate_run(tmp_path / "checkpoint_000001").state == "export"
        assert viewer.mesh_source == "mesh.glb" and len(viewer.orbit_frames) == 4
        cam = viewer.server.scene.get_handle_by_name("/input_camera")
        assert cam is not None and cam.image is None  # an export keeps no photo


@needs_viser
def test_follow_mode_redraws_each_newer_checkpoint_then_the_finished_run(tmp_path):
    out = tmp_path / "run"
    assert not _reconstruct(out, stop_after=3)["finished"]  # .run.partial, checkpoint step 3
    cfg = ViewerConfig(port=0, follow=True, poll_seconds=0.1, mesh_resolution=24)
    with Viewer(out, cfg) as viewer:
        scene = viewer.server.scene
        assert viewer.mesh_source == "checkpoint step 3"
        assert "(training)" in viewer.status_line and viewer.orbit_frames is None
        first = scene.get_handle_by_name("/mesh").glb_data
        assert scene.get_handle_by_name("/input_camera").image is not None

        assert not _reconstruct(out, stop_after=5)["finished"]  # resumes, saves step 5
        assert _wait_until(lambda: viewer.mesh_source == "checkpoint step 5"), \
            viewer.mesh_source
        second = scene.get_handle_by_name("/mesh").glb_data
        assert second != first

        assert _reconstruct(out)["finished"]  # the run is renamed into place
        assert _wait_until(lambda: "(finished)" in viewer.status_line), viewer.status_line
        assert viewer.mesh_source == "mesh.glb" and len(viewer.orbit_frames) == 4
        shown = _glb_mesh(scene.get_handle_by_name("/mesh"))
        assert len(shown.vertices) == len(read_mesh(out / "mesh.glb").vertices)


# ---------------------------------------------------------------------------- bad input


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    (tmp_path / "a-file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "missing": ["does not exist", "rf reconstruct PHOTO --out"],
             tmp_path / "a-file.txt": ["is a file", "rf reconstruct --out"],
             tmp_path / "empty": ["is not a run folder", "mesh.glb"]}
    for path, words in cases.items():
        with pytest.raises(UserError) as err:
            locate_run(path)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_an_export_of_several_objects_names_them(tmp_path):
    for name in ("cup", "duck"):
        (tmp_path / "trial" / "export" / name).mkdir(parents=True)
        (tmp_path / "trial" / "export" / name / "mesh.glb").write_bytes(b"")
    with pytest.raises(UserError, match=r"2 objects \(cup, duck\).*rf view .*export/cup"):
        locate_run(tmp_path / "trial")


def test_missing_viser_is_one_line(monkeypatch, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mesh.glb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "viser", None)  # import viser raises ImportError
    with pytest.raises(UserError) as err:
        cmd_view(_parse(["view", str(tmp_path / "run")]))
    assert str(err.value) == VIEWER_HINT == "rf view needs viser: pip install -e .[viewer]"


def test_bad_flag_values_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="^--poll: must be > 0"):
        cmd_view(_parse(["view", str(tmp_path), "--poll", "0"]))
    with pytest.raises(ConfigError, match="^--mesh-resolution: "):
        cmd_view(_parse(["view", str(tmp_path), "--mesh-resolution", "2"]))


@needs_viser
def test_cli_serves_for_the_given_seconds(finished_run, capsys):
    start = time.monotonic()
    assert cmd_view(_parse(["view", str(finished_run), "--port", "0", "--no-follow",
                            "--seconds", "0.3"])) == 0
    assert time.monotonic() - start < 30
    out = capsys.readouterr().out
    assert f"rf view: {finished_run} at http://127.0.0.1:" in out and "not following" in out


# ---------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Software WebGL in headless Chromium: the new headless mode with ANGLE on SwiftShader. The
# page is driven over the DevTools protocol and screenshotted until the scene is complete:
# `--screenshot` with `--virtual-time-budget` renders WebGL too, but the frustums' image
# textures decode off the virtual clock and are missing from some of its screenshots.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--window-size=1280,800", "--hide-scrollbars",
                  "--no-first-run", "--remote-debugging-port=0"]
MAGENTA = (255, 0, 255, 255)


def _scene_pixels(png: bytes) -> dict[str, np.ndarray]:
    """Masks of the mesh's magenta, the duck photo's yellow and the input frustum's orange,
    in the 3D view only: below the software-WebGL notice, right of the axes gizmo (whose
    centre is yellow), left of the GUI panel."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    view = np.zeros(r.shape, bool)
    view[160:740, 100:900] = True
    return {"magenta": view & (r > 120) & (b > 120) & (g < 0.6 * np.minimum(r, b)),
            "yellow": view & (r > 180) & (g > 140) & (b < 60),
            "orange": view & (abs(r - 230) < 30) & (abs(g - 90) < 40) & (b < 60)}


def _complete(masks: dict[str, np.ndarray]) -> bool:
    return masks["magenta"].sum() > 300 and masks["yellow"].sum() > 50 \
        and masks["orange"].sum() > 50


def _screenshot_when_complete(url: str, profile: Path, seconds: float = 90.0) -> bytes:
    """Open ``url`` in headless Chromium; the first screenshot showing the whole scene (or
    the last one taken, after ``seconds``)."""
    import base64
    import json
    import urllib.parse
    import urllib.request

    from websockets.sync.client import connect

    browser = subprocess.Popen([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                "about:blank"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        assert _wait_until(active.is_file, 30), "chromium did not start its DevTools server"
        port = active.read_text().split()[0]
        new = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?"
                                     f"{urllib.parse.quote(url, safe='')}", method="PUT")
        with urllib.request.urlopen(new, timeout=30) as reply:
            target = json.load(reply)["webSocketDebuggerUrl"]
        with connect(target, max_size=None) as page:
            calls = iter(range(1, 1_000_000))

            def call(method: str, **params) -> dict:
                n = next(calls)
                page.send(json.dumps({"id": n, "method": method, "params": params}))
                while (reply := json.loads(page.recv(timeout=60))).get("id") != n:
                    pass  # an event
                return reply["result"]

            call("Emulation.setDeviceMetricsOverride", width=1280, height=800,
                 deviceScaleFactor=1, mobile=False)
            end = time.monotonic() + seconds
            while True:
                png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
                if _complete(_scene_pixels(png)) or time.monotonic() > end:
                    return png
                time.sleep(1.0)
    finally:
        browser.terminate()
        browser.wait(timeout=30)


@needs_viser
@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_the_browser_shows_the_mesh_and_the_cameras(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    mesh = read_mesh(run / "mesh.glb")
    mesh.visual.vertex_colors = np.tile(np.array(MAGENTA, np.uint8), (len(mesh.vertices), 1))
    write_mesh(mesh, run / "mesh")  # a colour nothing else on the page has
    with Viewer(run, FAST) as viewer:
        clients = []
        viewer.server.on_client_connect(lambda client: clients.append(client.client_id))
        png = _screenshot_when_complete(viewer.url, tmp_path / "profile")
        assert clients, "the page never connected to the viewer's websocket"
    (ROOT / "outputs").mkdir(exist_ok=True)
    (ROOT / "outputs" / "view_screenshot.png").write_bytes(png)

    assert Image.open(io.BytesIO(png)).size == (1280, 800)
    masks = _scene_pixels(png)
    ys, xs = np.nonzero(masks["magenta"])
    assert len(xs) > 300, f"the mesh is not on the page ({len(xs)} magenta pixels)"
    # the initial camera looks at the origin, where the object is: the canvas centre
    assert abs(xs.mean() - 640) < 120 and abs(ys.mean() - 400) < 120, (xs.mean(), ys.mean())
    assert masks["yellow"].sum() > 50, "the duck photo is not on the input camera's frustum"
    assert masks["orange"].sum() > 50, "the input camera's frustum is not drawn"
