"""Fault points: unarmed they do nothing; armed by RF_FAULT_POINT, the Nth arrival signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rf_core.files import fault_points

_SCRIPT = """
import os
from rf_core.files.fault_points import fault_point
print("armed" if "RF_FAULT_POINT" in os.environ else "popped", flush=True)
for name in ("fit.step", "checkpoint.written", "fit.step", "fit.step"):
    print(name, flush=True)
    fault_point(name)
print("survived", flush=True)
"""


def _run(setting: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != fault_points.ENV}
    if setting is not None:
        env[fault_points.ENV] = setting
    return subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60)


def test_unarmed_points_do_nothing():
    assert fault_points.fault_point("fit.step") is None  # this process is not armed
    done = _run(None)
    assert done.returncode == 0 and done.stdout.split()[-1] == "survived"


def test_the_nth_arrival_signals_and_the_setting_is_not_inherited():
    done = _run("fit.step:2:SIGKILL")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["popped", "fit.step", "checkpoint.written", "fit.step"]


@pytest.mark.parametrize("setting", ["fit.steps:1:SIGKILL", "fit.step:0:SIGKILL",
                                     "fit.step:1:SIGNOPE", "fit.step"])
def test_a_bad_setting_is_refused(setting):
    with pytest.raises(fault_points.FaultPointError):
        fault_points.parse(setting)
    done = _run(setting)
    assert done.returncode == 1 and "FaultPointError" in done.stderr
