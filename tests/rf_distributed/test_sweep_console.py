"""What `rf sweep` prints: one line per report and per trial end, Tune's console off, and
the ranking of the best trials at the end."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

from rf_distributed.sweep_console import (
    ConsoleReporter,
    format_summary,
    quiet_tune,
    rank_trials,
)


def _trial(entropy: float, step: int | None = None, tid: str = "t1"):
    return SimpleNamespace(trial_id=tid, config={"recon": {"weights": {"entropy": entropy}}},
                           last_result={"step": step} if step else {}, checkpoint=None,
                           error_file=None)


def test_one_line_per_report_and_per_trial_end(capsys, tmp_path):
    reporter = ConsoleReporter("objective", ["heldout_psnr", "heldout_mask_iou"], steps=100)
    trial = _trial(0.1)
    reporter.on_trial_result(0, [], trial, {"step": 25, "objective": 16.32861,
                                            "heldout_psnr": 10.74, "loss/rgb": 0.1,
                                            "heldout_psnr/duck": 9.0})
    trial.last_result = {"step": 50}
    reporter.on_trial_complete(0, [], trial)
    done = _trial(1.0, 100, "t2")
    reporter.on_trial_complete(0, [], done)
    error = tmp_path / "error.txt"
    error.write_text("Traceback ...\nRuntimeError: boom\n")
    failed = _trial(1.0, 10, "t3")
    failed.error_file = str(error)
    reporter.on_trial_error(0, [], failed)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert re.fullmatch(r"\[\d\d:\d\d\] entropy=0\.1  step    25/100  objective 16\.3286  "
                        r"heldout_psnr 10\.7400", lines[0]), lines[0]
    assert lines[1].endswith("entropy=0.1  stopped by the scheduler at step 50")
    assert lines[2].endswith("entropy=1.0  finished at step 100")
    assert lines[3].endswith("entropy=1.0  failed: RuntimeError: boom")


def test_quiet_tune_turns_tune_console_off_and_restores_it():
    from ray.tune.utils.util import warn_if_slow

    before = warn_if_slow.DEFAULT_THRESHOLD
    os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
    with quiet_tune():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
        assert warn_if_slow.DEFAULT_THRESHOLD >= 5
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    assert warn_if_slow.DEFAULT_THRESHOLD == before
    with quiet_tune(False):
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ


def test_ranking_of_the_best_trials():
    def result(entropy, objective, step, error=None):
        return SimpleNamespace(config={"recon.weights.entropy": entropy}, error=error,
                               metrics={"objective": objective, "step": step,
                                        "trial_id": f"t{entropy}"})

    results = [result(0.1, 14.8, 100), result(1.0, 16.1, 50), result(3.0, 99.0, 10, "boom"),
               result(0.3, 15.0, 100)]
    rows = rank_trials(results, "objective", "max", lambda config: 100, top=5)
    assert [(r["trial"], r["step"], r["status"]) for r in rows] == [
        ("entropy=1.0", 50, "stopped"), ("entropy=0.3", 100, "finished"),
        ("entropy=0.1", 100, "finished")]  # the failed trial is not ranked
    assert rank_trials(results, "objective", "min", lambda c: 100)[0]["trial"] == "entropy=0.1"
    text = format_summary({"sweep": "s", "trials": 4, "finished": 2, "stopped": 1, "errors": 1,
                           "metric": "objective", "ranking": rows, "folder": "f",
                           "mlflow": "make ui"})
    table = text.splitlines()[1:6]
    assert table[0] == "best trials (objective):"
    assert table[2].split() == ["1", "entropy=1.0", "16.1000", "50", "stopped"]
