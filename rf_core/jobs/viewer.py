"""``rf view RUN``: a live 3D viewer of a run folder in the browser (viser, as nerfstudio uses).

The scene, in the world frame of the run (z-up, OpenCV cameras, see rf_core.scene.cameras):

- ``/mesh``: the mesh with its vertex colours: ``mesh.glb`` of a finished run or export, else a
  coarse mesh extracted from the latest checkpoint of a run still training;
- ``/input_camera``: the camera that took the photo, as a frustum showing the processed photo;
- ``/orbit/view_NNN``: one frustum per frame of the orbit video, showing that frame's rgb
  panel; the GUI steps through them and can move the browser's camera to one.

RUN may be a finished run (``rf reconstruct --out RUN``), a run still training (its work
folder ``.RUN.partial`` beside it: pass RUN itself), or a sweep trial's export folder (a Tune
checkpoint holding ``export/``, or that ``export/`` folder). While following, the viewer polls
the folder every few seconds and redraws what changed: a newer checkpoint is rebuilt into a
field and meshed at a modest resolution, and a finished run's files replace it when the
run's folder is renamed into place. viser is imported only inside :func:`require_viser`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rf_core.config import bounded, build, parse_yaml
from rf_core.errors import UserError
from rf_core.files.checkpoint import CheckpointError, load_checkpoint
from rf_core.fitting.reconstruct import Reconstructor
from rf_core.jobs.job_config import ReconstructJobConfig
from rf_core.output.export import extract_mesh, orbit_cameras_for
from rf_core.output.mesh_io import read_mesh
from rf_core.scene.cameras import orbit_cameras

if TYPE_CHECKING:
    import trimesh

VIEWER_HINT = "rf view needs viser: pip install -e .[viewer]"
INPUT_COLOR = (230, 90, 20)
ORBIT_COLOR = (110, 110, 110)
SELECTED_COLOR = (20, 110, 240)


@dataclass
class ViewerConfig:
    """Where ``rf view`` serves, and how it follows a training run."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; the viewer has no authentication)."""
    port: int = bounded(8080, lo=0, hi=65535)
    """Port to listen on; viser takes the next free one when it is taken (0: any free port)."""
    follow: bool = True
    """Poll the run folder and redraw what changed (a newer checkpoint, the finished run)."""
    poll_seconds: float = bounded(2.0, lo=0, lo_open=True)
    """Seconds between polls while following."""
    mesh_resolution: int = bounded(64, lo=8)
    """Marching-cubes grid points per side for meshes extracted from checkpoints."""
    device: str = "cpu"
    """Where checkpoints are meshed; the CPU leaves the training run's GPU alone."""
    frustum_scale: float = bounded(0.25, lo=0, lo_open=True)
    """Size of the camera frustums in scene units."""


def require_viser():
    """The viser module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import viser
    except ImportError:
        raise UserError(VIEWER_HINT) from None
    return viser


# ---------------------------------------------------------------------------- the run folder


@dataclass
class RunFiles:
    """What one look at a run folder found; paths are None when absent."""

    folder: Path
    """Where the files are: the run, its work folder while training, or an export folder."""
    state: str
    """'finished', 'training' or 'export'."""
    config: ReconstructJobConfig
    """The run's resolved config (defaults when the folder has none)."""
    mesh: Path | None
    orbit: Path | None
    photo: Path | None
    checkpoint: Path | None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def _export_folder(path: Path) -> Path:
    """``path``, or its ``export/`` when it is a sweep trial's Tune checkpoint."""
    export = path / "export"
    if not export.is_dir() or (path / "mesh.glb").is_file():
        return path
    if (export / "mesh.glb").is_file() or (export / "orbit.gif").is_file():
        return export
    objects = sorted(p.name for p in export.iterdir() if (p / "mesh.glb").is_file())
    if objects:
        raise UserError(f"{path} holds the exports of {len(objects)} objects "
                        f"({', '.join(objects[:4])}); view one of them, e.g. `rf view "
                        f"{export / objects[0]}`")
    return path


