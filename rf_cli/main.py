"""`rf`: the command line. Thin: parse, build configs, call the library, report.

The commands live in one module per group (run_commands, distributed, bench); this module
assembles the parser and is the error boundary: libraries raise, only here do errors become
one line and an exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rf_cli import bench, distributed, info, prior, run_commands, view
from rf_core.errors import UserError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"rf: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("realfusion-ray")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The `rf` parser: every command group's subcommands, in help order."""
    parser = _Parser(
        prog="rf", description=__doc__.splitlines()[0],
        epilog="Every command also takes --debug: print the traceback of an unexpected error.")
    parser.add_argument("--version", action="version", version=f"rf {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (run_commands, view, distributed, info, bench, prior):
        group.add_commands(sub)
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


_CHATTY_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")
"""Libraries' INFO lines that say nothing to a user (MLflow creating its sqlite tables)."""


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command, and turn every exception into one line and an exit status:
    2 for the user's errors (UserError, and OSError from their filesystem), 1 for bugs,
    130 for Ctrl-C."""
    import logging

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
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
    # One line per command about a random-weight model or an unusable GPU: the libraries set
    # these once said; they are cleared after the command unless a caller had set them.
    noted = {name: os.environ.get(name) for name in ("RF_RANDOM_NOTED", "RF_GPU_NOTED")}
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
    finally:  # the command's notes cover its own process and workers, not a caller's next call
        for name, value in noted.items():
            if value is None:
                os.environ.pop(name, None)


if __name__ == "__main__":
    sys.exit(main())
