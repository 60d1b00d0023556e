"""The ``rf.*`` MLflow tag names live in one module, ``rf_distributed/tracking/tags.py``; and
one rule, :func:`trial_status`, tells a finished trial from a stopped one."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from rf_distributed.tracking import tags as rf_tags
from rf_distributed.tracking.tags import trial_status

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rf_core", "rf_distributed", "rf_cli", "rf_bench")
TAGS_MODULE = ROOT / "rf_distributed" / "tracking" / "tags.py"
TAG = re.compile(r"rf\.[a-z_][a-z_.]*")
IN_FILTER = re.compile(r"tags\.`rf\.")


def _tag_literals(path: Path) -> list[str]:
    """``file:line: text`` of each string that is a tag name (``"rf.status"``) or names one
    in an MLflow filter (``"tags.`rf.kind` = 'trial'"``); prose that mentions a tag does not
    count."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type != tokenize.STRING:
            continue
        prefix = tok.string[:tok.string.index(tok.string[-1])].lower()
        plain = "f" not in prefix and TAG.fullmatch(str(ast.literal_eval(tok.string)) or "")
        if plain or IN_FILTER.search(tok.string):
            found.append(f"{path.name}:{tok.start[0]}: {tok.string}")
    return found


def test_no_rf_tag_literal_outside_the_tags_module():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
             if p != TAGS_MODULE]
    assert len(files) > 50
    found = [hit for p in files for hit in _tag_literals(p)]
    assert not found, ("write these as rf_distributed.tracking.tags constants:\n"
                       + "\n".join(found))


def test_the_checker_sees_literals_and_filters(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('X = {"rf.kind": 1}\nY = f"tags.`rf.status` = \'{1}\'"\n'
                     'Z = "rf.kind of runs: any"\n"""Docs name ``rf.kind``."""\n')
    assert [hit.split(":")[1] for hit in _tag_literals(probe)] == ["1", "2"]


def test_every_tag_is_an_rf_name_and_unique():
    names = [getattr(rf_tags, n) for n in rf_tags.__all__
             if n.isupper() and getattr(rf_tags, n).startswith("rf.")]
    assert len(names) == len(set(names)) >= 20 and all(TAG.fullmatch(n) for n in names)


def test_trial_status_one_rule():
    assert trial_status(100, 100) == trial_status(120, 100) == "finished"
    assert trial_status(50, 100) == "stopped"
    assert trial_status(50, 100, exported=True) == "stopped"  # the step count decides
    assert trial_status(None, 100) == "stopped"
    # without the step count, the last report's export/ (written only at the last step)
    assert trial_status(30, None, exported=True) == "finished"
    assert trial_status(20, None) == "stopped"
    assert trial_status("?", 100, exported=True) == "finished"