def locate_run(path: str | Path) -> RunFiles:
    """Find what ``path`` holds; a one-line :class:`UserError` when it is not a run."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    if path.is_file():
        raise UserError(f"{path} is a file, not a run folder; pass the folder that "
                        "`rf reconstruct --out` wrote")
    training = partial.is_dir() and (not path.exists() or _mtime(partial / "checkpoint")
                                     > _mtime(path / "checkpoint"))
    if not path.exists() and not training:
        raise UserError(f"{path} does not exist and no run is training into it (no "
                        f"{partial.name} beside it); pass a run folder, or start one with "
                        f"`rf reconstruct PHOTO --out {path}`")
    folder = partial if training else _export_folder(path)
    if training or folder.name.endswith(".partial"):
        state = "training"
    else:
        state = "finished" if (folder / "input").is_dir() else "export"

    def found(*names: str) -> Path | None:
        return next((folder / n for n in names if (folder / n).exists()), None)

    files = RunFiles(folder, state, ReconstructJobConfig(), found("mesh.glb", "mesh.obj"),
                     found("orbit.gif"), found("input/image.png"),
                     found("checkpoint") if (folder / "checkpoint" / "config.yaml").is_file()
                     else None)
    if state != "training" and not (files.mesh or files.orbit or files.checkpoint):
        raise UserError(f"{folder} is not a run folder (no mesh.glb, orbit.gif or "
                        "checkpoint/); pass a folder from `rf reconstruct --out` or a sweep "
                        "trial's export folder")
    config = found("config.yaml", "checkpoint/config.yaml")
    if config is not None:
        files.config = build(ReconstructJobConfig, parse_yaml(config.read_text(), str(config)))
    return files


def read_orbit(path: str | Path, cfg: ReconstructJobConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rgb panel of every frame of ``orbit.gif`` and each frame's camera-to-world pose.

    Returns frames: uint8 [F, S, S, 3] and c2w: float [F, 4, 4]. The GIF writer merges
    identical consecutive frames into one longer frame; those are split again by duration,
    so frame i is always the i-th camera of the orbit.
    """
    from PIL import Image, ImageSequence

    video = cfg.export.video
    base = max(20, round(1000 / video.fps))
    frames = []
    with Image.open(path) as gif:
        for frame in ImageSequence.Iterator(gif):
            repeat = max(1, round(frame.info.get("duration", base) / base))
            frames += [np.asarray(frame.convert("RGB"))] * repeat
    strip = np.stack(frames)
    side = strip.shape[1]
    panel = video.panels.index("rgb") if "rgb" in video.panels else 0
    if strip.shape[2] < (panel + 1) * side:
        panel = 0  # not the panels the config names: show the first square
    frames = strip[:, :, panel * side:(panel + 1) * side]
    # the cameras export_run (rf_core.jobs.reconstruct_job) renders the video with
    cam = cfg.recon.camera
    video = dataclasses.replace(video, frames=len(frames), radius=cam.input_radius,
                                fov=cam.input_fov, start_azimuth=cam.input_azimuth)
    return frames, orbit_cameras_for(video).c2w.numpy()


