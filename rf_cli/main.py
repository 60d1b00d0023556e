"""`rf`: the command line. Thin: parse, build configs, call the library, report.

Each command lives in one small function; libraries raise, only this module exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rf_core.errors import UserError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="YAML preset(s), merged in order before the overrides")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. field.grid.log2_hashmap_size=18")


def cmd_render_gt(args) -> int:
    from rf_core.gt_render import render_gt

    out = render_gt(args.mesh, args.out, views=args.views, size=args.size, radius=args.radius,
                    fov=args.fov, up_axis=args.up_axis, overwrite=args.overwrite)
    print(f"wrote {args.views} views of {args.mesh} to {out}")
    return 0


def cmd_bench_multiview(args) -> int:
    from rf_core.bench.multiview import MultiviewConfig, format_result, run_multiview
    from rf_core.config import load_config

    flags = {"size": args.size, "train_views": args.train_views, "test_views": args.test_views,
             "minutes": args.minutes, "steps": args.steps, "up_axis": args.up_axis}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = load_config(MultiviewConfig, args.config, overrides)
    result = run_multiview(args.mesh, cfg, json_path=args.json, out_dir=args.out)
    print(format_result(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_bench_hashgrid(args) -> int:
    from rf_core.bench.hashgrid import run_hashgrid_bench

    run_hashgrid_bench(args.json)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_invert(args) -> int:
    from rf_core.config import load_config
    from rf_core.invert_job import InvertJobConfig, invert_image
    from rf_core.prior.random_models import is_random_model

    init = [f"inversion.initializer={args.initializer}"] if args.initializer else []
    cfg = load_config(InvertJobConfig, args.config,
                      [f"model.name={args.model}", *init, *args.overrides])
    if is_random_model(cfg.model.name):
        print(f"rf: note: --model {cfg.model.name} has random weights; the embedding exercises "
              "the pipeline but carries no knowledge of the object", file=sys.stderr)
    result = invert_image(args.image, args.mask, args.out, cfg)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    tail = result.losses[-50:]
    print(f"learned {result.token} in {len(result.losses)} steps{resumed}; "
          f"mean loss over the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
    print(f"wrote {args.out}")
    return 0


def cmd_reconstruct(args) -> int:
    from rf_core.reconstruct_job import load_job_config, reconstruct

    overrides = [f"model.name={args.model}"] if args.model else []
    if args.initializer:
        overrides.append(f"inversion.initializer={args.initializer}")
    if args.embedding:
        overrides.append(f"embedding={args.embedding}")
    cfg = load_job_config(args.preset, args.config, overrides + args.overrides)
    from rf_core.prior.random_models import is_random_model

    if is_random_model(cfg.model.name):
        print(f"rf: note: --model {cfg.model.name} has random weights: the run exercises every "
              "code path, but the prior knows nothing about objects", file=sys.stderr)
    if args.embedding and args.invert:
        raise UserError("pass either --embedding or --invert, not both")
    result = reconstruct(args.image, args.mask, args.out, cfg, learn_embedding=args.invert,
                         overwrite=args.overwrite)
    print(f"input view: PSNR {result['input_psnr']:.2f} dB, mask IoU "
          f"{result['input_mask_iou']:.3f} after {result['steps']} steps "
          f"({result['total_seconds']:.0f} s)")
    print(f"wrote {args.out}: orbit.mp4, orbit.gif, mesh.glb, mesh.obj, metrics.json")
    return 0


def cmd_export(args) -> int:
    from rf_core.config import build, deep_merge, parse_override, to_dict
    from rf_core.reconstruct_job import ExportConfig, export_folder, run_config

    data = to_dict(run_config(args.run).export)
    for o in args.overrides:
        data = deep_merge(data, parse_override(o))
    written = export_folder(args.run, build(ExportConfig, data))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_evaluate(args) -> int:
    from rf_core.evaluate_run import evaluate_run

    report, text = evaluate_run(args.run, args.gt, input_view=args.input_view)
    print(text)
    print(f"wrote {Path(args.run) / 'evaluation.json'}")
    return 0


def cmd_bench_singleview(args) -> int:
    from rf_core.bench.singleview import run_singleview

    result = run_singleview(args.mesh, args.out, preset=args.preset, views=args.views,
                            size=args.size, overrides=args.overrides, json_path=args.json,
                            prior=args.prior)
    print(result["table"])
    print(f"prior {result['prior']}: held-out PSNR {result['heldout_psnr']:.2f} dB, mask IoU "
          f"{result['heldout_mask_iou']:.3f} ({result['wall_seconds']:.0f} s)")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_sweep(args) -> int:
    from rf_distributed.sweep import format_summary, run_sweep, usable

    summary = run_sweep(args.config_file, address=args.address, tracking_uri=args.tracking_uri,
                        gpus_per_trial=args.gpus_per_trial, resume=args.resume,
                        storage=args.storage)
    print(format_summary(summary))
    if usable(summary):
        return 0
    print(f"rf: no trial finished ({summary['errors']} of {summary['trials']} failed): the "
          f"errors are in {summary['folder']}/*/error.txt and in the rf.error tag of the "
          "sweep's trial runs in MLflow", file=sys.stderr)
    return 1


def cmd_dataset(args) -> int:
    from rf_distributed.dataset import format_dataset_summary, run_dataset

    summary = run_dataset(args.input, args.out, preset=args.preset, model=args.model,
                          config_files=args.config, overrides=args.overrides,
                          address=args.address, tracking_uri=args.tracking_uri,
                          experiment=args.experiment, cpus_per_object=args.cpus_per_object,
                          gpus_per_object=args.gpus_per_object, max_retries=args.retries)
    print(format_dataset_summary(summary))
    return 0 if summary["finished"] else 1


def _key_values(pairs: list[str], flag: str) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise UserError(f"{flag} {bad[0]!r} must look like KEY=VALUE")
    return dict(p.split("=", 1) for p in pairs)


def _any(values: list[str] | None, default: list[str]) -> list[str]:
    """``--kind any`` / ``--status any`` select everything (an empty list)."""
    if values is None:
        return default
    return [] if "any" in values else values


def cmd_compare(args) -> int:
    from rf_distributed.compare import CompareSelection, format_compare, run_compare

    selection = CompareSelection(
        experiments=args.experiment, tags=_key_values(args.tag, "--tag"), run_ids=args.run_id,
        filter=args.filter, kinds=_any(args.kind, ["trial", "object"]),
        statuses=_any(args.status, ["finished"]))
    summary = run_compare(selection, tracking_uri=args.tracking_uri, out_dir=args.out,
                          metrics=args.metrics.split(",") if args.metrics else None,
                          params=args.params.split(",") if args.params else None,
                          sort=args.sort, log_to_mlflow=not args.no_log)
    print(format_compare(summary))
    return 0


def cmd_bench_sharing(args) -> int:
    from rf_distributed.bench_sharing import format_sharing_table, run_sharing_bench

    result = run_sharing_bench(args.trials, args.json, quick=args.quick)
    print(format_sharing_table(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_bench_dataset(args) -> int:
    from rf_distributed.bench_dataset import format_dataset_bench, run_dataset_bench

    result = run_dataset_bench(args.objects, args.nodes, args.json, out_dir=args.out,
                               quick=args.quick, schemes=tuple(args.schemes.split(",")))
    print(format_dataset_bench(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(s["exactly_once"] for s in result["schemes"].values()) else 1


def cmd_bench_prior(args) -> int:
    from rf_core.bench.prior import format_prior_table, run_prior_bench

    result = run_prior_bench(args.json, quick=args.quick)
    print(format_prior_table(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_bench_gpu_check(args) -> int:
    from rf_core.bench.gpu_check import GPUCheckUnavailable, format_table, run_gpu_check

    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    try:
        report = run_gpu_check(args.json, args.table, cpu_smoke=args.cpu_smoke,
                               budget_s=args.budget, parts=parts)
    except GPUCheckUnavailable as err:
        print(f"rf: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {args.json} and {args.table}")
    return 0 if report["ok"] else 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"rf: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rf", description=__doc__.splitlines()[0],
        epilog="Every command also takes --debug: print the traceback of an unexpected error.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render-gt", help="render a textured OBJ into ground-truth views")
    p.add_argument("mesh", help="OBJ path (with its .mtl and texture) or pybullet_data:NAME.obj")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--views", type=int, default=32, help="number of views (default 32)")
    p.add_argument("--size", type=int, default=128, help="image width and height (default 128)")
    p.add_argument("--radius", type=float, default=3.0, help="camera distance (default 3)")
    p.add_argument("--fov", type=float, default=40.0, help="vertical fov, degrees (default 40)")
    p.add_argument("--up-axis", default="y", choices=["y", "z"], help="mesh up axis (default y)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_render_gt)

    p = sub.add_parser("invert", help="single-image textual inversion: learn a token for a photo")
    p.add_argument("image", help="photo: RGBA, or RGB with --mask")
    p.add_argument("--mask", help="object mask (white = object), if the photo has no alpha")
    p.add_argument("--model", required=True,
                   help="diffusers SD folder, .safetensors file, cached hub id, or tiny")
    p.add_argument("--out", required=True, help="embedding file to write (.safetensors)")
    p.add_argument("--initializer", help="one word the token starts from, naming the object's "
                   "kind (e.g. cat, teddy); default: inversion.initializer (object)")
    _add_overrides(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("reconstruct", help="RealFusion: one photo -> 360° video and mesh")
    p.add_argument("image", help="photo: RGBA, or RGB with --mask")
    p.add_argument("--mask", help="object mask (white = object), if the photo has no alpha")
    p.add_argument("--embedding", help="textual-inversion file from `rf invert` (or the "
                   "authors' learned_embeds.bin)")
    p.add_argument("--invert", action="store_true", help="learn the embedding first")
    p.add_argument("--initializer", help="with --invert: one word the token starts from "
                   "(e.g. cat, teddy); default: inversion.initializer (object)")
    p.add_argument("--model", help="diffusers SD folder, .safetensors, cached hub id, or tiny "
                   "(default: the preset's)")
    p.add_argument("--preset", default="realfusion", help="realfusion (GPU, SD 1.5) or tiny "
                   "(CPU, minutes); default realfusion")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run folder")
    _add_overrides(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("export", help="re-export a run's orbit video and mesh")
    p.add_argument("run", help="run folder from `rf reconstruct`")
    _add_overrides(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="compare a run with ground-truth views and mesh")
    p.add_argument("run", help="run folder from `rf reconstruct`")
    p.add_argument("--gt", required=True, help="folder from `rf render-gt`")
    p.add_argument("--input-view", type=int, default=0, help="index of the GT view that was "
                   "the input photo (default 0); the others are held out")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="Ray Tune sweep over reconstruction settings, in MLflow")
    p.add_argument("config_file", metavar="CONFIG.yaml", help="sweep file (tune_configs/*.yaml)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else the local store outputs/mlflow)")
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (e.g. 0.25)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--storage", default="outputs/sweeps", help="Tune results folder")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("dataset", help="reconstruct every object of a folder or manifest on a "
                       "Ray cluster, exactly once, tracked in MLflow")
    p.add_argument("input", help="folder of objects (image.png + mask.png per folder, RGBA "
                   "images, or `rf render-gt` folders) or a .csv/.jsonl manifest")
    p.add_argument("--out", required=True, help="results folder (rerun to resume)")
    p.add_argument("--preset", default="realfusion", help="realfusion (GPU, SD 1.5) or tiny")
    p.add_argument("--model", help="diffusers SD folder, .safetensors, cached hub id, or tiny "
                   "(default: the preset's)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else the local store outputs/mlflow)")
    p.add_argument("--experiment", help="MLflow experiment (default: dataset-<out folder name>)")
    p.add_argument("--cpus-per-object", type=float, default=1.0, help="CPUs per object task")
    p.add_argument("--gpus-per-object", type=float, default=None,
                   help="GPU fraction per object task (default: 0.25 on a cluster with GPUs, "
                   "four objects sharing a GPU and its prior; 0 without GPUs)")
    p.add_argument("--retries", type=int, default=3,
                   help="re-runs of an object whose worker or node was lost (default 3)")
    _add_overrides(p)
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("compare", help="compare sweep trials and dataset objects from MLflow: "
                       "table (terminal, CSV, Markdown), plots, a comparison run")
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="MLflow experiment to read (repeatable; default: all)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with this tag value, e.g. rf.dataset=objects (repeatable)")
    p.add_argument("--run-id", action="append", default=[], metavar="ID",
                   help="compare exactly these runs (full ids or unique prefixes; repeatable)")
    p.add_argument("--filter", help="extra MLflow filter, e.g. \"metrics.input_psnr > 25\"")
    p.add_argument("--kind", action="append", metavar="KIND",
                   help="rf.kind of runs: trial, object, sweep, dataset or any "
                   "(repeatable; default trial and object)")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help="rf.status of runs: finished, failed, error, ... or any (default "
                   "finished)")
    p.add_argument("--metrics", help="metric columns, comma-separated (first one is plotted; "
                   "default: the usual quality metrics present)")
    p.add_argument("--params", help="param columns, comma-separated (default: those that "
                   "differ between the runs)")
    p.add_argument("--sort", help="sort by this column (best first for metrics)")
    p.add_argument("--out", default="outputs/compare", help="where table.csv, table.md and "
                   "the plots go (default outputs/compare)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else the local store outputs/mlflow)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison as an "
                   "MLflow run")
    p.set_defaults(func=cmd_compare)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("multiview", help="fit the field to GT renders of a mesh; held-out metrics")
    p.add_argument("mesh", help="OBJ path (with its .mtl and texture) or pybullet_data:NAME.obj")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--out", help="also write held-out renders (GT | prediction) here")
    p.add_argument("--size", type=int)
    p.add_argument("--train-views", type=int)
    p.add_argument("--test-views", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--up-axis", choices=["y", "z"])
    _add_overrides(p)
    p.set_defaults(func=cmd_bench_multiview)

    p = bsub.add_parser("hashgrid", help="points/s of every hash-grid backend vs the reference")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_bench_hashgrid)

    p = bsub.add_parser("singleview", help="reconstruct GT view 0 of a mesh, evaluate the rest")
    p.add_argument("mesh", help="OBJ path or pybullet_data:NAME.obj")
    p.add_argument("--out", default=None, help="GT views and the run go here (default "
                   "outputs/singleview, outputs/singleview_PRIOR for oracle and none)")
    p.add_argument("--preset", default="tiny")
    # Checked by the benchmark, not by argparse, so a bad name is one `rf: error:` line.
    p.add_argument("--prior", default="tiny", metavar="tiny|oracle|none",
                   help="what shapes the unseen sides: tiny (random-weight Stable Diffusion, "
                   "today's default), oracle (ground-truth renders of the same mesh as the SDS "
                   "gradient: an upper bound) or none (no SDS, regularisers only)")
    p.add_argument("--views", type=int, default=9, help="GT views (view 0 is the input)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--json", help="write the result here")
    _add_overrides(p)
    p.set_defaults(func=cmd_bench_singleview)

    p = bsub.add_parser("prior-sharing", help="K reconstructions sharing one prior server vs "
                        "K processes with their own prior: memory and SDS requests/s")
    p.add_argument("--trials", type=int, default=4, help="K concurrent reconstructions")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quick", action="store_true", help="tiny model, few requests (smoke test)")
    p.set_defaults(func=cmd_bench_sharing)

    p = bsub.add_parser("dataset", help="objects/hour on one node vs a local multi-node "
                        "cluster that loses a node mid-run; exactly-once check in MLflow")
    p.add_argument("--objects", type=int, default=6, help="objects (pybullet meshes, max 6)")
    p.add_argument("--nodes", type=int, default=3, help="worker nodes of one CPU each")
    p.add_argument("--out", default="outputs/bench_dataset", help="inputs and results go here")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quick", action="store_true", help="few steps at 64 px (smoke test)")
    p.add_argument("--schemes", default="single,cluster", help="which of single,cluster to run")
    p.set_defaults(func=cmd_bench_dataset)

    p = bsub.add_parser("prior", help="SDS and textual-inversion step times (tiny; SD-1.5 on GPU)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quick", action="store_true", help="batch 1 only, few repeats (smoke test)")
    p.set_defaults(func=cmd_bench_prior)

    p = bsub.add_parser("gpu-check", help="every GPU test and benchmark in one run (<= 8 min on "
                        "one H100/H200): JSON + Markdown table")
    p.add_argument("--json", default="outputs/gpu_check.json",
                   help="JSON report, rewritten after every part (default outputs/gpu_check.json)")
    p.add_argument("--table", default="outputs/gpu_check.md",
                   help="Markdown table (default outputs/gpu_check.md)")
    p.add_argument("--cpu-smoke", action="store_true", help="every part in a tiny CPU "
                   "configuration (no GPU needed): checks the plumbing, not the GPU")
    p.add_argument("--budget", type=float, default=480.0,
                   help="total wall-clock limit in seconds (default 480)")
    p.add_argument("--parts", help="comma-separated subset of hashgrid,attention,reconstruct,"
                   "prior,sharing,pytest (default all)")
    p.set_defaults(func=cmd_bench_gpu_check)
    return parser


def _report_bug(err: BaseException, command: str, debug: bool) -> int:
    """An unexpected exception: one line plus the path of the saved traceback."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    if debug:
        print(text, end="", file=sys.stderr)
    folder = Path(os.environ.get("RF_CACHE", Path.home() / ".cache" / "realfusion-ray"))
    name = f"rf-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path = None
    for where in (folder / "errors", Path(tempfile.gettempdir()) / "rf-errors"):
        try:
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(f"rf {' '.join(sys.argv[1:])}\n\n{text}")
            path = where / name
            break
        except OSError:
            continue
    first = (str(err).strip().splitlines() or [""])[0][:300]
    saved = f"traceback in {path}" if path else "no traceback file could be written"
    print(f"rf: internal error (a bug in rf): {type(err).__name__}: {first} ({saved}; "
          f"rerun with --debug to print it)", file=sys.stderr)
    return 1


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command, and turn every exception into one line and an exit status:
    2 for the user's errors (UserError, and OSError from their filesystem), 1 for bugs,
    130 for Ctrl-C."""
    parser = build_parser()
    # Overrides may sit anywhere among the flags: collect every KEY=VALUE argparse left over.
    args, extra = parser.parse_known_args(argv)
    debug = "--debug" in extra or os.environ.get("RF_DEBUG") == "1"
    extra = [e for e in extra if e != "--debug"]
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = args.overrides + extra
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("rf: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        if debug:
            raise
        print(f"rf: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the error boundary of the command line
        return _report_bug(e, getattr(args, "command", "rf"), debug)


if __name__ == "__main__":
    sys.exit(main())
