"""`rf bench ...`: the benchmarks of rf_bench. Each handler parses, runs one benchmark, prints
its table and says where the JSON went."""

from __future__ import annotations

import sys

from rf_cli.args import add_overrides

__all__ = ["add_commands", "cmd_bench_dataset", "cmd_bench_gpu_check", "cmd_bench_hashgrid",
           "cmd_bench_multiview", "cmd_bench_novel_view", "cmd_bench_prior", "cmd_bench_sharing",
           "cmd_bench_singleview", "cmd_bench_step"]


def _wrote(path: str | None) -> None:
    if path:
        print(f"wrote {path}")


def cmd_bench_multiview(args) -> int:
    from rf_bench.multiview import MultiviewConfig, format_result, run_multiview
    from rf_core.config import load_config

    flags = {"size": args.size, "train_views": args.train_views, "test_views": args.test_views,
             "minutes": args.minutes, "steps": args.steps, "up_axis": args.up_axis}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = load_config(MultiviewConfig, files=args.config, overrides=overrides)
    result = run_multiview(args.mesh, cfg, json_path=args.json, out_dir=args.out)
    print(format_result(result))
    _wrote(args.json)
    return 0


def cmd_bench_hashgrid(args) -> int:
    from rf_bench.hashgrid import run_hashgrid_bench

    run_hashgrid_bench(args.json)
    _wrote(args.json)
    return 0


def cmd_bench_singleview(args) -> int:
    from rf_bench.singleview import run_singleview
    from rf_core.evaluation.metric_registry import HELDOUT_MASK_IOU, HELDOUT_PSNR

    result = run_singleview(args.mesh, args.out, preset=args.preset, views=args.views,
                            size=args.size, overrides=args.overrides, json_path=args.json,
                            prior=args.prior)
    print(result["table"])
    print(f"prior {result['prior']}: held-out PSNR {result[HELDOUT_PSNR]:.2f} dB, mask IoU "
          f"{result[HELDOUT_MASK_IOU]:.3f} ({result['wall_seconds']:.0f} s)")
    _wrote(args.json)
    return 0


def cmd_bench_novel_view(args) -> int:
    from rf_bench.novel_view import format_novel_view_table, run_novel_view_bench

    result = run_novel_view_bench(args.weights, views=args.views, inputs=args.inputs,
                                  out_dir=args.out, json_path=args.json)
    print(format_novel_view_table(result))
    _wrote(args.json)
    return 0


def cmd_bench_sharing(args) -> int:
    from rf_bench.sharing import format_sharing_table, run_sharing_bench

    result = run_sharing_bench(args.trials, args.json, quick=args.quick, part=args.part,
                               requests_per_trial=args.requests)
    print(format_sharing_table(result))
    _wrote(args.json)
    return 0


def cmd_bench_dataset(args) -> int:
    from rf_bench.dataset_cluster import format_dataset_bench, run_dataset_bench

    result = run_dataset_bench(args.objects, args.nodes, args.json, out_dir=args.out,
                               quick=args.quick, schemes=tuple(args.schemes.split(",")),
                               overrides=args.overrides)
    print(format_dataset_bench(result))
    _wrote(args.json)
    return 0 if all(s["exactly_once"] for s in result["schemes"].values()) else 1


def cmd_bench_step(args) -> int:
    from rf_bench.step import format_step_table, run_step_bench

    result = run_step_bench(args.preset, args.model, args.steps, args.device, args.json,
                            overrides=args.overrides, steady_from=args.steady_from)
    print(format_step_table(result))
    _wrote(args.json)
    return 0


def cmd_bench_prior(args) -> int:
    from rf_bench.prior import format_prior_table, run_prior_bench

    result = run_prior_bench(args.json, quick=args.quick)
    print(format_prior_table(result))
    _wrote(args.json)
    return 0


def cmd_bench_gpu_check(args) -> int:
    from rf_bench.gpu_check import GPUCheckUnavailable, format_table, run_gpu_check

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