def input_pose(cfg: ReconstructJobConfig) -> np.ndarray:
    """Camera-to-world [4, 4] of the photo's camera."""
    c = cfg.recon.camera
    return orbit_cameras(c.input_radius, c.input_elevation, c.input_azimuth, c.input_fov,
                         1, 1).c2w[0].numpy()


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder's manifest records (None when it has none)."""
    try:
        step = json.loads((folder / "manifest.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def mesh_from_checkpoint(folder: str | Path, resolution: int = 64, device: str = "cpu"
                         ) -> tuple[trimesh.Trimesh, int]:
    """Rebuild the field of a checkpoint and mesh it; returns (mesh, step).

    Raises :class:`~rf_core.files.checkpoint.CheckpointError` for an unusable checkpoint and
    ValueError when the field has no surface yet.
    """
    state, text = load_checkpoint(folder)
    cfg = build(ReconstructJobConfig, parse_yaml(text, f"{folder}/config.yaml"))
    size = cfg.recon.input_size
    # Only the field is used: the photo would set the input-view targets, never read here.
    blank = torch.zeros(3, size, size)
    recon = Reconstructor(cfg.recon, blank, blank[:1], prior=None, device=device)
    recon.load_state_dict(state)  # also sets the hash-grid levels active at this step
    field = recon.field
    mesh = extract_mesh(field.density, lambda x: field(x)[1], bound=cfg.recon.field.bound,
                        resolution=resolution, threshold=cfg.export.threshold,
                        device=recon.device)
    return mesh, recon.step_count


def camera_frame(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wxyz, position) of an OpenCV camera-to-world pose, as viser places frustums."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(c2w[:3, :3]).as_quat()
    return np.array([w, x, y, z]), np.asarray(c2w[:3, 3], dtype=np.float64)


# ---------------------------------------------------------------------------- the viewer


class Viewer:
    """A viser server showing one run; :meth:`refresh` redraws what changed on disk.

    ``server``: an existing ``viser.ViserServer`` to draw into (default: start one on
    ``cfg.host``:``cfg.port``). With ``cfg.follow`` a thread refreshes every
    ``cfg.poll_seconds``; :meth:`close` stops it and the server.
    """

    def __init__(self, run: str | Path, cfg: ViewerConfig | None = None, server=None):
        self.run = Path(run)
        self.cfg = cfg or ViewerConfig()
        files = locate_run(self.run)  # a bad folder fails before the server starts
        viser = require_viser()
        self.server = server or viser.ViserServer(host=self.cfg.host, port=self.cfg.port,
                                                  verbose=False)
        self.server.scene.set_up_direction("+z")
        self.mesh = None
        """The trimesh shown at ``/mesh`` (None until one is found)."""
        self.mesh_source = ""
        """Where it came from: 'mesh.glb', or 'checkpoint step N' while training."""
        self.orbit_frames: np.ndarray | None = None
        self.status_line = ""
        self._keys: dict[str, object] = {}
        self._orbit_handles: list = []
        self._orbit_gui: list = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        try:
            self._status = self.server.gui.add_markdown("")
            self._set_initial_camera(files.config)
            self.refresh(files)
        except BaseException:
            if server is None:  # ours to stop
                self.server.stop()
            raise
        if self.cfg.follow:
            self._thread = threading.Thread(target=self._follow, name="rf-view-follow",
                                            daemon=True)
            self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def _set_initial_camera(self, cfg: ReconstructJobConfig) -> None:
        """Above and beside the photo's camera, far enough to see it and the orbit."""
        cam = cfg.recon.camera
        r, az = 2.0 * cam.input_radius, np.radians(cam.input_azimuth + 35.0)
        el = np.radians(30.0)
        eye = r * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        self.server.initial_camera.fov = np.radians(50.0)
        self.server.initial_camera.position = tuple(eye)
        self.server.initial_camera.look_at = (0.0, 0.0, 0.0)

    # ------------------------------------------------------------------ polling
    def refresh(self, files: RunFiles | None = None) -> bool:
        """Look at the run folder once and redraw what changed; returns whether anything did.

        While following, problems that a later poll may not have (a checkpoint being
        replaced, a field with no surface yet) are shown in the status line, not raised.
        """
        with self._lock:
            files = files or locate_run(self.run)
            changed = self._update_mesh(files)
            changed |= self._update_input(files)
            changed |= self._update_orbit(files)
            self._show_status(files)
            return changed

    def _follow(self) -> None:
        while not self._stop.wait(self.cfg.poll_seconds):
            try:
                self.refresh()
            except (UserError, OSError, ValueError) as e:  # e.g. mid-rename: try again
                self._show_problem(f"waiting: {e}")
            except Exception as e:  # noqa: BLE001 - keep serving; the page shows the error
                self._show_problem(f"error (a bug in rf): {type(e).__name__}: {e}")

    def _show_problem(self, text: str) -> None:
        self.status_line = (text.strip().splitlines() or [""])[0][:300]
        self._status.content = self.status_line

    def _changed(self, name: str, key: object) -> bool:
        if self._keys.get(name) == key:
            return False
        self._keys[name] = key
        return True

    def _update_mesh(self, files: RunFiles) -> bool:
        if files.mesh is not None:
            if not self._changed("mesh", ("file", str(files.mesh), _mtime(files.mesh))):
                return False
            self._show_mesh(read_mesh(files.mesh), files.mesh.name)
            return True
        if files.checkpoint is None:
            return False
        ckpt = files.checkpoint
        key = ("checkpoint", str(ckpt), _mtime(ckpt / "manifest.json"), checkpoint_step(ckpt))
        if not self._changed("mesh", key):
            return False
        try:
            mesh, step = mesh_from_checkpoint(ckpt, self.cfg.mesh_resolution, self.cfg.device)
        except CheckpointError:  # replaced while it was read: read it again next poll
            self._keys.pop("mesh", None)
            return False
        except ValueError as e:  # no surface yet: wait for a newer checkpoint
            self.mesh_source = f"checkpoint step {key[-1]}: {str(e).splitlines()[0]}"
            return False
        self._show_mesh(mesh, f"checkpoint step {step}")
        return True

    def _show_mesh(self, mesh: trimesh.Trimesh, source: str) -> None:
        self.server.scene.add_mesh_trimesh("/mesh", mesh)  # replaces the node of that name
        self.mesh, self.mesh_source = mesh, source

    def _update_input(self, files: RunFiles) -> bool:
        c = files.config.recon.camera
        photo = files.photo
        key = (str(photo), _mtime(photo) if photo else None, c.input_radius,
               c.input_elevation, c.input_azimuth, c.input_fov)
        if not self._changed("input", key):
            return False
        image = None
        if photo is not None:
            from PIL import Image

            with Image.open(photo) as im:
                image = np.asarray(im.convert("RGB"))
        wxyz, position = camera_frame(input_pose(files.config))
        self.server.scene.add_camera_frustum(
            "/input_camera", fov=np.radians(c.input_fov), aspect=1.0,
            scale=self.cfg.frustum_scale * 1.6, color=INPUT_COLOR, image=image, wxyz=wxyz,
            position=position)
        return True

    def _update_orbit(self, files: RunFiles) -> bool:
        orbit = files.orbit
        if not self._changed("orbit", (str(orbit), _mtime(orbit) if orbit else None)):
            return False
        for handle in self._orbit_handles + self._orbit_gui:
            handle.remove()
        self._orbit_handles, self._orbit_gui, self.orbit_frames = [], [], None
        if orbit is None:
            return True
        frames, poses = read_orbit(orbit, files.config)
        fov = np.radians(files.config.recon.camera.input_fov)
        for i, (frame, c2w) in enumerate(zip(frames, poses)):
            wxyz, position = camera_frame(c2w)
            self._orbit_handles.append(self.server.scene.add_camera_frustum(
                f"/orbit/view_{i:03d}", fov=fov, aspect=1.0, scale=self.cfg.frustum_scale,
                color=ORBIT_COLOR, image=frame, wxyz=wxyz, position=position))
        self.orbit_frames = frames
        self._add_orbit_gui(frames, poses, fov)
        return True

    def _add_orbit_gui(self, frames: np.ndarray, poses: np.ndarray, fov: float) -> None:
        gui = self.server.gui
        folder = gui.add_folder("Orbit views")
        with folder:
            show = gui.add_checkbox("show orbit cameras", True)
            slider = gui.add_slider("view", min=0, max=max(1, len(frames) - 1), step=1,
                                    initial_value=0, disabled=len(frames) < 2)
            image = gui.add_image(frames[0], label="orbit view 0")
            look = gui.add_button("look through this view")
        self._orbit_gui = [folder]
        handles = self._orbit_handles

        @show.on_update
        def _(_event) -> None:
            for h in handles:
                h.visible = show.value

        @slider.on_update
        def _(_event) -> None:
            i = int(slider.value)
            image.image, image.label = frames[i], f"orbit view {i}"
            for j, h in enumerate(handles):
                h.color = SELECTED_COLOR if j == i else ORBIT_COLOR

        @look.on_click
        def _(event) -> None:
            eye = poses[int(slider.value)][:3, 3]
            for client in ([event.client] if event.client else
                           self.server.get_clients().values()):
                with client.atomic():
                    client.camera.fov = fov
                    client.camera.position = tuple(eye)
                    client.camera.look_at = (0.0, 0.0, 0.0)

    def _show_status(self, files: RunFiles) -> None:
        mesh = (f"{self.mesh_source} ({len(self.mesh.vertices)} vertices)" if self.mesh
                is not None else self.mesh_source or "none yet")
        orbit = len(self.orbit_frames) if self.orbit_frames is not None else 0
        self.status_line = (f"**{self.run.name}** ({files.state})  \nmesh: {mesh}  \n"
                            f"orbit views: {orbit}  \nupdated {time.strftime('%H:%M:%S')}")
        self._status.content = self.status_line

    # ------------------------------------------------------------------ lifetime
    def serve(self, seconds: float | None = None) -> None:
        """Block until ``seconds`` have passed (None: until interrupted) or :meth:`close`."""
        self._stop.wait(seconds)

    def close(self) -> None:
        """Stop following and stop the server."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.server.stop()

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
