"""Many reconstructions on a Ray cluster, tracked in MLflow: `rf sweep`, `dataset`, `compare`.
Each handler parses, calls rf_distributed, prints."""

from __future__ import annotations

import sys

from rf_cli.args import add_overrides, choose_preset, examples, note_random_weights
from rf_core.errors import UserError

__all__ = ["add_commands", "cmd_compare", "cmd_dataset", "cmd_sweep"]

_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store " \
                 "outputs/mlflow)"


def cmd_sweep(args) -> int:
    from rf_core.precision import note_unusable_gpu
    from rf_distributed.sweep import format_summary, run_sweep, usable
    from rf_distributed.sweep_spec import load_sweep

    note_unusable_gpu()  # said here, once: the Ray workers inherit that it was

    note_random_weights(load_sweep(args.config_file).base_config().model.name)
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
    from rf_core.jobs.job_config import load_job_config
    from rf_core.precision import note_unusable_gpu
    from rf_distributed.dataset_run import format_dataset_summary, run_dataset

    note_unusable_gpu()  # said here, once: the Ray workers inherit that it was

    # the driver may have no GPU while the cluster's workers do: only --model tiny picks tiny
    preset = choose_preset(args.preset, args.model, gpu_here=True)
    model = ["model.name=" + args.model] if args.model else []
    note_random_weights(load_job_config(preset, args.config, model + args.overrides)
                        .model.name)
    summary = run_dataset(args.input, args.out, preset=preset, model=args.model,
                          config_files=args.config, overrides=args.overrides,
                          address=args.address, tracking_uri=args.tracking_uri,
                          experiment=args.experiment, cpus_per_object=args.cpus_per_object,
                          gpus_per_object=args.gpus_per_object,
                          object_memory_gb=args.object_memory_gb, max_retries=args.retries)
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
        statuses=_any(args.status, ["finished", "stopped"]))
    summary = run_compare(selection, tracking_uri=args.tracking_uri, out_dir=args.out,
                          metrics=args.metrics.split(",") if args.metrics else None,
                          params=args.params.split(",") if args.params else None,
                          sort=args.sort, log_to_mlflow=not args.no_log)
    print(format_compare(summary))
    return 0


def add_commands(sub) -> None:
    """Add this group's subcommands to ``sub`` (the `rf` subparsers)."""
    p = sub.add_parser("sweep", help="Ray Tune sweep over reconstruction settings, in MLflow",
                       **examples("rf sweep tune_configs/default.yaml --resume",
                                  "rf sweep tune_configs/regularizers.yaml"))
    p.add_argument("config_file", metavar="CONFIG.yaml", help="sweep file (tune_configs/*.yaml)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", help=_TRACKING_HELP)
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (e.g. 0.25)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--storage", default="outputs/sweeps", help="Tune results folder")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("dataset", help="reconstruct every object of a folder or manifest on a "
                       "Ray cluster, exactly once, tracked in MLflow",
                       **examples("rf dataset outputs/example_dataset/manifest.jsonl --out "
                                  "outputs/datasets/example --preset tiny recon.steps=300"))
    p.add_argument("input", help="folder of objects (image.png + mask.png per folder, RGBA "
                   "images, or `rf render-gt` folders) or a .csv/.jsonl manifest")
    p.add_argument("--out", required=True, help="results folder (rerun to resume)")
    p.add_argument("--preset", help="realfusion (GPU, SD 1.5) or tiny (default: tiny with "
                   "--model tiny, else realfusion)")
    p.add_argument("--model", help="diffusers SD folder, .safetensors, cached hub id, or tiny "
                   "(default: the preset's)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", help=_TRACKING_HELP)
    p.add_argument("--experiment", help="MLflow experiment (default: dataset-<out folder name>)")
    p.add_argument("--cpus-per-object", type=float, default=1.0, help="CPUs per object task")
    p.add_argument("--gpus-per-object", type=float, default=None,
                   help="GPU fraction per object task (default: on a cluster with GPUs, as "
                   "many objects per GPU as its free memory holds beside the prior; 0 "
                   "without GPUs)")
    p.add_argument("--object-memory-gb", type=float, default=None,
                   help="peak GPU memory of one object, GB, for that count (default: "
                   "estimated from the preset's renderer and field settings; `rf bench step` "
                   "measures it as warmup_peak_mem_gb)")
    p.add_argument("--retries", type=int, default=3,
                   help="re-runs of an object whose worker or node was lost (default 3)")
    add_overrides(p, "recon.steps=300")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("compare", help="compare sweep trials and dataset objects from MLflow: "
                       "table (terminal, CSV, Markdown), plots, a comparison run",
                       **examples("rf compare --experiment default",
                                  "rf compare --experiment default --sort objective "
                                  "--metrics objective,heldout_psnr,heldout_mask_iou"))
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
                   help="rf.status of runs: finished, stopped, failed, error, ... or any (default "
                   "finished and stopped: a trial ASHA stopped early is a result too)")
    p.add_argument("--metrics", help="metric columns, comma-separated (first one is plotted; "
                   "default: the usual quality metrics present)")
    p.add_argument("--params", help="param columns, comma-separated (default: those that "
                   "differ between the runs)")
    p.add_argument("--sort", help="sort by this column (best first for metrics)")
    p.add_argument("--out", default="outputs/compare", help="where table.csv, table.md and "
                   "the plots go (default outputs/compare)")
    p.add_argument("--tracking-uri", help=_TRACKING_HELP)
    p.add_argument("--no-log", action="store_true", help="do not log the comparison as an "
                   "MLflow run")
    p.set_defaults(func=cmd_compare)
