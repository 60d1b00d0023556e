"""`rf`'s error boundary: the user's errors are one line (exit 2), bugs are one line plus a
saved traceback (exit 1), Ctrl-C is 130; `--debug` shows the traceback."""

from __future__ import annotations

import pytest

import rf_cli.main as cli
import rf_cli.run_commands as commands
from rf_core.config import ConfigError


def _raise(err):
    def command(args):
        raise err
    return command


@pytest.fixture
def patched(monkeypatch, tmp_path):
    monkeypatch.setenv("RF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RF_DEBUG", raising=False)

    def use(err):
        monkeypatch.setattr(commands, "cmd_evaluate", _raise(err))
    return use


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_user_errors_are_one_line(patched, capsys):
    patched(ConfigError("recon.steps: must be >= 1, got 0"))
    code, out, err = _run(["evaluate", "run", "--gt", "gt"], capsys)
    assert code == 2 and out == ""
    assert err == "rf: error: recon.steps: must be >= 1, got 0\n"


def test_os_errors_are_one_line(patched, capsys):
    patched(OSError(28, "No space left on device"))
    code, _, err = _run(["evaluate", "run", "--gt", "gt"], capsys)
    assert code == 2 and err == "rf: error: [Errno 28] No space left on device\n"


def test_a_bug_is_one_line_and_a_saved_traceback(patched, capsys, tmp_path):
    patched(KeyError("frames"))  # a plain ValueError/KeyError is a bug now, not a user error
    code, _, err = _run(["evaluate", "run", "--gt", "gt"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("rf: internal error (a bug in rf): KeyError: 'frames'")
    saved = list((tmp_path / "cache" / "errors").glob("rf-evaluate-*.txt"))
    assert len(saved) == 1 and lines[0].count(str(saved[0])) == 1
    text = saved[0].read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'frames'" in text
    assert "--debug" in lines[0]


def test_debug_prints_the_traceback(patched, capsys):
    patched(ValueError("boom"))
    code, _, err = _run(["evaluate", "run", "--gt", "gt", "--debug"], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and "ValueError: boom" in err


def test_interrupt_is_130_and_one_line(patched, capsys):
    patched(KeyboardInterrupt())
    code, _, err = _run(["evaluate", "run", "--gt", "gt"], capsys)
    assert code == 130 and err.strip().splitlines() == [
        "rf: interrupted; rerun the same command to resume"]
