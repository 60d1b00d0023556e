"""Argument helpers shared by the command groups."""

from __future__ import annotations

import argparse

__all__ = ["add_overrides"]


def add_overrides(p: argparse.ArgumentParser) -> None:
    """Give a command ``--config YAML`` (repeatable) and trailing ``KEY=VALUE`` overrides."""
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="YAML preset(s), merged in order before the overrides")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. field.grid.log2_hashmap_size=18")
