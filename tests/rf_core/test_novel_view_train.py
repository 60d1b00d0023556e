"""The novel-view trainer: schedule and batch order, metrics by hand, resume == uninterrupted,
the time budget, reproducibility, refusals, and the model card."""

from __future__ import annotations

import csv

import pytest
import torch

from rf_core.errors import OutputError, UserError
from rf_core.prior.novel_view.card import write_card
from rf_core.prior.novel_view.model import NovelViewConfig, NovelViewModel
from rf_core.prior.novel_view.train import TrainConfig, batch_indices, learning_rate, train
from rf_core.prior.novel_view.validate import evaluate, validation_indices

S = 16
TINY_MODEL = dict(size=S, block_out_channels=[8, 16], attention=[False, True],
                  norm_num_groups=4, attention_head_dim=8, camera_hidden=16, sample_steps=2)


class FakePairs:
    """Random pairs in NovelViewPairs' item format: cond, target [4, S, S] in [0, 1], camera [6]."""

    def __init__(self, n: int, seed: int, size: int = S):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"cond": torch.rand(4, size, size, generator=g),
                       "target": torch.rand(4, size, size, generator=g),
                       "camera": torch.randn(6, generator=g)} for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def splits(size=S):
    data = {"train": FakePairs(12, 0, size), "val": FakePairs(5, 1, size)}
    return lambda split: data[split]


def config(kind="regressor", **kw) -> TrainConfig:
    return TrainConfig(model=NovelViewConfig(kind=kind, **TINY_MODEL), **{
        "steps": 8, "batch_size": 4, "warmup_steps": 2, "log_every": 2, "val_every": 4,
        "checkpoint_every": 4, "val_pairs": 3, **kw})


def run(out, cfg, open_split=None, progress=lambda line: None):
    return train(out, "unused-data-folder", cfg, progress, open_split=open_split or splits())


def weights(folder):
    return NovelViewModel.from_pretrained(folder).state_dict()


# ---------------------------------------------------------------------------- pure pieces


def test_learning_rate_warms_up_then_follows_the_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=104, final_lr_fraction=0.1)
    assert [learning_rate(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(54, cfg) == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert learning_rate(104, cfg) == pytest.approx(0.1)
    constant = TrainConfig(lr=0.5, warmup_steps=0, lr_schedule="constant")
    assert learning_rate(0, constant) == learning_rate(10**6, constant) == 0.5


def test_batches_walk_seeded_permutations_epoch_by_epoch():
    n, b = 10, 4
    stream = [i for step in range(5) for i in batch_indices(n, b, seed=3, step=step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch its own order
    assert batch_indices(n, b, 3, 2) == batch_indices(n, b, 3, 2)  # a pure function
    assert batch_indices(n, b, 4, 0) != batch_indices(n, b, 3, 0)


def test_evaluate_scores_by_hand():
    """target 0.6, cond 0.5: the copy baseline's MSE is 0.01 -> 20 dB; masks 1 vs 0.5 > 0.5."""
    pairs = [{"cond": torch.full((4, S, S), 0.5), "target": torch.full((4, S, S), 0.6),
              "camera": torch.zeros(6)}]
    pairs[0]["cond"][3, :, : S // 2] = 1.0  # left half inside, right half at 0.5 (outside)
    pairs[0]["target"][3] = 1.0
    model = NovelViewModel(NovelViewConfig(**TINY_MODEL))
    m = evaluate(model, pairs, [0])
    assert m["copy_psnr"] == pytest.approx(20.0)
    assert m["copy_iou"] == pytest.approx(0.5)
    assert 0 <= m["val_iou"] <= 1 and m["val_psnr"] > 0


def test_validation_leaves_out_the_pairs_that_copy_their_input():
    pairs = FakePairs(10, 0).items
    for i in (0, 3, 4):
        pairs[i]["target"] = pairs[i]["cond"].clone()
    assert validation_indices(pairs, 100) == [1, 2, 5, 6, 7, 8, 9]
    assert validation_indices(pairs, 3) == [1, 6, 9]  # spread over the others, ends included
    assert validation_indices(pairs[3:5], 3) == []


# ---------------------------------------------------------------------------- the run


class Crash(Exception):
    """The injected interruption of a training run."""


@pytest.mark.parametrize("kind, ema", [("regressor", None), ("diffusion", 0.9)])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, kind, ema):
    cfg = config(kind, ema_decay=ema)
    whole = run(tmp_path / "whole", cfg)
    assert whole.step == 8 and whole.stopped == "finished"

    def crash_at_step_6(line):
        if line.startswith("step 6/"):
            raise Crash  # after the step-4 checkpoint, before the step-8 one

    with pytest.raises(Crash):
        run(tmp_path / "cut", cfg, progress=crash_at_step_6)
    lines = []
    resumed = run(tmp_path / "cut", cfg, progress=lines.append)
    assert lines[0].startswith("resuming") and "step 4/8" in lines[0]
    expected, got = weights(whole.model_dir), weights(resumed.model_dir)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
    assert resumed.metrics == whole.metrics
    with open(tmp_path / "cut" / "curve.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [2, 4, 6, 8]  # the rows after the checkpoint were not kept twice


def test_the_same_seed_reproduces_the_run_and_another_does_not(tmp_path):
    a = run(tmp_path / "a", config(steps=4))
    b = run(tmp_path / "b", config(steps=4))
    c = run(tmp_path / "c", config(steps=4, seed=1))
    assert a.metrics == b.metrics and a.metrics != c.metrics


def test_the_time_budget_stops_cleanly_and_a_rerun_continues(tmp_path):
    out = tmp_path / "run"
    cut = run(out, config(steps=16, max_minutes=1e-9))
    assert cut.stopped == "time budget" and cut.step < 16
    assert (out / "model" / "model.safetensors").is_file()
    assert "time budget" in (out / "MODEL_CARD.md").read_text()
    done = run(out, config(steps=16))  # the budget may change on a resume
    assert done.stopped == "finished" and done.step == 16


def test_a_finished_run_can_be_extended(tmp_path):
    out = tmp_path / "run"
    run(out, config(steps=4))
    lines = []
    more = run(out, config(steps=6), progress=lines.append)
    assert more.step == 6 and "step 4/6" in lines[0]


def test_outputs_that_are_not_this_run_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an `rf prior train` run"):
        run(foreign, config())
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "run"
    run(out, config(steps=2))
    with pytest.raises(UserError, match="model.kind=.regressor., not .diffusion.; resume"):
        run(out, config("diffusion", steps=4))
    with pytest.raises(UserError, match="pass --size 8"):
        run(tmp_path / "small", config(), open_split=splits(size=8))


# ---------------------------------------------------------------------------- the card


def test_the_card_reports_the_run_and_keeps_added_sections(tmp_path):
    out = tmp_path / "run"
    result = run(out, config(steps=4))
    card = (out / "MODEL_CARD.md").read_text()
    m = result.metrics
    assert f"| model | {m['val_psnr']:.2f} | {m['val_iou']:.3f} |" in card
    assert f"| copy the conditioning view | {m['copy_psnr']:.2f} |" in card
    assert "4 of 4 (finished)" in card and "| 4 | " in card
    write_card(out, {"Evaluation objects": "| object | PSNR |\n|---|---|\n| duck | 18.1 |"})
    run(out, config(steps=6))  # the trainer rewrites the card at its end
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Evaluation objects" in card and "| duck | 18.1 |" in card
    assert "6 of 6 (finished)" in card
