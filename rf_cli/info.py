"""What rf knows about itself: `rf config show`."""

from __future__ import annotations

import json

from rf_cli.args import examples

__all__ = ["add_commands", "cmd_config_show"]


def cmd_config_show(args) -> int:
    from rf_core.config_doc import config_keys, format_config_keys
    from rf_core.jobs.job_config import ReconstructJobConfig

    keys = config_keys(ReconstructJobConfig, args.preset)
    if args.json:
        print(json.dumps([{"key": k.key, "value": k.value, "type": k.type, "help": k.help}
                          for k in keys], indent=2))
    else:
        print(format_config_keys(keys))
    return 0


def add_commands(sub) -> None:
    """Add this group's subcommands to ``sub`` (the `rf` subparsers)."""
    p = sub.add_parser("config", help="list every config key with its value and help",
                       **examples("rf config show --preset realfusion"))
    actions = p.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="every key `rf reconstruct KEY=VALUE` accepts, with "
                              "its value under a preset and its help")
    show.add_argument("--preset", help="values of this preset (realfusion, tiny; default: the "
                      "built-in defaults)")
    show.add_argument("--json", action="store_true", help="a JSON list of {key, value, type, "
                      "help}")
    show.set_defaults(func=cmd_config_show)
