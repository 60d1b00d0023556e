"""One reconstruction, start to end: `rf render-gt`, `invert`, `reconstruct`, `export`,
`evaluate`. Each handler parses, calls rf_core, prints."""

from __future__ import annotations

import sys
from pathlib import Path

from rf_cli.args import (
    add_overrides,
    choose_preset,
    examples,
    note_paper_on_cpu,
    note_random_weights,
)
from rf_core.errors import UserError

__all__ = ["add_commands", "cmd_evaluate", "cmd_export", "cmd_invert", "cmd_reconstruct",
           "cmd_render_gt"]


def cmd_render_gt(args) -> int:
    from rf_core.ground_truth.gt_render import render_gt

    out = render_gt(args.mesh, args.out, views=args.views, size=args.size, radius=args.radius,
                    fov=args.fov, up_axis=args.up_axis, overwrite=args.overwrite)
    print(f"wrote {args.views} views of {args.mesh} to {out}")
    return 0


def cmd_invert(args) -> int:
    from rf_core.config import load_config
    from rf_core.jobs.invert_job import InvertJobConfig, invert_image

    init = [f"inversion.initializer={args.initializer}"] if args.initializer else []
    cfg = load_config(InvertJobConfig, files=args.config,
                      overrides=[f"model.name={args.model}", *init, *args.overrides])
    note_random_weights(cfg.model.name)
    result = invert_image(args.image, args.mask, args.out, cfg)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    tail = result.losses[-50:]
    print(f"learned {result.token} in {len(result.losses)} steps{resumed}; "
          f"mean loss over the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
    print(f"wrote {args.out}")
    return 0


def cmd_reconstruct(args) -> int:
    from rf_core.evaluation.metric_registry import INPUT_MASK_IOU, INPUT_PSNR, TOTAL_SECONDS
    from rf_core.jobs.job_config import load_job_config
    from rf_core.jobs.reconstruct_job import reconstruct
    from rf_core.prior.registry import needs_inversion

    if args.embedding and args.invert:
        raise UserError("pass either --embedding or --invert, not both")
    overrides = [f"model.name={args.model}"] if args.model else []
    if args.initializer:
        overrides.append(f"inversion.initializer={args.initializer}")
    if args.embedding:
        overrides.append(f"embedding={args.embedding}")
    preset = choose_preset(args.preset, args.model)
    cfg = load_job_config(preset, args.config, overrides + args.overrides)
    note_random_weights(cfg.model.name)
    invert = args.invert
    if invert and not needs_inversion(cfg.model):
        print(f"rf: note: the {cfg.model.type} prior reads no text, so there is no token to "
              "learn: --invert skipped", file=sys.stderr)
        invert = False
    note_paper_on_cpu(preset, cfg.device, cfg.recon.steps,
                      cfg.inversion.steps if invert else 0)
    result = reconstruct(args.image, args.mask, args.out, cfg, learn_embedding=invert,
                         overwrite=args.overwrite)
    print(f"input view: PSNR {result[INPUT_PSNR]:.2f} dB, mask IoU "
          f"{result[INPUT_MASK_IOU]:.3f} after {result['steps']} steps "
          f"({result[TOTAL_SECONDS]:.0f} s)")
    print(f"wrote {args.out}: orbit.mp4, orbit.gif, mesh.glb, mesh.obj, metrics.json")
    return 0


def cmd_export(args) -> int:
    from rf_core.config import build, deep_merge, parse_override, to_dict
    from rf_core.jobs.export_job import export_folder
    from rf_core.jobs.run_loading import run_config
    from rf_core.output.export import ExportConfig

    data = to_dict(run_config(args.run).export)
    for o in args.overrides:
        data = deep_merge(data, parse_override(o))
    written = export_folder(args.run, build(ExportConfig, data))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_evaluate(args) -> int:
    from rf_core.jobs.evaluate_run import evaluate_run

    report, text = evaluate_run(args.run, args.gt, input_view=args.input_view)
    print(text)
    print(f"wrote {Path(args.run) / 'evaluation.json'}")
    return 0


def add_commands(sub) -> None:
    """Add this group's subcommands to ``sub`` (the `rf` subparsers)."""
    p = sub.add_parser("render-gt", help="render a textured OBJ into ground-truth views",
                       **examples("rf render-gt pybullet_data:duck.obj --out outputs/gt/duck "
                                  "--views 9 --size 128"))
    p.add_argument("mesh", help="OBJ path (with its .mtl and texture) or pybullet_data:NAME.obj")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--views", type=int, default=32, help="number of views (default 32)")
    p.add_argument("--size", type=int, default=128, help="image width and height (default 128)")
    p.add_argument("--radius", type=float, default=3.0, help="camera distance (default 3)")
    p.add_argument("--fov", type=float, default=40.0, help="vertical fov, degrees (default 40)")
    p.add_argument("--up-axis", default="y", choices=["y", "z"], help="mesh up axis (default y)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_render_gt)

    p = sub.add_parser("invert", help="single-image textual inversion: learn a token for a photo",
                       **examples("rf invert examples/duck.png --model tiny --initializer duck "
                                  "--out outputs/duck.safetensors inversion.steps=100"))
    p.add_argument("image", help="photo: RGBA, or RGB with --mask")
    p.add_argument("--mask", help="object mask (white = object), if the photo has no alpha")
    p.add_argument("--model", required=True,
                   help="diffusers SD folder, .safetensors file, cached hub id, or tiny")
    p.add_argument("--out", required=True, help="embedding file to write (.safetensors)")
    p.add_argument("--initializer", help="one word the token starts from, naming the object's "
                   "kind (e.g. cat, teddy); default: inversion.initializer (object)")
    add_overrides(p, "inversion.steps=300")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("reconstruct", help="RealFusion: one photo -> 360° video and mesh",
                       **examples(
                           "rf reconstruct examples/duck.png --invert --out outputs/duck",
                           "rf reconstruct examples/duck.png --preset tiny --invert --out "
                           "outputs/duck recon.steps=300 recon.weights.entropy=0.01",
                           "rf reconstruct examples/duck.png --model sd15-random --preset "
                           "realfusion --invert --out outputs/duck-paper"))
    p.add_argument("image", help="photo: RGBA, or RGB with --mask")
    p.add_argument("--mask", help="object mask (white = object), if the photo has no alpha")
    p.add_argument("--embedding", help="textual-inversion file from `rf invert` (or the "
                   "authors' learned_embeds.bin)")
    p.add_argument("--invert", action="store_true", help="learn the embedding first")
    p.add_argument("--initializer", help="with --invert: one word the token starts from "
                   "(e.g. cat, teddy); default: inversion.initializer (object)")
    p.add_argument("--model", help="diffusers SD folder, .safetensors, cached hub id, or tiny "
                   "(default: the preset's)")
    p.add_argument("--preset", help="realfusion (the paper's settings: GPU, SD 1.5) or tiny "
                   "(CPU, minutes); default: tiny with --model tiny or without a CUDA GPU, "
                   "else realfusion")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run folder")
    add_overrides(p, "recon.steps=300")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("export", help="re-export a run's orbit video and mesh",
                       **examples("rf export outputs/duck video.frames=120 mesh_resolution=256"))
    p.add_argument("run", help="run folder from `rf reconstruct`")
    add_overrides(p, "video.frames=120")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="compare a run with ground-truth views and mesh",
                       **examples("rf evaluate outputs/duck --gt outputs/gt/duck --input-view 0"))
    p.add_argument("run", help="run folder from `rf reconstruct`")
    p.add_argument("--gt", required=True, help="folder from `rf render-gt`")
    p.add_argument("--input-view", type=int, default=0, help="index of the GT view that was "
                   "the input photo (default 0); the others are held out")
    p.set_defaults(func=cmd_evaluate)
