"""One way to silence progress: the caller's ``quiet()`` block (per thread, no environment
change), and the user's ``RF_QUIET=1``."""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import threading
from pathlib import Path

import pytest

from rf_core import progress as progress_module
from rf_core.fitting.engine import ProgressBar
from rf_core.prior import loading, zero123_loading
from rf_core.progress import in_quiet_block, is_quiet, progress, quiet

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("rf_core", "rf_distributed", "rf_cli", "rf_bench")


@pytest.fixture(autouse=True)
def _no_user_switch(monkeypatch):
    monkeypatch.delenv("RF_QUIET", raising=False)  # CI sets it; these tests set it themselves
    monkeypatch.delenv("RF_RANDOM_NOTED", raising=False)


def _bar_shown() -> bool:
    bar = progress(3, "test", file=io.StringIO())
    try:
        return not bar.disable
    finally:
        bar.close()


def test_a_bar_is_disabled_inside_quiet_and_shown_outside():
    assert _bar_shown() and not is_quiet()
    with quiet():
        assert not _bar_shown() and is_quiet() and in_quiet_block()
        assert "RF_QUIET" not in os.environ  # the block changes no environment variable
    assert _bar_shown() and not is_quiet()


def test_the_fitting_loops_bar_follows_quiet():
    recon = type("Recon", (), {"step_count": 0})()
    for silent in (False, True):
        bar = ProgressBar(4)
        with quiet() if silent else contextlib.nullcontext():
            bar.on_start(recon)
        assert bar.bar.disable is silent
        bar.close()


def test_nested_blocks_restore_the_outer_state():
    with quiet():
        with quiet():
            assert is_quiet()
        assert is_quiet()  # the inner block's end leaves the outer one quiet
    assert not is_quiet()


def test_the_state_comes_back_after_an_error_in_the_block():
    with pytest.raises(RuntimeError), quiet():
        raise RuntimeError("boom")
    assert not is_quiet()


def test_another_thread_is_not_silenced_by_this_threads_block():
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def other() -> None:
        entered.wait(10)
        seen["quiet"], seen["bar"] = is_quiet(), _bar_shown()
        checked.set()

    thread = threading.Thread(target=other)
    thread.start()
    with quiet():
        entered.set()
        assert checked.wait(10)
        assert is_quiet()
    thread.join(10)
    assert seen == {"quiet": False, "bar": True}


def test_a_block_in_another_thread_does_not_silence_this_one():
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with quiet():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(10)
        assert not is_quiet() and _bar_shown()
    finally:
        release.set()
        thread.join(10)


def test_rf_quiet_in_the_environment_silences_everything(monkeypatch):
    monkeypatch.setenv("RF_QUIET", "1")
    assert is_quiet() and not _bar_shown()
    assert not in_quiet_block()  # the user's switch is not the caller's block
    with quiet():
        assert not _bar_shown()
    assert not _bar_shown()
    monkeypatch.setenv("RF_QUIET", "0")
    assert _bar_shown()


@pytest.mark.parametrize("module, note, noted", [
    (loading, "_note_random_weights", "_noted_random"),
    (zero123_loading, "_note_random", "_noted"),
])
def test_the_loaders_note_respects_quiet(module, note, noted, caplog, monkeypatch):
    def notes() -> list[str]:
        return [r.getMessage() for r in caplog.records if "RANDOM weights" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger=module.__name__):
        monkeypatch.setattr(module, noted, set())
        with quiet():
            getattr(module, note)("tiny")
        assert not notes()
        getattr(module, note)("tiny")  # outside the block: said once
        assert len(notes()) == 1 and "'tiny'" in notes()[0]
        caplog.clear()
        monkeypatch.setattr(module, noted, set())
        monkeypatch.setenv("RF_QUIET", "1")
        getattr(module, note)("tiny")
        assert not notes()


def test_progress_context_is_gone():
    assert not hasattr(progress_module, "progress_context")


# ---------------------------------------------------------------------------- source scans
def _library_sources():
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _is_os_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id == "os")


def _names_rf_quiet(node: ast.AST) -> bool:
    """A literal "RF_QUIET", the ``QUIET_ENV`` name, or a dict/call holding either."""
    return any((isinstance(n, ast.Constant) and n.value == "RF_QUIET")
               or (isinstance(n, ast.Name) and n.id == "QUIET_ENV")
               or (isinstance(n, ast.Attribute) and n.attr == "QUIET_ENV")
               for n in ast.walk(node))


def _rf_quiet_writes(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Subscript) and _is_os_environ(node.value)
                and isinstance(node.ctx, (ast.Store, ast.Del)) and _names_rf_quiet(node.slice)):
            lines.append(node.lineno)  # os.environ["RF_QUIET"] = ... / del os.environ[...]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            writes = (_is_os_environ(func.value)
                      and func.attr in ("setdefault", "pop", "update", "__setitem__",
                                        "__delitem__", "clear"))
            writes |= (isinstance(func.value, ast.Name) and func.value.id == "os"
                       and func.attr in ("putenv", "unsetenv"))
            if writes and any(_names_rf_quiet(a) for a in [*node.args, *node.keywords]):
                lines.append(node.lineno)
    return lines


def test_no_library_module_writes_rf_quiet():
    bad = [f"{path.relative_to(ROOT)}:{line}" for path, tree in _library_sources()
           for line in _rf_quiet_writes(tree)]
    assert not bad, f"RF_QUIET is the user's switch; use rf_core.progress.quiet(): {bad}"
    # and only rf_core.progress reads it
    readers = sorted({str(path.relative_to(ROOT)) for path, tree in _library_sources()
                      if any(isinstance(n, ast.Constant) and n.value == "RF_QUIET"
                             for n in ast.walk(tree))})
    assert readers == ["rf_core/progress.py"], readers


def test_the_write_scan_finds_a_write():
    for code in ('os.environ["RF_QUIET"] = "1"', 'del os.environ["RF_QUIET"]',
                 'os.environ.pop("RF_QUIET", None)', 'os.environ.update({"RF_QUIET": "1"})',
                 'os.environ.setdefault(QUIET_ENV, "1")'):
        assert _rf_quiet_writes(ast.parse(code)), code
    assert not _rf_quiet_writes(ast.parse('x = os.environ.get("RF_QUIET") == "1"'))


def test_no_library_function_takes_a_switch_for_its_progress():
    """No ``show_progress``, and no boolean ``progress`` or ``quiet`` (``progress=print``, a
    callable for lines, is not a switch)."""
    bad = []
    for path, tree in _library_sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                args = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                defaults = dict(zip([x.arg for x in args][::-1],
                                    [*a.defaults[::-1], *[None] * len(args)]))
                defaults.update({x.arg: d for x, d in zip(a.kwonlyargs, a.kw_defaults)})
                for x in args:
                    default = defaults.get(x.arg)
                    boolean = (isinstance(default, ast.Constant)
                               and isinstance(default.value, bool)) or (
                        isinstance(x.annotation, ast.Name) and x.annotation.id == "bool")
                    if x.arg == "show_progress" or (x.arg in ("progress", "quiet") and boolean):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({x.arg})")
    assert not bad, f"wrap the call in rf_core.progress.quiet() instead: {bad}"
