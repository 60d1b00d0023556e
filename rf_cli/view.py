"""`rf view RUN`: a live 3D viewer of a run in the browser (rf_core.jobs.viewer, on viser)."""

from __future__ import annotations

from rf_cli.args import examples

__all__ = ["add_commands", "cmd_view"]

_FLAGS = {"poll_seconds": "--poll", "mesh_resolution": "--mesh-resolution", "port": "--port"}


def cmd_view(args) -> int:
    from rf_core.config import ConfigError, build
    from rf_core.jobs.viewer import Viewer, ViewerConfig

    values = {"host": args.host, "port": args.port, "follow": not args.no_follow,
              "poll_seconds": args.poll, "mesh_resolution": args.mesh_resolution}
    try:
        cfg = build(ViewerConfig, values)
    except ConfigError as e:  # name the flag, not the config field
        text = str(e)
        for field, flag in _FLAGS.items():
            text = text.replace(f"{field}:", f"{flag}:")
        raise ConfigError(text) from None
    viewer = Viewer(args.run, cfg)
    try:
        follow = f"following it every {cfg.poll_seconds:g} s" if cfg.follow else "not following"
        print(f"rf view: {args.run} at {viewer.url} ({follow}; Ctrl-C to stop)", flush=True)
        viewer.serve(args.seconds)
    except KeyboardInterrupt:
        pass  # the usual way to stop a viewer, not an interrupted job
    finally:
        viewer.close()
    return 0


def add_commands(sub) -> None:
    """Add `rf view` to ``sub`` (the `rf` subparsers)."""
    p = sub.add_parser("view", help="live 3D viewer of a run: mesh, cameras, orbit, checkpoints",
                       **examples("rf view outputs/duck --port 8080"))
    p.add_argument("run", help="run folder from `rf reconstruct --out` (finished or still "
                   "training), or a sweep trial's export folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 serves every interface, without authentication)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; the next free "
                   "one when taken)")
    p.add_argument("--no-follow", action="store_true", help="show the folder once; do not "
                   "poll it for newer checkpoints")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls while "
                   "following (default 2)")
    p.add_argument("--mesh-resolution", type=int, default=64, help="marching-cubes grid for "
                   "meshes extracted from checkpoints (default 64)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: run "
                   "until Ctrl-C)")
    p.set_defaults(func=cmd_view)
