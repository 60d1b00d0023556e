"""Reading a dataset: folder layouts, CSV/JSONL manifests, and bad rows that do not stop
the rest."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rf_core.input.dataset_listing import DatasetError, read_dataset


def _png(path: Path, mode="RGBA") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, len(mode)), 200, np.uint8).squeeze(), mode).save(path)
    return path


def _gt(folder: Path) -> Path:
    (folder / "cameras.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "cameras.json").write_text("{}")
    _png(folder / "rgb" / "000.png", "RGB")
    _png(folder / "mask" / "000.png", "L")
    return folder


def test_folder_of_objects_all_layouts(tmp_path):
    _png(tmp_path / "cat" / "image.png", "RGB")
    _png(tmp_path / "cat" / "mask.png", "L")
    _png(tmp_path / "teddy" / "rgba.png")
    _png(tmp_path / "mug" / "photo.jpg", "RGB")
    _gt(tmp_path / "duck_gt")
    _png(tmp_path / "loose ball.png")
    (tmp_path / "notes.txt").write_text("listed as skipped")
    _png(tmp_path / "two" / "a.png")
    _png(tmp_path / "two" / "b.png")
    objects, bad = read_dataset(tmp_path)
    by_name = {o.name: o for o in objects}
    assert sorted(by_name) == ["cat", "duck_gt", "loose_ball", "mug", "teddy"]
    assert by_name["cat"].mask == tmp_path / "cat" / "mask.png"
    assert by_name["teddy"].image.name == "rgba.png" and by_name["teddy"].mask is None
    assert by_name["mug"].image.name == "photo.jpg"
    assert by_name["duck_gt"].gt == tmp_path / "duck_gt"
    assert by_name["duck_gt"].image == tmp_path / "duck_gt" / "rgb" / "000.png"
    failed = [b for b in bad if not b.skipped]
    assert [b.name for b in failed] == ["two"] and "2 images" in failed[0].error
    assert [Path(b.where).name for b in bad if b.skipped] == ["notes.txt"]


def test_csv_manifest_good_and_bad_rows(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "objs" / "b" / "image.png", "RGB")
    _png(tmp_path / "objs" / "b" / "mask.png", "L")
    _gt(tmp_path / "gt")
    (tmp_path / "m.csv").write_text(
        "name,image,mask,gt,input_view\n"
        "first,a.png,,,\n"
        ",objs/b/image.png,objs/b/mask.png,,\n"
        "withgt,gt/rgb/000.png,gt/mask/000.png,gt,0\n"
        "gone,missing.png,,,\n"
        "badview,a.png,,,two\n"
        "first,a.png,,,\n"
        "nogt,a.png,,nofolder,\n")
    objects, bad = read_dataset(tmp_path / "m.csv")
    assert [o.name for o in objects] == ["first", "b", "withgt"]
    assert objects[1].mask == tmp_path / "objs" / "b" / "mask.png"  # relative to the manifest
    assert objects[2].gt == tmp_path / "gt" and objects[2].input_view == 0
    reasons = {b.where: b.error for b in bad}
    assert "not found" in reasons["m.csv line 5"]
    assert "not an integer" in reasons["m.csv line 6"]
    assert "gt 'nofolder' not found" in reasons["m.csv line 8"]
    assert any("duplicate object name 'first'" in b.error for b in bad)
    assert len(bad) == 4


def test_jsonl_manifest_and_unknown_columns(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "name": "ok"}) + "\n\n"
        + "{not json\n"
        + json.dumps({"image": "a.png", "colour": "red", "name": "x"}) + "\n"
        + json.dumps(["a.png"]) + "\n"
        + json.dumps({"image": "a.png", "name": "meshonly", "mesh": "pybullet_data:duck.obj"})
        + "\n")
    objects, bad = read_dataset(tmp_path / "m.jsonl")
    assert [o.name for o in objects] == ["ok"]
    errors = [b.error for b in bad]
    assert "not valid JSON" in errors[0]
    assert "unknown column(s) colour" in errors[1] and bad[1].name == "x"
    assert "JSON object" in errors[2]
    assert "needs the gt views" in errors[3]


def test_whole_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        read_dataset(tmp_path / "empty")
    (tmp_path / "m.csv").write_text("photo,mask\nx.png,\n")
    with pytest.raises(DatasetError, match="'image' column"):
        read_dataset(tmp_path / "m.csv")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither a folder"):
        read_dataset(tmp_path / "m.txt")


def test_manifest_initializer_column(tmp_path):
    """The word textual inversion starts from is given per object; a phrase is a bad row."""
    _png(tmp_path / "cat.png")
    _png(tmp_path / "mug.png")
    _png(tmp_path / "toy.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"image": "cat.png", "initializer": "cat"}, {"image": "mug.png"},
        {"image": "toy.png", "initializer": "a toy"}]))
    objects, bad = read_dataset(manifest)
    assert {o.name: o.initializer for o in objects} == {"cat": "cat", "mug": None}
    assert len(bad) == 1 and "initializer 'a toy' must be one word" in bad[0].error


def test_cli_initializer_flag_parses():
    from rf_cli.main import build_parser

    args = build_parser().parse_args(["invert", "x.png", "--model", "tiny", "--out", "e.st",
                                      "--initializer", "teddy"])
    assert args.initializer == "teddy"
    args = build_parser().parse_args(["reconstruct", "x.png", "--invert", "--initializer", "cat",
                                      "--out", "o"])
    assert args.initializer == "cat"
