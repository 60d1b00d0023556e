"""The fitting loop (rf_core.fitting.engine): callbacks, early stops, history files; and the metric
registry every caller ranks by."""

from __future__ import annotations

import json

import pytest

from rf_core.evaluation.metric_registry import (
    METRICS,
    higher_is_better,
    needs_gt,
    objective_metrics,
    summary_metrics,
)
from rf_core.fitting.engine import (
    Callback,
    Checkpointer,
    HistoryLog,
    StepHook,
    StopAfter,
    fit,
    last_history_row,
    trim_history,
)


class Counter:
    """A stand-in reconstruction: ``step()`` counts, ``state_dict()`` is the count."""

    def __init__(self, start: int = 0):
        self.step_count = start

    def step(self) -> dict:
        self.step_count += 1
        return {"step": self.step_count - 1, "loss/total": 1.0 / self.step_count}

    def state_dict(self) -> dict:
        return {"step": self.step_count}


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_start(self, recon):
        self.events.append(("start", recon.step_count))

    def on_step(self, recon, metrics):
        self.events.append(("step", recon.step_count))

    def on_end(self, recon, metrics, finished):
        self.events.append(("end", recon.step_count, finished))


def test_fit_runs_to_the_last_step_and_calls_every_hook_in_order():
    rec = Recorder()
    result = fit(Counter(), 3, [rec])
    assert rec.events == [("start", 0), ("step", 1), ("step", 2), ("step", 3), ("end", 3, True)]
    assert result.finished and result.start_step == 0 and result.metrics["step"] == 2


def test_a_callback_stops_the_loop_and_every_callback_still_sees_that_step():
    rec = Recorder()
    result = fit(Counter(), 10, [StopAfter(2), rec])
    assert not result.finished
    assert rec.events == [("start", 0), ("step", 1), ("step", 2), ("end", 2, False)]


def test_stop_after_a_step_already_reached_runs_no_step():
    recon = Counter(start=5)
    result = fit(recon, 10, [StopAfter(4)])
    assert recon.step_count == 5 and result.metrics == {} and result.start_step == 5


def test_resumed_fit_runs_only_the_steps_left():
    seen = []
    result = fit(Counter(start=4), 6, [StepHook(lambda s, t, m: seen.append((s, t)), 6)])
    assert seen == [(5, 6), (6, 6)] and result.start_step == 4


def test_a_finished_reconstruction_runs_no_step():
    rec = Recorder()
    result = fit(Counter(start=3), 3, [rec])
    assert result.finished and result.metrics == {}
    assert rec.events == [("start", 3), ("end", 3, True)]


def test_history_and_checkpoints_land_on_their_steps(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr("rf_core.fitting.engine.save_checkpoint",
                        lambda folder, state, text: saved.append(state["step"]))
    history = tmp_path / "history.jsonl"
    fit(Counter(), 7, [HistoryLog(history, every=3, total=7),
                       Checkpointer(tmp_path / "ckpt", every=3, total=7, config_text="x")])
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 5, 6]  # 0-based step of steps 3, 6 and the last
    assert saved == [3, 6, 7]
    saved.clear()
    fit(Counter(), 7, [Checkpointer(tmp_path / "ckpt", every=3, total=7, config_text="x"),
                       StopAfter(4)])
    assert saved == [3, 4]  # the early stop saves exactly where it stopped


def test_a_crash_inside_a_step_ends_the_loop_without_on_end():
    class Boom(Counter):
        def step(self):
            if self.step_count == 1:
                raise RuntimeError("boom")
            return super().step()

    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        fit(Boom(), 5, [rec])
    assert rec.events == [("start", 0), ("step", 1)]


def test_history_helpers_skip_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "history.jsonl"
    assert last_history_row(path) == {}
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"ste')
    assert last_history_row(path) == {"step": 2}
    trim_history(path, 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_metric_registry_directions_and_ground_truth():
    assert objective_metrics() == ("input_psnr", "input_mask_iou", "heldout_psnr",
                                   "heldout_ssim", "heldout_mask_iou", "chamfer_l1", "fscore",
                                   "clip_input_similarity")
    assert summary_metrics()[-1] == "total_seconds"
    assert needs_gt("heldout_psnr") and needs_gt("chamfer_l1") and not needs_gt("input_psnr")
    assert not needs_gt("loss/rgb")
    assert higher_is_better("fscore") and not higher_is_better("chamfer_l1")
    assert not higher_is_better("heldout_depth_error") and not higher_is_better("loss/rgb")
    assert not higher_is_better("chamfer_l1/duck") and higher_is_better("heldout_psnr/worst")
    assert higher_is_better("heldout_psnr/duck")  # per-object columns follow their metric
    assert all(spec.name == name and spec.doc for name, spec in METRICS.items())
