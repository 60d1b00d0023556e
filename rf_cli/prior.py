"""`rf prior train`: train the learned novel-view prior on the project's own rendered objects.

Thin: builds the configs, builds the training data when it is missing, and calls
:func:`rf_core.prior.novel_view.train.train`, which resumes a run folder of its own.
"""

from __future__ import annotations

from pathlib import Path

from rf_cli.args import add_overrides, examples

__all__ = ["DEFAULT_DATA", "add_commands", "cmd_prior_train"]

DEFAULT_DATA = "outputs/novel_view_data"
"""Where the training pairs are built when no --data is given: ``DEFAULT_DATA/<size>px``."""


def cmd_prior_train(args) -> int:
    import torch

    from rf_core.config import load_config, to_dict
    from rf_core.files.run_folder import check_output_path
    from rf_core.prior.novel_view.train import TrainConfig, check_resume, previous_config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    base, run = previous_config(out) or ({}, {})  # refuses a folder that is not a run of ours
    flags = {"model.kind": args.kind, "model.size": args.size, "steps": args.steps,
             "max_minutes": args.max_minutes, "seed": args.seed}
    data_overrides = [o.split(".", 1)[1] for o in args.overrides if o.startswith("data.")]
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + \
        [o for o in args.overrides if not o.startswith("data.")]
    cfg = load_config(TrainConfig, base=base, files=args.config, overrides=overrides)
    size = cfg.model.size
    data_dir = Path(args.data or run.get("data_folder") or Path(DEFAULT_DATA) / f"{size}px")
    check_output_path(out, inputs=[data_dir])
    check_resume(out, cfg)  # before the data is built: that may take long

    from rf_core.prior.novel_view.data import NovelViewDataConfig, build_dataset

    data_cfg = load_config(NovelViewDataConfig, base=run.get("data") if not args.data else None,
                           overrides=[*data_overrides, f"size={size}"])  # data.size is --size
    built = Path(build_dataset(data_dir, data_cfg, print))  # the folder or its manifest
    data_dir = built.parent if built.is_file() else built
    result = train(out, data_dir, cfg, print, data_summary=to_dict(data_cfg),
                   threads=torch.get_num_threads())
    print(f"wrote {result.model_dir} and {result.out_dir / 'MODEL_CARD.md'}"
          + ("" if result.stopped == "finished" else
             f" (stopped by the time budget at step {result.step}/{cfg.steps}: rerun the same "
             "command to continue)"))
    return 0


def add_commands(sub) -> None:
    """Add `rf prior` and its subcommands to ``sub`` (the `rf` subparsers)."""
    prior = sub.add_parser("prior", help="the learned novel-view prior: train it")
    psub = prior.add_subparsers(dest="prior", required=True)
    p = psub.add_parser(
        "train", help="train the novel-view model on rendered objects (resumable)",
        description="Train the novel-view model (Zero-1-to-3's form) on pairs of views of "
        "objects the project renders itself; builds the pairs when --data is missing. Rerun "
        "with the same --out to resume; KEY=VALUE sets a TrainConfig field (data.KEY=VALUE "
        "one of the data config).",
        **examples("rf prior train --out outputs/novel_view_prior --threads 2",
                   "rf prior train --out outputs/nv_diffusion --kind diffusion --steps 3000 "
                   "ema_decay=0.999"))
    p.add_argument("--out", required=True, help="run folder: checkpoint, curve.csv, model/, "
                   "MODEL_CARD.md (an earlier run's folder resumes it)")
    p.add_argument("--data", help=f"training pairs folder, built there if missing (default: "
                   f"the earlier run's, else {DEFAULT_DATA}/<size>px)")
    p.add_argument("--kind", choices=["regressor", "diffusion"], help="model kind (default "
                   "regressor)")
    p.add_argument("--size", type=int, help="image size in pixels (default 32; 64 allowed)")
    p.add_argument("--steps", type=int, help="optimizer steps in all (default 1600)")
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this many minutes "
                   "(checkpoint, model and card written; rerun to continue)")
    p.add_argument("--seed", type=int, help="seed of weights, batch order and noise (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_overrides(p, "lr=2e-3")
    p.set_defaults(func=cmd_prior_train)
