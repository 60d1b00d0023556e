"""Verified checkpoints: every way a checkpoint folder breaks is one actionable line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rf_core.config import load_config
from rf_core.files.checkpoint import (
    CheckpointError,
    load_checkpoint,
    pack_checkpoint,
    packed_step,
    previous_path,
    remove_checkpoint,
    restore_previous,
    save_checkpoint,
    unpack_checkpoint,
)
from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig
from rf_core.progress import quiet

TINY = ["steps=4", "input_size=16", "input_rays=64", "sds_size=16", "renderer.num_samples=8",
        "renderer.occupancy.resolution=8", "field.grid.n_levels=2",
        "field.grid.log2_hashmap_size=8", "levels=[0,2,2,2]", "weights.sds=0"]


def _state(step: int = 400) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"step": step,
            "field": {"w": torch.randn(3, 4, generator=gen), "b": torch.zeros(4)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1},
            "flags": torch.tensor([True, False]), "pair": (1, "a"), "none": None}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _error(folder: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and "--overwrite" in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "checkpoint", _state(), "x: 1\n")


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "state.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "state.safetensors"))


def test_round_trip_writes_a_manifest(ckpt):
    assert {p.name for p in ckpt.iterdir()} == {"config.yaml", "state.safetensors",
                                                "state.json", "manifest.json"}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["step"] == 400
    assert manifest["tensors"]["state.1.0"]["shape"] == [3, 4]  # field.w, by position
    assert manifest["tensors"]["state.1.0"]["dtype"] == "float32"
    assert set(manifest["files"]) == {"state.json", "config.yaml"}
    state, text = load_checkpoint(ckpt)
    assert _same(state, _state()) and text == "x: 1\n"
    assert not previous_path(ckpt).exists()  # nothing was replaced yet


def test_truncated_safetensors(ckpt):
    data = (ckpt / "state.safetensors").read_bytes()
    (ckpt / "state.safetensors").write_bytes(data[: len(data) - 7])
    assert "state.safetensors is truncated or corrupt" in _error(ckpt)


def test_flipped_byte_is_a_hash_mismatch(ckpt):
    data = bytearray((ckpt / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor's data
    (ckpt / "state.safetensors").write_bytes(bytes(data))
    msg = _error(ckpt)
    assert "in state.safetensors does not match its sha256 in manifest.json" in msg
    assert "tensor 'state." in msg


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("state.1.0"))
    msg = _error(ckpt)
    assert "tensor 'state.1.0' listed in manifest.json is missing from state.safetensors" in msg


def test_extra_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update(intruder=torch.ones(2)))
    assert "state.safetensors holds tensor 'intruder' that manifest.json does not list" in \
        _error(ckpt)


def test_wrong_shape(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"state.1.0": t["state.1.0"].reshape(4, 3)}))
    assert "tensor 'state.1.0' in state.safetensors has shape [4, 3], manifest.json says [3, 4]" \
        in _error(ckpt)


def test_garbled_state_json(ckpt):
    (ckpt / "state.json").write_text('{"__dict__": [[')
    assert "state.json does not match its sha256 in manifest.json" in _error(ckpt)
    (ckpt / "manifest.json").unlink()  # without a manifest the parser's complaint is wrapped
    assert "state.json is not valid JSON (Expecting value at line 1 column 16)" in _error(ckpt)
    (ckpt / "state.json").write_text('{"nothing": 1}')
    assert "state.json is malformed" in _error(ckpt)


def test_missing_files(ckpt, tmp_path):
    (ckpt / "config.yaml").unlink()
    assert "config.yaml is missing" in _error(ckpt)
    assert "the folder is missing" in _error(tmp_path / "nowhere")


def test_garbled_manifest(ckpt):
    (ckpt / "manifest.json").write_text("{")
    assert "manifest.json is not valid JSON" in _error(ckpt)


def test_old_checkpoint_without_manifest_loads(ckpt):
    (ckpt / "manifest.json").unlink()
    state, text = load_checkpoint(ckpt)
    assert _same(state, _state()) and text == "x: 1\n"
    _edit_tensors(ckpt, lambda t: t.pop("state.1.0"))  # still caught, without hashes
    assert "tensor 'state.1.0' named in state.json is missing from state.safetensors" in \
        _error(ckpt)


def test_previous_checkpoint_is_kept_and_usable(tmp_path):
    folder = tmp_path / "checkpoint"
    for step in (100, 200, 300):
        save_checkpoint(folder, _state(step), f"step: {step}\n")
    prev = previous_path(folder)
    assert prev == tmp_path / ".checkpoint.prev"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.prev", "checkpoint"]
    assert load_checkpoint(prev)[1] == "step: 200\n"  # only the latest replaced one is kept

    (folder / "state.safetensors").write_bytes(b"")
    msg = _error(folder)
    assert "state.safetensors is truncated or corrupt" in msg
    assert f"an earlier checkpoint from step 200 is kept at {prev}" in msg
    assert f"rm -r {folder} && mv {prev} {folder}" in msg
    with pytest.warns(RuntimeWarning, match="resuming from an earlier checkpoint from step 200"):
        state, text = load_checkpoint(folder, fallback=True)
    assert _same(state, _state(200)) and text == "step: 200\n"

    shutil.rmtree(folder)  # what the message says to do
    prev.rename(folder)
    assert load_checkpoint(folder)[0]["step"] == 200


def test_a_broken_previous_checkpoint_is_not_offered(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, _state(100), "x: 1\n")
    save_checkpoint(folder, _state(200), "x: 1\n")
    (previous_path(folder) / "config.yaml").unlink()
    (folder / "config.yaml").unlink()
    msg = _error(folder)
    assert "earlier" not in msg
    with pytest.raises(CheckpointError):
        load_checkpoint(folder, fallback=True)


def test_crash_between_the_renames_points_at_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, _state(100), "x: 1\n")
    save_checkpoint(folder, _state(200), "x: 1\n")
    shutil.rmtree(folder)
    msg = _error(folder)
    assert "the folder is missing" in msg and "from step 100" in msg


# ---------------------------------------------------------------------------- applying a state


def _recon(overrides=()) -> Reconstructor:
    cfg = load_config(ReconstructorConfig, overrides=[*TINY, *overrides])
    return Reconstructor(cfg, torch.ones(3, 16, 16), torch.ones(1, 16, 16), prior=None,
                         device="cpu")


def _apply_error(recon: Reconstructor, state: dict) -> str:
    with pytest.raises(CheckpointError) as info:
        recon.load_state_dict(state)
    msg = str(info.value)
    assert "\n" not in msg and "--overwrite" in msg, msg
    return msg


def test_reconstructor_rejects_a_wrong_shaped_tensor():
    recon = _recon()
    state = recon.state_dict()
    key, value = next(iter(state["field"].items()))
    state["field"][key] = torch.zeros(value.numel() + 1)
    state["step"] = 3
    msg = _apply_error(recon, state)
    assert f"tensor 'field.{key}' has shape [{value.numel() + 1}], this model expects " \
           f"{list(value.shape)}" in msg
    assert recon.step_count == 0  # checked before anything changed

    state = recon.state_dict()
    del state["occupancy"]["density"]
    assert "tensor 'occupancy.density' is missing" in _apply_error(recon, state)
    state = recon.state_dict()
    state["field"]["intruder"] = torch.zeros(1)
    assert "tensor 'field.intruder' is not part of this model" in _apply_error(recon, state)
    state = recon.state_dict()
    del state["optimizer"]
    assert "its state has no 'optimizer'" in _apply_error(recon, state)


def test_reconstructor_rejects_a_checkpoint_of_another_config(tmp_path):
    recon = _recon()
    recon.step()
    save_checkpoint(tmp_path / "ckpt", recon.state_dict(), "x: 1\n")
    state, _ = load_checkpoint(tmp_path / "ckpt")
    _recon().load_state_dict(state)  # the same config resumes
    other = _recon(["field.grid.log2_hashmap_size=9"])
    assert "this model expects" in _apply_error(other, state)


def test_corrupt_inversion_checkpoint_is_one_line(tiny_prior, tmp_path):
    from rf_core.prior import AugmentConfig, InversionConfig, invert

    cfg = InversionConfig(token="<c>", initializer="toy", steps=1, batch_size=1, grad_accum=1,
                          checkpoint_every=0, augment=AugmentConfig(blur_p=0.0))
    rgb, mask = torch.ones(3, 32, 32), torch.ones(1, 32, 32)
    path = tmp_path / "state.ckpt"
    with quiet():
        result = invert(tiny_prior, rgb, mask, cfg, checkpoint=path)
    assert path.is_dir()  # a checkpoint folder, as a reconstruction's
    tensors = path / "state.safetensors"
    data = tensors.read_bytes()

    def error() -> str:
        with pytest.raises(CheckpointError) as info, quiet():
            invert(tiny_prior, rgb, mask, cfg, checkpoint=path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and "delete it" in msg, msg
        return msg

    tensors.write_bytes(data[: len(data) // 2])
    assert "state.safetensors is truncated or corrupt" in error()
    at = data.find(result.vector.numpy().tobytes())
    assert at > 0
    flipped = bytearray(data)
    flipped[at] ^= 0x01
    tensors.write_bytes(bytes(flipped))
    assert "does not match its sha256" in error()


def test_an_older_inversion_checkpoint_starts_over_with_a_note(tiny_prior, tmp_path, caplog):
    """Before checkpoint folders, an inversion saved one torch.save file at the same path."""
    from rf_core.prior import AugmentConfig, InversionConfig, invert

    cfg = InversionConfig(token="<c>", initializer="toy", steps=2, batch_size=1, grad_accum=1,
                          checkpoint_every=1, augment=AugmentConfig(blur_p=0.0))
    rgb, mask = torch.ones(3, 32, 32), torch.ones(1, 32, 32)
    path = tmp_path / ".e.safetensors.ckpt"
    torch.save({"config": {}, "step": 1, "vector": torch.zeros(32)}, path)
    with quiet():
        result = invert(tiny_prior, rgb, mask, cfg, checkpoint=path)
    assert result.resumed_from == 0 and len(result.losses) == 2
    notes = [r.getMessage() for r in caplog.records if "older rf" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and notes[0].startswith("rf: note: ")
    assert load_checkpoint(path)[0]["step"] == 2
    with quiet():  # and it is a checkpoint like any other now: it resumes
        again = invert(tiny_prior, rgb, mask, dataclasses.replace(cfg, steps=3),
                       checkpoint=path)
    assert again.resumed_from == 2


def test_packed_checkpoint_round_trip(tmp_path):
    folder = save_checkpoint(tmp_path / "a", _state(100), "x: 1\n")
    data = pack_checkpoint(folder)
    assert pack_checkpoint(folder) == data  # the same folder packs to the same bytes
    assert packed_step(data) == 100 and packed_step(None) is None
    assert pack_checkpoint(tmp_path / "missing") is None
    there = tmp_path / "b"
    unpack_checkpoint(data, there)
    state, text = load_checkpoint(there)
    assert _same(state, _state(100)) and text == "x: 1\n"
    unpack_checkpoint(pack_checkpoint(save_checkpoint(tmp_path / "c", _state(200), "y\n")),
                      there)
    assert load_checkpoint(there)[0]["step"] == 200
    assert load_checkpoint(previous_path(there))[0]["step"] == 100  # kept, as by a save
    with pytest.raises(CheckpointError, match="not a packed checkpoint"):
        unpack_checkpoint(b"garbage", tmp_path / "d")
    broken = bytearray(data)
    at = broken.find(_state(100)["field"]["w"].numpy().tobytes())
    broken[at] ^= 0x01
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        unpack_checkpoint(bytes(broken), tmp_path / "d")
    assert not (tmp_path / "d").exists()
    (folder / "config.yaml").unlink()  # an unusable folder is not sent
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        pack_checkpoint(folder)


def test_restore_and_remove(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, _state(100), "x: 1\n")
    save_checkpoint(folder, _state(200), "x: 1\n")
    shutil.rmtree(folder)  # killed between the two renames
    assert restore_previous(folder) and load_checkpoint(folder)[0]["step"] == 100
    assert not restore_previous(folder)
    save_checkpoint(folder, _state(300), "x: 1\n")
    remove_checkpoint(folder)
    assert list(tmp_path.iterdir()) == []
