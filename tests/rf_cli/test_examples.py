"""Every example `rf` shows (the ``examples:`` of each command's --help, the ``e.g.`` of its
overrides) and every `rf` / `make` line in the README's code blocks is checked: it parses, its
overrides build the command's config (under the preset it picks), its input files exist (or
are made by a Makefile target), and the cheap ones (`rf config show`, `rf --version`) run."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from rf_cli.args import choose_preset
from rf_cli.main import build_parser, main
from rf_core.config import build, deep_merge, load_config, parse_override, to_dict

ROOT = Path(__file__).resolve().parents[2]
MADE_BY_MAKE = ("outputs/",)  # inputs the Makefile's targets create (example objects, runs)


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple = ()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def help_examples() -> list[str]:
    out = []
    for _, parser in _subparsers(build_parser()):
        lines = (parser.epilog or "").splitlines()
        out += [ln.strip() for ln in lines if ln.strip().startswith("rf ")]
    return out


def help_overrides() -> list[tuple[tuple, str]]:
    """(command path, the override its help gives as an example)."""
    out = []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if action.dest == "overrides":
                match = re.search(r"e\.g\. (\S+=\S+)", action.help or "")
                assert match, f"rf {' '.join(path)}: overrides help has no example"
                out.append((path, match.group(1)))
    return out


def readme_lines(prefix: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(prefix):
                lines.append(line)
    return lines


def _input_exists(path: str) -> None:
    if path.startswith("pybullet_data:") or path.startswith(MADE_BY_MAKE):
        return
    assert (ROOT / path).exists(), f"example input {path} does not exist"


def _config_for(command: tuple, args) -> None:
    """Build the config the command would build from its preset, files and overrides."""
    name = command[0]
    overrides = list(getattr(args, "overrides", []))
    if name in ("reconstruct", "dataset"):
        from rf_core.jobs.job_config import load_job_config

        preset = choose_preset(args.preset, args.model, gpu_here=False)
        model = [f"model.name={args.model}"] if args.model else []
        load_job_config(preset, args.config, model + overrides)
    elif command[:2] == ("prior", "train"):
        from rf_core.prior.novel_view.train import TrainConfig

        load_config(TrainConfig, files=args.config,
                    overrides=[o for o in overrides if not o.startswith("data.")])
    elif name == "invert":
        from rf_core.jobs.invert_job import InvertJobConfig

        load_config(InvertJobConfig, files=args.config,
                    overrides=[f"model.name={args.model}", *overrides])
    elif name == "export":
        from rf_core.output.export import ExportConfig

        data = to_dict(ExportConfig())
        for o in overrides:
            data = deep_merge(data, parse_override(o))
        build(ExportConfig, data)
    elif command[:2] == ("bench", "multiview"):
        from rf_bench.multiview import MultiviewConfig

        load_config(MultiviewConfig, overrides=overrides)
    elif command[:2] == ("bench", "step"):
        from rf_core.jobs.job_config import load_job_config

        load_job_config(args.preset, args.config, [f"model.name={args.model}", *overrides])
    elif command[:2] == ("bench", "singleview"):
        from rf_core.jobs.job_config import load_job_config

        load_job_config(args.preset, [], overrides)
    elif name == "sweep":
        from rf_distributed.sweep_spec import load_sweep

        load_sweep(ROOT / args.config_file)


def check_example(line: str, capsys) -> None:
    argv = shlex.split(line)[1:]
    if argv in (["--version"], ["--help"]) or argv[:2] == ["config", "show"]:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 0, line
        capsys.readouterr()
        return
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    assert not unknown, f"{line}: unrecognized {unknown}"
    if hasattr(args, "overrides"):
        args.overrides = args.overrides + extra
    command = tuple(a for a in argv if not a.startswith("-"))[:2]
    for attr in ("image", "input", "config_file", "mesh"):
        if isinstance(getattr(args, attr, None), str):
            _input_exists(getattr(args, attr))
    _config_for(command, args)


@pytest.mark.parametrize("line", help_examples())
def test_every_help_example_is_valid(line, capsys):
    check_example(line, capsys)


@pytest.mark.parametrize("command,override", help_overrides())
def test_every_override_example_in_help_builds(command, override, capsys):
    parser = build_parser()
    # the smallest valid command line of that command, plus its example override
    fillers = {"invert": ["examples/duck.png", "--model", "tiny", "--out", "x.safetensors"],
               "reconstruct": ["examples/duck.png", "--preset", "tiny", "--out", "x"],
               "export": ["outputs/x"], "dataset": ["outputs/x", "--out", "y"],
               "multiview": ["pybullet_data:duck.obj"], "singleview": ["pybullet_data:duck.obj"],
               "step": [], "train": ["--out", "x"]}
    argv = [*command, *fillers[command[-1]], override]
    args, extra = parser.parse_known_args(argv)
    args.overrides = args.overrides + extra
    _config_for(command, args)


def test_a_wrong_override_example_would_fail(capsys):
    """The check is real: the key the old help showed (field.grid...) is rejected."""
    with pytest.raises(Exception, match="field"):
        check_example("rf reconstruct examples/duck.png --preset tiny --out x "
                      "field.grid.log2_hashmap_size=18", capsys)


@pytest.mark.parametrize("line", readme_lines("rf "))
def test_every_rf_line_in_the_readme_is_valid(line, capsys):
    check_example(line, capsys)


@pytest.mark.parametrize("line", readme_lines("make "))
def test_every_make_line_in_the_readme_names_a_target(line):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    for word in shlex.split(line)[1:]:
        if "=" not in word:
            assert word in targets, f"README: `{line}`: no Makefile target {word!r}"