def add_commands(sub) -> None:
    """Add `rf bench` and its subcommands to ``sub`` (the `rf` subparsers)."""
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
    add_overrides(p, "steps=500")
    p.set_defaults(func=cmd_bench_multiview)

    p = bsub.add_parser("hashgrid", help="points/s of every hash-grid backend vs the reference")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_bench_hashgrid)

    p = bsub.add_parser("singleview", help="reconstruct GT view 0 of a mesh, evaluate the rest")
    p.add_argument("mesh", help="OBJ path or pybullet_data:NAME.obj")
    p.add_argument("--out", default=None, help="GT views and the run go here (default "
                   "outputs/singleview, outputs/singleview_PRIOR for the other priors)")
    p.add_argument("--preset", default="tiny")
    # Checked by the benchmark, not by argparse, so a bad name is one `rf: error:` line.
    p.add_argument("--prior", default="tiny", metavar="tiny|oracle|none|learned|joint",
                   help="what shapes the unseen sides: tiny (random-weight Stable Diffusion, "
                   "today's default), learned (the shipped novel-view model), joint (tiny plus "
                   "learned, Magic123's sum), oracle (ground-truth renders of the same mesh as "
                   "the SDS gradient: an upper bound) or none (no SDS, regularisers only)")
    p.add_argument("--views", type=int, default=9, help="GT views (view 0 is the input)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--json", help="write the result here")
    add_overrides(p, "recon.steps=300")
    p.set_defaults(func=cmd_bench_singleview)

    p = bsub.add_parser("prior-sharing", help="K reconstructions sharing one prior server vs "
                        "K processes with their own prior: memory and SDS requests/s")
    p.add_argument("--trials", type=int, default=4, help="K concurrent reconstructions")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quick", action="store_true", help="tiny model, few requests (smoke test)")
    p.add_argument("--part", choices=("schemes", "inversion", "all"), default="schemes",
                   help="schemes: shared vs separate memory and requests/s; inversion: the K "
                   "trials' SDS latency p50/p95 while one textual inversion runs on the shared "
                   "server (tiny model), vs none; all: both")
    p.add_argument("--requests", type=int, default=None,
                   help="timed SDS requests per trial (default 16, --quick 4)")
    p.set_defaults(func=cmd_bench_sharing)

    p = bsub.add_parser("dataset", help="objects/hour on one node vs a local multi-node "
                        "cluster that loses a node mid-run; exactly-once check in MLflow")
    p.add_argument("--objects", type=int, default=6, help="objects (pybullet meshes, max 6)")
    p.add_argument("--nodes", type=int, default=3, help="worker nodes of one CPU each")
    p.add_argument("--out", default="outputs/bench_dataset", help="inputs and results go here")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quick", action="store_true", help="few steps at 64 px (smoke test)")
    p.add_argument("--schemes", default="single,cluster", help="which of single,cluster to run")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides for every object, after the benchmark's own, "
                   "e.g. recon.steps=12")
    p.set_defaults(func=cmd_bench_dataset)

    p = bsub.add_parser("step", help="what one reconstruction step does, baseline vs "
                        "optimised: grid points, samples, UNet/VAE calls, syncs, memory, time")
    p.add_argument("--preset", default="realfusion")
    p.add_argument("--model", default="tiny", help="prior model (tiny on the CPU, "
                   "sd15-random on a GPU)")
    p.add_argument("--steps", type=int, default=60, help="steps per variant (default 60)")
    p.add_argument("--steady-from", type=int, default=50,
                   help="the steady state is the mean over steps >= this (default 50)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", help="write the result here")
    add_overrides(p, "recon.sds_batch=2")
    p.set_defaults(func=cmd_bench_step)

    p = bsub.add_parser("novel-view", help="the learned novel-view model alone on the "
                        "evaluation objects: PSNR, SSIM, mask IoU vs copying the photo")
    p.add_argument("--weights", default="builtin",
                   help="model folder (default builtin: the shipped weights)")
    p.add_argument("--views", type=int, default=9, help="GT views per object")
    p.add_argument("--inputs", type=int, default=3, help="views taken in turn as the photo")
    p.add_argument("--out", default="outputs/bench_novel_view", help="GT views go here")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_bench_novel_view)

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
