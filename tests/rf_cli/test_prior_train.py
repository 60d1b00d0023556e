"""`rf prior train`, end to end on a fake data package (random pairs in NovelViewPairs' item
format): it builds the data, trains, resumes its own run, and refuses in one line."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from rf_cli.main import build_parser, main
from rf_core.config import load_config, to_dict
from rf_core.prior.novel_view.model import NovelViewModel
from rf_core.prior.novel_view.train import TrainConfig

TINY = ["model.block_out_channels=[8,16]", "model.attention=[false,true]",
        "model.norm_num_groups=4", "model.attention_head_dim=8", "model.camera_hidden=16",
        "batch_size=4", "log_every=2", "val_every=2", "checkpoint_every=2", "val_pairs=2"]


@dataclasses.dataclass
class FakeDataConfig:
    size: int = 32
    objects: int = 4


class FakePairs:
    def __init__(self, folder, split="train"):
        size = json.loads((Path(folder) / "data.json").read_text())["size"]
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.items = [{"cond": torch.rand(4, size, size, generator=g),
                       "target": torch.rand(4, size, size, generator=g),
                       "camera": torch.randn(6, generator=g)}
                      for _ in range(8 if split == "train" else 3)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture
def built(monkeypatch):
    """A stand-in ``rf_core.prior.novel_view.data``; yields the configs build_dataset was given."""
    calls = []

    def build_dataset(out_dir, cfg, progress=print):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps(to_dict(cfg)))
        calls.append(cfg)
        return out

    module = types.ModuleType("rf_core.prior.novel_view.data")
    module.NovelViewDataConfig, module.build_dataset = FakeDataConfig, build_dataset
    module.NovelViewPairs = FakePairs
    monkeypatch.setitem(sys.modules, "rf_core.prior.novel_view.data", module)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)  # --threads must not leak into the other tests


def rf(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_trains_then_resumes_its_own_run(tmp_path, capsys, built):
    out, data = tmp_path / "run", tmp_path / "data"
    code, stdout, _ = rf(["prior", "train", "--out", str(out), "--data", str(data), "--size",
                          "16", "--steps", "4", "--threads", "1", "data.objects=3", *TINY],
                         capsys)
    assert code == 0, stdout
    assert built == [FakeDataConfig(size=16, objects=3)]
    assert "step 4/4" in stdout and f"wrote {out / 'model'}" in stdout
    model = NovelViewModel.from_pretrained(out / "model", size=16, kind="regressor")
    assert model.metadata["data"] == {"size": 16, "objects": 3}
    assert model.metadata["training"]["step"] == 4
    assert (out / "MODEL_CARD.md").is_file()
    # the same folder again, with only more steps: its config, data folder and data config
    code, stdout, _ = rf(["prior", "train", "--out", str(out), "--steps", "6", "--threads", "1"],
                         capsys)
    assert code == 0 and "resuming" in stdout and "step 6/6" in stdout
    assert built[-1] == FakeDataConfig(size=16, objects=3)
    assert json.loads((out / "summary.json").read_text())["step"] == 6


def test_the_time_budget_says_how_to_continue(tmp_path, capsys, built):
    out = tmp_path / "run"
    code, stdout, _ = rf(["prior", "train", "--out", str(out), "--data", str(tmp_path / "d"),
                          "--size", "16", "--steps", "50", "--max-minutes", "1e-9", *TINY],
                         capsys)
    assert code == 0 and "rerun the same command to continue" in stdout


@pytest.mark.parametrize("setup, extra, message", [
    ("foreign", [], "is not an `rf prior train` run"),
    ("ours", ["--size", "32"], "is a run with model.size=16, not 32"),
    ("none", ["colour=red"], "unknown config key 'colour'"),
    ("none", ["--data", "{out}"], "overlaps the input"),
])
def test_refusals_are_one_line_and_exit_2(tmp_path, capsys, built, setup, extra, message):
    out = tmp_path / "run"
    argv = ["prior", "train", "--out", str(out), "--size", "16", "--steps", "2", *TINY]
    if setup == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif setup == "ours":
        assert rf([*argv, "--data", str(tmp_path / "d")], capsys)[0] == 0
    calls = len(built)
    code, _, err = rf([*argv, *(e.format(out=out) for e in extra)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rf: error:") and message in lines[0]
    assert len(built) == calls  # refused before building any data
    if setup == "foreign":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_help_examples_build_the_config():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prior"]
    train_parser = next(a for a in sub._actions if a.dest == "prior").choices["train"]
    override = re.search(r"e\.g\. (\S+=\S+)",
                         next(a.help for a in train_parser._actions if a.dest == "overrides"))
    assert load_config(TrainConfig, overrides=[override.group(1)]).lr == 2e-3
    for line in train_parser.epilog.splitlines()[1:]:
        args, extra = parser.parse_known_args(line.split()[1:])
        load_config(TrainConfig, overrides=[*args.overrides, *extra])


def test_trains_on_a_real_tiny_dataset(tmp_path, capsys, monkeypatch):
    """The real data package: a few rendered objects, then two steps."""
    pytest.importorskip("pybullet")
    monkeypatch.delitem(sys.modules, "rf_core.prior.novel_view.data", raising=False)
    pytest.importorskip("rf_core.prior.novel_view.data")
    threads = torch.get_num_threads()
    data = ["data.objects=3", "data.val_objects=1", "data.input_views_per_object=1",
            "data.target_views_per_object=2", "data.supersample=1"]
    try:
        code, stdout, _ = rf(["prior", "train", "--out", str(tmp_path / "run"), "--data",
                              str(tmp_path / "data"), "--size", "16", "--steps", "2",
                              "--threads", "1", *data, *TINY], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stdout
    model = NovelViewModel.from_pretrained(tmp_path / "run" / "model", size=16)
    assert model.metadata["data"]["objects"] == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_pairs"] == 2 * 1 * 3  # train objects x input views x views
